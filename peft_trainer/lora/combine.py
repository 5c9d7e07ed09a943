"""Tensor math of `add_weighted_adapter`: combine several LoRA factor pairs (A, B, scaling) into one, per layer."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

COMBINATION_TYPES = (
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_EQUAL_RANK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def resolve_combination_type(num_adapters: int, combination_type: str) -> str:
    """Validate `combination_type`; like peft, a single adapter is always combined with `"linear"`.

    Call this with the number of adapters of the whole `add_weighted_adapter` call (not per layer).
    """
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    return "linear" if num_adapters == 1 else combination_type


def new_rank(ranks: list[int], combination_type: str, svd_rank: int | None) -> int:
    """Rank of the combined adapter; `ranks[i]` is adapter i's `max(r, *rank_pattern.values())`."""
    combination_type = resolve_combination_type(len(ranks), combination_type)
    if combination_type in _EQUAL_RANK_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type linear, ties, dare_ties or "
                f"dare_linear (got ranks {ranks} for combination_type {combination_type!r})."
            )
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def prune(tensor: Tensor, density: float, method: str, rescale: bool = False) -> Tensor:
    """Zero all but a `density` fraction of `tensor` (any shape): top-|value| (`"magnitude"`) or Bernoulli (`"random"`).

    `"random"` with `rescale` divides the survivors by `density` (DARE). `density >= 1` warns and prunes nothing.
    """
    if density >= 1:
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=2
        )
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        keep[tensor.abs().flatten().topk(int(density * tensor.numel())).indices] = 1
        return tensor * keep.view_as(tensor)
    pruned = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return pruned / density if rescale and density > 0 else pruned


def merge_tensors(
    tensors: list[Tensor],
    weights: Tensor,
    method: str,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> Tensor:
    """Merge same-shape task tensors T_i (any shape) with weights λ_i (n,) into one tensor of that shape.

    `method`: "linear" (Σ λ_i T_i), "magnitude_prune", "ties", "dare_linear" or "dare_ties". TIES elects the
    majority sign on the unweighted pruned stack and takes the mean of the agreeing weighted entries.
    """
    if method in ("ties", "magnitude_prune"):
        tensors = [prune(t, density, "magnitude") for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [prune(t, density, "random", rescale=True) for t in tensors]
    stacked = torch.stack(tensors)  # (n, *shape)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if not method.endswith("ties"):
        return weighted.sum(dim=0)
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def lowrank_svd(a_cat: Tensor, b_cat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of D = b_cat @ a_cat without forming D: b_cat (out, R), a_cat (R, in).

    Returns U (out, m), S (m,), Vh (m, in) with m = min(out, in, R), via QR of both factors and an SVD of the
    small core Rb @ Ra^T.
    """
    q_b, r_b = torch.linalg.qr(b_cat)  # (out, p), (p, R)
    q_a, r_a = torch.linalg.qr(a_cat.T)  # (in, q), (q, R)
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # (p, m), (m,), (m, q)
    return q_b @ u_core, s, vh_core @ q_a.T


def _pad(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad A (k, in) / B (out, k) into the top-left of (rank, in) / (out, rank) when k < rank."""
    k = a.shape[0]
    if k >= rank:
        return a, b
    return torch.cat([a, a.new_zeros(rank - k, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)


def combine_factors(
    factors: list[tuple[Tensor, Tensor, float]],
    weights: list[float],
    combination_type: str,
    rank: int,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> tuple[Tensor, Tensor]:
    """Combine one layer's adapters the way peft 0.22.0's `add_weighted_adapter` does.

    factors[i] = (A_i (r_i, in), B_i (out, r_i), scaling_i), delta in `B @ A` (out, in) orientation; weights[i]
    is adapter i's user weight. Pass the type from `resolve_combination_type` and `rank` from `new_rank`.
    Returns float32 (A_new (rank, in), B_new (out, rank)), meant for the new adapter's scaling (1.0 unless rsLoRA).
    """
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    if not factors or len(factors) != len(weights):
        raise ValueError(
            f"Need one weight per factor pair, got {len(factors)} factor pairs and {len(weights)} weights"
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    method = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
    if method != "linear" and combination_type != "cat" and density is None:
        raise ValueError(f"combination_type {combination_type!r} needs a density in [0, 1]")
    a_list = [a.float() for a, _, _ in factors]
    b_list = [b.float() for _, b, _ in factors]
    scalings = [float(s) for _, _, s in factors]

    if combination_type == "cat":
        a_new = torch.cat([a * (w * s) for a, w, s in zip(a_list, weights, scalings)])
        return _pad(a_new, torch.cat(b_list, dim=1), rank)

    if not combination_type.endswith("svd"):  # factor-level merge, sqrt(|w s|) on each side, sign on A
        if len({a.shape for a in a_list}) != 1:
            raise ValueError(f"combination_type {combination_type!r} needs equal ranks in every layer")
        ws = [w * s for w, s in zip(weights, scalings)]
        w_b = [math.sqrt(abs(x)) for x in ws]
        w_a = torch.tensor([c if x >= 0 else -c for c, x in zip(w_b, ws)], device=a_list[0].device)
        a_new = merge_tensors(a_list, w_a, method, density, majority_sign_method)
        b_new = merge_tensors(
            b_list, torch.tensor(w_b, device=b_list[0].device), method, density, majority_sign_method
        )
        return _pad(a_new, b_new, rank)

    if combination_type == "svd" and svd_clamp is None:  # never form the dense delta
        b_cat = torch.cat([b * (w * s) for b, w, s in zip(b_list, weights, scalings)], dim=1)  # (out, R)
        u, s_vals, vh = lowrank_svd(torch.cat(a_list), b_cat)
    else:  # pruning needs the dense delta; with a clamp, the quantile depends on LAPACK's singular-vector signs
        deltas = [(b @ a) * s for a, b, s in zip(a_list, b_list, scalings)]  # (out, in) each
        w = torch.tensor(weights, dtype=torch.float32, device=deltas[0].device)
        delta = merge_tensors(deltas, w, method, density, majority_sign_method)
        u, s_vals, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s_vals.numel())
    b_new, a_new = u[:, :k] * s_vals[:k], vh[:k]
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([b_new.flatten(), a_new.flatten()]), svd_clamp)
        b_new, a_new = b_new.clamp(-hi, hi), a_new.clamp(-hi, hi)
    return _pad(a_new.contiguous(), b_new.contiguous(), rank)
