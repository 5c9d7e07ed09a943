"""peft-trainer: LoRA and QLoRA fine-tuning on the Hugging Face Trainer, with PEFT-compatible adapter files.

Besides the project's own names (PeftTrainer, PeftTrainingArguments), it exports PEFT's LoRA API under PEFT's names,
so that PEFT code runs after changing ``import peft`` to ``import peft_trainer as peft``.
"""

from typing import Any

from .config import LoraConfig, PeftConfig
from .lora import PeftModel, get_peft_model
from .lora.model import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    inject_adapter_in_model,
)
from .utils import (
    PeftType,
    TaskType,
    cast_mixed_precision_params,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

__version__ = "0.1.0"
__all__ = [
    "LoraConfig", "PeftModel", "PeftTrainer", "PeftTrainingArguments", "get_peft_model",
    "prepare_model_for_kbit_training",
    # PEFT's other LoRA names
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSequenceClassification", "PeftConfig", "PeftType",
    "TaskType", "cast_mixed_precision_params", "get_layer_status", "get_model_status", "get_peft_model_state_dict",
    "inject_adapter_in_model", "set_peft_model_state_dict", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
]  # fmt: skip

# Imported on first use: the Trainer stack is slow to import and the Space does not need it.
_LAZY = {
    "PeftTrainer": ".trainer",
    "PeftTrainingArguments": ".arguments",
    "prepare_model_for_kbit_training": ".quantization",
    "get_layer_status": ".status",
    "get_model_status": ".status",
    **{name: ".auto" for name in ("AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSequenceClassification",
                                  "AutoPeftModelForTokenClassification", "AutoPeftModelForSeq2SeqLM",
                                  "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction")},
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
