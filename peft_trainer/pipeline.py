"""The training pipeline a script can call as the CLI does: prepare data, train and save an adapter (with its
behaviour score), merge or combine adapters, train the quickstart set. Bad input raises UsageError."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data.checks import source_of
from .errors import UsageError
from .errors import as_usage_error as _as_usage_error
from .recipe import Recipe, parse_recipe

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from .arguments import DataArguments, PeftTrainingArguments

logger = logging.getLogger("peft_trainer.pipeline")
PROG = "peft-trainer"


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    fmt: str
    label_names: list[str] | None
    num_labels: int | None


def _canonical_columns(records: datasets.Dataset, data: DataArguments) -> datasets.Dataset:
    """Rename the configured columns (text_column, prompt_column, ...) to the names data.py expects."""
    mapping = {
        data.text_column: "text", data.prompt_column: "prompt", data.completion_column: "completion",
        data.messages_column: "messages",
    }  # fmt: skip
    renames = {src: dst for src, dst in mapping.items() if src != dst and src in records.column_names}
    for src, dst in renames.items():
        if dst in records.column_names:
            raise ValueError(f"{source_of(records)}: cannot use column {src!r} as {dst!r}: a column {dst!r} exists")
    info = records.info
    records = records.rename_columns(renames) if renames else records
    records.info.dataset_name = getattr(info, "dataset_name", None)
    return records


def _load(path: str, data: DataArguments, split: str) -> datasets.Dataset:
    from .data import load_records

    kwargs = {"name": data.dataset_config} if data.dataset_config else {}
    records = load_records(path, split=split, **kwargs)
    if not getattr(records.info, "dataset_name", None):
        records.info.dataset_name = path
    return _canonical_columns(records, data)


def _class_names(records: datasets.Dataset) -> list[str] | None:
    feature = records.features.get("label")
    if getattr(feature, "names", None):
        return list(feature.names)
    names = sorted({v for v in records["label"] if isinstance(v, str)})
    return names or None


def prepare_data(
    data: DataArguments, training: PeftTrainingArguments, tokenizer: PreTrainedTokenizerBase, task: str
) -> PreparedData:
    """Load, check the format against the task, split off eval rows and tokenize (``max_length``, ``packing``,
    ``completion_only_loss`` of the training arguments); logs the counts (truncations too).

    Errors name the file, row and column of the *file* (a split renumbers rows, so a failing split is re-checked
    on the whole file to report the file's row number).
    """
    from .data import detect_format, tokenize_dataset, train_eval_split

    assert data.dataset is not None
    records = _load(data.dataset, data, data.dataset_split)
    fmt = detect_format(records, source_of(records))
    if fmt == "classification" and task != "seq-cls":
        raise ValueError(
            f"{source_of(records)}: text/label rows are classification data, but task is {task!r}: "
            "set task: seq-cls and num_labels (or use messages, prompt/completion or text data)"
        )
    if task == "seq-cls" and fmt != "classification":
        raise ValueError(f"{source_of(records)}: task seq-cls needs 'text' and 'label' columns, found format {fmt!r}")
    names = _class_names(records) if fmt == "classification" else None
    options = dict(
        fmt=fmt, max_length=training.max_length, completion_only_loss=training.completion_only_loss, label_names=names
    )

    def tokenize(part: datasets.Dataset, packing: bool, whole: datasets.Dataset) -> datasets.Dataset:
        try:
            tokenized, stats = tokenize_dataset(part, tokenizer, packing=packing, **options)
        except ValueError:
            if part is not whole:  # the same problem, reported with the file's row numbers
                tokenize_dataset(whole, tokenizer, packing=False, **options)
            raise
        note = logger.warning if stats.truncated else logger.info
        note(
            "%s: %d rows -> %d examples (%s%s), %d truncated to max_length=%d, %d dropped (nothing to learn), "
            "%d tokens of which %d trained on",
            stats.source, stats.rows, stats.examples, stats.fmt, ", packed" if stats.packed else "", stats.truncated,
            stats.max_length, stats.dropped, stats.tokens, stats.trainable_tokens,
        )  # fmt: skip
        return tokenized

    eval_records: datasets.Dataset | None = None
    train_records = records
    if data.eval_dataset:
        local = os.path.exists(os.path.expanduser(data.eval_dataset))
        eval_records = _load(data.eval_dataset, data, data.dataset_split if local else "validation")
    elif data.eval_ratio:
        train_records, eval_records = train_eval_split(records, data.eval_ratio, seed=training.seed)
        logger.info(
            "eval split: %d of %d rows held out (eval_ratio=%s)", len(eval_records), len(records), data.eval_ratio
        )
    train = tokenize(train_records, training.packing, records)
    evaluation = tokenize(eval_records, False, records if data.eval_ratio else eval_records) if eval_records else None
    num_labels = len(names) if names else (max(train["label"]) + 1 if fmt == "classification" else None)
    return PreparedData(train, evaluation, fmt, names, num_labels)


def setup_logging(main_process: bool = True) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("peft_trainer").setLevel(logging.INFO if main_process else logging.WARNING)


def _classification_metrics() -> Any:
    from .metrics import load_metric

    metric = load_metric("accuracy")

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        import numpy as np

        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute_metrics


@dataclass
class TrainSummary:
    """What a training run produced, for the quickstart table and for tests."""

    output_dir: str
    train_seconds: float
    wall_seconds: float
    train_loss: float | None
    behaviour_before: float | None = None
    behaviour_after: float | None = None
    behaviour_check: str | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)


def run_training(recipe: Recipe) -> TrainSummary:
    """Load model and data, train with PeftTrainer, save the adapter and its card; score the behaviour if asked.

    With ``push_to_hub`` the finished folder (adapter, card with the behaviour score, tokenizer) is pushed once,
    at the end of ``train()``."""
    start = time.perf_counter()
    m, d, t, b = recipe.model, recipe.data, recipe.training, recipe.behaviour
    main_process = t.process_index == 0
    setup_logging(main_process)
    from .behaviour import BehaviourCallback, load_prompts
    from .data import make_collator
    from .models import load_model, load_tokenizer
    from .quantization import bitsandbytes_config

    logger.info(
        "recipe %s: model %s, task %s, data %s", recipe.path or "(arguments)", recipe.model_name, m.task, d.dataset
    )
    with _as_usage_error(f"model {recipe.model_name!r}: "):
        tokenizer = load_tokenizer(recipe.model_name, revision=m.revision)
    with _as_usage_error():
        prepared = prepare_data(d, t, tokenizer, m.task)
        prompts = load_prompts(b.behaviour_prompts) if b.behaviour and b.behaviour_prompts else None
    num_labels = m.num_labels
    if m.task == "seq-cls" and prepared.num_labels and num_labels and prepared.num_labels > num_labels:
        raise UsageError(f"{d.dataset}: {prepared.num_labels} classes in the data but num_labels={num_labels}")
    with _as_usage_error(f"model {recipe.model_name!r}: "):
        extra = {"trust_remote_code": True} if m.trust_remote_code else {}
        model, _ = load_model(
            recipe.model_name, task=m.task, num_labels=num_labels, torch_dtype=m.torch_dtype,
            quantization_config=bitsandbytes_config(t), revision=m.revision, **extra,
        )  # fmt: skip
    if prepared.label_names:
        model.config.id2label = dict(enumerate(prepared.label_names))
        model.config.label2id = {n: i for i, n in enumerate(prepared.label_names)}

    from .trainer import PeftTrainer

    with _as_usage_error():  # LoRA injection: a wrong target module lists the candidates
        trainer = PeftTrainer(
            model, t, train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tokenizer,
            data_collator=make_collator(tokenizer, prepared.fmt),
            compute_metrics=_classification_metrics() if prepared.fmt == "classification" else None,
            lora_config=t.to_lora_config(task_type=m.task_type),
        )  # fmt: skip
    state = trainer.accelerator.state
    logger.info(
        "distributed: %s, %d process(es)%s", state.distributed_type.value, state.num_processes,
        ", base in 4 bit (bitsandbytes)" if getattr(model, "is_loaded_in_4bit", False) else
        ", base in 8 bit (bitsandbytes)" if getattr(model, "is_loaded_in_8bit", False) else "",
    )  # fmt: skip
    behaviour = BehaviourCallback(b, tokenizer, prompts).bind(trainer) if prompts else None
    if behaviour is not None:
        trainer.add_callback(behaviour)  # after the progress bar: scoring shows once the eval bar has closed
        behaviour.score_base()
    resume = t.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    if not t.push_to_hub:  # a push has already saved the folder it uploaded
        trainer.save_model()  # adapter(s), tokenizer, card; every rank takes part (FSDP gathers the adapter)
    before, after = (behaviour.before, behaviour.after) if behaviour else (None, None)
    if trainer.args.should_save:
        files = sorted(p.name for p in Path(t.output_dir).iterdir() if p.is_file())
        print(f"{PROG}: adapter written to {t.output_dir} by rank {t.process_index}: {', '.join(files)}", flush=True)
    summary = TrainSummary(
        output_dir=t.output_dir, train_seconds=float(result.metrics.get("train_runtime", 0.0)),
        wall_seconds=time.perf_counter() - start, train_loss=result.metrics.get("train_loss"),
        behaviour_before=before.score if before else None, behaviour_after=after.score if after else None,
        behaviour_check=b.behaviour, log_history=list(trainer.state.log_history),
    )  # fmt: skip
    if main_process:
        print(f"{PROG}: trained in {summary.train_seconds:.1f} s (wall {summary.wall_seconds:.1f} s), "
              f"train_loss {summary.train_loss:.4f}", flush=True)  # fmt: skip
        if before is not None and after is not None:
            print(f"{PROG}: behaviour {b.behaviour!r} on {after.total} held-out prompts: "
                  f"{before.score:.1%} before -> {after.score:.1%} after training", flush=True)  # fmt: skip
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# merge


def _adapter_task(config: Any) -> str:
    return "seq-cls" if config.task_type == "SEQ_CLS" else "causal-lm"


def _num_labels(adapter: str) -> int | None:
    from . import io

    for key, tensor in io.load_weights(adapter).items():
        if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
            return int(tensor.shape[0])
    return None


def merge_adapters(
    adapters: Sequence[str], output: str | os.PathLike[str], base: str | None = None,
    weights: Sequence[float] | None = None, combination_type: str = "svd", svd_rank: int | None = None,
    density: float | None = None, safe_merge: bool = False, dtype: str | None = None, overwrite: bool = False,
) -> str:  # fmt: skip
    """Without ``weights``: merge the adapters into the base and write a full model folder (weights, config,
    tokenizer) that loads without peft. With ``weights``: combine them with ``add_weighted_adapter`` into one new
    adapter folder. Returns a one-line description of what was written."""
    out = Path(output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise UsageError(f"{out} exists and is not empty: choose a new folder or pass --overwrite")
    if weights is not None and len(weights) != len(adapters):
        raise UsageError(f"--weights: got {len(weights)} weight(s) for {len(adapters)} adapter(s)")

    from .config import LoraConfig
    from .lora.model import PeftModel
    from .models import embedded_name, load_model

    with _as_usage_error():
        configs = [LoraConfig.from_pretrained(a) for a in adapters]
    base = base or embedded_name(configs[0].base_model_name_or_path or "")
    if not base:
        raise UsageError(f"{adapters[0]}: its adapter_config.json names no base model: pass --base")
    tasks = {_adapter_task(c) for c in configs}
    if len(tasks) > 1:
        raise UsageError(
            f"the adapters are for different tasks ({', '.join(sorted(tasks))}): merge one task at a time"
        )
    task = tasks.pop()
    with _as_usage_error(f"base model {base!r}: "):
        num_labels = _num_labels(adapters[0]) if task == "seq-cls" else None
        model, tokenizer = load_model(base, task=task, num_labels=num_labels)
    names = [f"adapter{i}" for i in range(len(adapters))]
    with _as_usage_error():
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:]):
            peft_model.load_adapter(adapter, adapter_name=name)
    if weights is not None:
        with _as_usage_error("add_weighted_adapter: "):
            peft_model.add_weighted_adapter(
                names, list(weights), "default", combination_type=combination_type, svd_rank=svd_rank,
                density=density,
            )  # fmt: skip
        peft_model.save_pretrained(str(out), selected_adapters=["default"])
        tokenizer.save_pretrained(str(out))
        return f"combined adapter ({combination_type}, weights {list(weights)}) written to {out}"
    with _as_usage_error("merge: "):
        merged = peft_model.merge_and_unload(adapter_names=names, safe_merge=safe_merge)
    if dtype:
        import torch

        merged = merged.to(getattr(torch, dtype))
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return f"{len(names)} adapter(s) merged into {base} and written to {out}"


# ---------------------------------------------------------------------------------------------------------------------
# quickstart

QUICKSTART_GLOB = "quickstart-*.yaml"
QUICKSTART_ROOT = "outputs/quickstart"
QUICKSTART_STAMP = ".quickstart_recipe.json"


@dataclass
class QuickstartRow:
    """One quickstart adapter: its name and folder, behaviour scores, and training seconds (None: reused)."""

    name: str
    folder: str
    base_model: str
    before: float | None
    after: float | None
    train_seconds: float | None


def quickstart_recipes() -> list[Path]:
    """The shipped quickstart recipes (``peft_trainer/recipes/quickstart-*.yaml``)."""
    from .recipe import RECIPES_DIR

    return sorted(RECIPES_DIR.glob(QUICKSTART_GLOB))


def _stamp(recipe_path: str, overrides: Sequence[str]) -> dict[str, Any]:
    return {
        "recipe": os.path.abspath(recipe_path),
        "sha256": hashlib.sha256(Path(recipe_path).read_bytes()).hexdigest(),
        "overrides": list(overrides),
    }


def _already_trained(out: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The previous run's behaviour report when ``out`` holds a complete adapter trained from the same recipe."""
    from .behaviour import REPORT_NAME
    from .folders import missing_files

    try:
        same = json.loads((out / QUICKSTART_STAMP).read_text(encoding="utf-8")) == stamp
        report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if same and not missing_files(out, ["default"]) else None


def train_quickstart(
    recipes: Sequence[str | os.PathLike[str]] | None = None, output_root: str = QUICKSTART_ROOT,
    overrides: Sequence[str] = (), retrain: bool = False,
) -> list[QuickstartRow]:  # fmt: skip
    """Train each quickstart recipe into ``output_root/<name>`` (reusing an adapter trained from the same recipe
    and overrides unless ``retrain``); returns one row per adapter."""
    rows = []
    for path in [str(p) for p in recipes or quickstart_recipes()]:
        name = Path(path).stem.removeprefix("quickstart-")
        out = Path(output_root) / name
        recipe = parse_recipe(path, [*overrides, "--output_dir", str(out)])
        stamp = _stamp(recipe.path or path, overrides)
        previous = None if retrain else _already_trained(out, stamp)
        if previous is not None:
            print(f"{PROG}: {name}: already trained in {out} from this recipe (--retrain to train again)")
            rows.append(QuickstartRow(name, str(out), recipe.model_name, previous["before"]["score"],
                                      previous["after"]["score"], None))  # fmt: skip
            continue
        print(f"{PROG}: training {name} from {path} -> {out}", flush=True)
        summary = run_training(recipe)
        (out / QUICKSTART_STAMP).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
        rows.append(QuickstartRow(name, str(out), recipe.model_name, summary.behaviour_before,
                                  summary.behaviour_after, summary.train_seconds))  # fmt: skip
    return rows
