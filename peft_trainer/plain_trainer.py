"""transformers.Trainer (and trainers built on it) with this package's PeftModel: adapter-only saves and resume.

transformers recognises only peft's own ``PeftModel`` class (``isinstance`` checks in ``Trainer._save`` and
``_load_from_checkpoint``); for any other model a checkpoint holds the full ``model.safetensors``. :func:`install`
wraps those two methods and ``_load_best_model`` so that, for a trainer holding a peft_trainer ``PeftModel``, they
write and read peft's adapter files, exactly as for a peft model. Other models, and PeftTrainer (which overrides the
three itself), are untouched. FSDP and DeepSpeed save through other paths (sharded model state), so a plain Trainer
holding a peft_trainer model refuses them at construction and names PeftTrainer, which handles both.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from . import io
from .folders import subfolder_of

TRAINING_ARGS_NAME = "training_args.bin"
_installed = False


def install() -> None:
    """Wrap transformers.Trainer's save/load methods once ``transformers.trainer`` has been imported (a no-op
    before that, and after the first time). PeftModel calls it when built and when set to train."""
    global _installed
    if _installed or "transformers.trainer" not in sys.modules:
        return
    from transformers import Trainer

    _installed = True
    init, save, load, load_best = (
        Trainer.__init__,
        Trainer._save,
        Trainer._load_from_checkpoint,
        Trainer._load_best_model,
    )

    @functools.wraps(init)
    def __init__(self: Trainer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if _adapter_model(self) is not None and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ValueError(
                f"{type(self).__name__} with FSDP or DeepSpeed would checkpoint the whole base model of this "
                "peft_trainer PeftModel: train it with peft_trainer.PeftTrainer (same arguments), whose checkpoints "
                "hold the adapter only under FSDP and DeepSpeed too"
            )

    @functools.wraps(save)
    def _save(self: Trainer, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _adapter_model(self)
        if model is None:
            return save(self, output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        import torch

        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    @functools.wraps(load)
    def _load_from_checkpoint(self: Trainer, resume_from_checkpoint: str, model: Any = None) -> None:
        if _adapter_model(self) is None:
            return load(self, resume_from_checkpoint, model)
        return _load_adapters(self, resume_from_checkpoint)

    @functools.wraps(load_best)
    def _load_best_model(self: Trainer) -> None:
        if _adapter_model(self) is None:
            return load_best(self)
        return _load_adapters(self, self.state.best_model_checkpoint)

    Trainer.__init__, Trainer._save = __init__, _save
    Trainer._load_from_checkpoint, Trainer._load_best_model = _load_from_checkpoint, _load_best_model


def _adapter_model(trainer: Any) -> Any:
    """The trainer's peft_trainer PeftModel, unwrapped; None for other models and for trainers that save it
    themselves (PeftTrainer)."""
    from transformers import Trainer

    from .lora.model import PeftModel

    if type(trainer)._save is not Trainer._save:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    return model if isinstance(model, PeftModel) else None


def _load_adapters(trainer: Any, folder: str) -> None:
    """Every adapter of the model from ``folder`` ("default" at the root, others in subfolders), strictly."""
    model = _adapter_model(trainer)
    for name in model.peft_config:
        model.load_adapter_tensors(name, io.load_weights(folder, subfolder=subfolder_of(name)), source=folder)
