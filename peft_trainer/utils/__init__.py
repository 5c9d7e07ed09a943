"""PEFT's ``peft.utils`` names: task and adapter types, adapter state dicts, mixed-precision casting."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .. import io
from ..config import PeftType, TaskType

__all__ = [
    "PeftType", "TaskType", "cast_mixed_precision_params", "get_peft_model_state_dict",
    "prepare_model_for_kbit_training", "set_peft_model_state_dict",
]  # fmt: skip


def _adapters(model: nn.Module) -> tuple[Any, str]:
    """The adapter registry of ``model`` and the key prefix PEFT uses for it: ``base_model.model.`` for a PeftModel,
    none for a model from ``inject_adapter_in_model`` (nothing wraps it)."""
    from ..lora.model import PeftModel

    if isinstance(model, PeftModel):
        return model, ""
    holder = getattr(model, "_peft_trainer_adapters", None)  # set by inject_adapter_in_model
    if holder is None:
        raise TypeError(f"{type(model).__name__} holds no LoRA adapters: pass a PeftModel or an injected model")
    return holder, io.PREFIX


def get_peft_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = "default", **_: Any
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors under the keys PEFT writes to disk (``...lora_A.weight``, no adapter name).

    ``state_dict`` (``model.state_dict()`` of a PeftModel, keys with the adapter name) is read instead of the live
    tensors when given."""
    holder, strip = _adapters(model)
    tensors = {k.removeprefix(strip): t for k, t in holder.adapter_tensors(adapter_name).items()}
    if state_dict is None:
        return {k: t.detach() for k, t in tensors.items()}
    by_id = {id(t): name for name, t in model.state_dict(keep_vars=True).items()}
    return {k: state_dict[by_id[id(t)]] for k, t in tensors.items() if by_id.get(id(t)) in state_dict}


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default", **_: Any
) -> _IncompatibleKeys:
    """Copy on-disk-named tensors into adapter ``adapter_name``. Strict: a missing, unexpected or mis-shaped tensor
    raises and names it, so the returned ``unexpected_keys`` and ``missing_keys`` are always empty."""
    holder, prefix = _adapters(model)
    tensors = {prefix + k: t for k, t in peft_model_state_dict.items()}
    holder.load_adapter_tensors(adapter_name, tensors, source=adapter_name)
    return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype`` (float16/bfloat16), trainable ones to float32: a 16-bit base with full-precision
    adapters for autocast training."""
    for p in model.parameters():
        p.data = p.data.to(dtype if not p.requires_grad else torch.float32)


def __getattr__(name: str) -> Any:
    if name == "prepare_model_for_kbit_training":  # imports the Trainer stack's quantization helpers lazily
        from ..quantization import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
