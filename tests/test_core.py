"""LoRA core invariants and bad input: no-op init, merge/unmerge, training touches only adapters, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_trainer import LoraConfig, PeftModel, get_peft_model
from peft_trainer.lora import LoraLayer

from .conftest import tiny_gpt2, tiny_llama

QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _has_lora(model) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_fresh_adapter_is_exact_noop(init, inputs):
    for make, targets in ((tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "wte"])):
        ref = _logits(make(), inputs)
        model = get_peft_model(make(), LoraConfig(r=4, target_modules=targets, init_lora_weights=init))
        assert torch.equal(_logits(model, inputs), ref)


def test_scaling_rslora_and_patterns():
    cfg = LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"],
                     rank_pattern={"o_proj": 4}, alpha_pattern={"layers.1.self_attn.q_proj": 32})  # fmt: skip
    model = get_peft_model(tiny_llama(), cfg)
    layers = model.base_model.model.model.layers
    assert layers[0].self_attn.q_proj.scaling["default"] == 2.0
    assert layers[0].self_attn.o_proj.scaling["default"] == 4.0 and layers[0].self_attn.o_proj.r["default"] == 4
    assert layers[1].self_attn.q_proj.scaling["default"] == 8.0


def test_training_changes_only_adapter_parameters(inputs):
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, lora_dropout=0.1, **QV))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(input_ids=inputs, labels=inputs).loss.backward()
        opt.step()
        opt.zero_grad()
    for key, value in model.state_dict().items():
        changed = not torch.allclose(value, before[key])
        assert changed == (".lora_" in key), key
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_merge_unmerge_and_safe_merge_roundtrip(inputs):
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **QV))
    model.eval()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = q.base_layer.weight.clone()
    unmerged = _logits(model, inputs)
    model.merge_adapter(safe_merge=True)
    assert not torch.allclose(q.base_layer.weight, w0)
    torch.testing.assert_close(_logits(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(q.base_layer.weight, w0, atol=1e-7, rtol=0)
    torch.testing.assert_close(_logits(model, inputs), unmerged, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_broken_adapter_and_leaves_base_untouched(bad):
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **QV))
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    layer.lora_B["default"].weight.data[0, 0] = bad
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "base_layer" in k}
    with pytest.raises(
        ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        model.merge_and_unload(safe_merge=True)
    for key, value in before.items():
        assert torch.equal(model.base_model.state_dict()[key], value), key
    assert model.adapter_state.merged == [] and _has_lora(model)


def test_target_modules_matching_nothing_lists_candidates():
    with pytest.raises(ValueError) as err:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["query", "value"]))
    message = str(err.value)
    assert "not found" in message and "q_proj" in message and "down_proj" in message and "embed_tokens" in message


def test_unsupported_target_type_is_refused_without_changes():
    base = tiny_llama()
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert not _has_lora(base)


def test_injecting_twice_is_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(**QV))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        get_peft_model(model.base_model, LoraConfig(**QV))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(**QV))


def test_adapter_for_another_base_names_layer_and_shapes(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(**QV)).save_pretrained(tmp_path)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))  # fmt: skip
    reference = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(other, tmp_path)
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message and "(4, 64)" in message and "(4, 32)" in message
    assert not _has_lora(other)
    assert all(torch.equal(v, reference[k]) for k, v in other.state_dict().items())


def test_rank_mismatch_between_config_and_file_is_an_error(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(**QV)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape \(4, 64\) in the file but \(8, 64\)"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_and_truncated_weights_are_clear_errors(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(**QV)).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="No adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")


@pytest.mark.parametrize(
    "field,value",
    [("target_parameters", ["experts"]), ("peft_type", "IA3"), ("init_lora_weights", "loftq"),
     ("corda_config", {"corda_method": "ipm"}), ("loftq_config", {"loftq_bits": 4}), ("r", "eight")],
)  # fmt: skip
def test_config_asking_for_unimplemented_features_names_the_field(tmp_path, field, value):
    get_peft_model(tiny_llama(), LoraConfig(**QV)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_config_validation_collects_every_problem():
    with pytest.raises(ValueError) as err:
        LoraConfig(r=0, lora_dropout=1.5, bias="some", layers_pattern="layers")
    message = str(err.value)
    for field in ("r=0", "lora_dropout", "bias", "layers_pattern"):
        assert field in message


def test_unknown_config_keys_warn_and_load(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(**QV)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["foobar"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="foobar"):
        LoraConfig.from_pretrained(tmp_path)


def test_pickled_weights_refused_unless_opted_in(tmp_path, inputs):
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **QV))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), tmp_path / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match="pickle"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(_logits(loaded, inputs), _logits(model.eval(), inputs))


def test_save_load_roundtrip_and_trainable_flag(tmp_path, inputs):
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **QV)).eval()
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not frozen.training and frozen.get_nb_trainable_parameters()[0] == 0
    assert torch.equal(_logits(frozen, inputs), _logits(model, inputs))
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0] > 0


def test_unload_returns_the_original_model(inputs):
    base = tiny_llama()
    ref = _logits(base, inputs)
    n_params = len(base.state_dict())
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **QV))
    plain = model.unload()
    assert plain is base and not _has_lora(plain) and len(plain.state_dict()) == n_params
    assert torch.equal(_logits(plain, inputs), ref)
