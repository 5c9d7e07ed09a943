"""PEFT's ``peft.tuners`` path: this project implements the LoRA tuner (``peft_trainer.tuners.lora``)."""

from ..config import LoraConfig
from .lora import LoraModel

__all__ = ["LoraConfig", "LoraModel"]
