"""PeftTrainer: transformers.Trainer that injects LoRA and saves, resumes, loads and pushes adapter-only checkpoints."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.trainer_pt_utils import LabelSmoother
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    HubStrategy,
    SaveStrategy,
    enable_full_determinism,
    rotate_checkpoints,
    set_seed,
)
from transformers.utils.hub import PushInProgress, hf_api

from . import card, hub, io
from .arguments import PeftTrainingArguments
from .config import LoraConfig, decomposes_base
from .data.raw import is_raw, prepare_raw
from .folders import ADAPTER_FILES, adapter_dir, missing_files, subfolder_of
from .hub import STAGING_PREFIX
from .lora.model import PeftModel, as_plain_lora, get_peft_model
from .models import _HUB_ID, load_tokenizer
from .quantization import bitsandbytes_config, is_kbit, prepare_model_for_kbit_training

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_PARAM_NAMES = "optimizer_param_names.json"
# From a checkpoint folder (hub_strategy checkpoint / all_checkpoints): what resuming needs, token-free args included.
CHECKPOINT_ALLOW_PATTERNS = [
    *hub.ALLOW_PATTERNS, "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", TRAINER_STATE_NAME,
    OPTIMIZER_PARAM_NAMES, TRAINING_ARGS_NAME,
]  # fmt: skip


class _CausalLabelSmoother(LabelSmoother):
    """Label smoothing that always shifts labels: Trainer decides the shift from the wrapper's class name, which
    is not a causal-LM name, so a PeftModel around a causal LM would be smoothed against unshifted labels."""

    def __call__(self, model_output: Any, labels: torch.Tensor, shift_labels: bool = False, num_items_in_batch=None):
        return super().__call__(model_output, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)


class _OwnForwardAtTrainEnd(TrainerCallback):
    """First ``on_train_end`` callback: drops accelerate's mixed-precision autocast forward from the model, so later
    callbacks and the caller of ``train()`` see the model as its saved adapter computes."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.accelerator.unwrap_model(self.trainer.model, keep_fp32_wrapper=False)


def task_type_of(model: nn.Module) -> str | None:
    """PEFT task_type for a transformers model class ("CAUSAL_LM", "SEQ_CLS") or None."""
    name = type(model).__name__
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "CAUSAL_LM"
    if name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return "SEQ_CLS"
    return None


def token_free(args: TrainingArguments) -> TrainingArguments:
    """A shallow copy of ``args`` with every ``*_token`` field cleared (what goes into training_args.bin)."""
    clean = copy.copy(args)
    for f in dataclasses.fields(clean):
        if f.name.endswith("_token") and getattr(clean, f.name, None) is not None:
            setattr(clean, f.name, None)
    return clean


def _fsync_tree(folder: str) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _initial_factors(model: PeftModel) -> dict[str, dict[str, torch.Tensor]]:
    """The starting A/B factors (on the CPU) of each PiSSA/OLoRA adapter that can be converted to a plain LoRA."""
    out = {}
    for name, config in model.peft_config.items():
        init = config.init_lora_weights
        if not decomposes_base(init):
            continue
        why = (
            "with DoRA/lora_bias cannot be written as a plain LoRA" if config.use_dora or config.lora_bias
            else "was loaded from files, so its starting factors are unknown" if name in model.loaded_adapters
            else None
        )  # fmt: skip
        if why:
            logger.warning(
                "Adapter %r (init_lora_weights=%r) %s: it is saved as trained, for a base that holds the PiSSA/OLoRA "
                "residual (as peft does)", name, init, why,
            )  # fmt: skip
            continue
        out[name] = {
            k: t.detach().to("cpu", copy=True)
            for k, t in model.adapter_tensors(name).items() if k.endswith((".lora_A.weight", ".lora_B.weight"))
        }  # fmt: skip
    return out


class PeftTrainer(Trainer):
    """``transformers.Trainer`` for LoRA/QLoRA with this project's PeftModel; checkpoints hold only adapters.

    ``model``: an embedded model name (its local copy, as the CLI loads it), a folder or a Hub id (loaded with
    ``AutoModelForCausalLM``), in 4/8 bit when the arguments ask;
    a transformers ``PreTrainedModel`` (LoRA injected from ``lora_config`` or ``args.to_lora_config()`` after the
    seed is set), or a ready ``PeftModel``. A 4-/8-bit base goes through ``prepare_model_for_kbit_training``.
    """

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        compute_metrics: Any = None,
        callbacks: list | None = None,
        lora_config: LoraConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("model_init") is not None:
            raise ValueError("PeftTrainer does not take model_init: pass the model (id, path or instance)")
        args = args if args is not None else PeftTrainingArguments(output_dir="trainer_output")
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False  # every LoRA parameter gets a gradient in every step
        self._hub_id = model if isinstance(model, str) and _HUB_ID.match(model) and not os.path.isdir(model) else None
        if processing_class is None and isinstance(model, str) and any(map(is_raw, (train_dataset, eval_dataset))):
            processing_class = load_tokenizer(model)
        train_dataset, eval_dataset, data_collator = prepare_raw(
            args, processing_class, train_dataset, eval_dataset, data_collator
        )
        model = self._build_model(model, args, lora_config)
        model.chunked_loss = getattr(args, "chunked_loss", True)
        if args.activation_checkpointing and getattr(model, "main_input_name", None) != "input_ids":
            model.enable_input_require_grads()  # transformers does this itself only for input_ids models
        self._staging_dir: str | None = None
        self.hub_push_errors: list[str] = []
        # Extra model-card sections, {title: markdown}, e.g. the behaviour score; every card written includes them.
        self.card_sections: dict[str, str] = {}
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, **kwargs,
        )  # fmt: skip
        self.callback_handler.callbacks.insert(0, _OwnForwardAtTrainEnd(self))
        if self.label_smoother is not None and task_type_of(model.get_base_model()) == "CAUSAL_LM":
            self.label_smoother = _CausalLabelSmoother(self.label_smoother.epsilon, self.label_smoother.ignore_index)
        # Parameter names of the adapters as the unwrapped model has them (FSDP state dicts use these).
        by_id = {id(t): n for n, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers())}
        self._adapter_fqns = {
            name: {by_id[id(t)]: key for key, t in model.adapter_tensors(name).items() if id(t) in by_id}
            for name in model.peft_config
        }
        self._initial_factors = _initial_factors(model)
        trainable, total = model.get_nb_trainable_parameters()
        logger.info(
            "trainable params: %s || all params: %s || trainable%%: %.4f",
            f"{trainable:,d}", f"{total:,d}", 100 * trainable / max(total, 1),
        )  # fmt: skip

    @staticmethod
    def _build_model(model: Any, args: TrainingArguments, lora_config: LoraConfig | None) -> PeftModel:
        peft_args = isinstance(args, PeftTrainingArguments)
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            from . import models

            qconfig = bitsandbytes_config(args) if peft_args else None
            spec = models._embedded(models.embedded_name(model))
            path = models.resolve_model(spec.name) if spec else model  # embedded: the local copy, never the Hub
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path, **({"quantization_config": qconfig} if qconfig else {})
                )
            except OSError as e:  # neither a folder nor a Hub model: perhaps a misspelt embedded name
                if spec is None and not os.path.exists(path) and not _HUB_ID.match(path):
                    raise models._unknown(path, "not an embedded model name, a folder or a Hub model") from e
                raise
            if spec is not None and spec.hub_id:  # adapter configs and cards name the Hub model it copies
                model.config._name_or_path = spec.hub_id
        if type(model).__module__.split(".")[0] == "peft":
            raise TypeError("PeftTrainer trains peft_trainer.PeftModel; pass the base model, not a peft.PeftModel")
        if isinstance(model, PeftModel):
            if lora_config is not None:
                raise ValueError("model is already a PeftModel: pass lora_config only with a base model")
            return model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a model id, a path, a PreTrainedModel or a PeftModel, not {type(model)}")
        if peft_args and (args.load_in_4bit or args.load_in_8bit) and not is_kbit(model):
            raise ValueError(
                "load_in_4bit/load_in_8bit quantize a model that PeftTrainer loads from an id or path; this model "
                "was passed already loaded and is not quantized: pass its id/path, or load it with a "
                "BitsAndBytesConfig yourself"
            )
        if is_kbit(model):
            # Trainer.train() turns activation checkpointing on itself when the arguments ask for it.
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if lora_config is None:
            if not peft_args:
                raise ValueError("Pass lora_config, or PeftTrainingArguments (whose lora_* fields define it)")
            lora_config = args.to_lora_config(task_type=task_type_of(model))
        # Seeded right before injection (loading may draw random numbers): the adapter init is reproducible.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        return get_peft_model(model, lora_config, adapter_name=args.adapter_name if peft_args else "default")

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, or with ``loraplus_lr_ratio`` the same optimizer class over LoRA+'s groups."""
        ratio = getattr(self.args, "loraplus_lr_ratio", None)
        if ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from .optimizers import create_loraplus_optimizer

        model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = create_loraplus_optimizer(
            model, optimizer_cls, loraplus_lr_ratio=ratio, loraplus_weight_decay=self.args.weight_decay,
            loraplus_lr_embedding=self.args.loraplus_lr_embedding, **kwargs,
        )  # fmt: skip
        return self.optimizer

    def _peft_model(self) -> PeftModel:
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not isinstance(unwrapped, PeftModel):
            raise TypeError(f"PeftTrainer needs a PeftModel, found {type(unwrapped).__name__}")
        return unwrapped

    def _base_model_id(self) -> str | None:
        """The base model's Hub id for model cards (None for local or unnamed bases)."""
        given = getattr(self.args, "base_model_name_or_path", None)
        if given or self._hub_id:
            return given or self._hub_id
        name = getattr(getattr(self._peft_model(), "config", None), "_name_or_path", None)
        return name if name and not os.path.isdir(name) else None

    # ---- training / resume ----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train; ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint, and with
        ``push_to_hub`` a final push always follows (a failed push is logged, the local files stay).

        With ``bf16``/``fp16``, accelerate wraps the model's forward in autocast for training; when training ends
        (before any ``on_train_end`` callback) the model gets its own forward back, so it computes what its saved
        adapter computes wherever it is loaded (the Trainer would leave it in 16-bit autocast).
        ``evaluate``/``predict`` keep autocast by themselves."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self.last_complete_checkpoint(self.args.output_dir)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.args.push_to_hub:
            try:
                self.push_to_hub(commit_message="End of training")
            except Exception as e:  # the trained adapter is safe in output_dir; report and finish
                self._push_failed("final push", e)
        return output

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with self._autocast_after_training():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._autocast_after_training():
            return super().predict(*args, **kwargs)

    def _autocast_after_training(self) -> contextlib.AbstractContextManager:
        """The mixed-precision autocast that training's forward wrapper applied, once :meth:`train` removed it, so
        an evaluation after training computes what the evaluations during training did."""
        wrapped = "_original_forward" in self.model.__dict__ or not self.accelerator._models
        return contextlib.nullcontext() if wrapped else self.accelerator.autocast()

    def _missing_files(self, folder: str) -> list[str]:
        """Files a checkpoint folder needs before it can be resumed from (empty: complete)."""
        state = [] if os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)) else [TRAINER_STATE_NAME]
        return state + missing_files(folder, self._peft_model().peft_config)

    def last_complete_checkpoint(self, run_dir: str) -> str:
        """The newest checkpoint-N in ``run_dir`` that is complete; incomplete ones are reported and skipped."""
        steps = {}
        if os.path.isdir(run_dir):
            for entry in os.listdir(run_dir):
                prefix, _, step = entry.rpartition("-")
                if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(os.path.join(run_dir, entry)):
                    steps[int(step)] = os.path.join(run_dir, entry)
        incomplete = [
            f"{os.path.join(run_dir, e)} (interrupted save)" for e in sorted(os.listdir(run_dir))
            if e.startswith(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR)
        ] if os.path.isdir(run_dir) else []  # fmt: skip
        chosen = None
        for step in sorted(steps, reverse=True):
            missing = self._missing_files(steps[step])
            if not missing:
                chosen = steps[step]
                break
            incomplete.append(f"{steps[step]} (missing {', '.join(missing)})")
        if incomplete:
            logger.warning("Ignoring incomplete checkpoint(s) when resuming: %s", "; ".join(incomplete))
        if chosen is None:
            raise ValueError(
                f"No complete checkpoint in {run_dir} to resume from"
                + (f"; incomplete: {'; '.join(incomplete)}" if incomplete else "")
            )
        return chosen

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        missing = self._missing_files(resume_from_checkpoint)
        if missing:
            raise ValueError(
                f"Cannot resume from {resume_from_checkpoint}: it is incomplete (missing {', '.join(missing)}); "
                "it was probably interrupted while saving. Resume from an earlier checkpoint."
            )
        self._load_adapters(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info(f"Loading best adapter from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        self._load_adapters(self.state.best_model_checkpoint)

    def _load_adapters(self, folder: str) -> None:
        """Load every adapter of the model from ``folder`` ("default" at the root, others in subfolders), strictly."""
        model = self._peft_model()
        tensors = {name: io.load_weights(folder, subfolder=subfolder_of(name)) for name in model.peft_config}
        if self.is_fsdp_enabled:
            self._load_into_fsdp(folder, tensors)
            return
        with self._gathered(modify=True):  # ZeRO-3: whole tensors inside; rank 0's copy is partitioned on exit
            for name, loaded in tensors.items():
                model.load_adapter_tensors(name, loaded, source=folder)

    def _load_into_fsdp(self, folder: str, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = {}
        for name, fqns in self._adapter_fqns.items():
            loaded = {io.normalize_key(k): v for k, v in tensors[name].items()}
            missing, unexpected = sorted(set(fqns.values()) - set(loaded)), sorted(set(loaded) - set(fqns.values()))
            if missing or unexpected:
                raise ValueError(
                    f"Adapter {name!r} in {folder} does not fit this model: missing {missing[:3]} "
                    f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
                )
            state.update({fqn: loaded[key] for fqn, key in fqns.items()})
        set_model_state_dict(self.model_wrapped, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def _is_zero3(self) -> bool:
        return self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    @contextlib.contextmanager
    def _gathered(self, modify: bool = False) -> Iterator[None]:
        """Under DeepSpeed ZeRO-3, every adapter parameter whole inside the block (a collective: every rank enters);
        with ``modify``, rank 0's values are what each rank keeps. Elsewhere a no-op."""
        if not self._is_zero3():
            yield
            return
        import deepspeed

        model = self._peft_model()
        params = [t for name in model.peft_config for t in model.adapter_tensors(name).values() if hasattr(t, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None) -> Any:
        """DeepSpeed resume: Trainer loads its engine checkpoint strictly, which fails on the adapter-only module
        state written by :meth:`_save_optimizer_and_scheduler`; here it is loaded with only the adapters expected."""
        if resume_from_checkpoint is None or not self.is_deepspeed_enabled:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        self._load_from_checkpoint(resume_from_checkpoint)  # checks completeness; adapters from the PEFT files
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint, load_module_strict=False)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _optimizer_param_names(self) -> list[list[str]]:
        """Parameter names per optimizer group, in the optimizer's order (its state is matched by position)."""
        names = {id(p): n for n, p in self.model.named_parameters()}

        def clean(n: str) -> str:
            return n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")

        return [[clean(names.get(id(p), "<unnamed>")) for p in g["params"]] for g in self.optimizer.param_groups]

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Trainer would also write the full base model here (FSDP: save_fsdp_model; DeepSpeed: the engine's module
        # state, unless it recognises peft's own PeftModel class).
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            from accelerate.utils import DeepSpeedSchedulerWrapper, save_fsdp_optimizer

            if self.is_fsdp_enabled:
                save_fsdp_optimizer(
                    self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir
                )
            else:  # optimizer partitions per rank (global_stepN/) and the trainable parameters only
                self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))
        else:
            super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            with open(os.path.join(output_dir, OPTIMIZER_PARAM_NAMES), "w", encoding="utf-8") as f:
                json.dump({"param_groups": self._optimizer_param_names()}, f, indent=1)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            self._check_optimizer_params(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)

    def _check_optimizer_params(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, OPTIMIZER_PARAM_NAMES)
        if not os.path.isfile(path):
            logger.warning(f"{path} not found: cannot check that the optimizer state belongs to these parameters")
            return
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)["param_groups"]
        current = self._optimizer_param_names()
        if saved == current:
            return
        flat_saved, flat_now = [n for g in saved for n in g], [n for g in current for n in g]
        diffs = [f"#{i}: {a} vs {b}" for i, (a, b) in enumerate(zip(flat_saved, flat_now)) if a != b][:3]
        raise ValueError(
            f"Cannot resume from {checkpoint}: its optimizer state is for other parameters than this model trains "
            f"({len(flat_saved)} saved in groups of {[len(g) for g in saved]}, {len(flat_now)} now in groups of "
            f"{[len(g) for g in current]}; first differences (checkpoint vs now): {diffs or 'group split'}). "
            "Resume with the same LoRA settings (r, target modules, modules_to_save, adapter name) and optimizer "
            "grouping (weight decay), or start a fresh run."
        )

    # ---- saving ---------------------------------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written into tmp-checkpoint-N/ and renamed to checkpoint-N/ once complete and
        fsynced, so an interrupted save never looks like a checkpoint. Push and rotation follow the rename."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, STAGING_PREFIX + name)
        staged = os.path.join(staging, name)
        if self.args.should_save and os.path.exists(staging):
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # its own push and rotation are deferred / no-ops in staging
        finally:
            self._staging_dir = None
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            _fsync_tree(staged)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            os.rmdir(staging)
            _fsync_dir(run_dir)
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the adapter(s), tokenizer and token-free training_args.bin; a user call also writes README.md and
        trainer_state.json (the loss history, which the Space's adapter card plots)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # FSDP and DeepSpeed ZeRO-3 gather the adapter tensors only (a collective), never the full base model.
        if self.is_fsdp_enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(
                full_state_dict=True, ignore_frozen_params=True, cpu_offload=self.args.device.type != "cpu"
            )
            self._save(output_dir, state_dict=get_model_state_dict(self.model_wrapped, options=options))
        elif self.is_deepspeed_enabled:
            with self._gathered():
                self._save(output_dir)
        else:
            super().save_model(output_dir, _internal_call=True)
        if not _internal_call:
            if self.args.should_save:
                self.state.save_to_json(os.path.join(output_dir, TRAINER_STATE_NAME))
            self.create_model_card(output_dir=output_dir)
            if self.args.push_to_hub:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self._peft_model()
        # A PiSSA/OLoRA adapter leaves the trainer as a plain LoRA for the original base; checkpoints, which are
        # loaded back into this model (whose base holds the residual), keep its own factors.
        initial = self._initial_factors if self._staging_dir is None else {}
        if state_dict is None:
            for name in model.peft_config:
                model.save_pretrained(
                    output_dir, selected_adapters=[name], path_initial_model_for_weight_conversion=initial.get(name)
                )
            if len(model.peft_config) > 1:
                model.create_or_update_model_card(output_dir)
        else:  # gathered by FSDP, keyed by parameter name
            for name, fqns in self._adapter_fqns.items():
                if all(fqn in state_dict for fqn in fqns):
                    tensors = {key: state_dict[fqn] for fqn, key in fqns.items()}
                    config = model.config_for_saving(name)
                    if name in initial:
                        tensors, config = as_plain_lora(tensors, config, initial[name])
                    io.save_adapter(adapter_dir(output_dir, name), tensors, config)
            model.create_or_update_model_card(output_dir)
        tokenizer = self.processing_class
        tokenizer = tokenizer if tokenizer is not None else getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(token_free(self.args), os.path.join(output_dir, TRAINING_ARGS_NAME))

    def create_model_card(
        self, language: str | None = None, license: str | None = None, tags: str | list[str] | None = None,
        model_name: str | None = None, finetuned_from: str | None = None, tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None, output_dir: str | None = None,
    ) -> None:  # fmt: skip
        """README.md for the adapter: PEFT's metadata (``library_name: peft``, ``base_model``,
        ``base_model_relation: adapter``, lora tags), the LoRA settings, Trainer's hyperparameters and results, and
        :attr:`card_sections`."""
        if not self.is_world_process_zero():
            return
        from transformers.modelcard import TrainingSummary

        model = self._peft_model()
        base = finetuned_from or self._base_model_id()
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        dataset_tags = dataset_tags or getattr(self.args, "dataset_name", None)
        if dataset is None and dataset_tags is None:  # a local file or an in-memory dataset: name it, tag nothing
            source = getattr(getattr(self.train_dataset, "info", None), "dataset_name", None)
            dataset, dataset_tags = (os.path.basename(source) if source else None), []
        summary = TrainingSummary.from_trainer(
            self, language=language, license=license, tags=tags, model_name=model_name, finetuned_from=base,
            tasks=tasks or card.PIPELINE_TAGS.get(task_type_of(model.get_base_model()) or ""),
            dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
        )  # fmt: skip
        meta, body = card.adapter_card(base, model.peft_config, summary, self.card_sections, summary.model_name)
        card.write_card(output_dir or self.args.output_dir, meta, body)

    # ---- Hub ------------------------------------------------------------------------------------------------

    def _push_failed(self, what: str, error: BaseException) -> None:
        repo = self.hub_model_id or self.args.hub_model_id
        message = f"Hub {what} to {repo or 'the Hub'} failed: {hub.describe_error(error, repo)}"
        self.hub_push_errors.append(message)
        logger.error(f"{message}. The local files in {self.args.output_dir} are intact; push them later.")

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as e:  # training goes on and keeps everything locally; pushes are skipped
            self.hub_model_id, self.push_in_progress = None, None
            self._push_failed("repository creation", e)

    def _upload(self, folder: str, message: str, allow: list[str], path_in_repo: str | None = None,
                token: str | None = None, revision: str | None = None, blocking: bool = False) -> Any:  # fmt: skip
        result = hf_api().upload_folder(
            repo_id=self.hub_model_id, folder_path=folder, path_in_repo=path_in_repo, commit_message=message,
            token=token if token is not None else self.args.hub_token, run_as_future=not blocking,
            allow_patterns=allow, ignore_patterns=hub.IGNORE_PATTERNS,
            revision=revision if revision is not None else self.args.hub_revision,
        )  # fmt: skip
        if not blocking:
            result.add_done_callback(
                lambda f: f.exception() and self._push_failed(f"upload {message!r}", f.exception())
            )
        return result

    def push_to_hub(
        self, commit_message: str | None = "End of training", blocking: bool = True, token: str | None = None,
        revision: str | None = None, private: bool | None = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Save the adapter, write the model card and upload only the allow-listed files of output_dir."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)  # first, so that the local copy is complete even if the push fails
        if not self.is_world_process_zero():
            return None
        self.state.save_to_json(os.path.join(self.args.output_dir, TRAINER_STATE_NAME))
        model_name = kwargs.pop("model_name", None) or (self.args.hub_model_id or self.args.output_dir).split("/")[-1]
        tags = kwargs.pop("tags", None)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in getattr(self.model, "model_tags", None) or [] if t not in tags]
        self.create_model_card(model_name=model_name, tags=tags, **kwargs)
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
            if self.hub_model_id is None:
                raise RuntimeError(self.hub_push_errors[-1])
        self._finish_current_push()
        return self._upload(
            self.args.output_dir, commit_message, hub.ALLOW_PATTERNS, token=token, revision=revision, blocking=blocking
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push output_dir (adapter copied from the checkpoint, card, tokenizer) and, per hub_strategy, the
        checkpoint itself; never base weights, never a token."""
        if self._staging_dir is not None:  # called inside Trainer._save_checkpoint: pushed after the rename
            return
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END or self.hub_model_id is None:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        for name in self._peft_model().peft_config:
            target, source = adapter_dir(output_dir, name), adapter_dir(checkpoint_folder, name)
            target.mkdir(parents=True, exist_ok=True)
            for file in ADAPTER_FILES:  # replaced, not overwritten: a running upload keeps reading the old file
                shutil.copy(source / file, target / (file + ".tmp"))
                os.replace(target / (file + ".tmp"), target / file)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        self.create_model_card()
        step = self.args.save_strategy == SaveStrategy.STEPS
        message = f"Training in progress, {'step' if step else 'epoch'} {self.state.global_step if step else int(self.state.epoch or 0)}"
        jobs = [self._upload(output_dir, message, hub.ALLOW_PATTERNS)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path = (
                "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            )
            jobs.append(self._upload(checkpoint_folder, message + ", checkpoint", CHECKPOINT_ALLOW_PATTERNS, path))
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)
