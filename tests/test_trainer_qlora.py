"""QLoRA on CPU: prepare_model_for_kbit_training == peft's, 4-bit NF4 training, peft loads the adapter onto the same
4-bit base with matching logits, and a merged 16-bit export from the QLoRA adapter."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_trainer import PeftModel, PeftTrainer, prepare_model_for_kbit_training
from peft_trainer.lora.layer import Linear
from tests.conftest import tiny_llama
from tests.trainer_helpers import adapter_file, fast_args, token_dataset

pytest.importorskip("bitsandbytes")

BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    return path


def _load_4bit(path):
    config = BitsAndBytesConfig(**BNB, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


def _state(model):
    return {n: (type(p).__name__, p.dtype, p.requires_grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["fp16", "4bit", "8bit"])
def test_prepare_model_for_kbit_training_matches_peft(base_dir, kind):
    def load():
        if kind == "4bit":
            return _load_4bit(base_dir)
        if kind == "8bit":
            return AutoModelForCausalLM.from_pretrained(
                base_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
            )
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16)

    ours, theirs = prepare_model_for_kbit_training(load()), peft.prepare_model_for_kbit_training(load())
    assert _state(ours) == _state(theirs)
    assert not any(p.requires_grad for p in ours.parameters())
    quantized = {"4bit": {("Params4bit", torch.uint8)}, "8bit": {("Int8Params", torch.int8)}}.get(kind, set())
    assert {(type(p).__name__, p.dtype) for p in ours.parameters()} == {("Parameter", torch.float32)} | quantized
    assert ours.is_activation_checkpointing is theirs.is_activation_checkpointing is (kind != "fp16")
    ids = torch.randint(1, 100, (1, 5))
    embeds = [ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids)]
    assert embeds[0].requires_grad is embeds[1].requires_grad is (kind != "fp16")


@pytest.fixture(scope="module")
def qlora(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    args = fast_args(
        out, max_steps=3, load_in_4bit=True, bnb_4bit_compute_dtype="float32", activation_checkpointing=True,
        base_model_name_or_path="my-org/tiny-llama",
    )  # fmt: skip
    trainer = PeftTrainer(str(base_dir), args, train_dataset=token_dataset(12))
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    before = {
        "packed": q_proj.base_layer.weight.data.clone(),
        "lora": {k: v.detach().clone() for k, v in trainer.model.adapter_tensors("default").items()},
    }
    trainer.train()
    trainer.save_model()
    return trainer, out, before


def test_qlora_trains_lora_only_on_a_4bit_base(qlora):
    trainer, out, before = qlora
    base = trainer.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert base.is_loaded_in_4bit and isinstance(q_proj, Linear)
    assert type(q_proj.base_layer.weight).__name__ == "Params4bit" and q_proj.base_layer.weight.quant_type == "nf4"
    assert q_proj.base_layer.weight.quant_state.nested  # double quantization
    assert torch.equal(q_proj.base_layer.weight.data, before["packed"])  # the base did not change
    after = trainer.model.adapter_tensors("default")
    assert all(not torch.equal(before["lora"][k], after[k]) for k in after)
    saved = adapter_file(out)
    assert saved.keys() == after.keys() and {t.dtype for t in saved.values()} == {torch.float32}
    config = peft.LoraConfig.from_pretrained(str(out))  # plain PEFT format, nothing quantization-specific
    assert config.peft_type == peft.PeftType.LORA and config.base_model_name_or_path == "my-org/tiny-llama"


def test_peft_loads_qlora_adapter_onto_same_4bit_base(qlora, base_dir):
    trainer, out, _ = qlora
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(_load_4bit(base_dir), str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_merged_16bit_export_from_qlora_adapter(qlora, base_dir, tmp_path):
    _, out, _ = qlora
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(out))
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        merged = model.merge_and_unload()
        merged.save_pretrained(tmp_path / "merged")
        assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
            "config.json",
            "generation_config.json",
            "model.safetensors",
        ]
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert reloaded.dtype == torch.bfloat16
        assert not any("lora" in n for n, _ in reloaded.named_parameters())
        exported = reloaded(input_ids=ids).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)(input_ids=ids).logits.float()
    torch.testing.assert_close(exported, unmerged, rtol=0, atol=3e-2)
    assert (exported - plain).abs().max() > 10 * (exported - unmerged).abs().max()  # the adapter is in there


def test_8bit_base_trains(base_dir, tmp_path):
    trainer = PeftTrainer(
        str(base_dir), fast_args(tmp_path, max_steps=2, load_in_8bit=True), train_dataset=token_dataset(8)
    )
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_8bit and type(base.model.layers[0].mlp.up_proj.base_layer.weight).__name__ == "Int8Params"
    before = {k: v.detach().clone() for k, v in trainer.model.adapter_tensors("default").items()}
    trainer.train()
    after = trainer.model.adapter_tensors("default")
    assert all(not torch.equal(before[k], after[k]) for k in after)


def test_bf16_trained_qlora_model_computes_what_its_saved_adapter_does(base_dir, tmp_path):
    """accelerate runs training's forward under bf16 autocast; after train() the model computes in its own dtypes
    again (peft + Trainer stay in autocast: 2.9e-3 apart from their own file here), and evaluate() keeps autocast."""
    args = fast_args(
        tmp_path, max_steps=4, load_in_4bit=True, bf16=True, lora_dropout=0.05, eval_strategy="steps", eval_steps=4
    )
    trainer = PeftTrainer(str(base_dir), args, train_dataset=token_dataset(12), eval_dataset=token_dataset(8, seed=1))
    trainer.train()
    trainer.save_model()
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = trainer.model.eval()(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(_load_4bit(base_dir), str(tmp_path)).eval()(input_ids=ids).logits
        bf16 = _load_4bit(base_dir)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_autocast = peft.PeftModel.from_pretrained(bf16, str(tmp_path)).eval()(input_ids=ids).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (in_autocast - theirs).abs().max() > 1e-4  # what the test tells apart: autocast changes these logits
    during = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert trainer.evaluate()["eval_loss"] == during[-1]
