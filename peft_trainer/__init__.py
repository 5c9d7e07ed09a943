"""peft-trainer: LoRA and QLoRA fine-tuning on the Hugging Face Trainer, with PEFT-compatible adapter files."""

from typing import Any

from .config import LoraConfig
from .lora import PeftModel, get_peft_model

__version__ = "0.1.0"
__all__ = [
    "LoraConfig", "PeftModel", "PeftTrainer", "PeftTrainingArguments", "get_peft_model",
    "prepare_model_for_kbit_training",
]  # fmt: skip

# Imported on first use: the Trainer stack is slow to import and the Space does not need it.
_LAZY = {
    "PeftTrainer": ".trainer",
    "PeftTrainingArguments": ".arguments",
    "prepare_model_for_kbit_training": ".quantization",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
