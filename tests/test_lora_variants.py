"""LoRA variants against peft 0.22.0 as the oracle: DoRA (Linear, GPT-2 Conv1D, Embedding, 4-bit base,
convolutions), lora_bias, PiSSA/OLoRA (with the conversion to plain LoRA), convolution targets and trainable tokens.

Each: the same files give the same logits both ways, one training step gives the same gradients, merge equals the
unmerged forward and unmerge restores the weights, a mixed-adapter batch equals each adapter alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
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
    for model in (mine, theirs):
        model.train()
        for module in model.modules():  # GPT-2's own dropout would draw different masks in the two models
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model(input_ids=IDS, labels=IDS).loss.backward()
    mine_grads, their_grads = _grads(mine), _grads(theirs)
    assert mine_grads.keys() == their_grads.keys() and len(mine_grads) > 4
    for n, g in mine_grads.items():
        assert torch.allclose(g, their_grads[n], atol=1e-6, rtol=1e-4), n


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the trainable parameters under one naming for ours and peft's: "<module>.lora_A.weight",
    "<module>.lora_magnitude_vector" (peft's DoRA nests the magnitude in a module)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.replace(".default", "")
            out[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = p.grad
    return out


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
    with pytest.raises(ValueError, match="use DoRA, lora_bias"):
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


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_pissa_and_olora_decompose_the_base_as_peft_does(init: str) -> None:
    targets = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init)
    torch.manual_seed(3)  # pissa_niter_K draws its random projection from torch's generator
    mine = ours.get_peft_model(tiny_llama(), ours.LoraConfig(**targets))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**targets))
    layers = mine.base_model.model.model.layers[1].mlp.down_proj, theirs.base_model.model.model.layers[1].mlp.down_proj
    for attr in ("lora_A", "lora_B"):
        assert torch.allclose(getattr(layers[0], attr)["default"].weight, getattr(layers[1], attr)["default"].weight)
    assert torch.allclose(layers[0].base_layer.weight, layers[1].base_layer.weight)  # the residual W - s·BA
    assert not torch.allclose(layers[0].base_layer.weight, tiny_llama().model.layers[1].mlp.down_proj.weight)
    assert torch.allclose(_logits(mine), _logits(tiny_llama()), atol=1e-5)  # decomposed, the model is unchanged


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_trained_pissa_adapter_converts_to_lora_for_the_original_base(init: str, tmp_path: Path) -> None:
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    mine = ours.get_peft_model(tiny_llama(), ours.LoraConfig(**config))
    mine.save_pretrained(tmp_path / "ours-init")  # right after get_peft_model, before training
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "peft-init")
    _perturb_factors(mine)  # "training"
    trained = _logits(mine)
    peft.set_peft_model_state_dict(theirs, {k: v.detach() for k, v in mine.adapter_tensors("default").items()})
    mine.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours-init")
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft-init"))

    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft")]
    assert files[0].keys() == files[1].keys()
    assert all(torch.allclose(files[0][k], files[1][k], atol=1e-6) for k in files[0])
    configs = [ours.LoraConfig.from_pretrained(tmp_path / d) for d in ("ours", "peft")]
    assert (configs[0].r, configs[0].lora_alpha, configs[0].init_lora_weights) == (8, 16, True)
    assert (configs[1].r, configs[1].lora_alpha, configs[1].init_lora_weights) == (8, 16, True)
    on_original = ours.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")  # the base as it was
    assert torch.allclose(_logits(on_original), trained, atol=1e-5)
    assert torch.allclose(_logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")), trained, atol=1e-5)


def _perturb_factors(model: torch.nn.Module) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_pissa_adapter_from_peft_trainer_is_a_plain_lora_for_the_original_base(init: str, tmp_path: Path) -> None:
    """PeftTrainer writes the trained PiSSA/OLoRA adapter converted (rank 2r, plain init), so any loader, a shared
    base (the Space) or a randomized-SVD init gets the trained model; its checkpoints keep the factors themselves."""
    from tests.trainer_helpers import fast_args, token_dataset

    fields = dict(init_lora_weights=init, lora_r=4, lora_target_modules=["q_proj", "v_proj"], max_steps=3,
                  learning_rate=5e-2, save_strategy="steps", save_steps=2)  # fmt: skip
    trainer = ours.PeftTrainer(tiny_llama(), fast_args(tmp_path, **fields), train_dataset=token_dataset(12))
    trainer.train()
    trainer.save_model()
    trained = _logits(trainer.model)
    assert not torch.allclose(trained, _logits(tiny_llama()), atol=1e-4)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    checkpoint = json.loads((tmp_path / "checkpoint-2" / "adapter_config.json").read_text())
    assert (checkpoint["r"], checkpoint["init_lora_weights"]) == (4, init)
    for loader in (ours.PeftModel, peft.PeftModel):
        assert torch.allclose(_logits(loader.from_pretrained(tiny_llama(), tmp_path)), trained, atol=1e-5)

    # Resumed from checkpoint-2, the run ends with the same converted adapter.
    resumed = ours.PeftTrainer(
        tiny_llama(), fast_args(tmp_path / "resumed", **fields), train_dataset=token_dataset(12)
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed.save_model()
    first, again = (load_file(d / "adapter_model.safetensors") for d in (tmp_path, tmp_path / "resumed"))
    assert first.keys() == again.keys() and all(torch.allclose(first[k], again[k], atol=1e-6) for k in first)
    # A PiSSA adapter loaded from files has unknown starting factors: saved as it is, in its PiSSA form.
    loaded = ours.PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-2", is_trainable=True)
    ours.PeftTrainer(loaded, fast_args(tmp_path / "from-files")).save_model()
    assert json.loads((tmp_path / "from-files" / "adapter_config.json").read_text())["init_lora_weights"] == init


def test_an_eva_adapter_from_peft_loads_and_saves_as_peft_wrote_it(tmp_path: Path) -> None:
    """EVA (peft's initialize_lora_eva_weights over a dataloader) starts in peft; the adapter loads here both ways.
    Starting one here is refused by name."""
    from peft.tuners.lora import EvaConfig, initialize_lora_eva_weights

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="eva")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config, eva_config=EvaConfig(rho=2.0)))
    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}] * 2
    initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    with torch.no_grad():  # EVA starts B at zero: move it so the factors matter
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    mine = ours.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert torch.allclose(_logits(mine), _logits(theirs), atol=1e-5)
    assert not torch.allclose(_logits(mine), _logits(tiny_llama()), atol=1e-4)
    mine.save_pretrained(tmp_path / "ours")
    written = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")]
    assert written[0]["eva_config"] == written[1]["eva_config"] and written[1]["init_lora_weights"] == "eva"
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert torch.allclose(_logits(back), _logits(theirs), atol=1e-5)
    with pytest.raises(ValueError, match="initialize_lora_eva_weights"):
        ours.get_peft_model(tiny_llama(), ours.LoraConfig(**config))


class ConvNet(torch.nn.Module):
    """A custom model (as in PEFT's custom-model guide) with 1-, 2- and 3-d convolutions, one grouped."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv1d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv3d(2, 4, (1, 3, 3))
        self.grouped = torch.nn.Conv2d(8, 8, 1, groups=2)

    def forward(self, x1, x2, x3):
        return self.c1(x1), self.grouped(self.c2(x2)), self.c3(x3)


CONV_INPUTS = [torch.randn(2, 3, 10), torch.randn(2, 3, 8, 8), torch.randn(2, 2, 3, 6, 6)]


def _conv_out(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.eval()(*CONV_INPUTS))


CONV_VARIANTS = {
    "lora": dict(target_modules=["c1", "c2", "c3", "grouped"]),
    "lora_bias": dict(target_modules=["c1", "c2", "c3", "grouped"], lora_bias=True),
    "dora": dict(target_modules=["c1", "c2", "c3"], use_dora=True, lora_dropout=0.1),  # DoRA: not grouped ones
}


@pytest.mark.parametrize("variant", CONV_VARIANTS)
def test_convolution_targets_match_peft_both_ways(variant: str, tmp_path: Path) -> None:
    config = dict(r=4, lora_alpha=8, init_lora_weights=False, **CONV_VARIANTS[variant])
    mine = ours.get_peft_model(ConvNet(), ours.LoraConfig(**config))
    _perturb(mine)
    mine.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(ConvNet(), tmp_path / "ours")
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_conv_out(mine), _conv_out(theirs)))
    assert not torch.allclose(_conv_out(mine)[1], _conv_out(ConvNet())[1], atol=1e-3)

    if variant == "dora":  # peft's file layout of the magnitude: (1, out, 1, ...)
        keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        assert keys["base_model.model.c2.lora_magnitude_vector"].shape == (1, 8, 1, 1)

    theirs = peft.get_peft_model(ConvNet(), peft.LoraConfig(**{**config, "lora_dropout": 0.0}))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    back = ours.PeftModel.from_pretrained(ConvNet(), tmp_path / "peft", is_trainable=True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_conv_out(back), _conv_out(theirs)))
    for model in (back, theirs):  # the same gradients
        model.train()
        sum(out.square().mean() for out in model(*CONV_INPUTS)).backward()
    grads = [_grads(m) for m in (back, theirs)]
    assert grads[0].keys() == grads[1].keys() and all(torch.allclose(grads[0][k], grads[1][k]) for k in grads[0])


@pytest.mark.parametrize("use_dora", [False, True])
def test_convolution_merge_equals_unmerged(use_dora: bool) -> None:
    model = ours.get_peft_model(ConvNet(), ours.LoraConfig(r=4, target_modules=["c1", "c2", "c3"],
                                                           init_lora_weights=False, use_dora=use_dora))  # fmt: skip
    _perturb(model)
    unmerged = _conv_out(model)
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_conv_out(model), unmerged))
    model.unmerge_adapter()
    assert all(torch.allclose(p, before[n], atol=1e-6) for n, p in model.named_parameters() if n in before)
    merged = model.merge_and_unload()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_conv_out(merged), unmerged))
    grouped = ours.get_peft_model(ConvNet(), ours.LoraConfig(r=4, target_modules=["grouped"]))
    with pytest.raises(ValueError, match="grouped Conv2d is not supported"):
        grouped.merge_adapter()
    with pytest.raises(ValueError, match=r"use_dora on a grouped Conv2d \(groups=2\)"):
        ours.get_peft_model(ConvNet(), ours.LoraConfig(r=4, target_modules=["grouped"], use_dora=True))


def _tied_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(config).eval()


TOKENS = dict(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7], init_lora_weights=False)
TOKEN_IDS = torch.tensor([[1, 3, 5, 7, 9, 3], [7, 2, 5, 5, 0, 3]])


def _token_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKEN_IDS).logits


def _move_tokens(model) -> None:
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-lm-head"])
def test_trainable_tokens_match_peft_both_ways(tied: bool, tmp_path: Path) -> None:
    mine = ours.get_peft_model(_tied_llama(tied), ours.LoraConfig(**TOKENS))
    _move_tokens(mine)
    mine.save_pretrained(tmp_path / "ours")
    assert torch.allclose(_token_logits(peft.PeftModel.from_pretrained(_tied_llama(tied), tmp_path / "ours")),
                          _token_logits(mine), atol=1e-5)  # fmt: skip
    theirs = peft.get_peft_model(_tied_llama(tied), peft.LoraConfig(**TOKENS))
    _move_tokens(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )  # one (3, 64) tensor of rows, also when the head is tied; no embedding matrix
    back = ours.PeftModel.from_pretrained(_tied_llama(tied), tmp_path / "peft")
    assert torch.allclose(_token_logits(back), _token_logits(theirs), atol=1e-5)
    unmerged = _token_logits(back)
    back.merge_adapter()
    assert torch.allclose(_token_logits(back), unmerged, atol=1e-5)
    back.unmerge_adapter()
    assert torch.equal(
        back.get_base_model().get_input_embeddings().base_layer.weight, _tied_llama(tied).model.embed_tokens.weight
    )
    with torch.no_grad():  # a mixed batch: row 0 with the tokens, row 1 the bare base
        mixed = back(TOKEN_IDS, adapter_names=["default", "__base__"]).logits
    assert torch.allclose(mixed[0], unmerged[0], atol=1e-5)
    assert torch.allclose(mixed[1], _token_logits(_tied_llama(tied))[1], atol=1e-5)


def test_training_changes_only_the_chosen_rows(tmp_path: Path) -> None:
    from tests.trainer_helpers import fast_args, token_dataset

    args = fast_args(tmp_path, lora_trainable_token_indices=[3, 5], lora_target_modules=["q_proj"], max_steps=3)
    trainer = ours.PeftTrainer(_tied_llama(True), args, train_dataset=token_dataset(12))
    trainer.train()
    trainer.save_model()
    merged = trainer.model.merge_and_unload().model.embed_tokens.weight
    changed = (merged != _tied_llama(True).model.embed_tokens.weight).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 5]
    with pytest.raises(ValueError, match="both a LoRA target and in trainable_token_indices"):
        ours.get_peft_model(_tied_llama(False), ours.LoraConfig(target_modules=["embed_tokens"],
                                                                trainable_token_indices=[1]))  # fmt: skip
    with pytest.raises(ValueError, match="matches no module; embedding layers"):
        ours.get_peft_model(_tied_llama(False), ours.LoraConfig(target_modules=["q_proj"],
                                                                trainable_token_indices={"embeddings": [1]}))  # fmt: skip


def test_layer_replication_matches_peft_both_ways(tmp_path: Path) -> None:
    config = dict(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, layer_replication=[[0, 2], [1, 2]]
    )
    mine = ours.get_peft_model(tiny_llama(), ours.LoraConfig(**config))
    layers = mine.get_base_model().model.layers
    assert len(layers) == 3 and mine.get_base_model().config.num_hidden_layers == 3
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight  # copies share the base weights ...
    assert layers[1].self_attn.q_proj.lora_A["default"] is not layers[2].self_attn.q_proj.lora_A["default"]  # not LoRA
    mine.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert torch.allclose(_logits(theirs), _logits(mine), atol=1e-5)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "peft")
    back = ours.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert torch.allclose(_logits(back), _logits(theirs), atol=1e-5)
    prompt = IDS[:1, :4]
    with torch.no_grad():  # the KV cache has one slot per layer, copies included
        assert torch.equal(back.generate(prompt, max_new_tokens=5, do_sample=False),
                           theirs.generate(prompt, max_new_tokens=5, do_sample=False))  # fmt: skip
    with pytest.raises(ValueError, match="share their base weights"):
        back.merge_adapter()
    with pytest.raises(ValueError, match="every adapter must use that layer_replication"):
        back.add_adapter("other", ours.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 1]]))
