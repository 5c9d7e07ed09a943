"""bitsandbytes 4-/8-bit loading (BitsAndBytesConfig from arguments) and prepare_model_for_kbit_training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Quantization methods whose weights prepare_model_for_kbit_training must not cast (PEFT's list).
_NO_UPCAST_METHODS = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def compute_dtype(name: str | None) -> torch.dtype:
    """The 4-bit compute dtype: the named one, or bfloat16 on a bf16-capable GPU and float32 otherwise."""
    if name is not None:
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def bitsandbytes_config(args: Any) -> Any | None:
    """A ``transformers.BitsAndBytesConfig`` from ``load_in_4bit``/``load_in_8bit``/``bnb_4bit_*`` (None if neither)."""
    if not (getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)):
        return None
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute_dtype(args.bnb_4bit_compute_dtype),
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_quant_storage=getattr(torch, getattr(args, "bnb_4bit_quant_storage", None) or "uint8"),
    )


def load_quantized(model_id: str, quantization_config: Any, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load ``model_id`` (Hub id or folder) with bitsandbytes weights; ``model_class`` defaults to AutoModelForCausalLM."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    return model_class.from_pretrained(model_id, quantization_config=quantization_config, **kwargs)


def is_kbit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def _quant_method(model: nn.Module) -> str:
    method = getattr(model, "quantization_method", None)
    return str(getattr(method, "value", method) or "").lower()


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """PEFT's preparation of a (k-bit) base before adding LoRA; returns the same model, with no LoRA added.

    1. Freeze every parameter.
    2. Unless GPTQ/AQLM/EETQ/HQQ/torchao: cast every fp16/bf16 parameter that is not a 4-bit ``Params4bit`` to
       float32 (norms, embeddings, head), so they do not lose precision in training.
    3. If the model is loaded in 8/4 bit (or quantized with one of the methods above) and
       ``use_gradient_checkpointing``: make the input embeddings' output require grad (needed by reentrant
       checkpointing; done unless ``use_reentrant`` is given and false) and turn activation checkpointing on
       (reentrant unless the kwargs say otherwise: torch's default, which PEFT relies on).
    """
    method = _quant_method(model)
    for param in model.parameters():
        param.requires_grad_(False)
    if method not in _NO_UPCAST_METHODS:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
    if (is_kbit(model) or method in _NO_UPCAST_METHODS) and use_gradient_checkpointing:
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    return model
