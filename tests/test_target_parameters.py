"""target_parameters (LoRA on nn.Parameters: the 3-D expert stacks of a tiny Mixtral) against peft 0.22.0: the same
files both ways with the same logits, the same gradients, merge == unmerged, nested wrappers unload cleanly, a second
adapter, PeftTrainer's lora_target_parameters, and the refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig

import peft_trainer as ours
from tests.trainer_helpers import fast_args, token_dataset

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
CONFIG = dict(r=2, lora_alpha=4, target_modules=[], target_parameters=PARAMS, init_lora_weights=False)
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def tiny_mixtral() -> torch.nn.Module:
    config = MixtralConfig(
        vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_expert_adapters_match_peft_both_ways(tmp_path) -> None:
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(**CONFIG)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    mine = ours.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "theirs")
    expected = _logits(theirs)
    assert (expected - _logits(tiny_mixtral())).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(_logits(mine), expected, rtol=0, atol=1e-5)
    assert list(mine.state_dict()) == list(theirs.state_dict())  # nested: <experts>.base_layer.lora_A...

    mine.save_pretrained(tmp_path / "ours")
    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs")]
    assert sorted(files[0]) == sorted(files[1]) and all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    assert configs[0] == configs[1]
    back = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back), expected, rtol=0, atol=1e-5)

    # one training step: the same gradients on every factor
    for model in (mine, theirs):
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        model(IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in mine.named_parameters() if p.requires_grad}
    assert sorted(ours_grads) == sorted(grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6)

    mine.eval()
    mine.merge_adapter()
    torch.testing.assert_close(_logits(mine), expected, rtol=0, atol=1e-5)
    mine.unmerge_adapter()
    plain = mine.unload()  # the nested wrappers come off innermost first
    assert type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(_logits(plain), _logits(tiny_mixtral()), rtol=0, atol=1e-6)


def test_a_second_adapter_and_the_refusals() -> None:
    mine = ours.get_peft_model(tiny_mixtral(), ours.LoraConfig(**{**CONFIG, "init_lora_weights": True}))
    mine.add_adapter("other", ours.LoraConfig(**{**CONFIG, "r": 3}))
    experts = mine.base_model.model.model.layers[0].mlp.experts
    assert experts.parameter_name == "down_proj" and set(experts.r) == {"default", "other"}  # one wrapper each
    with torch.no_grad():
        torch.nn.init.normal_(experts.lora_B["other"].weight)
    base = _logits(tiny_mixtral())
    mine.set_adapter("other")
    other = _logits(mine)
    assert (other - base).abs().max() > 0
    mine.delete_adapter("other")
    torch.testing.assert_close(_logits(mine), base, rtol=0, atol=1e-6)  # default is a no-op at init

    with pytest.raises(ValueError, match="must all target the same parameters"):
        mine.add_adapter("third", ours.LoraConfig(**{**CONFIG, "target_parameters": PARAMS[:1]}))
    with pytest.raises(ValueError, match=r"match no parameter.*experts\.gate_up_proj"):
        ours.get_peft_model(tiny_mixtral(), ours.LoraConfig(**{**CONFIG, "target_parameters": ["experts.up"]}))
    with pytest.raises(ValueError, match="plain LoRA only.*lora_dropout"):
        ours.get_peft_model(tiny_mixtral(), ours.LoraConfig(**{**CONFIG, "lora_dropout": 0.1}))
    with pytest.raises(ValueError, match="add_weighted_adapter combines"):
        mine.add_weighted_adapter(["default"], [1.0], "mix", combination_type="linear")


def test_peft_trainer_trains_expert_adapters(tmp_path) -> None:
    args = fast_args(tmp_path, lora_target_modules=["q_proj"], lora_target_parameters=PARAMS, max_steps=3)
    trainer = ours.PeftTrainer(tiny_mixtral(), args, train_dataset=token_dataset(12))
    trainer.train()
    trainer.save_model()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("experts.base_layer.lora_B.weight") for k in saved)
    assert all(saved[k].abs().sum() > 0 for k in saved if ".lora_B." in k)  # every B trained away from zero
    theirs = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs), _logits(trainer.model.eval()), rtol=0, atol=1e-5)
