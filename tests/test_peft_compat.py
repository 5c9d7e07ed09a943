"""Our adapter files against peft 0.22.0 (the oracle): same keys, shapes, config JSON and logits, both ways."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors import safe_open

from peft_trainer import LoraConfig, PeftModel, get_peft_model

from .conftest import MODELS

CASES = {
    "llama-qv": ("llama", dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "llama-all-linear-patterns": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, rank_pattern={"o_proj": 2},
             alpha_pattern={"layers.1.mlp.down_proj": 32}),
    ),
    "llama-regex-layers": ("llama", dict(r=4, target_modules=["gate_proj", "up_proj"], layers_to_transform=[1])),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "bert-seq-cls": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "bert-bias-all": ("bert", dict(r=4, target_modules=".*attention.self.(query|key)", bias="all",
                                   modules_to_save=["classifier"])),
}  # fmt: skip


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _train_a_little(model, x, steps=3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        out = model(x).logits
        loss = (out.float() ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _tensors(path):
    with safe_open(path, "pt") as f:
        return {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("case", CASES)
def test_ours_load_in_peft_with_same_logits(case, tmp_path, inputs):
    arch, kwargs = CASES[case]
    ours = get_peft_model(MODELS[arch](), LoraConfig(**kwargs))
    _train_a_little(ours, inputs)
    expected = _logits(ours, inputs)
    assert not torch.allclose(expected, _logits(MODELS[arch](), inputs), atol=1e-4), "training changed nothing"
    ours.save_pretrained(tmp_path / "ours")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "ours")
    assert not [w for w in caught if "missing" in str(w.message) or "Unexpected" in str(w.message)]
    torch.testing.assert_close(_logits(theirs, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_same_keys_shapes_and_config_as_peft(case, tmp_path):
    arch, kwargs = CASES[case]
    get_peft_model(MODELS[arch](), LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(MODELS[arch](), peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "theirs")
    ours, ours_meta = _tensors(tmp_path / "ours" / "adapter_model.safetensors")
    theirs, theirs_meta = _tensors(tmp_path / "theirs" / "adapter_model.safetensors")
    # peft quirk with bias="all" + modules_to_save: it also writes wrapper-internal bias copies, ignored on load
    theirs = {k: v for k, v in theirs.items() if ".modules_to_save." not in k and ".original_module." not in k}
    assert ours == theirs
    assert ours_meta == theirs_meta == {"format": "pt"}
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for cfg in (ours_cfg, theirs_cfg):
        if isinstance(cfg["target_modules"], list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
    assert ours_cfg == theirs_cfg
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):  # same mode as peft's files
        assert (tmp_path / "ours" / name).stat().st_mode & 0o777 == (tmp_path / "theirs" / name).stat().st_mode & 0o777


def test_config_file_is_byte_identical_to_peft(tmp_path):
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(MODELS["llama"](), LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(MODELS["llama"](), peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "theirs")
    ours = (tmp_path / "ours" / "adapter_config.json").read_bytes()
    assert ours == (tmp_path / "theirs" / "adapter_config.json").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.LoraConfig.from_pretrained(tmp_path / "ours")


@pytest.mark.parametrize("case", CASES)
def test_peft_adapters_load_here_with_same_logits(case, tmp_path, inputs):
    arch, kwargs = CASES[case]
    theirs = peft.get_peft_model(MODELS[arch](), peft.LoraConfig(init_lora_weights=False, **kwargs))
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    expected = _logits(theirs, inputs)
    ours = PeftModel.from_pretrained(MODELS[arch](), tmp_path / "theirs")
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama-qv", "gpt2-conv1d", "llama-embedding", "bert-seq-cls"])
def test_merge_and_unload_matches_unmerged_and_peft(case, tmp_path, inputs):
    arch, kwargs = CASES[case]
    theirs = peft.get_peft_model(MODELS[arch](), peft.LoraConfig(init_lora_weights=False, **kwargs))
    theirs.save_pretrained(tmp_path / "a")
    theirs_merged = theirs.merge_and_unload()
    ours = PeftModel.from_pretrained(MODELS[arch](), tmp_path / "a")
    unmerged = _logits(ours, inputs)
    merged = ours.merge_and_unload()
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged, inputs), unmerged, atol=1e-5, rtol=1e-5)
    theirs_sd = theirs_merged.state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, theirs_sd[key], atol=1e-6, rtol=1e-6)
