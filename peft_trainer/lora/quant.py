"""Base-weight access that also works for bitsandbytes 4-/8-bit layers: merge = dequantize -> add -> requantize."""

from __future__ import annotations

import torch
from torch import nn


def _weight_kind(layer: nn.Module) -> str:
    name = type(layer.weight).__name__
    if name == "Params4bit":
        return "4bit"
    if name == "Int8Params":
        return "8bit"
    return "plain"


def is_quantized_weight(layer: nn.Module) -> bool:
    return _weight_kind(layer) != "plain"


def read_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as a float tensor in its own layout (dequantized for bitsandbytes layers)."""
    kind = _weight_kind(layer)
    if kind == "plain":
        return layer.weight.data
    import bitsandbytes as bnb

    if kind == "4bit":
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    state = layer.state
    if state.SCB is None:
        state.SCB = layer.weight.SCB
    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, state.SCB).float()


def write_weight(layer: nn.Module, value: torch.Tensor) -> None:
    """Store ``value`` as the base weight (requantizing bitsandbytes layers; lossy for 4/8-bit)."""
    kind = _weight_kind(layer)
    if kind == "plain":
        layer.weight.data.copy_(value.to(layer.weight.dtype))
        return
    import bitsandbytes as bnb

    old = layer.weight
    device = old.device
    if kind == "4bit":
        attrs = {k: v for k, v in old.__dict__.items() if k in ("blocksize", "compress_statistics", "quant_type")}
        new = bnb.nn.Params4bit(value.to("cpu"), requires_grad=False, quant_storage=old.quant_storage, **attrs)
        layer.weight = new.to(device)
    else:
        new = bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
        layer.weight = new.to(device)
        layer.state.reset_grads()
        layer.state.SCB = layer.weight.SCB
