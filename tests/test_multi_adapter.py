"""Many adapters on one base, against peft 0.22.0: switch, combine, disable, delete, merge, mixed batches, threads."""

from __future__ import annotations

import threading

import peft
import pytest
import torch

from peft_trainer import LoraConfig, PeftModel, get_peft_model

from .conftest import tiny_gpt2, tiny_llama

ARCHS = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"])),
}


def _logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


@pytest.fixture(params=list(ARCHS))
def pair(request, tmp_path):
    """The same two adapters ("default" r=4, "other" r=4 with other seeds) in peft and here."""
    make, targets = ARCHS[request.param]
    torch.manual_seed(1)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **targets))
    torch.manual_seed(2)
    theirs.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, **targets))
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    return make, theirs, ours


def test_switching_matches_peft_and_costs_no_walk(pair, inputs):
    make, theirs, ours = pair
    assert ours.active_adapters == ["default"]
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    theirs.set_adapter("other")
    ours.set_adapter("other")
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    theirs.base_model.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    assert ours.active_adapters == ["default", "other"]
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    base = _logits(make(), inputs)
    with ours.disable_adapter():
        assert torch.equal(_logits(ours, inputs), base)
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=1e-5, rtol=1e-5)


def test_set_adapter_does_not_walk_the_model(pair, monkeypatch):
    _, _, ours = pair
    calls = []
    monkeypatch.setattr(torch.nn.Module, "named_modules", lambda *a, **k: calls.append(1) or iter(()))
    monkeypatch.setattr(torch.nn.Module, "modules", lambda *a, **k: calls.append(1) or iter(()))
    ours.set_adapter("other")
    ours.set_adapter("default")
    assert calls == []


def test_trainability_follows_the_active_adapter():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.requires_grad and not q.lora_A["b"].weight.requires_grad
    model.set_adapter("b")
    assert not q.lora_A["default"].weight.requires_grad and q.lora_A["b"].weight.requires_grad


def test_duplicate_and_invalid_names_leave_model_unchanged(pair):
    _, _, ours = pair
    before = set(ours.state_dict())
    with pytest.raises(ValueError, match="already exists"):
        ours.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "c_attn"]))
    for bad in ("", "../x", "a/b", "a.b", "/abs", "__base__"):
        with pytest.raises(ValueError, match="Invalid adapter name"):
            ours.add_adapter(bad, LoraConfig(r=2, target_modules=["q_proj", "c_attn"]))
    assert set(ours.state_dict()) == before and list(ours.peft_config) == ["default", "other"]


def test_failed_add_rolls_back():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    before = set(model.state_dict())
    with pytest.raises(ValueError, match="not found"):
        model.add_adapter("b", LoraConfig(r=4, target_modules=["nothing_here"]))
    assert set(model.state_dict()) == before and "b" not in model.peft_config


def test_merge_unmerge_delete(pair, inputs):
    make, theirs, ours = pair
    ours.set_adapter(["default", "other"])
    weights = {k: v.clone() for k, v in ours.base_model.state_dict().items() if "base_layer" in k}
    expected = _logits(ours, inputs)
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="while they are merged"):
        ours.delete_adapter("other")
    assert "other" in ours.peft_config and ours.adapter_state.merged == ["default", "other"]
    with pytest.raises(ValueError, match="merged"):
        ours(inputs, adapter_names=["other"] * len(inputs))
    ours.unmerge_adapter()
    for k, v in ours.base_model.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)
    ours.delete_adapter("other")
    assert ours.active_adapters == ["default"] and "other" not in ours.peft_config
    assert not any(".other." in k for k in ours.state_dict())
    with pytest.raises(ValueError, match="does not exist"):
        ours.delete_adapter("unknown-adapter")
    ours.delete_adapter("default")
    assert ours.active_adapters == []
    torch.testing.assert_close(_logits(ours, inputs), _logits(make(), inputs))


@pytest.mark.parametrize("names", [["default"], ["other"], ["default", "other"]])
def test_merge_and_unload_with_adapter_names_matches_peft(pair, inputs, names):
    _, theirs, ours = pair
    merged_theirs = theirs.merge_and_unload(adapter_names=names)
    merged_ours = ours.merge_and_unload(adapter_names=names)
    torch.testing.assert_close(_logits(merged_ours, inputs), _logits(merged_theirs, inputs), atol=1e-5, rtol=1e-5)


def test_mixed_batch_rows_equal_single_adapter_outputs(pair, inputs):
    _, theirs, ours = pair
    x = torch.cat([inputs, inputs[:1]])
    names = ["default", "other", "__base__", "other"]
    mixed = _logits(ours, x, adapter_names=names)
    torch.testing.assert_close(mixed, _logits(theirs, x, adapter_names=names), atol=1e-5, rtol=1e-5)
    for i, name in enumerate(names):
        with ours.use_adapter(name):
            torch.testing.assert_close(mixed[i], _logits(ours, x[i : i + 1])[0], atol=1e-5, rtol=1e-5)


def test_generate_with_mixed_adapters(pair, inputs):
    _, theirs, ours = pair
    names = ["other", "__base__", "default"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = ours.generate(input_ids=inputs, adapter_names=names, **kw)
    assert torch.equal(mixed, theirs.generate(input_ids=inputs, adapter_names=names, **kw))
    for i, name in enumerate(names):
        with ours.use_adapter(name):
            assert torch.equal(mixed[i], ours.generate(input_ids=inputs[i : i + 1], **kw)[0])


def test_adapter_names_errors(pair, inputs):
    _, _, ours = pair
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        ours(inputs, adapter_names=["default"])
    with pytest.raises(ValueError, match="non-existing adapter"):
        ours(inputs, adapter_names=["default", "nope", "other"])
    ours.train()
    with pytest.raises(ValueError, match="training mode"):
        ours(inputs, adapter_names=["default"] * len(inputs))


def test_threads_each_see_their_own_adapter(pair, inputs):
    _, _, ours = pair
    expected = {}
    for name in ("default", "other", "__base__"):
        with ours.use_adapter(name):
            expected[name] = _logits(ours, inputs)
    names = ["default", "other", "__base__", "other", "default", "__base__", "other", "default"]
    results, barrier = {}, threading.Barrier(len(names))

    def run(i, name):
        barrier.wait()
        with ours.use_adapter(name):
            results[i] = [_logits(ours, inputs) for _ in range(5)]

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, name in enumerate(names):
        for out in results[i]:
            assert torch.equal(out, expected[name]), (i, name)
    assert ours.active_adapters == ["default"]


def test_saving_several_adapters_peft_layout(pair, tmp_path, inputs):
    make, theirs, ours = pair
    ours.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all" / "adapter_model.safetensors").exists()
    assert (tmp_path / "all" / "other" / "adapter_config.json").exists()
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "all" / "other").eval()
    ours.set_adapter("other")
    torch.testing.assert_close(_logits(loaded, inputs), _logits(ours, inputs), atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "one", selected_adapters=["other"])
    assert not (tmp_path / "one" / "adapter_model.safetensors").exists()
    assert (tmp_path / "one" / "other" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="cannot be saved"):
        ours.save_pretrained(tmp_path / "x", selected_adapters=["missing"])


DETERMINISTIC = ["cat", "linear", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]


@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_add_weighted_adapter_matches_peft(pair, inputs, combination_type):
    _, theirs, ours = pair
    kwargs = dict(combination_type=combination_type)
    if "prune" in combination_type or "ties" in combination_type:
        kwargs["density"] = 0.5
    theirs.add_weighted_adapter(["default", "other"], [0.7, -1.3], "mix", **kwargs)
    ours.add_weighted_adapter(["default", "other"], [0.7, -1.3], "mix", **kwargs)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    theirs_sd = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if ".mix." in key:
            assert value.shape == theirs_sd[key].shape, key
    for name in ("mix",):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        a, b = _logits(ours, inputs), _logits(theirs, inputs)
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-6


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_add_weighted_adapter_dare_shapes(pair, combination_type):
    _, theirs, ours = pair
    theirs.add_weighted_adapter(
        ["default", "other"], [1.0, 1.0], "mix", combination_type=combination_type, density=0.3
    )
    ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type=combination_type, density=0.3)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    shapes = {k.replace(".mix.", "."): v.shape for k, v in ours.state_dict().items() if ".mix." in k}
    theirs_shapes = {k.replace(".mix.", "."): v.shape
                     for k, v in theirs.state_dict().items() if ".mix." in k}  # fmt: skip
    assert shapes == theirs_shapes


def test_add_weighted_adapter_constraints(pair):
    _, _, ours = pair
    ours.add_adapter("r8", LoraConfig(r=8, target_modules=["q_proj", "c_attn"]))
    with pytest.raises(ValueError, match="same r"):
        ours.add_weighted_adapter(["default", "r8"], [1, 1], "m", combination_type="linear")
    with pytest.raises(ValueError, match="do not exist"):
        ours.add_weighted_adapter(["default", "ghost"], [1, 1], "m")
    ours.add_adapter("rx", LoraConfig(r=4, target_modules=".*q_proj|.*c_attn"))
    with pytest.raises(ValueError, match="same target modules type"):
        ours.add_weighted_adapter(["default", "rx"], [1, 1], "m", combination_type="svd")
    assert "m" not in ours.peft_config


def test_cat_of_two_equals_both_active(pair, inputs):
    _, _, ours = pair
    ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "both", combination_type="cat")
    ours.set_adapter("both")
    combined = _logits(ours, inputs)
    ours.set_adapter(["default", "other"])
    torch.testing.assert_close(combined, _logits(ours, inputs), atol=1e-5, rtol=1e-5)
