"""LoRA+ (Hayou et al., 2024): lora_B learns ``loraplus_lr_ratio`` times faster than lora_A (``peft.optimizers``)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from .lora.layer import Embedding

__all__ = ["create_loraplus_optimizer"]


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> Optimizer:
    """``optimizer_cls`` over the trainable parameters in PEFT's four LoRA+ groups: lora_A and the rest (``lr``),
    embedding adapters (``loraplus_lr_embedding``, default 1e-6), lora_B and 1-D parameters (``lr * ratio``; biases
    and norm weights without weight decay). ``loraplus_weight_decay`` (default 0) applies to the others."""
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}  # as the Trainer
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = model.get_submodule(".".join(name.split(".")[:-2])) if name.count(".") >= 2 else None
        if isinstance(owner, Embedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    return optimizer_cls(
        [
            {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
            {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
            {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
            {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
        ],
        lr=lr,
        **kwargs,
    )
