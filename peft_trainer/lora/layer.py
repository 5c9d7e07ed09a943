"""LoRA layers (Linear, GPT-2 Conv1D, Embedding), the shared adapter state, and the modules_to_save wrapper."""

from __future__ import annotations

import contextlib
import copy
import math
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .functions import LoraBranch, LoraLinear
from .quant import is_quantized_weight, read_weight, write_weight


@dataclass(frozen=True)
class RowGroups:
    """Per-row adapter choice for one call: ``groups[i] = (adapter name, row indices)``; ``"__base__"`` = none."""

    groups: tuple[tuple[str, torch.Tensor], ...]
    batch_size: int


class AdapterState:
    """Which adapters run, held once per model and shared by every LoRA layer (switching is O(1)).

    A context variable lets one call (one thread or task) choose other adapters without changing what the
    rest of the process sees.
    """

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.merged: list[str] = []
        self._run: tuple[str, ...] = ()
        self._override: ContextVar[tuple[str, ...] | RowGroups | None] = ContextVar(
            f"peft_trainer_adapters_{id(self)}", default=None
        )

    def refresh(self) -> None:
        self._run = () if self.disabled else tuple(a for a in self.active if a not in self.merged)

    def current(self) -> tuple[str, ...] | RowGroups:
        """The adapters the layers must add on top of the (possibly merged) base weights for this call."""
        override = self._override.get()
        return self._run if override is None else override


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

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Add each adapter's ΔW into the base weight; with ``safe_merge`` check finiteness on a copy first."""
        names = [n for n in names if n in self.r]
        if not names:
            return
        weight = read_weight(self.base_layer)
        merged = weight.float() + sum(self.delta_weight(n).to(weight.device) for n in names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken "
                "(the base weights were left untouched)"
            )
        write_weight(self.base_layer, merged)

    def unmerge(self, names: list[str]) -> None:
        names = [n for n in names if n in self.r]
        if not names:
            return
        weight = read_weight(self.base_layer)
        restored = weight.float() - sum(self.delta_weight(n).to(weight.device) for n in names)
        write_weight(self.base_layer, restored)

    def delete_adapter(self, name: str) -> None:
        for attr in ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B"):
            container = getattr(self, attr, None)
            if container is not None and name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)

    def set_trainable(self, name: str, trainable: bool) -> None:
        for p in self.adapter_parameters(name):
            p.requires_grad_(trainable)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        raise NotImplementedError


class Linear(LoraLayer):
    """LoRA around ``nn.Linear`` (also bitsandbytes 4/8-bit) or transformers' ``Conv1D`` (``fan_in_fan_out``).

    Forward: ``y = base(x) + s · B(A(dropout(x)))`` with A ``(r, in)``, B ``(out, r)``, s = alpha/r (or alpha/√r).
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, state)
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:  # transformers Conv1D: weight (in, out)
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def update_layer(
        self, name: str, r: int, alpha: float, dropout: float, init: bool | str, use_rslora: bool
    ) -> None:
        device = self.base_layer.weight.device
        dtype = self._adapter_dtype()
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        elif init == "gaussian":
            nn.init.normal_(a.weight, std=1 / r)
            nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._set_scaling(name, r, alpha, use_rslora)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name].weight, self.lora_B[name].weight]

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s · B(A(dropout(x)))`` for x ``(..., in)`` -> ``(..., out)`` (plain autograd ops)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return F.linear(F.linear(self.lora_dropout[name](x.to(a.dtype)), a), b) * self.scaling[name]

    def _train_add(self, name: str, result: torch.Tensor, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
        """``result + s · B(A(dropout(x)))`` through :class:`LoraBranch` (the training path), in the adapter's
        dtype, or in ``amp`` (autocast's dtype) when autocast is on."""
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
        if len(names) != 1 or base is None:
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
                a = modules["lora_A"]._modules[name]._parameters["weight"]
                b = modules["lora_B"]._modules[name]._parameters["weight"]
                h = F.linear(x if x.dtype == a.dtype else x.to(a.dtype), a)
                out.add_(F.linear(h, b), alpha=self.scaling[name])
        return out

    def _train_forward(self, x: torch.Tensor, selection: tuple[str, ...], args: tuple, kwargs: dict) -> torch.Tensor:
        names = [n for n in selection if n in self.r]
        amp = _autocast_dtype(x)
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

    def __init__(self, base_layer: nn.Embedding, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(
        self, name: str, r: int, alpha: float, dropout: float, init: bool | str, use_rslora: bool
    ) -> None:
        weight = self.base_layer.weight
        num, dim = weight.shape
        kwargs = {"device": weight.device, "dtype": self._adapter_dtype()}
        a = torch.zeros(r, num, **kwargs) if init in (True, "gaussian") else torch.randn(r, num, **kwargs)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r, **kwargs))
        self.lora_dropout[name] = nn.Identity()  # PEFT applies no dropout on embeddings
        self._set_scaling(name, r, alpha, use_rslora)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_embedding_A[name], self.lora_embedding_B[name]]

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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        selection = self.state.current()
        if not selection:
            return result
        if isinstance(selection, RowGroups):
            return _add_rows(result, x, selection, self)
        dtype = result.dtype
        for name in selection:
            if name in self.r:
                result = result + self.lora_delta(name, x)
        return result.to(dtype)


def _add_rows(result: torch.Tensor, x: torch.Tensor, rows: RowGroups, layer: Linear | Embedding) -> torch.Tensor:
    """Add each row group's own adapter delta (mixed-adapter batches); ``__base__`` rows stay as they are."""
    out = result.clone()
    for name, index in rows.groups:
        if name in layer.r:
            out[index] = (result[index] + layer.lora_delta(name, x[index])).to(result.dtype)
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
