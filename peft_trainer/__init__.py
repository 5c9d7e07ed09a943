"""peft-trainer: LoRA and QLoRA fine-tuning on the Hugging Face Trainer, with PEFT-compatible adapter files."""

from .config import LoraConfig
from .lora import PeftModel, get_peft_model

__version__ = "0.1.0"
__all__ = ["LoraConfig", "PeftModel", "get_peft_model"]
