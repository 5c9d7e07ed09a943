"""PEFT's ``peft.tuners.lora`` names: the config and the layer classes (``LoraModel`` is this project's PeftModel)."""

from ..config import LoraConfig
from ..lora.layer import Embedding, Linear, LoraLayer
from ..lora.model import PeftModel as LoraModel

__all__ = ["Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel"]
