"""Dataclasses parsed by HfArgumentParser: PeftTrainingArguments (LoRA/QLoRA on top of TrainingArguments), model, data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from . import distributed
from .config import LoraConfig, is_supported_init
from .folders import validate_adapter_name

distributed.install()  # before any TrainingArguments sets up its devices (CPU-only DeepSpeed/FSDP fixes)

_BIASES = ("none", "all", "lora_only")
_QUANT_TYPES = ("nf4", "fp4")
_DTYPES = ("float32", "bfloat16", "float16")
_TASKS = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"Invalid {what}:\n  - " + "\n  - ".join(problems))


def parse_init(value: Any) -> bool | str:
    """``init_lora_weights`` from Python (True/False/"gaussian") or text ("true", "false", "gaussian")."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def parse_layer_replication(value: Any) -> list[list[int]] | None:
    """``layer_replication`` from Python/YAML (``[[0, 4], [2, 5]]``) or text (``"0-4,2-5"`` or that JSON)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [[int(n) for n in span.split("-")] for span in text.split(",")] if text else None


@dataclass
class PeftTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the LoRA and bitsandbytes settings; ``to_lora_config()`` builds the LoraConfig.

    Defaults differ from ``TrainingArguments`` in one place: ``ddp_find_unused_parameters=False`` (every LoRA
    parameter is used in every step, and ``True`` breaks DDP with reentrant activation checkpointing).
    """

    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha/r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] | str = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names or dotted suffixes, or one regex / 'all-linear' (every linear but the head)."},
    )
    lora_target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "peft's target_parameters: LoRA on nn.Parameters such as MoE expert stacks "
            "(e.g. experts.gate_up_proj experts.down_proj); needs lora_dropout 0."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. lm_head)."}
    )
    lora_bias: str = field(default="none", metadata={"help": "Which base biases train: 'none', 'all', 'lora_only'."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r."})
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: also learn a magnitude per output feature (peft's use_dora); slower than LoRA."},
    )
    lora_trainable_token_indices: list[int] | None = field(
        default=None,
        metadata={
            "help": "peft's trainable_token_indices: train only these rows of the input embedding (and of a tied "
            "output layer), e.g. the ids of new special tokens."
        },
    )
    lora_b_bias: bool = field(
        default=False,
        metadata={"help": "peft's lora_bias=True: lora_B gets a trainable bias (merging needs a base bias)."},
    )
    init_lora_weights: str = field(
        default="true",
        metadata={
            "help": "'true' (B=0, Kaiming A), 'gaussian', 'false' (random, not a no-op), or 'pissa', "
            "'pissa_niter_K', 'olora' (A and B from the base weight's SVD / QR; the base keeps the residual)."
        },
    )
    layer_replication: str | None = field(
        default=None,
        metadata={
            "help": "peft's layer_replication: the decoder layers become these [start, end) ranges in turn, copies "
            "sharing base weights, each with its own LoRA (e.g. '0-4,2-5' or [[0, 4], [2, 5]] in a recipe).",
        },
    )
    adapter_name: str = field(default="default", metadata={"help": "Name of the trained adapter."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4 bit (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8 bit (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: 'nf4' or 'fp4'."})
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={"help": "float32, bfloat16 or float16; default: bfloat16 on a bf16 GPU, else float32."},
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit quantization constants too (QLoRA double quant)."}
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LoRA+: lora_B learns this many times faster than lora_A (e.g. 16); embedding adapters learn at "
            "loraplus_lr_embedding. Unset: one learning rate for all."
        },
    )
    loraplus_lr_embedding: float = field(
        default=1e-6, metadata={"help": "LoRA+: learning rate of embedding adapters."}
    )
    bnb_4bit_quant_storage: str | None = field(
        default=None,
        metadata={
            "help": "dtype the packed 4-bit weights are stored in (default uint8). FSDP shards 4-bit weights only "
            "when this is a float dtype: use the compute dtype (bfloat16 on GPUs) with FSDP."
        },
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "Causal-LM loss in row chunks straight from the hidden states, without the B x T x vocab logits "
            "(training steps of Llama/Mistral/Qwen2/Qwen3 heads; others use the model's own loss)."
        },
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Rows longer than this many tokens are cut (packed rows are at most this long)."},
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Put several rows into each row of up to max_length tokens; positions restart at every row and "
            "attention stays within it (as TRL's padding-free packing). Needs use_cache off (the default)."
        },
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={"help": "Learn only the assistant turns / completions (off: every token)."},
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id of the base model for the model card (default: the base's own id)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub id of the dataset, for the model card."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP find_unused_parameters; False because every LoRA parameter is used."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, (list, tuple)) and list(self.lora_target_modules) == ["all-linear"]:
            self.lora_target_modules = "all-linear"
        if self.dataloader_pin_memory and (self.use_cpu or not torch.accelerator.is_available()):
            self.dataloader_pin_memory = False  # nothing to pin for; torch warns at every DataLoader otherwise
        problems = self.lora_problems()
        try:
            super().__post_init__()
        except ValueError as e:
            problems.append(str(e))
        _raise_if(problems, "PeftTrainingArguments")

    def lora_problems(self) -> list[str]:
        """Every invalid LoRA, quantization or tokenizing setting, each naming the field and the fix."""
        p = []
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r <= 0:
            p.append(f"lora_r={self.lora_r!r}: use a positive integer rank (e.g. 8, 16, 64)")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
            p.append(f"lora_alpha={self.lora_alpha!r}: use a positive number (commonly 2 * lora_r)")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout={self.lora_dropout!r}: use a number in [0, 1)")
        targets = self.lora_target_modules
        if not targets or (not isinstance(targets, str) and not all(isinstance(t, str) and t for t in targets)):
            p.append(f"lora_target_modules={targets!r}: name at least one module, or use 'all-linear'")
        if self.lora_bias not in _BIASES:
            hint = (
                " (PEFT's boolean lora_bias is the field lora_b_bias here)" if isinstance(self.lora_bias, bool) else ""
            )
            p.append(f"lora_bias={self.lora_bias!r}: use one of {', '.join(_BIASES)}{hint}")
        if self.use_dora is True and self.lora_b_bias is True:
            p.append("use_dora and lora_b_bias are both true: DoRA has no lora_B bias (as in peft); drop one")
        if not is_supported_init(parse_init(self.init_lora_weights)):
            p.append(
                f"init_lora_weights={self.init_lora_weights!r}: use 'true', 'false', 'gaussian', 'pissa', "
                "'pissa_niter_K' (e.g. pissa_niter_4) or 'olora'"
            )
        try:
            LoraConfig(layer_replication=parse_layer_replication(self.layer_replication))
        except ValueError:
            p.append(f"layer_replication={self.layer_replication!r}: use [start, end) layer ranges, e.g. '0-4,2-5'")
        try:
            validate_adapter_name(self.adapter_name)
        except ValueError as e:
            p.append(f"adapter_name: {e}")
        if self.load_in_4bit and self.load_in_8bit:
            p.append("load_in_4bit and load_in_8bit are both set: choose one")
        if self.bnb_4bit_quant_type not in _QUANT_TYPES:
            p.append(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r}: use 'nf4' or 'fp4'")
        if self.bnb_4bit_compute_dtype is not None and self.bnb_4bit_compute_dtype not in _DTYPES:
            p.append(f"bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype!r}: use one of {', '.join(_DTYPES)}")
        ratio = self.loraplus_lr_ratio
        if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio <= 0):
            p.append(f"loraplus_lr_ratio={ratio!r}: use a positive number (LoRA+ suggests 16), or leave it unset")
        if self.bnb_4bit_quant_storage not in (None, "uint8", *_DTYPES):
            p.append(f"bnb_4bit_quant_storage={self.bnb_4bit_quant_storage!r}: use uint8, {', '.join(_DTYPES)}")
        if self.lora_modules_to_save is not None and not all(isinstance(m, str) for m in self.lora_modules_to_save):
            p.append(f"lora_modules_to_save={self.lora_modules_to_save!r}: use a list of module names")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2:
            p.append(f"max_length={self.max_length!r}: use a number of tokens of at least 2")
        if self.packing and self.use_cache:
            p.append("packing with use_cache=True: the model would attend across packed rows; leave use_cache off")
        return p

    def to_lora_config(self, task_type: str | None = None) -> LoraConfig:
        """The LoraConfig these arguments describe (``task_type``: "CAUSAL_LM", "SEQ_CLS", ... or None)."""
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            target_parameters=self.lora_target_parameters,
            modules_to_save=self.lora_modules_to_save,
            bias=self.lora_bias,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            lora_bias=self.lora_b_bias,
            trainable_token_indices=self.lora_trainable_token_indices,
            init_lora_weights=parse_init(self.init_lora_weights),
            layer_replication=parse_layer_replication(self.layer_replication),
            task_type=task_type,
            base_model_name_or_path=self.base_model_name_or_path,
        )


@dataclass
class ModelArguments:
    """Which base model to load and how."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id, local folder or GGUF file."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    torch_dtype: str | None = field(default=None, metadata={"help": "auto, float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub repo."})
    task: str = field(default="causal-lm", metadata={"help": "causal-lm or seq-cls."})
    num_labels: int | None = field(default=None, metadata={"help": "Number of classes for seq-cls."})

    def __post_init__(self) -> None:
        p = []
        if self.task not in _TASKS:
            p.append(f"task={self.task!r}: use one of {', '.join(_TASKS)}")
        if self.torch_dtype is not None and self.torch_dtype not in ("auto", *_DTYPES):
            p.append(f"torch_dtype={self.torch_dtype!r}: use auto, {', '.join(_DTYPES)} or leave it unset")
        if self.task == "seq-cls" and (not isinstance(self.num_labels, int) or self.num_labels < 1):
            p.append(f"num_labels={self.num_labels!r}: task seq-cls needs the number of classes (>= 1)")
        if self.task != "seq-cls" and self.num_labels is not None:
            p.append(f"num_labels={self.num_labels!r} is only used with task seq-cls: remove it or set the task")
        _raise_if(p, "ModelArguments")

    @property
    def task_type(self) -> str:
        """The PEFT task_type for the adapter config ("CAUSAL_LM" or "SEQ_CLS")."""
        return _TASKS[self.task]


@dataclass
class DataArguments:
    """Where the training text comes from and how it becomes token ids and labels."""

    dataset: str | None = field(default=None, metadata={"help": "Local file/folder or Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Separate evaluation data (file or Hub id)."})
    eval_ratio: float = field(default=0.0, metadata={"help": "Fraction of the training data held out for eval."})
    text_column: str = field(default="text", metadata={"help": "Column with plain text."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the prompt (prompt/completion)."})
    completion_column: str = field(default="completion", metadata={"help": "Column with the completion."})
    messages_column: str = field(default="messages", metadata={"help": "Column with chat messages."})

    def __post_init__(self) -> None:
        p = []
        if not isinstance(self.eval_ratio, (int, float)) or not 0 <= self.eval_ratio < 1:
            p.append(f"eval_ratio={self.eval_ratio!r}: use a fraction in [0, 1)")
        if self.eval_dataset and self.eval_ratio:
            p.append("eval_dataset and eval_ratio are both set: use one source of evaluation data")
        _raise_if(p, "DataArguments")
