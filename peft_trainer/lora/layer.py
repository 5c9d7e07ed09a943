"""LoRA layers (Linear, GPT-2 Conv1D, Embedding, Conv1d/2d/3d), the shared adapter state, and the modules_to_save wrapper."""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import decomposes_base
from .functions import LoraBranch, LoraLinear
from .functions import dropout as fast_dropout
from .quant import is_quantized_weight, read_weight, write_weight


@dataclass(frozen=True)
class RowGroups:
    """Per-row adapter choice for one call: ``groups[i] = (adapter name, row indices)``; ``"__base__"`` = none."""

    groups: tuple[tuple[str, torch.Tensor], ...]
    batch_size: int


class AdapterState:
    """Which adapters run, held once per model and shared by every LoRA layer (switching is O(1)).

    A context variable lets one call (one thread or task) choose other adapters without changing what the
    rest of the process sees. It is read only while some call holds an override, so that torch.compile, which
    cannot trace a context variable, traces the common case through plain attributes.
    """

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.merged: list[str] = []
        self._run: tuple[str, ...] = ()
        self._override: ContextVar[tuple[str, ...] | RowGroups | None] = ContextVar(
            f"peft_trainer_adapters_{id(self)}", default=None
        )
        self._overrides = 0  # calls holding an override now, in any thread or task
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Copies and pickles hold the adapters' state, not the calls in flight (their overrides)."""
        return {k: v for k, v in vars(self).items() if k not in ("_override", "_lock", "_overrides")}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        vars(self).update(state)

    def refresh(self) -> None:
        self._run = () if self.disabled else tuple(a for a in self.active if a not in self.merged)

    def current(self) -> tuple[str, ...] | RowGroups:
        """The adapters the layers must add on top of the (possibly merged) base weights for this call."""
        override = self._override.get() if self._overrides else None
        return self._run if override is None else override

    @contextlib.contextmanager
    def override(self, selection: tuple[str, ...] | RowGroups) -> Iterator[None]:
        """Inside, this thread or task runs ``selection`` instead of the active adapters."""
        with self._lock:
            self._overrides += 1
        token = self._override.set(selection)
        try:
            yield
        finally:
            self._override.reset(token)
            with self._lock:
                self._overrides -= 1


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Autocast's compute dtype for ``x``'s device when autocast is on there (e.g. the Trainer's ``bf16=True``)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _no_autocast(x: torch.Tensor, amp: torch.dtype | None):
    """Autocast off inside the LoRA functions (their inputs are already cast), a no-op when it was off."""
    return torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext()


class LoraLayer(nn.Module):
    """Holds ``base_layer`` plus per-adapter LoRA factors; subclasses define the shapes and the delta."""

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        # DoRA: per adapter, the learned magnitude of each output feature (its weight-norm direction is W + ΔW)
        self.lora_magnitude_vector = nn.ParameterDict()
        self._merge_norms: dict[str, torch.Tensor] = {}  # DoRA: ‖W + ΔW‖ at merge time, for unmerge
        self._norm_cache: dict[str, tuple[tuple, torch.Tensor]] = {}  # DoRA: ‖W + ΔW‖ while nothing changes
        object.__setattr__(self, "state", state)  # shared, not a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _adapter_dtype(self) -> torch.dtype:
        dtype = self.base_layer.weight.dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def _set_scaling(self, name: str, r: int, alpha: float, use_rslora: bool) -> None:
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW for adapter ``name`` in the base weight's layout, in float32."""
        raise NotImplementedError

    # DoRA: the norm of W + ΔW is taken over the input features of each output feature. ``_norm_dim`` is the
    # dimension of the base weight (in its own layout) that holds the input features.
    _norm_dim = 1

    def _factor_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector shaped to scale the base weight in its own layout."""
        return v.view(-1, 1) if self._norm_dim == 1 else v.view(1, -1)

    def weight_norm(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """DoRA's ‖W + ΔW‖ per output feature (detached, float32), for ``weight`` (default: the base weight).

        For the base weight it is expanded, ‖W‖² + 2s·⟨W, BA⟩ + s²‖BA‖² per row, so that no (out, in) matrix is
        built at each step; ‖W‖² is cached while the base weight stays the same tensor. Inference (no grad, eval
        mode) caches the whole norm while the factors stay the same tensors at the same version; a forward with
        grad or a switch to train mode drops that (optimizers such as fused AdamW update in place without bumping
        versions)."""
        if weight is not None:
            with torch.no_grad():
                return torch.linalg.norm(
                    weight.float() + self.delta_weight(name).to(weight.device), dim=self._norm_dim
                )
        compiling = torch.compiler.is_compiling()  # no caches: the compiler cannot trace data pointers
        inference = not (compiling or torch.is_grad_enabled() or self.training)
        key = None if compiling else tuple((t.data_ptr(), t._version) for t in self._factor_tensors(name))
        cached = self._norm_cache.get(name)
        if inference and cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            weight = read_weight(self.base_layer).float()
            rows = weight if self._norm_dim == 1 else weight.T  # (out, in)
            squares = rows.square().sum(1) if compiling else self._base_squares(rows)
            a, b = (t.float() for t in self._factor_tensors(name))  # (r, in), (out, r)
            s = self.scaling[name]
            cross = ((rows @ a.T) * b).sum(1)  # ⟨W_i, (BA)_i⟩
            own = ((b @ (a @ a.T)) * b).sum(1)  # ‖(BA)_i‖²
            norm = (squares + 2 * s * cross + s * s * own).clamp_min(0).sqrt()
        if inference:
            self._norm_cache[name] = (key, norm)
        return norm

    def _base_squares(self, rows: torch.Tensor) -> torch.Tensor:
        """‖W_i‖² per output feature of ``rows`` (out, in), cached while the base weight is the same tensor."""
        key = (self.base_layer.weight.data_ptr(), self.base_layer.weight._version)
        cached = self._norm_cache.get("__base__")
        if cached is None or cached[0] != key:
            cached = self._norm_cache["__base__"] = (key, rows.square().sum(1))
        return cached[1]

    def train(self, mode: bool = True) -> LoraLayer:
        if mode:  # keeps ‖W‖² (the base is frozen)
            self._norm_cache = {k: v for k, v in self._norm_cache.items() if k == "__base__"}
        return super().train(mode)

    def _dora_scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``magnitude / ‖W + ΔW‖`` (out,), the norm treated as a constant (DoRA paper, section 4.3)."""
        magnitude = self.lora_magnitude_vector[name].reshape(-1)  # convolutions keep peft's (1, out, 1, ...)
        return (magnitude / self.weight_norm(name).to(magnitude.dtype)).to(dtype)

    def _factor_tensors(self, name: str) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (float32, the base's layout) with adapter ``name`` merged in: W + ΔW, or for DoRA
        m / ‖W + ΔW‖ · (W + ΔW) (the norm is kept for :meth:`unmerge`)."""
        delta = self.delta_weight(name).to(weight.device)
        if name not in self.lora_magnitude_vector:
            return weight + delta
        norm = self.weight_norm(name, weight)
        self._merge_norms[name] = norm
        factor = self.lora_magnitude_vector[name].detach().float().reshape(-1).to(weight.device) / norm
        return self._factor_view(factor) * (weight + delta)

    def _unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name).to(weight.device)
        if name not in self.lora_magnitude_vector:
            return weight - delta
        magnitude = self.lora_magnitude_vector[name].detach().float().reshape(-1).to(weight.device)
        factor = magnitude / self._merge_norms.pop(name)
        return weight / self._factor_view(factor) - delta

    def _bias_delta(self, name: str) -> torch.Tensor | None:
        return None

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Merge each adapter into the base weight (and bias, for ``lora_bias``), in order; with ``safe_merge``
        check finiteness first, on copies."""
        names = [n for n in names if n in self.r]
        if not names:
            return
        weight = read_weight(self.base_layer).float().clone()
        bias_deltas = [d for d in (self._bias_delta(n) for n in names) if d is not None]
        base_bias = getattr(self.base_layer, "bias", None)
        if bias_deltas and base_bias is None:
            raise ValueError(
                f"Impossible to merge adapter(s) {', '.join(names)} with lora_bias=True: the base layer "
                f"({type(self.base_layer).__name__}) has no bias to merge it into"
            )
        for name in names:
            weight = self._merged_weight(name, weight)
        bias = base_bias.detach().float() + sum(bias_deltas) if bias_deltas else None
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            for name in names:
                self._merge_norms.pop(name, None)
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken "
                "(the base weights were left untouched)"
            )
        write_weight(self.base_layer, weight)
        self._norm_cache.clear()
        if bias is not None:
            base_bias.data.copy_(bias.to(base_bias.dtype))

    def unmerge(self, names: list[str]) -> None:
        names = [n for n in names if n in self.r]
        if not names:
            return
        weight = read_weight(self.base_layer).float().clone()
        for name in reversed(names):
            weight = self._unmerged_weight(name, weight)
        write_weight(self.base_layer, weight)
        self._norm_cache.clear()
        bias_deltas = [d for d in (self._bias_delta(n) for n in names) if d is not None]
        if bias_deltas:
            bias = self.base_layer.bias
            bias.data.copy_((bias.detach().float() - sum(bias_deltas)).to(bias.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base output plus each selected adapter's (:meth:`add_output`), in the base output's dtype."""
        result = self.base_layer(x, *args, **kwargs)
        selection = self.state.current()
        if not selection:
            return result
        if isinstance(selection, RowGroups):
            return _add_rows(result, x, selection, self)
        dtype = result.dtype
        for name in selection:
            if name in self.r:
                result = self.add_output(name, result, x)
        return result.to(dtype)

    def add_output(self, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result`` (the base output so far) with adapter ``name``'s contribution for input ``x``."""
        return result + self.lora_delta(name, x)

    def delete_adapter(self, name: str) -> None:
        for attr in (
            "lora_A",
            "lora_B",
            "lora_dropout",
            "lora_embedding_A",
            "lora_embedding_B",
            "lora_magnitude_vector",
        ):
            container = getattr(self, attr, None)
            if container is not None and name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling, self._merge_norms, self._norm_cache):
            d.pop(name, None)

    def set_trainable(self, name: str, trainable: bool) -> None:
        for p in self.adapter_parameters(name):
            p.requires_grad_(trainable)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        raise NotImplementedError


class FactoredLayer(LoraLayer):
    """A LoRA layer whose factors are modules, ``lora_A[name]`` and ``lora_B[name]`` (Linear and Conv)."""

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _add_factors(
        self, name: str, a: nn.Module, b: nn.Module, r: int, alpha: float, dropout: float, init: bool | str,
        use_rslora: bool,
    ) -> None:  # fmt: skip
        """Register A and B, initialized as peft does: true -> Kaiming A, 'gaussian' -> N(0, 1/r) A; B (and its
        bias) zero for both, so the adapter starts as a no-op; false leaves the modules' random init."""
        if init in (True, "gaussian"):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5)) if init is True else nn.init.normal_(
                a.weight, std=1 / r
            )
            nn.init.zeros_(b.weight)
            if b.bias is not None:
                nn.init.zeros_(b.bias)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._set_scaling(name, r, alpha, use_rslora)

    def _factor_tensors(self, name: str) -> tuple[torch.Tensor, ...]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        extra = [self.lora_magnitude_vector[name]] if name in self.lora_magnitude_vector else []
        return [*self.lora_A[name].parameters(), *self.lora_B[name].parameters(), *extra]

    def _bias_delta(self, name: str) -> torch.Tensor | None:
        bias = self.lora_B[name].bias
        return None if bias is None else bias.detach().float() * self.scaling[name]


class Linear(FactoredLayer):
    """LoRA around ``nn.Linear`` (also bitsandbytes 4/8-bit) or transformers' ``Conv1D`` (``fan_in_fan_out``).

    Forward: ``y = base(x) + s · B(A(dropout(x)))`` with A ``(r, in)``, B ``(out, r)``, s = alpha/r (or alpha/√r);
    with ``lora_bias`` B has a bias too. DoRA: ``y = m / ‖W + s·BA‖ · (W x + s · B(A(x))) + bias``, the norm per
    output feature and detached (``weight_norm``), the magnitude m ``(out,)`` learned.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, state)
        self.fan_in_fan_out = fan_in_fan_out
        self._norm_dim = 0 if fan_in_fan_out else 1  # Conv1D weights are (in, out)
        if fan_in_fan_out:  # transformers Conv1D: weight (in, out)
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def update_layer(
        self, name: str, r: int, alpha: float, dropout: float, init: bool | str, use_rslora: bool,
        lora_bias: bool = False, use_dora: bool = False,
    ) -> None:  # fmt: skip
        device = self.base_layer.weight.device
        dtype = self._adapter_dtype()
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=lora_bias, device=device, dtype=dtype)
        self._add_factors(name, a, b, r, alpha, dropout, init, use_rslora)
        if decomposes_base(init):
            self._decompose_base(name, init)
        if use_dora:  # m starts as ‖W + ΔW‖: a DoRA adapter starts where its LoRA would
            self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name, read_weight(self.base_layer)))

    def _decompose_base(self, name: str, init: str) -> None:
        """PiSSA / OLoRA (peft's semantics): A and B from the base weight W (out, in), and W keeps the residual
        W - s·BA, so the model computes what it did. PiSSA: the top-r singular triplets, √(σ/s) on each side
        (``pissa_niter_K``: randomized SVD with K iterations); OLoRA: B = Q[:, :r], A = R[:r] of W = QR."""
        r, s = self.r[name], self.scaling[name]
        weight = read_weight(self.base_layer)
        if init.startswith("pissa") and weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                "PiSSA needs a float32, float16 or bfloat16 base: initialize it unquantized, save the residual "
                "model, and quantize that"
            )
        rows = weight.float().T if self.fan_in_fan_out else weight.float()  # (out, in)
        if init == "olora":
            q, rr = torch.linalg.qr(rows)
            a, b = rr[:r], q[:, :r]
        else:
            if init == "pissa":
                v, sigma, uh = torch.linalg.svd(rows, full_matrices=False)
                v, sigma, uh = v[:, :r], sigma[:r], uh[:r]
            else:
                v, sigma, u = torch.svd_lowrank(rows, r, niter=int(init.removeprefix("pissa_niter_")))
                uh = u.T
            root = torch.diag(torch.sqrt(sigma / s))
            a, b = root @ uh, v @ root
        with torch.no_grad():
            self.lora_A[name].weight.copy_(a.contiguous())
            self.lora_B[name].weight.copy_(b.contiguous())
        residual = rows - s * (b @ a)
        write_weight(self.base_layer, residual.T if self.fan_in_fan_out else residual)

    def _plain_only(self, name: str) -> bool:
        """DoRA and lora_bias adapters train through plain autograd ops (the fused functions know neither)."""
        return name in self.lora_magnitude_vector or self.lora_B[name].bias is not None

    def add_output(self, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return result + self.lora_delta(name, x)
        # DoRA: m/‖W+ΔW‖ · (Wx + s·BAx) - Wx on top of result; Wx is result without the bias, or with dropout in
        # training the base applied to the dropped-out input (as peft computes it).
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        dropout, s = self.lora_dropout[name], self.scaling[name]
        x = x.to(a.dtype)
        scale = self._dora_scale(name, x.dtype)
        if isinstance(dropout, nn.Dropout) and self.training:
            x = fast_dropout(x, dropout.p)  # the masks of the fused LoRA functions: several times F.dropout's speed
            weight = read_weight(self.base_layer).to(x.dtype)
            base = F.linear(x, weight.T if self.fan_in_fan_out else weight)
            out = torch.addcmul(result.to(x.dtype), base, scale - 1)
            return torch.addcmul(out, F.linear(F.linear(x, a), b), scale * s).to(result.dtype)
        # Wx = result - bias, so result + (scale - 1)·Wx + scale·s·BAx = scale·(result + s·BAx) + (1 - scale)·bias
        out = torch.add(result.to(x.dtype), F.linear(F.linear(x, a), b), alpha=s)
        bias = self.base_layer.bias
        return (out * scale if bias is None else torch.addcmul((1 - scale) * bias.to(x.dtype), out, scale)).to(
            result.dtype
        )

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s · B(A(dropout(x)))`` for x ``(..., in)`` -> ``(..., out)`` (plain autograd ops; not DoRA's)."""
        a, b = self.lora_A[name].weight, self.lora_B[name]
        return F.linear(F.linear(self.lora_dropout[name](x.to(a.dtype)), a), b.weight, b.bias) * self.scaling[name]

    def _train_add(self, name: str, result: torch.Tensor, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
        """``result + s · B(A(dropout(x)))`` through :class:`LoraBranch` (the training path), in the adapter's
        dtype, or in ``amp`` (autocast's dtype) when autocast is on."""
        if self._plain_only(name):
            return self.add_output(name, result, x)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = amp or a.dtype
        # .to() is a no-op when the dtypes already agree (float bases); 4-/8-bit bases compute in 16 bits
        with _no_autocast(x, amp):
            out = LoraBranch.apply(result.to(dtype), x.to(dtype), a.to(dtype), b.to(dtype), self.scaling[name],
                                   self._p(name))  # fmt: skip
        return out.to(result.dtype)

    def _p(self, name: str) -> float:
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0

    def _plain_base(self) -> nn.Linear | None:
        """The base layer when it is a plain ``nn.Linear`` without hooks or a patched forward (else None)."""
        base = self._modules["base_layer"]
        plain = type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks)
        return base if plain and "forward" not in base.__dict__ else None

    def _fusable(self, x: torch.Tensor, names: list[str], amp: torch.dtype | None) -> bool:
        """One adapter on a plain ``nn.Linear`` of the adapter's dtype (any, under autocast): one function."""
        base = self._plain_base()
        if len(names) != 1 or base is None or self._plain_only(names[0]):
            return False
        return amp is not None or x.dtype == base.weight.dtype == self.lora_A[names[0]].weight.dtype

    def _base_forward(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        base = None if args or kwargs else self._plain_base()
        if base is None:
            return self.base_layer(x, *args, **kwargs)
        return F.linear(x, base._parameters["weight"], base._parameters["bias"])  # a module call costs µs per token

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        selection = self.state.current()
        if not selection:
            return self._base_forward(x, args, kwargs)
        if isinstance(selection, RowGroups):
            return _add_rows(self._base_forward(x, args, kwargs), x, selection, self)
        if torch.is_grad_enabled() or self.training:  # in train mode dropout applies, with or without grad
            return self._train_forward(x, selection, args, kwargs)
        # Evaluation without grad: each adapter's delta goes in place into the fresh base output. At one token per
        # call (decoding) every Python step here costs about as much as the small matmuls: no reshapes, no checks.
        out = self._base_forward(x, args, kwargs)
        modules = self._modules  # plain dict lookups: Module attribute access costs about 1 µs per call
        for name in selection:
            if name in self.r:
                if name in self.lora_magnitude_vector:
                    out = self.add_output(name, out, x)
                    continue
                a = modules["lora_A"]._modules[name]._parameters["weight"]
                b = modules["lora_B"]._modules[name]._parameters
                h = F.linear(x if x.dtype == a.dtype else x.to(a.dtype), a)
                out.add_(F.linear(h, b["weight"], b["bias"]), alpha=self.scaling[name])
        return out

    def _compiled_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict) -> torch.Tensor:
        """The training path under torch.compile: plain ops, which the compiler fuses (dropout's mask included) and
        whose saved tensors it chooses; there they run faster than the hand-written functions (bench/README.md)."""
        result = self._base_forward(x, args, kwargs)
        for name in names:
            a, b, p = self.lora_A[name].weight, self.lora_B[name].weight, self._p(name)
            h = F.linear(fast_dropout(x.to(a.dtype), p) if p else x.to(a.dtype), a)  # (..., r)
            result = result + (F.linear(h, b) * self.scaling[name]).to(result.dtype)
        return result

    def _train_forward(self, x: torch.Tensor, selection: tuple[str, ...], args: tuple, kwargs: dict) -> torch.Tensor:
        names = [n for n in selection if n in self.r]
        amp = _autocast_dtype(x)
        if torch.compiler.is_compiling() and amp is None and not any(self._plain_only(n) for n in names):
            return self._compiled_forward(x, names, args, kwargs)
        if not args and not kwargs and self._fusable(x, names, amp):
            name, base = names[0], self.base_layer
            tensors = (x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight)
            if amp is not None:  # what autocast does for F.linear; the casts pass gradients back in each dtype
                tensors = tuple(t if t is None else t.to(amp) for t in tensors)
            with _no_autocast(x, amp):
                return LoraLinear.apply(*tensors, self.scaling[name], self._p(name))
        result = self._base_forward(x, args, kwargs)
        for name in names:
            result = self._train_add(name, result, x, amp)
        return result


class Embedding(LoraLayer):
    """LoRA around ``nn.Embedding``: ``y = emb(ids) + s · (Aᵀ[ids] @ Bᵀ)`` with A ``(r, vocab)``, B ``(dim, r)``."""

    _norm_dim = 0  # the weight is (vocab, dim): DoRA's magnitude is per embedding dimension

    def __init__(self, base_layer: nn.Embedding, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(
        self, name: str, r: int, alpha: float, dropout: float, init: bool | str, use_rslora: bool,
        lora_bias: bool = False, use_dora: bool = False,
    ) -> None:  # fmt: skip
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for embedding layers (peft does not support it either)")
        weight = self.base_layer.weight
        num, dim = weight.shape
        kwargs = {"device": weight.device, "dtype": self._adapter_dtype()}
        # every init but False starts at zero, as peft's (PiSSA/OLoRA do not decompose embeddings)
        a = torch.randn(r, num, **kwargs) if init is False else torch.zeros(r, num, **kwargs)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r, **kwargs))
        self.lora_dropout[name] = nn.Identity()  # PEFT applies no dropout on embeddings
        self._set_scaling(name, r, alpha, use_rslora)
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name, self.base_layer.weight))

    def _factor_tensors(self, name: str) -> tuple[torch.Tensor, ...]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        extra = [self.lora_magnitude_vector[name]] if name in self.lora_magnitude_vector else []
        return [self.lora_embedding_A[name], self.lora_embedding_B[name], *extra]

    def add_output(self, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = self.lora_delta(name, x)
        if name not in self.lora_magnitude_vector:
            return result + delta
        scale = self._dora_scale(name, delta.dtype)  # DoRA: m/‖W+ΔW‖ · (emb(x) + ΔW[x])
        return (scale * result + scale * delta).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        b, a = self.lora_embedding_B[name].float(), self.lora_embedding_A[name].float()
        return (b @ a).T * self.scaling[name]

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(
            x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm, base.norm_type,
            base.scale_grad_by_freq, base.sparse,
        )  # fmt: skip
        delta = (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]
        embed_scale = getattr(base, "embed_scale", None)
        return delta * embed_scale if embed_scale is not None else delta


class Conv(FactoredLayer):
    """LoRA around ``nn.Conv1d/2d/3d`` (peft's semantics): A is a convolution like the base (kernel, stride, padding;
    no dilation) to r channels, B a 1x1 convolution back (grouped like the base), ``y = base(x) + s · B(A(x))``.
    DoRA: ``y = base(x) + (k - 1) · conv(x', W) + k · s · B(A(x'))`` with x' = dropout(x) and k = m / ‖W + ΔW‖ per
    output channel (the norm over input channels and kernel, detached); m is stored ``(1, out, 1, ...)`` as peft does.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def update_layer(
        self, name: str, r: int, alpha: float, dropout: float, init: bool | str, use_rslora: bool,
        lora_bias: bool = False, use_dora: bool = False,
    ) -> None:  # fmt: skip
        base = self.base_layer
        kind = type(base).__name__
        if use_dora and base.groups > 1:
            raise ValueError(
                f"use_dora on a grouped {kind} (groups={base.groups}) is not supported: DoRA's weight norm needs "
                "ΔW, which LoRA on a grouped convolution does not form (merging it is refused too)"
            )
        if isinstance(init, str) and init != "gaussian":
            raise ValueError(f"init_lora_weights={init!r} does not apply to {kind} layers (as in peft)")
        if r % base.groups:
            raise ValueError(f"a {kind} with groups={base.groups} needs a rank divisible by {base.groups}, not r={r}")
        ones = (1,) * (base.weight.dim() - 2)
        kwargs = {"device": base.weight.device, "dtype": self._adapter_dtype()}
        a = type(base)(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False, **kwargs)
        b = type(base)(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias, **kwargs)
        self._add_factors(name, a, b, r, alpha, dropout, init, use_rslora)
        if use_dora:  # m starts as ‖W + ΔW‖: a DoRA adapter starts where its LoRA would
            self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name).view(1, -1, *ones))

    def weight_norm(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """DoRA's ‖W + ΔW‖ (out,) per output channel, over input channels and kernel (detached, float32)."""
        weight = self.base_layer.weight if weight is None else weight
        with torch.no_grad():
            full = weight.float() + self.delta_weight(name).to(weight.device)
            return torch.linalg.vector_norm(full, dim=tuple(range(1, full.dim())))

    def _factor_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *(1,) * (self.base_layer.weight.dim() - 1))

    def add_output(self, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return result + self.lora_delta(name, x)
        a, b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(a.weight.dtype))
        scale = self._dora_scale(name, x.dtype).view(1, -1, *(1,) * (x.dim() - 2))
        base = self.base_layer._conv_forward(x, self.base_layer.weight.to(x.dtype), None)  # conv(x', W), no bias
        return result + (scale - 1) * base + scale * b(a(x)) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW (out, in, *kernel): B's 1x1 kernel applied to A's kernels, in float32."""
        if self.base_layer.groups > 1:
            raise ValueError(
                f"merging LoRA into a grouped {type(self.base_layer).__name__} is not supported (as in peft)"
            )
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        conv = getattr(F, f"conv{a.dim() - 2}d")
        return conv(a.transpose(0, 1), b).transpose(0, 1) * self.scaling[name]

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[name]
        return self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype)))) * self.scaling[name]


class TrainableTokens(LoraLayer):
    """Chosen rows of an embedding, or of the output layer tied to it, trained in place of the base's (peft's
    ``trainable_token_indices``): per adapter the rows' new values, (n, dim), start as copies of the base rows.
    A tied output layer shares the embedding's rows (``tied``) and does not save or merge them again."""

    def __init__(self, base_layer: nn.Module, state: AdapterState, tied: TrainableTokens | None = None) -> None:
        super().__init__(base_layer, state)
        self.tied = tied is not None
        self.trainable_tokens_delta = tied.trainable_tokens_delta if tied else nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = tied.token_indices if tied else {}
        self._original: dict[str, torch.Tensor] = tied._original if tied else {}

    def update_layer(self, name: str, indices: list[int]) -> None:
        self.r[name], self.scaling[name] = len(indices), 1.0
        if self.tied:
            return
        weight = self.base_layer.weight
        if not indices or min(indices) < 0 or max(indices) >= weight.shape[0]:
            raise ValueError(f"trainable_token_indices {indices}: each must be a row index below {weight.shape[0]}")
        self.token_indices[name] = list(indices)
        rows = weight.detach()[torch.tensor(indices, device=weight.device)]
        self._original[name] = rows.clone()
        self.trainable_tokens_delta[name] = nn.Parameter(rows.clone())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [] if self.tied else [self.trainable_tokens_delta[name]]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if not self.tied:
            for d in (self.trainable_tokens_delta, self.token_indices, self._original):
                d.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The new rows minus the original ones, at their indices (float32, the base weight's shape)."""
        weight = self.base_layer.weight
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        index = torch.tensor(self.token_indices[name], device=weight.device)
        new, old = self.trainable_tokens_delta[name].float(), self._original[name].float().to(weight.device)
        return delta.index_copy_(0, index, new - old)

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """The adapters' rows written into the base weight (exactly; a tied layer's weight is the embedding's,
        merged there)."""
        names = [n for n in names if n in self.r]
        if self.tied or not names:
            return
        if safe_merge and not all(torch.isfinite(self.trainable_tokens_delta[n]).all() for n in names):
            raise ValueError(f"NaNs detected in the trainable tokens of {', '.join(names)} (base weights untouched)")
        with torch.no_grad():
            self.base_layer.weight.copy_(self._weight(names))

    def unmerge(self, names: list[str]) -> None:
        names = [n for n in names if n in self.r]
        if self.tied or not names:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            for name in reversed(names):
                index = torch.tensor(self.token_indices[name], device=weight.device)
                weight.index_copy_(0, index, self._original[name].to(weight))

    def _weight(self, names: list[str]) -> torch.Tensor:
        weight = self.base_layer.weight
        for name in names:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight.dtype))
        return weight

    def _embed(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        base, weight = self.base_layer, self._weight(names)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)  # fmt: skip
            embed_scale = getattr(base, "embed_scale", None)
            return out * embed_scale.to(out.dtype) if embed_scale is not None else out
        return F.linear(x, weight, base.bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        selection = self.state.current()
        if isinstance(selection, RowGroups):
            out = None
            for name, index in selection.groups:
                part = self._embed(x[index], [name] if name in self.r else [])
                out = part.new_empty((selection.batch_size, *part.shape[1:])) if out is None else out
                out[index] = part
            return out
        names = [n for n in selection if n in self.r]
        return self._embed(x, names) if names else self.base_layer(x, *args, **kwargs)


def _add_rows(result: torch.Tensor, x: torch.Tensor, rows: RowGroups, layer: LoraLayer) -> torch.Tensor:
    """Add each row group's own adapter delta (mixed-adapter batches); ``__base__`` rows stay as they are."""
    out = result.clone()
    for name, index in rows.groups:
        if name in layer.r:
            out[index] = layer.add_output(name, result[index], x[index]).to(result.dtype)
    return out


class ModulesToSaveWrapper(nn.Module):
    """Keeps the frozen ``original_module`` and one trainable full copy per adapter (``modules_to_save``)."""

    def __init__(self, module: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        object.__setattr__(self, "state", state)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._active_module(), name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def update_layer(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def set_trainable(self, name: str, trainable: bool) -> None:
        for p in self.adapter_parameters(name):
            p.requires_grad_(trainable)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    def _module_for(self, names: tuple[str, ...]) -> nn.Module:
        for name in names:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def _active_module(self) -> nn.Module:
        selection = self.state.current()
        return self._module_for(selection if isinstance(selection, tuple) else ())

    def forward(self, x: torch.Tensor, *args, **kwargs):
        selection = self.state.current()
        if not isinstance(selection, RowGroups):
            return self._module_for(selection)(x, *args, **kwargs)
        out = None
        for name, index in selection.groups:
            part = self._module_for((name,))(x[index], *args, **kwargs)
            if out is None:
                out = part.new_empty((selection.batch_size, *part.shape[1:]))
            out[index] = part
        return out


def is_quantized(layer: LoraLayer) -> bool:
    return is_quantized_weight(layer.base_layer)
