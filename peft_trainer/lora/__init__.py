"""The LoRA core: layers, injection, the multi-adapter PeftModel and weighted combinations."""

from .layer import AdapterState, Embedding, Linear, LoraLayer, ModulesToSaveWrapper
from .model import PeftModel, get_peft_model

__all__ = ["AdapterState", "Embedding", "Linear", "LoraLayer", "ModulesToSaveWrapper", "PeftModel", "get_peft_model"]
