"""PeftTrainer trains like peft + transformers.Trainer: same losses, eval_loss, columns, GA scaling, label
smoothing and final adapter; model forms accepted by the constructor; activation checkpointing with a frozen base."""

from __future__ import annotations

import logging

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from transformers import LlamaForCausalLM, Trainer, TrainingArguments, set_seed

from peft_trainer import LoraConfig, PeftModel, PeftTrainer, get_peft_model
from tests.conftest import tiny_llama
from tests.trainer_helpers import adapter_file, assert_same_tensors, fast_args, token_dataset

# LoRA dropout 0: the core draws its own dropout masks (faster than F.dropout), so masks differ from peft's.
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


class NoLossKwargsLlamaForCausalLM(LlamaForCausalLM):
    """A base whose loss ignores num_items_in_batch (like gemma3): Trainer must divide by GA itself."""

    accepts_loss_kwargs = False


def _reference(tmp_path, base=None, **overrides):
    """peft + transformers.Trainer, seeded exactly as PeftTrainer seeds before injecting LoRA."""
    args = fast_args(tmp_path / "ref", cls=TrainingArguments, **overrides)
    base = base if base is not None else tiny_llama()
    set_seed(args.seed)
    model = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    trainer = Trainer(model, args, train_dataset=token_dataset(16), eval_dataset=token_dataset(8, seed=1))
    return trainer


def _ours(tmp_path, base=None, **overrides):
    args = fast_args(tmp_path / "ours", **overrides)
    base = base if base is not None else tiny_llama()
    return PeftTrainer(base, args, train_dataset=token_dataset(16), eval_dataset=token_dataset(8, seed=1))


def _numbers(trainer) -> list[dict]:
    keep = ("loss", "grad_norm", "learning_rate", "eval_loss", "step", "train_loss", "total_flos")
    return [{k: v for k, v in entry.items() if k in keep} for entry in trainer.state.log_history]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=2),
        dict(gradient_accumulation_steps=2, label_smoothing_factor=0.1),
    ],
    ids=["ga2-eval", "label-smoothing"],
)
@pytest.mark.parametrize("chunked_loss", [False, True])
def test_same_numbers_and_adapter_as_peft_with_trainer(tmp_path, overrides, chunked_loss):
    ref, ours = _reference(tmp_path, **overrides), _ours(tmp_path, chunked_loss=chunked_loss, **overrides)
    ref.train(), ours.train()
    expected, got = _numbers(ref), _numbers(ours)
    assert [e.keys() for e in got] == [e.keys() for e in expected]
    for e, g in zip(expected, got):
        assert g == pytest.approx(e, rel=1e-6, abs=1e-7)
    if "eval_strategy" in overrides:
        assert sum("eval_loss" in e for e in got) == 2
    ours.save_model()
    # Our fused LoRA functions and the chunked loss sum in another order than peft (the same accuracy against
    # float64); Adam's first steps, on gradients near zero, magnify those last-bit differences in the weights.
    assert_same_tensors(adapter_file(ours.args.output_dir), get_peft_model_state_dict(ref.model), atol=1e-4)


def test_label_smoothing_without_the_fix_differs(tmp_path):
    """Negative control: the vanilla Trainer around our PeftModel smooths unshifted labels."""
    overrides = dict(gradient_accumulation_steps=2, label_smoothing_factor=0.1, max_steps=1)
    ref = _reference(tmp_path, **overrides)
    set_seed(7)
    vanilla = Trainer(
        get_peft_model(tiny_llama(), LoraConfig(**LORA)), fast_args(tmp_path / "v", cls=TrainingArguments, **overrides),
        train_dataset=token_dataset(16),
    )  # fmt: skip
    ref.train(), vanilla.train()
    assert ref.state.log_history[0]["loss"] != pytest.approx(vanilla.state.log_history[0]["loss"], rel=1e-3)


@pytest.mark.parametrize("base_cls", [LlamaForCausalLM, NoLossKwargsLlamaForCausalLM])
def test_introspection_and_columns_match_peft(tmp_path, base_cls):
    def base():
        torch.manual_seed(0)
        return base_cls(tiny_llama().config)

    ref, ours = _reference(tmp_path, base=base()), _ours(tmp_path, base=base())
    for attr in ("model_accepts_loss_kwargs", "label_names", "can_return_loss", "_loss_shifts_labels"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.model_accepts_loss_kwargs is (base_cls is LlamaForCausalLM)
    assert ours.label_names == ["labels"] and ours._loss_shifts_labels is True
    batch = next(iter(ours.get_train_dataloader()))
    assert set(batch) == set(next(iter(ref.get_train_dataloader()))) == {"input_ids", "attention_mask", "labels"}
    assert "eval_loss" in ours.evaluate()


def test_model_forms_and_seeded_injection(tmp_path, caplog):
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    args = fast_args(tmp_path / "o", seed=3)
    with caplog.at_level(logging.INFO, logger="peft_trainer"):
        from_path = PeftTrainer(str(path), args).model
    assert isinstance(from_path, PeftModel) and isinstance(from_path.get_base_model(), LlamaForCausalLM)
    trainable = sum(p.numel() for p in from_path.parameters() if p.requires_grad)
    assert f"trainable params: {trainable:,d}" in caplog.text
    from_instance = PeftTrainer(tiny_llama(), args).model
    base = tiny_llama()
    set_seed(3)
    by_hand = get_peft_model(base, args.to_lora_config(task_type="CAUSAL_LM"))
    assert_same_tensors(from_path.adapter_tensors("default"), from_instance.adapter_tensors("default"))
    assert_same_tensors(from_instance.adapter_tensors("default"), by_hand.adapter_tensors("default"))
    other_seed = PeftTrainer(tiny_llama(), fast_args(tmp_path / "o", seed=4)).model.adapter_tensors("default")
    key = next(k for k in other_seed if "lora_A" in k)
    assert not torch.equal(other_seed[key], by_hand.adapter_tensors("default")[key])
    assert from_instance.peft_config["default"].task_type == "CAUSAL_LM"

    ready = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert PeftTrainer(ready, args).model is ready
    custom = PeftTrainer(tiny_llama(), args, lora_config=LoraConfig(r=2, target_modules=["v_proj"])).model
    assert all("v_proj" in k for k in custom.adapter_tensors("default"))
    with pytest.raises(ValueError, match="already a PeftModel"):
        PeftTrainer(ready, args, lora_config=LoraConfig())
    with pytest.raises(TypeError, match="peft.PeftModel"):
        PeftTrainer(peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"])), args)
    with pytest.raises(ValueError, match="not quantized"):
        PeftTrainer(tiny_llama(), fast_args(tmp_path / "o", load_in_4bit=True))


def test_embedded_model_names_load_offline_as_in_the_cli(tmp_path, embedded_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an embedded name must never reach for the Hub
    trainer = PeftTrainer("tiny-llama", fast_args(tmp_path, max_steps=1), train_dataset=token_dataset(4))
    assert type(trainer.model.get_base_model()).__name__ == "LlamaForCausalLM"
    trainer.train()
    with pytest.raises(ValueError, match="tiny-llama"):  # a misspelt name lists the embedded ones
        PeftTrainer("tiny-lama", fast_args(tmp_path))


def _train_with_checkpointing(tmp_path, name, **overrides):
    trainer = _ours(tmp_path / name, max_steps=3, **overrides)
    before = {k: v.clone() for k, v in trainer.model.adapter_tensors("default").items()}
    trainer.train()
    assert trainer.model.get_base_model().is_activation_checkpointing is bool(overrides)
    return before, trainer.model.adapter_tensors("default")


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_with_frozen_base(tmp_path, reentrant):
    """LoRA layers inside checkpointed decoder layers get the same gradients as without checkpointing."""
    _, plain = _train_with_checkpointing(tmp_path, "plain")
    before, ckpt = _train_with_checkpointing(
        tmp_path, "ckpt", activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    assert all(not torch.equal(before[k], ckpt[k]) for k in ckpt)  # every LoRA tensor trained
    assert_same_tensors(plain, ckpt, atol=1e-6)


def test_neftune_use_cache_and_flops_reach_the_base(tmp_path):
    """Trainer features that look things up on the model: NEFTune hooks the input embeddings, use_cache and the
    FLOP count go through to the base model."""
    trainer = _ours(tmp_path, max_steps=1, neftune_noise_alpha=5.0, use_cache=False)
    embeddings = trainer.model.get_base_model().get_input_embeddings()
    assert trainer.model.get_base_model().config.use_cache is False
    seen = []
    handle = embeddings.register_forward_hook(lambda m, i, out: seen.append(getattr(m, "neftune_noise_alpha", None)))
    trainer.train()
    handle.remove()
    assert seen and seen[0] == 5.0  # NEFTune was active on the base's embeddings during training
    assert not embeddings._forward_hooks  # and removed afterwards
    assert trainer.state.total_flos > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_mixed_precision_trains_like_peft(tmp_path, dtype):
    """``bf16=True`` (autocast: what GPU users set) on a float32 and on a bfloat16 base: the losses of peft +
    Trainer to bfloat16 accuracy (gradient norms and evaluation included), and float32 adapter weights that moved."""
    overrides = dict(bf16=True, eval_strategy="steps", eval_steps=2)
    ref = _reference(tmp_path, base=tiny_llama().to(dtype), **overrides)
    ours = _ours(tmp_path, base=tiny_llama().to(dtype), **overrides)
    ref.train(), ours.train()
    expected, got = _numbers(ref), _numbers(ours)
    assert [e.keys() for e in got] == [e.keys() for e in expected]
    for e, g in zip(expected, got):  # bfloat16 matmuls summed in another order: losses 1e-4 apart, norms 3e-3
        for key, rel in (("loss", 1e-3), ("eval_loss", 1e-3), ("grad_norm", 1e-2)):
            if key in e:
                assert g[key] == pytest.approx(e[key], rel=rel)
    tensors = ours.model.adapter_tensors("default")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert all(t.abs().sum() > 0 for name, t in tensors.items() if "lora_B" in name)
