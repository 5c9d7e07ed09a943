"""AutoPeftModel*: load an adapter and the base model its config names, in one call (PEFT's ``peft.auto``)."""

from __future__ import annotations

import os
from typing import Any

from .config import LoraConfig
from .lora.model import PeftModel

# task_type -> the transformers Auto class that builds its base model
_AUTO_CLASSES = {
    None: "AutoModel", "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}  # fmt: skip


class AutoPeftModel:
    """``AutoPeftModel.from_pretrained(adapter)``: the base from ``base_model_name_or_path`` (an embedded model's Hub
    id loads its local copy, no download), built by the Auto class of the adapter's ``task_type``, then the adapter."""

    task_type: str | None = None  # subclasses fix the task; this class takes the adapter's

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
        is_trainable: bool = False, config: LoraConfig | None = None, revision: str | None = None, **kwargs: Any,
    ) -> PeftModel:  # fmt: skip
        import transformers

        from . import models

        hub = {k: kwargs.pop(k) for k in ("token", "subfolder", "cache_dir") if k in kwargs}
        config = config or LoraConfig.from_pretrained(pretrained_model_name_or_path, revision=revision, **hub)
        if cls.task_type is not None and config.task_type not in (None, cls.task_type):
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {config.task_type} adapter, but {cls.__name__} loads "
                f"{cls.task_type} adapters: use AutoPeftModel (any task) or the class for {config.task_type}"
            )
        if not config.base_model_name_or_path:
            raise ValueError(
                f"{pretrained_model_name_or_path}: adapter_config.json names no base_model_name_or_path; load the base "
                "model yourself and use PeftModel.from_pretrained(base, adapter)"
            )
        auto = getattr(transformers, _AUTO_CLASSES[cls.task_type or config.task_type])
        base_path = models.resolve_model(models.embedded_name(config.base_model_name_or_path))
        base = auto.from_pretrained(base_path, revision=config.revision, **kwargs)
        return PeftModel.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config,
            revision=revision, **hub,
        )  # fmt: skip


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = "CAUSAL_LM"


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = "SEQ_CLS"


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = "TOKEN_CLS"


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = "FEATURE_EXTRACTION"
