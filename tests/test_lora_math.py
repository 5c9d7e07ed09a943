"""The fast LoRA branch (hand-written backward, 16-bit dropout masks) against a plain autograd reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_trainer import LoraConfig, get_peft_model
from peft_trainer.lora.functions import keep_input, keep_mask, restore_input

from .conftest import tiny_gpt2, tiny_llama


def _reference(layer, x, seed, p):
    """``base(x) + s·B(A(x ⊙ m / P(keep)))`` written with plain autograd ops and the same masks."""
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    dropped = x
    if p > 0:
        mask, scale = keep_mask(x.reshape(-1, x.shape[-1]).shape, p, x.device)
        dropped = x * mask.view(x.shape) * scale
    out = layer.base_layer(x) + (dropped @ a.T) @ b.T * layer.scaling["default"]
    return out, a, b


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_gradients_match_plain_reference(p, fan_in_fan_out):
    """In float64, so that 1e-5 measures the formula: in float32 the two summation orders differ by up to 2e-5 on
    outputs of this size, and random inputs crossed 1e-5 in a few percent of runs."""
    if fan_in_fan_out:
        model = get_peft_model(tiny_gpt2().double(), LoraConfig(r=4, lora_dropout=p, target_modules=["c_attn"],
                                                                init_lora_weights=False))  # fmt: skip
        layer = model.base_model.model.transformer.h[0].attn.c_attn
    else:
        base = nn.Sequential(nn.Linear(24, 40).double())
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, lora_dropout=p, target_modules=["0"],
                                                init_lora_weights=False))  # fmt: skip
        layer = model.base_model.model[0]
    model.train()
    x = torch.randn(3, 7, layer.in_features, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 7, layer.out_features, dtype=torch.float64)
    assert layer.lora_A["default"].weight.dtype == torch.float64
    torch.manual_seed(11)
    ours = layer(x)
    ours.backward(grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    ref, a, b = _reference(layer, x_ref, 11, p)
    ref.backward(grad_out)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_dropout_masks_are_bernoulli_with_the_right_rate_and_seeded():
    torch.manual_seed(1234)
    mask, scale = keep_mask(torch.Size([1000, 1000]), 0.05, torch.device("cpu"))
    assert abs(mask.float().mean().item() - 0.95) < 0.002
    assert abs(scale - 1 / 0.95) < 1e-4
    rows = mask.float().mean(dim=1)
    assert rows.std() < 0.01  # no lane or row structure
    torch.manual_seed(1234)
    assert torch.equal(keep_mask(torch.Size([1000, 1000]), 0.05, torch.device("cpu"))[0], mask)
    assert not torch.equal(keep_mask(torch.Size([1000, 1000]), 0.05, torch.device("cpu"))[0], mask)


def test_eval_mode_has_no_dropout_and_matches_training_formula_without_it():
    base = nn.Sequential(nn.Linear(16, 16))
    model = get_peft_model(base, LoraConfig(r=2, lora_dropout=0.5, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, 16)
    model.eval()
    first, second = model(x), model(x)
    assert torch.equal(first, second)
    layer = model.base_model.model[0]
    expected = layer.base_layer(x) + layer.lora_delta("default", x)
    torch.testing.assert_close(first, expected)


def test_no_grad_outputs_follow_every_change_to_the_adapter():
    """Every kind of change to the adapter reaches the no-grad output (which must hold no stale copies: fused AdamW,
    the Trainer's default, does not even bump the parameters' version counters)."""
    base = nn.Sequential(nn.Linear(16, 24))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    layer, seen = model.base_model.model[0], []
    x = torch.randn(3, 5, 16)

    def check():
        with torch.no_grad():
            expected = layer.base_layer(x) + layer.lora_delta("default", x)
            assert not any(torch.allclose(expected, e, atol=1e-2) for e in seen)  # each change moved the output
            seen.append(expected)
            for rows in (x, x[:1], x[0]):  # several sequences, one (as in decoding), a 2-D input
                torch.testing.assert_close(model(rows), expected[: len(rows)] if rows.dim() == 3 else expected[0],
                                           atol=1e-4, rtol=1e-4)  # fmt: skip
            with torch.inference_mode():
                torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)

    check()
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(3)  # in place
    check()
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(1)
    check()
    model(x).sum().backward()
    torch.optim.AdamW(model.parameters(), lr=0.5, fused=True).step()
    check()
    layer.lora_A["default"].weight = nn.Parameter(torch.randn(2, 16))  # another tensor
    check()
    layer.scaling["default"] = 0.25
    check()
    model.load_state_dict(
        {k: torch.randn_like(v) for k, v in model.state_dict().items() if "lora_" in k}, strict=False
    )
    check()


def test_no_grad_output_on_a_bfloat16_base_matches_the_formula():
    model = get_peft_model(nn.Sequential(nn.Linear(16, 24).to(torch.bfloat16)),
                           LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))  # fmt: skip
    layer, x = model.base_model.model[0], torch.randn(1, 5, 16, dtype=torch.bfloat16)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters of 16-bit bases train in float32
    with torch.no_grad():
        expected = (layer.base_layer(x).float() + layer.lora_delta("default", x)).to(torch.bfloat16)
        torch.testing.assert_close(model(x), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_linear_path_gives_base_weight_and_bias_gradients_when_they_train(p):
    model = get_peft_model(nn.Sequential(nn.Linear(24, 40)), LoraConfig(r=4, lora_dropout=p, target_modules=["0"],
                                                                        init_lora_weights=False))  # fmt: skip
    layer = model.base_model.model[0]
    layer.base_layer.weight.requires_grad_(True)
    layer.base_layer.bias.requires_grad_(True)
    model.train()
    x = torch.randn(5, 24)  # the input itself needs no gradient
    grad_out = torch.randn(5, 40)
    torch.manual_seed(3)
    layer(x).backward(grad_out)
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    ours = (weight.grad.clone(), bias.grad.clone())
    weight.grad = bias.grad = None
    ref, _, _ = _reference(layer, x, 3, p)
    ref.backward(grad_out)
    torch.testing.assert_close(ours[0], weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], bias.grad, atol=1e-5, rtol=1e-5)


def test_inputs_kept_as_autograd_factors_are_rebuilt_bit_for_bit():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    h = torch.randn(2, 5, 16, requires_grad=True)
    norm = LlamaRMSNorm(16)
    nn.init.normal_(norm.weight.requires_grad_(False))
    normed = norm(h)  # weight * (h * rstd): weight and (h, rstd) are what the multiplications keep anyway
    parts, layout = keep_input(normed)
    assert layout == (1, 2) and all(part is not normed for part in parts)
    assert torch.equal(restore_input(parts, layout), normed)
    gate, up = torch.randn(2, 5, 24, requires_grad=True), torch.randn(2, 5, 24, requires_grad=True)
    swiglu = nn.functional.silu(gate) * up
    parts, layout = keep_input(swiglu)
    assert layout == (1, 1) and torch.equal(restore_input(parts, layout), swiglu)
    for other in (h, h * 2.0, normed.view(10, 16), normed + 1):  # a leaf, a scalar product, a view, a sum
        assert keep_input(other) == ((other,), None)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing decides what is kept
        assert keep_input(normed) == ((normed,), None)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_training_gradients_are_the_same_whether_inputs_are_kept_or_rebuilt(p):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=p, target_modules="all-linear",
                                                    init_lora_weights=False))  # fmt: skip
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    rebuilt = grads()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # every input kept as it is
        kept = grads()
    assert len(rebuilt) == len(kept) == 2 * 7 * 2
    for ours, reference in zip(rebuilt, kept):
        assert torch.equal(ours, reference)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("case", ["linear", "bfloat16 linear", "conv1d"])
def test_autocast_runs_the_lora_math_in_its_dtype_with_float32_adapter_gradients(p, case):
    """The Trainer's ``bf16=True``: under autocast the LoRA functions compute in bfloat16, as autocast makes peft's
    ``nn.Linear`` calls do, and the float32 adapter weights get float32 gradients (``conv1d``: the branch path)."""
    if case == "conv1d":
        model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_dropout=p, target_modules=["c_attn"],
                                                       init_lora_weights=False))  # fmt: skip
        layer = model.base_model.model.transformer.h[0].attn.c_attn
    else:
        dtype = torch.bfloat16 if case.startswith("bfloat16") else torch.float32
        base = nn.Sequential(nn.Linear(24, 40).to(dtype))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, lora_dropout=p, target_modules=["0"],
                                                init_lora_weights=False))  # fmt: skip
        layer = model.base_model.model[0]
    model.train()
    dtype = layer.base_layer.weight.dtype
    x = torch.randn(3, 7, layer.in_features, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(3, 7, layer.out_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(11)
        ours = layer(x)
        ref, a, b = _reference(layer, x_ref, 11, p)
    assert ours.dtype == ref.dtype == torch.bfloat16
    ours.float().backward(grad_out)
    ref.float().backward(grad_out)
    got_a, got_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert got_a.dtype == got_b.dtype == torch.float32
    for got, want in ((ours, ref), (x.grad, x_ref.grad), (got_a, a.grad), (got_b, b.grad)):
        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert err < 1.5e-2  # bfloat16 rounding: up to 7e-3 here


def test_train_mode_without_grad_applies_dropout_as_with_grad():
    """``torch.no_grad()`` in train mode drops out as ``nn.Dropout`` (and peft) do; eval mode does not."""
    model = get_peft_model(nn.Sequential(nn.Linear(16, 24)), LoraConfig(r=4, lora_dropout=0.5, target_modules=["0"],
                                                                          init_lora_weights=False))  # fmt: skip
    layer, x = model.base_model.model[0], torch.randn(2, 5, 16)
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        no_grad = layer(x)
    torch.manual_seed(3)
    with_grad = layer(x)
    torch.testing.assert_close(no_grad, with_grad.detach(), atol=0, rtol=0)
    model.eval()
    with torch.no_grad():
        evaluated = layer(x)
    torch.testing.assert_close(evaluated, layer.base_layer(x) + layer.lora_delta("default", x))
    assert (no_grad - evaluated).abs().max() > 0.1
