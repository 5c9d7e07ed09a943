"""hotswap_adapter: replace a loaded adapter's weights with another file's, in place (PEFT's ``peft.utils.hotswap``)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import io
from ..config import LoraConfig
from ..lora.inject import pattern_value
from ..lora.layer import LoraLayer

# Config fields that change the output beyond the tensors: the two adapters must agree on them (as in PEFT).
CONFIG_KEYS_TO_CHECK = ("use_rslora", "lora_dropout", "alpha_pattern")


def check_hotswap_configs_compatible(old: LoraConfig, new: LoraConfig) -> None:
    for key in CONFIG_KEYS_TO_CHECK:
        if getattr(old, key) != getattr(new, key):
            raise ValueError(f"Configs are incompatible: for {key}, {getattr(old, key)} != {getattr(new, key)}")


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: LoraConfig, **_: Any
) -> None:
    """Copy ``state_dict`` (on-disk keys) into ``adapter_name`` and take ``config``'s alpha; shapes must match (same
    ranks and targets), else nothing changes and the error names the layer and both shapes."""
    if adapter_name in model.adapter_state.merged:
        raise ValueError(f"Cannot hot-swap adapter {adapter_name!r} while it is merged: unmerge_adapter() first")
    model.load_adapter_tensors(adapter_name, state_dict, source=f"hot-swap of {adapter_name!r}")
    for path, layer in model._layers():
        if isinstance(layer, LoraLayer) and adapter_name in layer.r:
            alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
            layer._set_scaling(adapter_name, layer.r[adapter_name], alpha, config.use_rslora)


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str, torch_device: str | None = None,
    **kwargs: Any,
) -> None:  # fmt: skip
    """Swap adapter ``adapter_name`` of ``model`` (a PeftModel) for the one saved at ``model_name_or_path``; the name,
    the modules and any ``torch.compile`` graph stay. Ranks and targets must match."""
    config = LoraConfig.from_pretrained(model_name_or_path, **kwargs)
    check_hotswap_configs_compatible(model.peft_config[adapter_name], config)
    tensors = io.load_weights(model_name_or_path, **kwargs)
    if torch_device is not None:
        tensors = {k: v.to(torch_device) for k, v in tensors.items()}
    hotswap_adapter_from_state_dict(model, tensors, adapter_name, config)
    model.peft_config[adapter_name].lora_alpha = config.lora_alpha
