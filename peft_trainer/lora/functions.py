"""The training-path autograd functions of LoRA ``Linear`` layers, their dropout masks, and how they keep their input
for the backward pass."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Dropout keep-mask (bool) and the scale 1 / P(keep) for the kept values, from 16 random bits per element:
    P(drop) = round(p · 65536) / 65536, within 8e-6 of p; several times faster than ``F.dropout`` on CPU.

    Everything derives from torch's default generator (on CPU one 64-bit draw seeds numpy's SFC64, which makes
    the bits twice as fast as torch's serial CPU generator), so seeds, the Trainer's RNG checkpoints and
    activation checkpointing's RNG replay all see the same masks. Under torch.compile: ``torch.randint``.
    """
    drop = round(p * 65536)
    n = math.prod(shape)
    words = (n + 3) // 4
    if torch.compiler.is_compiling():  # traceable (random_ is not); compiled, as fast as numpy's bits on CPU
        bits = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device=device).view(torch.int16)
    elif device.type == "cpu":
        seed = int(torch.empty((), dtype=torch.int64).random_(-(2**63), None)) & (2**64 - 1)
        bits = torch.from_numpy(np.random.SFC64(seed).random_raw(words).view(np.int16))
    else:
        bits = torch.empty(words, dtype=torch.int64, device=device).random_(-(2**63), None).view(torch.int16)
    return bits[:n].view(shape) >= drop - 32768, 65536 / (65536 - drop)


def _as_factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0/1 tensor of ``dtype`` from a bool mask (through uint8: far faster than a bool multiply or ``.float()``)."""
    return keep.view(torch.uint8).to(dtype)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` with the masks of :func:`keep_mask` (autograd passes through the product)."""
    keep, keep_scale = keep_mask(x.shape, p, x.device)
    return x * _as_factor(keep, x.dtype).mul_(keep_scale)


def _down(flat: torch.Tensor, a: torch.Tensor, scaling: float, p: float):
    """The rank-r activations ``h = s · dropout(x) Aᵀ`` (N, r), the keep-mask (None without dropout) and s."""
    keep, keep_scale = keep_mask(flat.shape, p, flat.device) if p > 0 else (None, 1.0)
    s = scaling * keep_scale
    return F.linear(flat * _as_factor(keep, flat.dtype) if keep is not None else flat, a).mul_(s), keep, s


def _flat_input(ctx, parts: list[torch.Tensor], needed: bool) -> torch.Tensor | None:
    """The saved input as ``(N, in)`` (None when no gradient needs it)."""
    return restore_input(parts, ctx.layout).reshape(-1, ctx.x_shape[-1]) if needed else None


def _factor_grads(g: torch.Tensor, flat: torch.Tensor, a, b, h, keep, s: float, needs: tuple[bool, bool]):
    """grad A and grad B (None where not needed), ``gh = s · g B`` (N, r) and the mask as a 0/1 factor (or None)."""
    factor = _as_factor(keep, a.dtype) if keep is not None else None
    grad_b = (h.T @ g).T if needs[1] else None  # (out, r); 2-3x faster than g.T @ h for these skinny shapes
    gh = (g @ b).mul_(s)
    grad_a = gh.T @ (flat * factor if factor is not None else flat) if needs[0] else None  # (r, in)
    return grad_a, grad_b, gh, factor


def _hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _is_mul(node) -> bool:
    return type(node).__name__ == "MulBackward0"


def keep_input(x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...] | None]:
    """What to save so that backward has ``x`` again: ``(tensors, layout)`` for :func:`restore_input`.

    When ``x`` is a product ``u * v`` whose factors (or, one level up, ``u * (v * w)``) autograd already keeps for
    the multiplication's own backward, those factors are saved instead of ``x``: they cost no memory, and the backward
    recomputes ``x`` from them bit for bit. That covers the inputs of most adapted projections: RMSNorm's output
    ``weight * (h * rstd)`` (q/k/v, gate/up) and SwiGLU's ``silu(gate) * up`` (down). Otherwise ``x`` itself (layout
    None). Not under saved-tensor hooks (activation checkpointing, offloading): those decide what is kept.
    """
    if torch.compiler.is_compiling():  # the compiler decides what is kept; it cannot read autograd's graph
        return (x,), None
    node = x.grad_fn
    if not _is_mul(node) or _hooks_active():
        return (x,), None
    parts: list[torch.Tensor] = []
    layout: list[int] = []
    for saved, (inner, _) in zip((node._saved_self, node._saved_other), node.next_functions):
        if saved is not None:
            parts.append(saved)
            layout.append(1)
        elif _is_mul(inner) and inner._saved_self is not None and inner._saved_other is not None:
            parts += [inner._saved_self, inner._saved_other]
            layout.append(2)
        else:
            return (x,), None
    return tuple(parts), tuple(layout)


def restore_input(parts: Sequence[torch.Tensor], layout: tuple[int, ...] | None) -> torch.Tensor:
    """``x`` from :func:`keep_input`'s tensors: the same products in the same order, so the same bits."""
    if layout is None:
        return parts[0]
    it = iter(parts)
    u, v = (next(it) if n == 1 else next(it) * next(it) for n in layout)
    return u * v


class LoraBranch(torch.autograd.Function):
    """``base_out + s · B(A(dropout(x)))`` in one fused multiply-add, with a hand-written backward.

    It saves ``x`` (through :func:`keep_input`: often only tensors autograd keeps anyway) and a 1-byte keep-mask
    instead of a dropped-out float copy per projection; the scalings are applied to the rank-r tensors only.
    """

    @staticmethod
    def forward(ctx, base_out, x, a, b, scaling: float, p: float):  # (..., out), (..., in), (r, in), (out, r)
        h, keep, ctx.s = _down(x.reshape(-1, x.shape[-1]), a, scaling, p)
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h, b.T)
        parts, ctx.layout = keep_input(x)
        ctx.save_for_backward(a, b, h, keep, *parts)
        ctx.x_shape = x.shape
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        a, b, h, keep, *parts = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(b.dtype)  # (N, out)
        flat = _flat_input(ctx, parts, ctx.needs_input_grad[2])
        grad_a, grad_b, gh, factor = _factor_grads(g, flat, a, b, h, keep, ctx.s, ctx.needs_input_grad[2:4])
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = gh @ a
            if factor is not None:
                grad_x.mul_(factor)
            grad_x = grad_x.view(ctx.x_shape)
        return grad if ctx.needs_input_grad[0] else None, grad_x, grad_a, grad_b, None, None


class LoraLinear(torch.autograd.Function):
    """``x Wᵀ + bias + s · B(A(dropout(x)))`` for a plain ``nn.Linear`` base: :class:`LoraBranch` with the base
    matmul inside, so the LoRA term is added in place into the base output and its input gradient in place into
    the base's (no separate output copy and no gradient sum per projection).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, p: float):
        flat = x.reshape(-1, x.shape[-1])
        h, keep, ctx.s = _down(flat, a, scaling, p)
        out = F.linear(flat, weight, bias).addmm_(h, b.T)
        parts, ctx.layout = keep_input(x)
        ctx.save_for_backward(weight, a, b, h, keep, *parts)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight, a, b, h, keep, *parts = ctx.saved_tensors
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        flat = _flat_input(ctx, parts, ctx.needs_input_grad[3] or need_w)
        grad_a, grad_b, gh, factor = _factor_grads(g, flat, a, b, h, keep, ctx.s, ctx.needs_input_grad[3:5])
        grad_x = grad_w = grad_bias = None
        if need_x:
            grad_x = g @ weight
            if factor is None:
                grad_x.addmm_(gh, a)
            else:
                grad_x.addcmul_(gh @ a, factor)
            grad_x = grad_x.view(ctx.x_shape)
        if need_w:
            grad_w = g.T @ flat
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None
