"""Tests for peft_trainer.lora.combine: add_weighted_adapter math checked against peft 0.22.0 as an oracle."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from peft_trainer.lora.combine import (
    combine_factors,
    lowrank_svd,
    new_rank,
    prune,
    resolve_combination_type,
)

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

TARGETS = ["emb", "lin0", "lin1"]


class Tiny(nn.Module):
    """Embedding (50 x 16) -> Linear 16->24 -> Linear 24->20."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 20)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lin1(self.lin0(self.emb(ids)))


def _peft_model(configs: list[dict]) -> nn.Module:
    """A peft-wrapped Tiny with adapters a0, a1, ... built from `configs` (non-zero random init)."""
    torch.manual_seed(0)
    cfgs = [LoraConfig(target_modules=TARGETS, init_lora_weights=False, **c) for c in configs]
    model = get_peft_model(Tiny(), cfgs[0], adapter_name="a0")
    for i, cfg in enumerate(cfgs[1:], start=1):
        model.add_adapter(f"a{i}", cfg)
    return model


def _factors(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor, float]:
    """(A (r, in), B (out, r), scaling) of adapter `name` in `layer`, in `B @ A` orientation."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(), layer.scaling[name]
    return layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach(), layer.scaling[name]


def _rel(x: Tensor, ref: Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def _delta(a: Tensor, b: Tensor, w: float, s: float) -> Tensor:
    return w * s * (b.double() @ a.double())


def _ranks(cfg: dict) -> int:
    return max([cfg.get("r", 8), *cfg.get("rank_pattern", {}).values()])


CASES = [
    ("cat", [{"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 4}], [0.7, -1.3], {}),
    ("cat", [{"r": 4, "lora_alpha": 8}, {"r": 6, "lora_alpha": 3}], [1.0, 0.5], {}),
    ("cat", [{"r": 4, "lora_alpha": 8, "rank_pattern": {"lin1": 6}}, {"r": 2, "lora_alpha": 2}], [1.0, 2.0], {}),
    ("linear", [{"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 4}], [0.7, -1.3], {}),
    ("linear", [{"r": 4, "lora_alpha": 8, "use_rslora": True}, {"r": 4, "lora_alpha": 4}], [0.5, 0.5], {}),
    ("svd", [{"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 4}], [0.7, -1.3], {}),
    ("svd", [{"r": 4, "lora_alpha": 8}, {"r": 6, "lora_alpha": 3}], [1.0, 0.5], {"svd_rank": 3}),
    ("svd", [{"r": 4, "lora_alpha": 8}, {"r": 6, "lora_alpha": 3}], [1.0, 0.5], {"svd_clamp": 0.9}),
    ("ties", [{"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 4}, {"r": 4}], [0.7, -1.3, 1.0], {"density": 0.5}),
    ("ties", [{"r": 4, "lora_alpha": 8}, {"r": 4}], [1.0, 1.0], {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", [{"r": 4, "lora_alpha": 8}, {"r": 6, "lora_alpha": 4}], [0.7, -1.3], {"density": 0.5}),
    ("magnitude_prune", [{"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 4}], [0.7, -1.3], {"density": 0.4}),
    ("magnitude_prune_svd", [{"r": 4, "lora_alpha": 8}, {"r": 6}], [1.0, 0.5], {"density": 0.4, "svd_rank": 5}),
]


@pytest.mark.parametrize(
    ("ctype", "configs", "weights", "kwargs"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_matches_peft_add_weighted_adapter(
    ctype: str, configs: list[dict], weights: list[float], kwargs: dict
) -> None:
    model = _peft_model(configs)
    names = [f"a{i}" for i in range(len(configs))]
    model.add_weighted_adapter(names, weights, "new", combination_type=ctype, **kwargs)
    rank = new_rank([_ranks(c) for c in configs], ctype, kwargs.get("svd_rank"))
    assert rank == model.peft_config["new"].r
    extra = {k: v for k, v in kwargs.items() if k != "svd_rank"}
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 3
    for layer in layers:
        a_new, b_new = combine_factors([_factors(layer, n) for n in names], weights, ctype, rank, **extra)
        a_ref, b_ref, s_new = _factors(layer, "new")
        assert a_new.dtype == b_new.dtype == torch.float32
        assert a_new.shape == a_ref.shape and b_new.shape == b_ref.shape
        assert _rel(s_new * b_new @ a_new, s_new * b_ref @ a_ref) <= 1e-5


def test_cat_pads_top_left_block() -> None:
    a0, b0, a1, b1 = torch.randn(2, 10), torch.randn(7, 2), torch.randn(3, 10), torch.randn(7, 3)
    a_new, b_new = combine_factors([(a0, b0, 2.0), (a1, b1, 1.0)], [1.0, -1.0], "cat", rank=8)
    assert a_new.shape == (8, 10) and b_new.shape == (7, 8)
    assert torch.equal(a_new[:2], 2.0 * a0) and torch.equal(a_new[2:5], -a1) and not a_new[5:].any()
    assert torch.equal(b_new[:, 5:], torch.zeros(7, 3)) and torch.equal(b_new[:, :2], b0)


@pytest.mark.parametrize("ctype", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_unequal_ranks_raise(ctype: str) -> None:
    with pytest.raises(ValueError, match="same r value"):
        new_rank([4, 6], ctype, None)
    factors = [(torch.randn(4, 8), torch.randn(5, 4), 1.0), (torch.randn(6, 8), torch.randn(5, 6), 1.0)]
    with pytest.raises(ValueError, match="equal ranks"):
        combine_factors(factors, [1.0, 1.0], ctype, rank=6, density=0.5)


def test_new_rank_and_type_resolution() -> None:
    assert new_rank([4, 6], "cat", None) == 10
    assert new_rank([4, 6], "svd", None) == 6 and new_rank([4, 6], "ties_svd", 3) == 3
    assert new_rank([4, 4], "linear", None) == 4
    assert resolve_combination_type(1, "svd") == "linear" and new_rank([8], "svd", 2) == 8  # peft forces linear
    assert resolve_combination_type(2, "svd") == "svd"
    with pytest.raises(ValueError, match="Invalid combination_type"):
        new_rank([4, 4], "mean", None)
    with pytest.raises(ValueError, match="density"):
        combine_factors([(torch.randn(4, 8), torch.randn(5, 4), 1.0)] * 2, [1.0, 1.0], "ties", rank=4)


def _dense_reference(factors: list[tuple[Tensor, Tensor, float]], weights: list[float], rank: int) -> Tensor:
    """Top-`rank` truncation of D = Σ w_i s_i B_i A_i via a dense float64 SVD: (out, in)."""
    d = sum(_delta(a, b, w, s) for (a, b, s), w in zip(factors, weights))
    u, s_vals, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :rank] * s_vals[:rank]) @ vh[:rank]


@pytest.mark.parametrize(
    ("out_f", "in_f", "ranks", "weights", "rank"),
    [
        (48, 96, [4, 6], [0.7, -1.3], 6),
        (48, 96, [4, 4, 8], [-1.0, 0.4, 2.0], 16),
        (48, 96, [8, 8], [1.0, 1.0], 20),  # rank above the sum: zero padding
        (5, 40, [4, 6], [1.0, -0.5], 3),  # out < R
        (40, 5, [4, 6], [1.0, -0.5], 5),  # in < R
    ],
)
def test_fast_svd_matches_dense(out_f: int, in_f: int, ranks: list[int], weights: list[float], rank: int) -> None:
    torch.manual_seed(1)
    factors = [(torch.randn(r, in_f), torch.randn(out_f, r), 2.0 / r) for r in ranks]
    svd_inputs: list[tuple[int, ...]] = []
    real_svd = torch.linalg.svd

    def spy(x: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, Tensor, Tensor]:
        svd_inputs.append(tuple(x.shape))
        return real_svd(x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.linalg, "svd", spy)
        a_new, b_new = combine_factors(factors, weights, "svd", rank)
    assert svd_inputs and all(max(shape) <= sum(ranks) for shape in svd_inputs)  # no dense (out, in) SVD
    assert a_new.shape == (rank, in_f) and b_new.shape == (out_f, rank)
    assert _rel((b_new @ a_new).double(), _dense_reference(factors, weights, rank)) <= 1e-4


def test_lowrank_svd_is_an_svd() -> None:
    torch.manual_seed(2)
    a_cat, b_cat = torch.randn(10, 30), torch.randn(20, 10)
    u, s, vh = lowrank_svd(a_cat, b_cat)
    assert torch.allclose(u.T @ u, torch.eye(10), atol=1e-5) and torch.allclose(vh @ vh.T, torch.eye(10), atol=1e-5)
    assert bool((s[:-1] >= s[1:]).all())
    assert _rel((u * s) @ vh, b_cat @ a_cat) <= 1e-5


@pytest.mark.parametrize("ctype", ["linear", "svd", "cat"])
def test_single_adapter_reweights_exactly(ctype: str) -> None:
    torch.manual_seed(3)
    a, b, s = torch.randn(4, 12), torch.randn(9, 4), 1.5
    for w in (-1.0, 0.3):
        a_new, b_new = combine_factors([(a, b, s)], [w], ctype, rank=4)
        assert _rel((b_new @ a_new).double(), _delta(a, b, w, s)) <= 1e-5


def test_half_precision_inputs_are_upcast() -> None:
    """Two copies of one bf16 adapter: cat/svd give 2·ΔW; linear gives (2B)(2A) = 4·ΔW (its cross terms)."""
    a, b = torch.randn(4, 12, dtype=torch.bfloat16), torch.randn(9, 4, dtype=torch.bfloat16)
    for ctype in ("cat", "linear", "svd"):
        a_new, b_new = combine_factors([(a, b, 1.0), (a, b, 1.0)], [1.0, 1.0], ctype, rank=8 if ctype == "cat" else 4)
        assert a_new.dtype == b_new.dtype == torch.float32
        assert (
            _rel((b_new @ a_new).double(), _delta(a.float(), b.float(), 4.0 if ctype == "linear" else 2.0, 1.0))
            <= 1e-5
        )


def test_prune_helpers() -> None:
    torch.manual_seed(4)
    t = torch.randn(200, 300)
    kept = prune(t, 0.3, "random", rescale=True)
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.02
    assert torch.allclose(kept[kept != 0], t[kept != 0] / 0.3)
    top = prune(t, 0.1, "magnitude")
    assert int((top != 0).sum()) == int(0.1 * t.numel())
    assert top.abs()[top != 0].min() >= t.abs()[top == 0].max()
    with pytest.warns(UserWarning, match="no pruning"):
        assert torch.equal(prune(t, 1.0, "random"), t)
    with pytest.raises(ValueError, match="Density"):
        prune(t, -0.1, "magnitude")


@pytest.mark.parametrize("ctype", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_matches_peft_merge_functions_under_same_seed(ctype: str) -> None:
    torch.manual_seed(5)
    factors = [(torch.randn(4, 16), torch.randn(12, 4), 2.0), (torch.randn(4, 16), torch.randn(12, 4), 0.5)]
    weights, density = [0.7, -1.3], 0.4
    peft_fn = getattr(merge_utils, ctype.removesuffix("_svd"))
    extra = {} if ctype.startswith("dare_linear") else {"majority_sign_method": "total"}
    torch.manual_seed(6)
    a_new, b_new = combine_factors(factors, weights, ctype, rank=4, density=density)
    assert a_new.shape == (4, 16) and b_new.shape == (12, 4)
    torch.manual_seed(6)
    if ctype.endswith("svd"):
        deltas = [(b @ a) * s for a, b, s in factors]
        d = peft_fn(deltas, torch.tensor(weights), density, **extra)
        u, s_vals, vh = torch.linalg.svd(d, full_matrices=False)
        ref = (u[:, :4] * s_vals[:4]) @ vh[:4]
    else:
        ws = [w * s for (_, _, s), w in zip(factors, weights)]
        w_b = torch.tensor([abs(x) ** 0.5 for x in ws])
        w_a = w_b * torch.tensor([1.0 if x >= 0 else -1.0 for x in ws])
        a_ref = peft_fn([a for a, _, _ in factors], w_a, density, **extra)
        b_ref = peft_fn([b for _, b, _ in factors], w_b, density, **extra)
        ref = b_ref @ a_ref
    assert _rel(b_new @ a_new, ref) <= 1e-5
