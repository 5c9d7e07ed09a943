"""PEFT's documented LoRA API under its own names, with peft as the oracle: task types and configs, state dicts,
low-level injection into a custom model, AutoPeftModel, status reports, LoRA+, hot-swapping, mixed precision."""

from __future__ import annotations

import dataclasses

import peft
import peft.utils.hotswap
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM, Trainer, TrainingArguments, set_seed

import peft_trainer as ours
from peft_trainer.optimizers import create_loraplus_optimizer
from peft_trainer.utils.hotswap import hotswap_adapter
from tests.conftest import tiny_llama
from tests.trainer_helpers import fast_args, token_dataset

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))
TARGETS = ["q_proj", "v_proj"]
WITH_EMBEDDINGS = [*TARGETS, "embed_tokens"]  # peft then also saves the base embedding matrix: see the README


def test_task_type_and_peft_config_read_as_peft_does(tmp_path) -> None:
    config = ours.LoraConfig(r=4, target_modules=["q_proj"], task_type=ours.TaskType.CAUSAL_LM)
    ours.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    loaded, theirs = ours.PeftConfig.from_pretrained(tmp_path), peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, ours.LoraConfig) and isinstance(loaded, ours.PeftConfig)
    assert loaded.task_type == ours.TaskType.CAUSAL_LM == theirs.task_type == peft.TaskType.CAUSAL_LM
    assert loaded.peft_type == ours.PeftType.LORA and str(theirs.peft_type.value) == loaded.peft_type
    assert (loaded.r, sorted(loaded.target_modules)) == (theirs.r, sorted(theirs.target_modules))
    # Printed as peft prints them (example scripts build folder names this way), str or enum alike.
    for task in ("CAUSAL_LM", "TaskType.CAUSAL_LM"):
        mine_cfg, peft_cfg = (
            lib.LoraConfig(task_type=lib.TaskType.CAUSAL_LM if "." in task else task) for lib in (ours, peft)
        )
        assert f"{mine_cfg.peft_type}_{mine_cfg.task_type}" == f"{peft_cfg.peft_type}_{peft_cfg.task_type}"
    assert f"{loaded.peft_type}_{loaded.task_type}" == f"{theirs.peft_type}_{theirs.task_type}"


@pytest.mark.parametrize("task_type", [None, *ours.TaskType])
def test_model_classes_per_task_type_as_peft_s(tmp_path, task_type) -> None:
    """get_peft_model and PeftModel.from_pretrained build PEFT's class for the task, by PEFT's class name."""
    config = dict(r=4, target_modules=["q_proj"], task_type=task_type)
    mine = ours.get_peft_model(tiny_llama(), ours.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    assert type(mine).__name__ == type(theirs).__name__ and isinstance(mine, ours.PeftModel)
    mine.save_pretrained(tmp_path)
    assert type(ours.PeftModel.from_pretrained(tiny_llama(), tmp_path)) is type(mine)
    assert isinstance(ours.PeftModelForCausalLM.from_pretrained(tiny_llama(), tmp_path), ours.PeftModelForCausalLM)


def test_text_generation_pipeline_takes_the_model_without_an_error(caplog, embedded_cache) -> None:
    from transformers import pipeline

    from peft_trainer import models

    base, tok = models.load_model("tiny-llama")
    model = ours.get_peft_model(base, ours.LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with caplog.at_level("ERROR"):
        out = pipeline("text-generation", model=model, tokenizer=tok)("Hello", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("Hello")
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_state_dicts_round_trip_with_peft() -> None:
    torch.manual_seed(0)
    mine = ours.get_peft_model(tiny_llama(), ours.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS))
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    result = ours.set_peft_model_state_dict(mine, theirs_sd)
    assert result.unexpected_keys == [] and result.missing_keys == []
    mine_sd = ours.get_peft_model_state_dict(mine)
    assert sorted(mine_sd) == sorted(theirs_sd)
    assert all(torch.equal(mine_sd[k], theirs_sd[k]) for k in mine_sd)
    from_full = ours.get_peft_model_state_dict(mine, state_dict=mine.state_dict())  # keys with the adapter name in
    assert all(torch.equal(from_full[k], mine_sd[k]) for k in mine_sd)
    with torch.no_grad():
        torch.testing.assert_close(mine.eval()(IDS).logits, theirs.eval()(IDS).logits, rtol=0, atol=1e-6)
    bad = {**theirs_sd, next(iter(theirs_sd)): torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"has shape \(3, 3\) in the file"):
        ours.set_peft_model_state_dict(mine, bad)


def test_in_memory_model_reads_as_peft_s() -> None:
    """PeftModel.base_model is a LoraModel holding the transformers model as .model: state_dict keys and module
    paths are peft's, and the LoraModel's adapter methods act on the PeftModel."""
    config = dict(r=4, target_modules=TARGETS, modules_to_save=["lm_head"], init_lora_weights=False)
    mine = ours.get_peft_model(tiny_llama(), ours.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    mine.add_adapter("other", ours.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert list(mine.state_dict()) == list(theirs.state_dict())
    assert type(mine.base_model).__name__ == type(theirs.base_model).__name__ == "LoraModel"
    assert mine.base_model.model is mine.get_base_model() and isinstance(mine.base_model.model, LlamaForCausalLM)
    for model in (mine, theirs):
        model.base_model.set_adapter(["default", "other"])
    assert mine.active_adapters == theirs.active_adapters == ["default", "other"]
    with torch.no_grad():
        active = mine.eval()(IDS).logits
        mine.base_model.disable_adapter_layers()
        base = mine(IDS).logits
        with mine.disable_adapter():
            assert torch.equal(mine(IDS).logits, base)
        mine.base_model.enable_adapter_layers()
        assert torch.equal(mine(IDS).logits, active) and not torch.equal(active, base)


class MLP(nn.Module):
    """The custom model of PEFT's "custom models" guide."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(20, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


def test_inject_adapter_in_model_on_a_custom_model_matches_peft() -> None:
    config = dict(r=8, target_modules=["seq.0", "seq.2"], init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), MLP())
    torch.manual_seed(0)
    mine = ours.inject_adapter_in_model(
        ours.LoraConfig(**config), MLP(), state_dict=peft.get_peft_model_state_dict(theirs)
    )
    assert {n: p.requires_grad for n, p in mine.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()
    }
    x = torch.randn(4, 20)
    torch.testing.assert_close(mine(x), theirs(x), rtol=0, atol=1e-6)
    assert sorted(ours.get_peft_model_state_dict(mine)) == sorted(peft.get_peft_model_state_dict(theirs))


def test_auto_peft_model_loads_the_base_its_config_names(tmp_path) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    config = ours.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    trained = ours.get_peft_model(base, config)
    trained.save_pretrained(tmp_path / "adapter")
    mine = ours.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(mine(IDS).logits, theirs(IDS).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.AutoPeftModel.from_pretrained(tmp_path / "adapter")(IDS).logits,
                                   theirs(IDS).logits, rtol=0, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="is a CAUSAL_LM adapter, but AutoPeftModelForSequenceClassification"):
        ours.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")


def test_targeted_names_and_status_match_peft() -> None:
    config = dict(r=4, target_modules=TARGETS)
    mine = ours.get_peft_model(tiny_llama(), ours.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    for model in (mine, theirs):
        model.add_adapter("other", type(model.peft_config["default"])(**config))
        model.merge_adapter(["default"])
    assert mine.targeted_module_names == theirs.targeted_module_names
    keep = ("enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices",
            "quantization_backend")  # fmt: skip
    layer_mine, layer_theirs = mine.get_layer_status(), theirs.get_layer_status()
    assert [s.name for s in layer_mine] == [s.name for s in layer_theirs]
    for a, b in zip(layer_mine, layer_theirs):
        assert {k: getattr(a, k) for k in keep} == {k: getattr(b, k) for k in keep}, a.name
    status_mine, status_theirs = ours.get_model_status(mine), peft.get_model_status(theirs)
    fields = [f.name for f in dataclasses.fields(status_theirs) if f.name != "adapter_model_type"]
    assert {f: getattr(status_mine, f) for f in fields} == {f: getattr(status_theirs, f) for f in fields}


def test_loraplus_groups_and_training_match_peft(tmp_path) -> None:
    config = dict(r=4, lora_alpha=8, target_modules=WITH_EMBEDDINGS, lora_dropout=0.0)
    mine = ours.get_peft_model(tiny_llama(), ours.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)
    groups_mine = create_loraplus_optimizer(mine, torch.optim.AdamW, **kwargs).param_groups
    groups_theirs = peft_loraplus(theirs, torch.optim.AdamW, **kwargs).param_groups
    names = [{id(p): n for n, p in m.named_parameters()} for m in (mine, theirs)]
    for a, b in zip(groups_mine, groups_theirs, strict=True):
        assert (a["lr"], a["weight_decay"]) == (b["lr"], b["weight_decay"])
        assert [names[0][id(p)] for p in a["params"]] == [names[1][id(p)] for p in b["params"]]  # the same parameters

    # PeftTrainer with loraplus_lr_ratio trains like peft + Trainer with peft's LoRA+ optimizer.
    args = dict(max_steps=3, learning_rate=1e-2, weight_decay=0.1)
    trainer = ours.PeftTrainer(tiny_llama(), fast_args(tmp_path / "ours", loraplus_lr_ratio=16, lora_r=4,
                                                      lora_alpha=8, lora_target_modules=TARGETS, **args),
                               train_dataset=token_dataset(12))  # fmt: skip
    reference_args = fast_args(tmp_path / "ref", cls=TrainingArguments, **args)
    base = tiny_llama()
    set_seed(reference_args.seed)  # as PeftTrainer seeds right before injecting
    model = peft.get_peft_model(base, peft.LoraConfig(**{**config, "target_modules": TARGETS}))
    optimizer = peft_loraplus(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)
    reference = Trainer(model, reference_args, train_dataset=token_dataset(12), optimizers=(optimizer, None))
    trainer.train(), reference.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (trainer, reference)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)


def test_hotswap_replaces_the_weights_like_loading_the_new_adapter(tmp_path) -> None:
    for i, alpha in enumerate((8, 16)):
        torch.manual_seed(i)
        config = ours.LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
        ours.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / f"a{i}")
    model = ours.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a0")
    hotswap_adapter(model, str(tmp_path / "a1"), adapter_name="default")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a0"))
    peft.utils.hotswap.hotswap_adapter(theirs, str(tmp_path / "a1"), adapter_name="default", torch_device="cpu")
    direct = ours.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a1")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, direct(IDS).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(IDS).logits, theirs(IDS).logits, rtol=0, atol=1e-6)
    ours.get_peft_model(tiny_llama(), ours.LoraConfig(r=2, target_modules=TARGETS)).save_pretrained(tmp_path / "r2")
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(2, 64\) in the file but \(4, 64\)"):
        hotswap_adapter(model, str(tmp_path / "r2"), adapter_name="default")


def test_mixed_precision_casts_match_peft() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        mine = ours.get_peft_model(tiny_llama(), ours.LoraConfig(r=4, target_modules=TARGETS))
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS))
        ours.cast_mixed_precision_params(mine, dtype)
        peft.cast_mixed_precision_params(theirs, dtype)
        assert sorted({(p.dtype, p.requires_grad) for p in mine.parameters()}, key=str) == sorted(
            {(p.dtype, p.requires_grad) for p in theirs.parameters()}, key=str
        )
        for autocast in (True, False):
            kept = [ours.get_peft_model(tiny_llama().to(dtype), ours.LoraConfig(r=4, target_modules=TARGETS),
                                        autocast_adapter_dtype=autocast),
                    peft.get_peft_model(tiny_llama().to(dtype), peft.LoraConfig(r=4, target_modules=TARGETS),
                                        autocast_adapter_dtype=autocast)]  # fmt: skip
            dtypes = [{p.dtype for n, p in m.named_parameters() if "lora_" in n} for m in kept]
            assert dtypes[0] == dtypes[1] == {torch.float32 if autocast else dtype}


def test_auto_peft_model_finds_an_embedded_base_by_its_hub_id(tmp_path, monkeypatch) -> None:
    from transformers import AutoModel

    from peft_trainer import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub id must resolve to the pip package's copy, not a download
    base = AutoModel.from_pretrained(models.resolve_model("minilm-l6"))
    config = ours.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False,
                             task_type="FEATURE_EXTRACTION",
                             base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")  # fmt: skip
    trained = ours.get_peft_model(base, config).eval()
    trained.save_pretrained(tmp_path)
    loaded = ours.AutoPeftModel.from_pretrained(tmp_path)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, trained(input_ids=ids).last_hidden_state)


def test_resized_vocabulary_saves_the_embedding_matrices_as_peft_does(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")  # config.json says vocab_size 100

    def resized():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        model.resize_token_embeddings(104)  # e.g. four new special tokens
        return model

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    mine = ours.get_peft_model(resized(), ours.LoraConfig(**config))
    with torch.no_grad():
        mine.get_base_model().get_input_embeddings().weight[100:] = 0.5  # the new rows were trained
    mine.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(resized(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "theirs")
    keys = [set(load_file(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs")]
    assert keys[0] == keys[1] and "base_model.model.model.embed_tokens.weight" in keys[0]

    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"resize_token_embeddings\(104\)"):
        ours.PeftModel.from_pretrained(fresh, tmp_path / "ours")
    ids = torch.tensor([[1, 101, 102, 5]])
    loaded = [m.eval()(ids).logits for m in (ours.PeftModel.from_pretrained(resized(), tmp_path / "ours"),
                                             peft.PeftModel.from_pretrained(resized(), tmp_path / "ours"))]  # fmt: skip
    assert torch.allclose(loaded[0], loaded[1], atol=1e-5) and torch.allclose(loaded[0], mine.eval()(ids).logits)


@pytest.mark.parametrize("library", [ours, peft], ids=["ours", "peft"])
def test_a_model_deep_copies_and_pickles(library) -> None:
    import copy
    import pickle

    model = library.get_peft_model(
        tiny_llama(), library.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    )
    with torch.no_grad():
        expected = model(IDS).logits
        with model.disable_adapter():
            base = model(IDS).logits
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(other) is type(model)
        with torch.no_grad():
            assert torch.equal(other(IDS).logits, expected)
            with other.disable_adapter():
                assert torch.equal(other(IDS).logits, base)
        other.add_adapter("second", library.LoraConfig(r=2, target_modules=TARGETS))
        assert list(model.peft_config) == ["default"]  # the copy is independent
