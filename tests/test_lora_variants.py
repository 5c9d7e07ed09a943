"""LoRA variants against peft 0.21.2 as the oracle: DoRA (Linear, GPT-2 Conv1D, Embedding, 4-bit base) and lora_bias.

Each: the same files give the same logits both ways, one training step gives the same gradients, merge equals the
unmerged forward and unmerge restores the weights, a mixed-adapter batch equals each adapter alone.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_trainer as ours
from peft_trainer import PeftTrainingArguments

from .conftest import tiny_gpt2, tiny_llama

VARIANTS = {
    "dora-llama": (tiny_llama, dict(use_dora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])),
    "dora-gpt2": (tiny_gpt2, dict(use_dora=True, target_modules=["c_attn", "c_fc"])),  # Conv1D: (in, out) weights
    "bias-gpt2": (tiny_gpt2, dict(lora_bias=True, target_modules=["c_attn", "c_proj"])),
}
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def _config(module, variant: dict):
    return module.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **variant)


def _perturb(model: torch.nn.Module) -> None:
    """Move every magnitude and lora_B bias away from its initial value (at init, DoRA equals plain LoRA)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name or "lora_B" in name and name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("name", VARIANTS)
def test_our_files_load_in_peft_and_peft_files_load_here(name: str, tmp_path: Path) -> None:
    build, variant = VARIANTS[name]
    mine = ours.get_peft_model(build(), _config(ours, variant))
    _perturb(mine)
    mine.save_pretrained(tmp_path / "ours")
    assert torch.allclose(
        _logits(peft.PeftModel.from_pretrained(build(), tmp_path / "ours")), _logits(mine), atol=1e-5
    )

    theirs = peft.get_peft_model(build(), _config(peft, variant))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = ours.PeftModel.from_pretrained(build(), tmp_path / "peft")
    assert torch.allclose(_logits(loaded), _logits(theirs), atol=1e-5)
    assert not torch.allclose(_logits(loaded), _logits(build()), atol=1e-3)  # the adapter does something
    key = "lora_magnitude_vector" if variant.get("use_dora") else "lora_B.bias"
    assert any(k.endswith(key) for k in loaded.adapter_tensors("default"))


@pytest.mark.parametrize("name", VARIANTS)
def test_a_training_step_gives_peft_gradients(name: str, tmp_path: Path) -> None:
    build, variant = VARIANTS[name]
    theirs = peft.get_peft_model(build(), _config(peft, variant))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    mine = ours.PeftModel.from_pretrained(build(), tmp_path, is_trainable=True)
    grads = []
    for model in (mine, theirs):
        model.train()
        for module in model.modules():  # GPT-2's own dropout would draw different masks in the two models
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad})
    mine_grads, their_grads = grads
    their_grads = {n.replace("base_model.model.", "", 1).replace(".weight", "") if "magnitude" in n
                   else n.replace("base_model.model.", "", 1): g for n, g in their_grads.items()}  # fmt: skip
    mine_grads = {n.replace("base_model.", "", 1): g for n, g in mine_grads.items()}
    assert mine_grads.keys() == their_grads.keys() and len(mine_grads) > 4
    for n, g in mine_grads.items():
        assert torch.allclose(g, their_grads[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("name", ["dora-llama", "dora-gpt2", "bias-gpt2"])
def test_merge_equals_unmerged_and_unmerge_restores(name: str) -> None:
    build, variant = VARIANTS[name]
    model = ours.get_peft_model(build(), _config(ours, variant))
    _perturb(model)
    before = {n: p.clone() for n, p in model.get_base_model().named_parameters() if "lora" not in n}
    unmerged = _logits(model)
    model.merge_adapter()
    assert torch.allclose(_logits(model), unmerged, atol=1e-5)
    model.unmerge_adapter()
    after = dict(model.get_base_model().named_parameters())
    assert all(torch.allclose(after[n], p, atol=1e-5) for n, p in before.items())
    assert torch.allclose(_logits(model), unmerged, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged), unmerged, atol=1e-5)


def test_dora_weight_norm_is_cached_in_eval_and_follows_changes() -> None:
    build, variant = VARIANTS["dora-llama"]
    model = ours.get_peft_model(build(), _config(ours, variant))
    _perturb(model)
    first = _logits(model)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    cached = layer._norm_cache["default"][1]
    assert torch.equal(_logits(model), first) and layer._norm_cache["default"][1] is cached  # reused, not recomputed
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(3)  # an in-place change (optimizer step, load) invalidates the norm
    changed = _logits(model)
    model.merge_adapter()
    assert torch.allclose(_logits(model), changed, atol=1e-5) and not torch.allclose(changed, first, atol=1e-4)


def test_mixed_adapter_batch_with_dora_equals_each_alone() -> None:
    build, variant = VARIANTS["dora-llama"]
    model = ours.get_peft_model(build(), _config(ours, variant))
    model.add_adapter("plain", ours.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    _perturb(model)
    alone = {}
    for name in ("default", "plain"):
        model.set_adapter(name)
        alone[name] = _logits(model)
    with model.disable_adapter():
        alone["__base__"] = _logits(model)
    names = ["default", "__base__"]  # row 0 DoRA, row 1 the bare base
    with torch.no_grad():
        mixed = model(IDS, adapter_names=names).logits
    assert torch.allclose(mixed[0], alone["default"][0], atol=1e-5)
    assert torch.allclose(mixed[1], alone["__base__"][1], atol=1e-5)
    with torch.no_grad():
        mixed = model(IDS, adapter_names=["plain", "default"]).logits
    assert torch.allclose(mixed[0], alone["plain"][0], atol=1e-5)
    assert torch.allclose(mixed[1], alone["default"][1], atol=1e-5)


def test_dora_on_a_4bit_base_matches_peft(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")

    def base():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config)

    variant = dict(use_dora=True, target_modules=["q_proj", "v_proj"])
    mine = ours.get_peft_model(base(), _config(ours, variant))
    _perturb(mine)
    mine.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "ours")
    assert torch.allclose(_logits(theirs), _logits(mine), atol=1e-5)
    back = ours.PeftModel.from_pretrained(base(), tmp_path / "ours")
    assert torch.allclose(_logits(back), _logits(theirs), atol=1e-5)


def test_training_arguments_and_config_refusals() -> None:
    args = PeftTrainingArguments(output_dir="x", use_dora=True, lora_target_modules=["q_proj"])
    assert args.to_lora_config().use_dora and not args.to_lora_config().lora_bias
    assert PeftTrainingArguments(output_dir="x", lora_b_bias=True).to_lora_config().lora_bias
    with pytest.raises(ValueError, match="use_dora and lora_b_bias are both true"):
        PeftTrainingArguments(output_dir="x", use_dora=True, lora_b_bias=True)
    with pytest.raises(ValueError, match="use_dora and lora_bias are both true"):
        ours.LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias=True is not supported for embedding layers"):
        ours.get_peft_model(tiny_llama(), ours.LoraConfig(lora_bias=True, target_modules=["embed_tokens"]))
    model = ours.get_peft_model(tiny_llama(), ours.LoraConfig(lora_bias=True, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="base layer .* has no bias"):  # Llama's projections have none
        model.merge_adapter()
    model.add_adapter("other", ours.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="use DoRA or lora_bias"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "both", combination_type="linear")


def test_peft_trainer_trains_a_dora_adapter_that_peft_loads(tmp_path: Path) -> None:
    from tests.trainer_helpers import fast_args, token_dataset

    args = fast_args(tmp_path, use_dora=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"], max_steps=3,
                     learning_rate=5e-2, lora_dropout=0.1)  # fmt: skip
    trainer = ours.PeftTrainer(tiny_llama(), args, train_dataset=token_dataset(12))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "magnitude" in n}
    trainer.train()
    trainer.save_model()
    after = dict(trainer.model.named_parameters())
    assert before and all(not torch.equal(after[n], p) for n, p in before.items())  # the magnitudes learned
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(_logits(theirs), _logits(trainer.model), atol=1e-5)
