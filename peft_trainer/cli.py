"""Command line `peft-trainer train|merge|push|space|quickstart`; also the module that `accelerate launch -m` runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import datasets
    from transformers import HfArgumentParser, PreTrainedTokenizerBase

    from .arguments import DataArguments, ModelArguments, PeftTrainingArguments
    from .behaviour import BehaviourArguments, BehaviourResult

logger = logging.getLogger("peft_trainer.cli")

PROG = "peft-trainer"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_MODEL = "smollm2-135m-instruct"
# Recipe fields holding data paths: a relative path is looked up next to the recipe file first.
PATH_FIELDS = ("dataset", "eval_dataset", "behaviour_prompts")
QUICKSTART_GLOB = "quickstart-*.yaml"
QUICKSTART_ROOT = "outputs/quickstart"
QUICKSTART_STAMP = ".quickstart_recipe.json"


class UsageError(Exception):
    """A problem with the recipe, the arguments or the data: printed without a traceback, exit code 2."""


class CommandError(Exception):
    """An operation that failed for an outside reason (e.g. the Hub): printed without a traceback, exit code 1."""


@contextlib.contextmanager
def _as_usage_error(what: str = "") -> Iterator[None]:
    """Turn the errors that bad input raises (ValueError, missing files, unreachable Hub ids) into UsageError."""
    try:
        yield
    except (ValueError, OSError, ImportError) as e:  # OSError covers FileNotFoundError and ConnectionError
        message = str(e) or type(e).__name__
        raise UsageError(f"{what}{message}" if what and what not in message else message) from e


# ---------------------------------------------------------------------------------------------------------------------
# Recipes: flat YAML of ModelArguments + DataArguments + PeftTrainingArguments + BehaviourArguments fields


@dataclass
class Recipe:
    """A parsed recipe: one instance of each argument dataclass, plus where it came from."""

    model: ModelArguments
    data: DataArguments
    training: PeftTrainingArguments
    behaviour: BehaviourArguments
    path: str | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return self.model.model_name_or_path or DEFAULT_MODEL


def _parser_class() -> type[HfArgumentParser]:
    from transformers import HfArgumentParser

    class RecipeParser(HfArgumentParser):
        """HfArgumentParser whose errors raise UsageError (no 300-option usage dump, no SystemExit)."""

        def error(self, message: str) -> None:  # type: ignore[override]
            raise UsageError(f"{self.prog}: {message}")

    return RecipeParser


def recipe_parser(prog: str = f"{PROG} train") -> HfArgumentParser:
    """The parser of every recipe field (also the ``--field value`` command-line overrides)."""
    from .arguments import DataArguments, ModelArguments, PeftTrainingArguments
    from .behaviour import BehaviourArguments

    return _parser_class()(
        (ModelArguments, DataArguments, PeftTrainingArguments, BehaviourArguments),
        prog=prog,
        allow_abbrev=False,  # --max_step is an unknown field, not silently --max_steps
        description=(
            "Train a LoRA/QLoRA adapter. RECIPE.yaml is a flat mapping of the fields below; --field value on the "
            "command line overrides the recipe. Relative data paths in a recipe are looked up next to the recipe "
            "file first. Bad recipes or data exit with code 2 and a message naming the problem."
        ),
    )


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe file as a flat dict; relative ``PATH_FIELDS`` that exist next to the recipe become such paths."""
    recipe = Path(path)
    if not recipe.is_file():
        raise UsageError(f"{path}: no such recipe file")
    try:
        values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: invalid YAML ({e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: a recipe is a flat mapping of field: value, got {type(values).__name__}")
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise UsageError(f"{path}: recipes are flat; field(s) {', '.join(map(str, nested))} hold a mapping")
    for key in PATH_FIELDS:
        value = values.get(key)
        if isinstance(value, str) and not os.path.isabs(value):
            beside = recipe.parent / value
            if beside.exists():
                values[key] = str(beside)
    return values


def parse_recipe(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Recipe:
    """Parse a recipe file (or none) and ``--field value`` overrides into a :class:`Recipe`.

    Every problem (unknown keys with suggestions, each dataclass's validation, cross-field checks) is collected
    and raised as one :class:`UsageError`.
    """
    from .arguments import DataArguments, ModelArguments, PeftTrainingArguments
    from .behaviour import BehaviourArguments

    parser = recipe_parser()
    values = read_recipe(path) if path is not None else {}
    known = {a.dest for a in parser._actions if a.dest != "help"}
    problems = []
    for key in values:
        if key not in known:
            close = " or ".join(repr(c) for c in difflib.get_close_matches(str(key), known, n=3))
            problems.append(f"unknown field {key!r}" + (f" (did you mean {close}?)" if close else ""))
    defaults = {"output_dir": f"outputs/{Path(path).stem}"} if path is not None else {}
    parser.set_defaults(**{**defaults, **{k: v for k, v in values.items() if k in known}})
    namespace, rest = parser.parse_known_args(list(overrides))
    if rest:
        flags = [a.removeprefix("--").partition("=")[0] for a in rest if a.startswith("--")]
        close = [c for f in flags for c in difflib.get_close_matches(f, known, n=1)]
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        problems.append(f"unknown command-line argument(s): {' '.join(rest)} (fields are written --name value{hint})")
    built: dict[type, Any] = {}
    for cls in (ModelArguments, DataArguments, PeftTrainingArguments, BehaviourArguments):
        kwargs = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}
        try:
            built[cls] = cls(**kwargs)
        except (ValueError, TypeError) as e:
            problems.append(str(e).replace("\n", "\n  "))
    problems += _cross_field_problems(namespace)
    if problems:
        where = f"{path}" if path is not None else "arguments"
        raise UsageError(f"invalid recipe {where}:\n  - " + "\n  - ".join(problems))
    return Recipe(
        built[ModelArguments], built[DataArguments], built[PeftTrainingArguments], built[BehaviourArguments],
        str(path) if path is not None else None, list(overrides),
    )  # fmt: skip


def _cross_field_problems(values: argparse.Namespace) -> list[str]:
    """Problems that involve fields of different dataclasses, checked on the raw values (so they are reported even
    when a dataclass itself failed to build)."""
    p = []
    if not values.dataset:
        p.append("dataset: name the training data (a local .jsonl/.json/.csv/.parquet file or a Hub dataset id)")
    evaluating = str(getattr(values.eval_strategy, "value", values.eval_strategy)).lower() != "no"
    if evaluating and not (values.eval_dataset or values.eval_ratio):
        p.append("eval_strategy is set but there is no eval data: set eval_ratio (e.g. 0.1) or eval_dataset")
    if values.task == "seq-cls" and values.packing:
        p.append("packing applies to causal-lm training, not task seq-cls: remove packing")
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Data


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
            raise ValueError(f"{_source(records)}: cannot use column {src!r} as {dst!r}: a column {dst!r} exists")
    info = records.info
    records = records.rename_columns(renames) if renames else records
    records.info.dataset_name = getattr(info, "dataset_name", None)
    return records


def _source(records: datasets.Dataset) -> str:
    return getattr(records.info, "dataset_name", None) or "dataset"


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


def prepare_data(data: DataArguments, tokenizer: PreTrainedTokenizerBase, task: str, seed: int) -> PreparedData:
    """Load, check the format against the task, split off eval rows and tokenize; logs the counts (truncations too).

    Errors name the file, row and column of the *file* (a split renumbers rows, so a failing split is re-checked
    on the whole file to report the file's row number).
    """
    from .data import detect_format, tokenize_dataset, train_eval_split

    assert data.dataset is not None
    records = _load(data.dataset, data, data.dataset_split)
    fmt = detect_format(records, _source(records))
    if fmt == "classification" and task != "seq-cls":
        raise ValueError(
            f"{_source(records)}: text/label rows are classification data, but task is {task!r}: "
            "set task: seq-cls and num_labels (or use messages, prompt/completion or text data)"
        )
    if task == "seq-cls" and fmt != "classification":
        raise ValueError(f"{_source(records)}: task seq-cls needs 'text' and 'label' columns, found format {fmt!r}")
    names = _class_names(records) if fmt == "classification" else None
    options = dict(
        fmt=fmt, max_length=data.max_length, completion_only_loss=data.completion_only_loss, label_names=names
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
        train_records, eval_records = train_eval_split(records, data.eval_ratio, seed=seed)
        logger.info(
            "eval split: %d of %d rows held out (eval_ratio=%s)", len(eval_records), len(records), data.eval_ratio
        )
    train = tokenize(train_records, data.packing, records)
    evaluation = tokenize(eval_records, False, records if data.eval_ratio else eval_records) if eval_records else None
    num_labels = len(names) if names else (max(train["label"]) + 1 if fmt == "classification" else None)
    return PreparedData(train, evaluation, fmt, names, num_labels)


# ---------------------------------------------------------------------------------------------------------------------
# train


def _setup_logging(main_process: bool = True) -> None:
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
    """Load model and data, train with PeftTrainer, save the adapter and its card; score the behaviour if asked."""
    start = time.perf_counter()
    m, d, t, b = recipe.model, recipe.data, recipe.training, recipe.behaviour
    main_process = t.process_index == 0
    _setup_logging(main_process)
    from .behaviour import BehaviourCallback, load_prompts, write_card_section
    from .data import make_collator
    from .models import load_model, load_tokenizer
    from .quantization import bitsandbytes_config

    logger.info(
        "recipe %s: model %s, task %s, data %s", recipe.path or "(arguments)", recipe.model_name, m.task, d.dataset
    )
    with _as_usage_error(f"model {recipe.model_name!r}: "):
        tokenizer = load_tokenizer(recipe.model_name, revision=m.revision)
    with _as_usage_error():
        prepared = prepare_data(d, tokenizer, m.task, t.seed)
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

    callback = BehaviourCallback(b, tokenizer, prompts) if prompts else None
    with _as_usage_error():  # LoRA injection: a wrong target module lists the candidates
        trainer = PeftTrainer(
            model, t, train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tokenizer,
            data_collator=make_collator(tokenizer, prepared.fmt),
            compute_metrics=_classification_metrics() if prepared.fmt == "classification" else None,
            callbacks=[callback] if callback else None, lora_config=t.to_lora_config(task_type=m.task_type),
        )  # fmt: skip
    state = trainer.accelerator.state
    logger.info(
        "distributed: %s, %d process(es)%s", state.distributed_type.value, state.num_processes,
        ", base in 4 bit (bitsandbytes)" if getattr(model, "is_loaded_in_4bit", False) else
        ", base in 8 bit (bitsandbytes)" if getattr(model, "is_loaded_in_8bit", False) else "",
    )  # fmt: skip
    before: BehaviourResult | None = None
    if callback is not None:
        callback.bind(trainer)
        with trainer.model.disable_adapter():
            before = callback.score(trainer.model)
        logger.info(
            "behaviour %r before training: %.1f%% (%d/%d)",
            b.behaviour,
            100 * before.score,
            before.passed,
            before.total,
        )
        trainer.log({"eval_behaviour_score": before.score})
    result = trainer.train(resume_from_checkpoint=t.resume_from_checkpoint)
    trainer.save_model()  # adapter(s), tokenizer, model card; every rank takes part (FSDP gathers the adapter)
    after = callback.score(trainer.model) if callback is not None else None  # FSDP: every rank generates
    if trainer.args.should_save:
        if before is not None and after is not None:
            write_card_section(t.output_dir, before, after)
            if t.push_to_hub and trainer.hub_model_id:
                with contextlib.suppress(CommandError):  # the adapter went up with train(); this adds the score
                    push_folder(t.output_dir, trainer.hub_model_id, message="Behaviour score")
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


def _split_recipe(args: Sequence[str]) -> tuple[str | None, list[str]]:
    if args and not args[0].startswith("-"):
        return args[0], list(args[1:])
    return None, list(args)


def cmd_train(args: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(recipe_parser(f"{PROG} train [RECIPE.yaml]").format_help())
        return EXIT_OK
    path, overrides = _split_recipe(args)
    run_training(parse_recipe(path, overrides))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# merge


def _adapter_task(config: Any) -> str:
    return "seq-cls" if config.task_type == "SEQ_CLS" else "causal-lm"


def _num_labels(adapter_dir: str) -> int | None:
    from . import io

    for key, tensor in io.load_weights(adapter_dir).items():
        if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
            return int(tensor.shape[0])
    return None


def cmd_merge(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} merge",
        description=(
            "Without --weights: merge the adapter(s) into the base model and write a full model folder (weights, "
            "config, tokenizer) that loads without peft. With --weights: combine the adapters with "
            "add_weighted_adapter into one new adapter folder (PEFT format)."
        ),
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folder(s) or Hub repo id(s)")
    parser.add_argument("-o", "--output", required=True, help="folder to write (must be empty or new)")
    parser.add_argument("--base", help="base model: embedded name, folder or Hub id (default: the adapter's base)")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per adapter: write a combined adapter")
    parser.add_argument(
        "--combination-type", default="svd",
        help="add_weighted_adapter combination: svd, linear, cat, ties, dare_linear, ... (default svd)",
    )  # fmt: skip
    parser.add_argument("--svd-rank", type=int, help="rank of the combined adapter (svd family)")
    parser.add_argument("--density", type=float, help="kept fraction for ties/dare/magnitude_prune")
    parser.add_argument("--safe-merge", action="store_true", help="check merged weights are finite first")
    parser.add_argument("--dtype", help="save the merged model in this dtype (float32, bfloat16, float16)")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    opts = parser.parse_args(args)
    _setup_logging()
    out = Path(opts.output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not opts.overwrite)):
        raise UsageError(f"{out} exists and is not empty: choose a new folder or pass --overwrite")
    if opts.weights is not None and len(opts.weights) != len(opts.adapters):
        raise UsageError(f"--weights: got {len(opts.weights)} weight(s) for {len(opts.adapters)} adapter(s)")

    from .config import LoraConfig
    from .lora.model import PeftModel
    from .models import embedded_name, load_model

    with _as_usage_error():
        configs = [LoraConfig.from_pretrained(a) for a in opts.adapters]
    base = opts.base or embedded_name(configs[0].base_model_name_or_path or "")
    if not base:
        raise UsageError(f"{opts.adapters[0]}: its adapter_config.json names no base model: pass --base")
    tasks = {_adapter_task(c) for c in configs}
    if len(tasks) > 1:
        raise UsageError(
            f"the adapters are for different tasks ({', '.join(sorted(tasks))}): merge one task at a time"
        )
    task = tasks.pop()
    with _as_usage_error(f"base model {base!r}: "):
        num_labels = _num_labels(opts.adapters[0]) if task == "seq-cls" else None
        model, tokenizer = load_model(base, task=task, num_labels=num_labels)
    names = [f"adapter{i}" for i in range(len(opts.adapters))]
    with _as_usage_error():
        peft_model = PeftModel.from_pretrained(model, opts.adapters[0], adapter_name=names[0])
        for name, adapter in zip(names[1:], opts.adapters[1:]):
            peft_model.load_adapter(adapter, adapter_name=name)
    if opts.weights is not None:
        with _as_usage_error("add_weighted_adapter: "):
            peft_model.add_weighted_adapter(
                names, opts.weights, "default", combination_type=opts.combination_type, svd_rank=opts.svd_rank,
                density=opts.density,
            )  # fmt: skip
        peft_model.save_pretrained(str(out), selected_adapters=["default"])
        tokenizer.save_pretrained(str(out))
        print(f"{PROG}: combined adapter ({opts.combination_type}, weights {opts.weights}) written to {out}")
        return EXIT_OK
    with _as_usage_error("merge: "):
        merged = peft_model.merge_and_unload(adapter_names=names, safe_merge=opts.safe_merge)
    if opts.dtype:
        import torch

        merged = merged.to(getattr(torch, opts.dtype))
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    print(f"{PROG}: {len(names)} adapter(s) merged into {base} and written to {out}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# push


def _push_patterns() -> tuple[list[str], list[str]]:
    from .trainer import HUB_ALLOW_PATTERNS, HUB_IGNORE_PATTERNS

    return list(HUB_ALLOW_PATTERNS), list(HUB_IGNORE_PATTERNS)


def files_to_push(folder: str | os.PathLike[str]) -> list[str]:
    """The files of ``folder`` a push uploads (the same filter ``upload_folder`` applies): adapter files, model card,
    tokenizer files; never base weights, checkpoints, optimizer state or training_args.bin."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS  # what upload_folder adds to ignore_patterns

    allow, ignore = _push_patterns()
    root = Path(folder)
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(found, allow_patterns=allow, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS))


def _describe_hub_error(error: BaseException, repo_id: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    detail = " ".join(str(error).split())
    if isinstance(error, HfHubHTTPError) and status is not None:
        hint = {
            401: "the token was refused: check HF_TOKEN or --token",
            403: f"the token may not write to {repo_id}: use a write token for that namespace",
            404: f"repository or namespace of {repo_id} not found",
        }.get(status, "the Hub answered with an error")
        return f"HTTP {status}: {hint} ({detail})"
    if isinstance(error, OSError) or type(error).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
        from huggingface_hub import constants

        return f"cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {detail})"
    return f"{type(error).__name__}: {detail}"


def push_folder(
    folder: str | os.PathLike[str], repo_id: str, token: str | None = None, private: bool | None = None,
    revision: str | None = None, message: str | None = None,
) -> Any:  # fmt: skip
    """Create ``repo_id`` if needed and upload the allow-listed files of ``folder`` in one commit.

    Local files are only read. Raises UsageError for a folder that is not an adapter folder, CommandError (with the
    cause: refused token, missing rights, unreachable Hub) when the Hub fails.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{folder}: no such folder")
    files = files_to_push(root)
    if not any(f.count("/") <= 1 and f.endswith("adapter_config.json") for f in files):
        raise UsageError(f"{folder}: no adapter_config.json: not an adapter output folder")
    from huggingface_hub import HfApi

    allow, ignore = _push_patterns()
    api = HfApi(token=token)
    logger.info("pushing %d file(s) from %s to %s: %s", len(files), folder, repo_id, ", ".join(files))
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo.repo_id, folder_path=str(root), allow_patterns=allow, ignore_patterns=ignore,
            commit_message=message or f"Upload adapter from {root.name}", revision=revision,
        )  # fmt: skip
    except Exception as e:  # the Hub's and the network's errors alike; nothing local was changed
        raise CommandError(
            f"push of {folder} to {repo_id} failed: {_describe_hub_error(e, repo_id)}. "
            f"The local files in {folder} are intact."
        ) from e


def cmd_push(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} push",
        description=(
            "Upload an existing output folder to the Hub: adapter files, README.md model card and tokenizer files "
            "only (no base weights, checkpoints, optimizer state or training_args.bin). The local folder is never "
            "modified; on failure the cause is printed and the exit code is 1."
        ),
    )
    parser.add_argument("folder", help="output folder of a training run (holds adapter_config.json)")
    parser.add_argument("--repo-id", required=True, help="target repository, 'owner/name' or 'name'")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be pushed and stop")
    opts = parser.parse_args(args)
    _setup_logging()
    if opts.dry_run:
        for name in files_to_push(opts.folder):
            print(name)
        return EXIT_OK
    commit = push_folder(opts.folder, opts.repo_id, opts.token, opts.private, opts.revision, opts.commit_message)
    print(f"{PROG}: pushed {opts.folder} to {getattr(commit, 'commit_url', None) or opts.repo_id}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# space


def launch_space(
    base_model: str | None = None, adapters: list[str] | None = None, host: str | None = None, port: int | None = None
) -> None:
    """``space.launch`` (the Gradio Space), with a clear error when the Space or gradio is not installed."""
    try:
        import space
    except ImportError as e:
        raise UsageError(f"the Space cannot be imported ({e}): install it with pip install -e '.[space]'") from e
    try:
        space.launch(base_model=base_model, adapters=adapters, host=host, port=port)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "gradio":
            raise UsageError("gradio is not installed: pip install -e '.[space]'") from e
        raise


def _space_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: GRADIO_SERVER_PORT or 7860)")


def cmd_space(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} space",
        description="Start the Gradio Space: one base model, many adapters (see space/__init__.py for settings).",
    )
    parser.add_argument(
        "--base-model", help=f"embedded name, folder or Hub id (default: BASE_MODEL or {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--adapter", action="append", dest="adapters", metavar="[NAME=]SOURCE",
        help=f"adapter folder or Hub repo id, repeatable (default: ADAPTERS or every {QUICKSTART_ROOT}/*/)",
    )  # fmt: skip
    _space_options(parser)
    opts = parser.parse_args(args)
    launch_space(opts.base_model, opts.adapters, opts.host, opts.port)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# quickstart


def find_recipes_dir() -> Path:
    """``./recipes`` when it holds the quickstart recipes, else the repository's ``recipes`` (editable installs)."""
    for candidate in (Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"):
        if any(candidate.glob(QUICKSTART_GLOB)):
            return candidate
    raise UsageError(f"no {QUICKSTART_GLOB} recipes found in ./recipes or next to the installed package")


def _stamp(recipe_path: str, overrides: Sequence[str]) -> dict[str, Any]:
    text = Path(recipe_path).read_bytes()
    return {
        "recipe": os.path.abspath(recipe_path),
        "sha256": hashlib.sha256(text).hexdigest(),
        "overrides": list(overrides),
    }


def _already_trained(out: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The previous run's behaviour report when ``out`` holds a complete adapter trained from the same recipe."""
    try:
        same = json.loads((out / QUICKSTART_STAMP).read_text(encoding="utf-8")) == stamp
        report = json.loads((out / "behaviour_eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    return report if same and complete else None


def cmd_quickstart(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} quickstart",
        description=(
            f"Train the quickstart adapters (recipes/{QUICKSTART_GLOB}) on the embedded SmolLM2-135M-Instruct, print "
            "each behaviour score before and after training, then start the Space with them. Adapters already "
            "trained from the same recipe are reused. Any recipe field can be overridden for all recipes with "
            "--field value (e.g. --max_steps 3 --model_name_or_path tiny-llama)."
        ),
    )
    parser.add_argument(
        "--recipes", nargs="+", metavar="RECIPE", help=f"recipe files (default: recipes/{QUICKSTART_GLOB})"
    )
    parser.add_argument(
        "--output-root", default=QUICKSTART_ROOT, help=f"adapters go to ROOT/<name> ({QUICKSTART_ROOT})"
    )
    parser.add_argument("--retrain", action="store_true", help="train again even if an adapter exists")
    parser.add_argument("--no-space", action="store_true", help="train only; do not start the Space")
    _space_options(parser)
    opts, overrides = parser.parse_known_args(args)
    recipes = opts.recipes or [str(p) for p in sorted(find_recipes_dir().glob(QUICKSTART_GLOB))]
    _setup_logging()
    rows, adapters, bases = [], [], set()
    for path in recipes:
        name = Path(path).stem.removeprefix("quickstart-")
        out = Path(opts.output_root) / name
        run_overrides = [*overrides, "--output_dir", str(out)]
        recipe = parse_recipe(path, run_overrides)
        bases.add(recipe.model_name)
        stamp = _stamp(path, overrides)
        previous = None if opts.retrain else _already_trained(out, stamp)
        if previous is not None:
            print(f"{PROG}: {name}: already trained in {out} from this recipe (--retrain to train again)")
            rows.append((name, previous["before"]["score"], previous["after"]["score"], None))
        else:
            print(f"{PROG}: training {name} from {path} -> {out}", flush=True)
            summary = run_training(recipe)
            (out / QUICKSTART_STAMP).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
            rows.append((name, summary.behaviour_before, summary.behaviour_after, summary.train_seconds))
        adapters.append(f"{name}={out}")
    print(f"\n{PROG}: quickstart adapters ({', '.join(sorted(bases))})")
    print(f"  {'adapter':<12} {'before':>8} {'after':>8} {'train s':>8}")
    for name, before, after, seconds in rows:
        pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        print(f"  {name:<12} {pct(before):>8} {pct(after):>8} {'-' if seconds is None else f'{seconds:.0f}':>8}")
    if opts.no_space:
        return EXIT_OK
    if len(bases) != 1:
        raise UsageError(f"the quickstart recipes use different base models ({', '.join(sorted(bases))})")
    print(f"{PROG}: starting the Space with {', '.join(adapters)}", flush=True)
    launch_space(base_model=bases.pop(), adapters=adapters, host=opts.host, port=opts.port)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# main

COMMANDS = {
    "train": (cmd_train, "train an adapter from a YAML recipe (+ --field value overrides)"),
    "merge": (cmd_merge, "merge adapter(s) into the base model, or combine them into a new adapter"),
    "push": (cmd_push, "upload an output folder's adapter, card and tokenizer files to the Hub"),
    "space": (cmd_space, "start the Gradio Space with a base model and adapters"),
    "quickstart": (cmd_quickstart, "train the quickstart adapters on the embedded SmolLM2, then start the Space"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA/QLoRA fine-tuning on the Hugging Face Trainer. Also runs under "
        "`accelerate launch [--config_file recipes/accelerate/X.yaml] -m peft_trainer.cli train RECIPE.yaml`.",
        epilog=f"`{PROG} COMMAND --help` describes each command. Exit codes: 0 ok, 1 failure, 2 bad input.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-trainer`` console script and of ``python -m peft_trainer.cli``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        _top_parser().print_help()
        return EXIT_OK if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"{PROG}: error: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        return COMMANDS[command][0](rest)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
