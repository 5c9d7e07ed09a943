"""get_layer_status / get_model_status: PEFT's report of which adapters each LoRA layer holds, runs and trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from .lora.layer import LoraLayer

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _same(values: list[Any]) -> Any:
    """The one value all entries share, else "irregular" (an inconsistent model)."""
    return values[0] if values and all(v == values[0] for v in values) else "irregular"


def _backend(layer: LoraLayer) -> str | None:
    kind = type(layer.base_layer).__name__
    return {"Linear4bit": "bnb 4bit", "Linear8bitLt": "bnb 8bit"}.get(kind)


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One entry per LoRA layer of ``model`` (a PeftModel, or a model from ``inject_adapter_in_model``)."""
    from .lora.model import PeftModel

    found = []
    # PEFT names layers as its LoraModel sees them: "model." + the path in the base model (none when injected).
    prefix, root = ("model.", model.get_base_model()) if isinstance(model, PeftModel) else ("", model)
    for name, layer in root.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        state, adapters = layer.state, sorted(layer.r)
        params = {a: list(layer.adapter_parameters(a)) for a in adapters}
        found.append(
            TunerLayerStatus(
                name=prefix + name,
                module_type=f"lora.{type(layer).__name__}",
                enabled=not state.disabled,
                active_adapters=[a for a in state.active if a in layer.r],
                merged_adapters=[a for a in state.merged if a in layer.r],
                requires_grad={a: _same([p.requires_grad for p in ps]) for a, ps in params.items()},
                available_adapters=adapters,
                devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()},
                quantization_backend=_backend(layer),
            )
        )
    if not found:
        raise ValueError("No LoRA layers found in the model: pass a PeftModel or a model with injected adapters")
    return found


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide summary of :func:`get_layer_status`; "irregular" where layers disagree."""
    from .lora.model import PeftModel

    layers = get_layer_status(model)
    peft = isinstance(model, PeftModel)
    base = model.get_base_model() if peft else model
    trainable, total = PeftModel.get_nb_trainable_parameters(model)  # works on any module, as in PEFT
    adapters = sorted({a for s in layers for a in s.available_adapters})
    merged = sorted({a for s in layers for a in s.merged_adapters})
    if any(set(merged) & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers):
        merged = "irregular"
    grads: dict[str, list] = {}
    devices: dict[str, set[str]] = {}
    for s in layers:
        for a, v in s.requires_grad.items():
            grads.setdefault(a, []).append(v)
        for a, d in s.devices.items():
            devices.setdefault(a, set()).update(d)
    return TunerModelStatus(
        base_model_type=type(base).__name__ if hasattr(base, "config") else "other",
        adapter_model_type="LoraModel",
        peft_types={name: "LORA" for name in getattr(model, "peft_config", {})} if peft else {},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_same([s.enabled for s in layers]),
        active_adapters=_same([s.active_adapters for s in layers]),
        merged_adapters=merged,
        requires_grad={a: _same(v) for a, v in grads.items()},
        available_adapters=adapters,
        devices={a: sorted(d) for a, d in devices.items()},
        quantization_backend=_same([s.quantization_backend for s in layers]),
    )
