"""PEFT's ``peft.tuners.lora`` names: the config, the layer classes and LoraModel (``PeftModel.base_model``)."""

from ..config import LoraConfig
from ..lora.layer import Embedding, Linear, LoraLayer
from ..lora.lora_model import LoraModel

__all__ = ["Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel"]
