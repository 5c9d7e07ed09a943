"""TRL's trainers with this package's LoRA: ``from peft_trainer.trl import SFTTrainer, DPOTrainer``.

TRL recognises only peft's classes: accelerate's ``is_peft_model`` and ``isinstance(peft_config, peft.PeftConfig)``.
Importing this module widens those checks, in TRL's SFT and DPO trainer modules only, to peft_trainer's
``PeftModel`` and ``LoraConfig``, and gives those modules peft_trainer's names where peft is not installed, as if
``import peft`` resolved to peft_trainer. TRL's own code then runs unchanged: ``peft_config=LoraConfig(...)`` wraps
the model with :func:`peft_trainer.get_peft_model`, checkpoints hold the adapter only, and DPO's reference is the
model with its adapter disabled (a copy of the adapter, named "ref", when the model came with a trained one).
peft's own models and configs keep going to peft.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import trl
from accelerate.utils import extract_model_from_parallel
from accelerate.utils import is_peft_model as _is_peft_model
from packaging.version import Version
from trl import DPOConfig, SFTConfig
from trl.trainer import dpo_trainer, sft_trainer
from trl.trainer.utils import use_adapter as _use_adapter

import peft_trainer

from .config import LoraConfig
from .lora.layer import LoraLayer
from .lora.model import PeftModel
from .lora.model import get_peft_model as _get_peft_model

SUPPORTED = ("1.16", "2")  # the TRL releases whose trainer modules use the names replaced below
if not Version(SUPPORTED[0]) <= Version(trl.__version__) < Version(SUPPORTED[1]):
    raise ImportError(f"peft_trainer.trl supports trl>={SUPPORTED[0]},<{SUPPORTED[1]}; found trl {trl.__version__}")


def is_peft_model(model: Any) -> bool:
    """accelerate's ``is_peft_model``, which knows only peft's ``PeftModel``, also true for peft_trainer's."""
    return _is_peft_model(model) or isinstance(extract_model_from_parallel(model), PeftModel)


@contextlib.contextmanager
def use_adapter(model: Any, adapter_name: str | None) -> Iterator[None]:
    """TRL's ``use_adapter`` (None: adapters disabled); for peft_trainer models a per-call choice that leaves which
    parameters train untouched."""
    context = model.use_adapter(adapter_name) if isinstance(model, PeftModel) else _use_adapter(model, adapter_name)
    with context:
        yield


def get_peft_model(model: Any, peft_config: Any, **kwargs: Any) -> Any:
    """peft_trainer's ``get_peft_model`` for its ``LoraConfig``, peft's for peft's configs."""
    if isinstance(peft_config, LoraConfig):
        return _get_peft_model(model, peft_config, **kwargs)
    import peft

    return peft.get_peft_model(model, peft_config, **kwargs)


def _with(theirs: Any, ours: type) -> Any:
    """An ``isinstance`` target matching peft's class (where peft is installed) and ours."""
    return ours if theirs is None else (theirs, ours)


def _teach(module: Any) -> None:
    names = vars(module)
    missing = [n for n in ("is_peft_model", "is_peft_available") if n not in names]
    if missing:
        raise ImportError(
            f"{module.__name__} of trl {trl.__version__} lacks {missing}: peft_trainer.trl cannot serve it"
        )
    names.update(
        is_peft_model=is_peft_model,
        is_peft_available=lambda: True,  # peft_trainer stands in for peft where it is not installed
        get_peft_model=get_peft_model,
        PeftConfig=_with(names.get("PeftConfig"), LoraConfig),
        BaseTunerLayer=_with(names.get("BaseTunerLayer"), LoraLayer),
    )
    if "use_adapter" in names:
        names["use_adapter"] = use_adapter
    # Names TRL imports from peft and reads only on paths peft_trainer's objects take where peft is absent.
    for name, value in {"peft": peft_trainer, "LoraConfig": LoraConfig, "PeftModel": PeftModel,
                        "PrefixTuningConfig": ()}.items():  # fmt: skip
        names.setdefault(name, value)


for _module in (sft_trainer, dpo_trainer):
    _teach(_module)

SFTTrainer = sft_trainer.SFTTrainer
DPOTrainer = dpo_trainer.DPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "SFTConfig", "SFTTrainer", "is_peft_model", "use_adapter"]
