"""Datasets to training rows: load records, detect the format, apply chat templates, mask labels to completions, pack."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

FORMATS = ("messages", "prompt_completion", "text", "classification")
CAUSAL_FORMATS = ("messages", "prompt_completion", "text")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
}
IGNORE_INDEX = -100
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# Used for `messages` rows when the tokenizer has no chat template of its own; loss covers "<content><eos>".
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)


@dataclass
class TokenizeStats:
    """What :func:`tokenize_dataset` did: counts for logs and the model card."""

    source: str
    fmt: str
    max_length: int
    rows: int = 0  # rows read
    examples: int = 0  # rows produced (blocks when packing)
    truncated: int = 0  # rows cut to max_length
    dropped: int = 0  # rows with no token left to learn from (e.g. completion truncated away)
    tokens: int = 0  # input tokens produced
    trainable_tokens: int = 0  # label tokens != -100
    packed: bool = False
    label_names: list[str] | None = None  # classification: label id -> name, when labels are names
    num_labels: int | None = None  # classification

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Row:
    input_ids: list[int]
    labels: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _kind(value: Any) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: file is empty (no rows)")
    data: Any = None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON Lines with a .json name: parsed below
        if isinstance(data, dict):
            columns = {k: v for k, v in data.items() if isinstance(v, list)}
            if len(data) == 1 and columns:  # {"data": [{...}, ...]}
                data = next(iter(columns.values()))
            elif columns and len(columns) == len(data) and len({len(v) for v in columns.values()}) == 1:
                data = [dict(zip(columns, values)) for values in zip(*columns.values())]  # columnar
            else:
                raise ValueError(f"{path}: expected a list of row objects (or JSON Lines), got one object")
    if data is None:
        data = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of row objects, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: file is empty (no rows)")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i}: expected an object with columns, got {_describe(row)}")
    return data


def _rows_to_dataset(rows: list[dict[str, Any]], source: str) -> datasets.Dataset:
    """Columns from the union of keys (missing -> None); checks each column holds one kind of value."""
    import datasets
    import pyarrow as pa

    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for key, values in columns.items():
        values.extend(row.get(key) for row in rows)
        if key == "messages":  # checked in depth here: Arrow's own error would not name the row
            for i, value in enumerate(values, start=1):
                problem = None if _missing(value) else _check_messages(value)
                if problem:
                    raise ValueError(f"{source}: row {i}, column 'messages': {problem}")
            continue
        first: tuple[int, str] | None = None
        for i, value in enumerate(values, start=1):
            kind = _kind(value)
            if kind is None:
                continue
            if first is None:
                first = (i, kind)
            elif kind != first[1]:
                raise ValueError(
                    f"{source}: row {i}, column {key!r}: expected a {first[1]} like row {first[0]}, got {_describe(value)}"
                )
    info = datasets.DatasetInfo(dataset_name=source)
    try:
        return datasets.Dataset.from_dict(columns, info=info)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as err:
        for key, values in columns.items():
            try:
                pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as column_err:
                raise ValueError(f"{source}: column {key!r}: values do not share one type ({column_err})") from None
        raise ValueError(f"{source}: cannot build a dataset ({err})") from None


def load_records(path_or_id: str | os.PathLike[str], split: str = "train", **kwargs: Any) -> datasets.Dataset:
    """Load rows from a local ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file, a data folder or a Hub id.

    Local files hold one split (``split`` is ignored for them); folders and Hub ids go through
    ``datasets.load_dataset(path_or_id, split=split, **kwargs)``. JSON rows may differ in their keys (missing
    values become ``None``); a column whose values differ in type, invalid JSON or an empty file raise
    ``ValueError`` naming the file, row and column. The dataset's ``info.dataset_name`` is set to the path, which
    :func:`tokenize_dataset` uses in its error messages.
    """
    import datasets

    name = os.fspath(path_or_id)
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        source = str(path)
        if suffix in (".jsonl", ".json"):
            return _rows_to_dataset(_read_json_rows(path), source)
        if suffix in (".csv", ".tsv"):
            import pandas as pd

            try:
                frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
            except pd.errors.EmptyDataError:
                raise ValueError(f"{path}: file is empty (no rows)") from None
            except pd.errors.ParserError as err:
                raise ValueError(f"{path}: cannot parse ({err})") from None
            if frame.empty:
                raise ValueError(f"{path}: file is empty (no rows)")
            records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
            return _rows_to_dataset([{str(k): v for k, v in row.items()} for row in records], source)
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            from datasets.table import InMemoryTable

            table = pq.read_table(path)
            if table.num_rows == 0:
                raise ValueError(f"{path}: file is empty (no rows)")
            return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(dataset_name=source))
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(DATA_EXTENSIONS)}")
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split, **kwargs)
    if suffix in DATA_EXTENSIONS or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name}: no such data file or folder")
    return datasets.load_dataset(name, split=split, **kwargs)


def detect_format(dataset: datasets.Dataset, source: str | None = None) -> str:
    """Which of ``FORMATS`` the columns describe.

    ``messages`` -> "messages"; ``prompt`` + ``completion`` -> "prompt_completion"; ``text`` + ``label`` ->
    "classification"; ``text`` -> "text". Raises ``ValueError`` naming the missing column otherwise.
    """
    source = source or _source(dataset)
    columns = set(dataset.column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"text", "label"} <= columns:
        return "classification"
    if "text" in columns:
        return "text"
    found = ", ".join(repr(c) for c in dataset.column_names) or "none"
    for have, need in (("prompt", "completion"), ("completion", "prompt"), ("label", "text")):
        if have in columns:
            raise ValueError(f"{source}: missing column {need!r} (found columns {found}) to go with {have!r}")
    raise ValueError(
        f"{source}: missing column: expected 'messages', 'prompt' + 'completion', 'text' + 'label' or 'text' "
        f"(found columns {found})"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Row checks: each returns a problem description or None


def _check_messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of {{role, content}} dicts, got {_describe(value)}"
    for j, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return f"message {j}: expected a {{role, content}} dict, got {_describe(message)}"
        for key in ("role", "content"):
            if _missing(message.get(key)):
                return f"message {j}: key {key!r} is missing"
            if not isinstance(message[key], str):
                return f"message {j}: {key!r} must be a string, got {_describe(message[key])}"
    return None


def _check_string(value: Any) -> str | None:
    if _missing(value):
        return "missing value"
    if not isinstance(value, str):
        return f"expected a string, got {_describe(value)}"
    return None


def _source(dataset: datasets.Dataset) -> str:
    return getattr(dataset.info, "dataset_name", None) or "dataset"


def _fail(source: str, row: int, column: str, problem: str) -> ValueError:
    return ValueError(f"{source}: row {row}, column {column!r}: {problem}")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str | None, gen: bool
) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=template)


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return its text and the character span of each assistant turn.

    A span runs from the end of the generation prompt to the end of the turn (content + end-of-turn token, trailing
    whitespace excluded), found by rendering prefixes of the conversation. Templates whose prefixes are not
    prefixes of the full text fall back to locating the content itself (+ eos when it follows).
    """
    full = _render(tokenizer, messages, template, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = end = None
        if i > 0:
            before = _render(tokenizer, messages[:i], template, True)
            if full.startswith(before) and len(before) >= cursor:
                start = len(before)
        after = _render(tokenizer, messages[: i + 1], template, False).rstrip()
        if full.startswith(after) and start is not None and len(after) > start:
            end = len(after)
        if start is None or end is None:
            found = full.find(message["content"], start if start is not None else cursor)
            if found < 0:
                raise ValueError(f"the chat template dropped the content of message {i + 1} (assistant)")
            start = found if start is None else start
            end = found + len(message["content"])
            eos = tokenizer.eos_token
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def _tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str | None, completion_only: bool
) -> _Row:
    text, spans = _assistant_spans(tokenizer, messages, template)
    # Templates write their own special tokens; the fallback one has none, so it lets the tokenizer add BOS.
    add_special = template is not None and template == FALLBACK_CHAT_TEMPLATE
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        trainable = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
    else:  # slow tokenizers have no offsets: tokenize segment by segment at span boundaries
        ids, trainable, pos = [], [], 0
        bounds = [(s, e, True) for s, e in spans]
        for s, e, inside in [*bounds, (len(text), len(text), False)]:
            for a, b, flag in ((pos, s, False), (s, e, inside)):
                if b > a:
                    piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
                    ids.extend(piece)
                    trainable.extend([flag] * len(piece))
            pos = e
    labels = [t if (keep or not completion_only) else IGNORE_INDEX for t, keep in zip(ids, trainable)]
    return _Row(ids, labels)


def _tokenize_plain(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, completion_only: bool) -> _Row:
    """Prompt (with the tokenizer's BOS if it adds one) + completion + eos; no template."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    masked = [IGNORE_INDEX] * len(prompt_ids) if completion_only else list(prompt_ids)
    return _Row(prompt_ids + completion_ids, masked + completion_ids)


def _clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Arrow fills keys that only some messages have with None; templates expect such keys to be absent.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _causal_rows(
    dataset: Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    fmt: str,
    completion_only: bool,
    source: str,
) -> Iterable[tuple[int, _Row]]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    template = None if has_template else FALLBACK_CHAT_TEMPLATE
    for i, row in enumerate(dataset, start=1):
        if fmt == "messages":
            messages = row["messages"]
            problem = "missing value" if _missing(messages) else _check_messages(messages)
            if problem:
                raise _fail(source, i, "messages", problem)
            if completion_only and not any(m["role"] == "assistant" for m in messages):
                raise _fail(source, i, "messages", "no assistant message to learn from (completion_only_loss=True)")
            try:
                yield i, _tokenize_chat(tokenizer, _clean_messages(messages), template, completion_only)
            except ValueError as err:
                raise _fail(source, i, "messages", str(err)) from None
        elif fmt == "prompt_completion":
            for column in ("prompt", "completion"):
                problem = _check_string(row[column])
                if problem:
                    raise _fail(source, i, column, problem)
            if has_template:
                turns = [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["completion"]},
                ]
                yield i, _tokenize_chat(tokenizer, turns, None, completion_only)
            else:
                yield i, _tokenize_plain(tokenizer, row["prompt"], row["completion"], completion_only)
        else:
            problem = _check_string(row["text"])
            if problem:
                raise _fail(source, i, "text", problem)
            ids = list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
            if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids.append(tokenizer.eos_token_id)
            yield i, _Row(ids, list(ids))


def _label_names(dataset: datasets.Dataset, given: Sequence[str] | None, source: str) -> list[str] | None:
    if given is not None:
        return list(given)
    feature = dataset.features.get("label")
    if getattr(feature, "names", None):
        return list(feature.names)
    values = dataset["label"]
    names = sorted({v for v in values if isinstance(v, str)})
    if names:
        for i, value in enumerate(values, start=1):
            if not isinstance(value, str) and not _missing(value):
                raise _fail(source, i, "label", f"mixes a number with class names {names[:5]}: got {_describe(value)}")
    return names or None


def _label_id(value: Any, names: list[str] | None) -> int | str:
    """The class id of ``value``, or a problem description (str) when it is none."""
    if _missing(value):
        return "missing value"
    if isinstance(value, str):
        if names and value in names:
            return names.index(value)
        known = f"known class names: {', '.join(names)}" if names else "labels are class ids (ints)"
        return f"unknown class name {value!r} ({known})"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an int class id or a class name, got {_describe(value)}"
    if value < 0 or (names is not None and value >= len(names)):
        return f"class id {value} out of range" + (f" for {len(names)} classes" if names else "")
    return value


def _tokenize_classification(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_names: Sequence[str] | None,
    stats: TokenizeStats,
) -> dict[str, list[Any]]:
    names = _label_names(dataset, label_names, stats.source)
    columns: dict[str, list[Any]] = {}
    top = -1
    for i, row in enumerate(_progress(dataset, stats.source), start=1):
        problem = _check_string(row["text"])
        if problem:
            raise _fail(stats.source, i, "text", problem)
        label = _label_id(row["label"], names)
        if isinstance(label, str):
            raise _fail(stats.source, i, "label", label)
        enc = tokenizer(row["text"])
        if len(enc["input_ids"]) > max_length:
            stats.truncated += 1
            enc = tokenizer(row["text"], truncation=True, max_length=max_length)
        for key, value in enc.items():
            columns.setdefault(key, []).append(list(value))
        columns.setdefault("label", []).append(label)
        stats.tokens += len(enc["input_ids"])
        top = max(top, label)
    stats.label_names = names
    stats.num_labels = len(names) if names else top + 1
    return columns


def _progress(rows: Iterable[Any], source: str) -> Iterable[Any]:
    from tqdm.auto import tqdm

    return tqdm(rows, desc=f"Tokenizing {os.path.basename(source) or source}", unit="row", disable=None, leave=False)


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    fmt: str | None = None,
    max_length: int = 1024,
    completion_only_loss: bool = True,
    packing: bool = False,
    source: str | None = None,
    label_names: Sequence[str] | None = None,
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Turn records into training rows.

    Causal-LM formats give ``input_ids``, ``attention_mask`` and ``labels`` (lists of ints, same length):

    - ``messages``: rendered with the tokenizer's chat template (``FALLBACK_CHAT_TEMPLATE`` when it has none);
      with ``completion_only_loss`` only assistant turns (content + end-of-turn token) keep labels, all else -100.
    - ``prompt_completion``: with a chat template, the prompt is a user turn and the completion the assistant
      turn; without one, ``prompt + completion + eos`` tokenized as two pieces. Loss on completion + eos.
    - ``text``: the text + eos, loss on every token.

    Rows longer than ``max_length`` are cut (counted in ``stats.truncated``); rows left with no label to learn from
    are dropped (``stats.dropped``). ``packing`` concatenates all rows (each ends with eos) and cuts the stream into
    ``max_length`` blocks (the last may be shorter) instead of truncating; attention is not reset between rows.

    ``classification`` gives the tokenizer's fields (truncated to ``max_length``) and an int ``label``; labels may
    be ids or class names (``label_names`` fixes their order, else a ``ClassLabel`` feature's names, else the
    sorted names found); ``stats.label_names``/``stats.num_labels`` say what the model head needs.

    Bad rows raise ``ValueError`` "<source>: row <n>, column '<col>': <problem>" with 1-based row numbers
    (== line numbers of a JSONL file without blank lines). ``source`` defaults to the path :func:`load_records` read.
    """
    import datasets

    source = source or _source(dataset)
    if len(dataset) == 0:
        raise ValueError(f"{source}: no rows (empty file or split)")
    if fmt is None:
        fmt = detect_format(dataset, source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    for column in REQUIRED_COLUMNS[fmt]:
        if column not in dataset.column_names:
            found = ", ".join(repr(c) for c in dataset.column_names)
            raise ValueError(f"{source}: missing column {column!r} for format {fmt!r} (found columns {found})")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: need at least 2 tokens")
    if packing and fmt == "classification":
        raise ValueError(
            "packing applies to causal-LM formats (messages, prompt_completion, text), not classification"
        )
    stats = TokenizeStats(source=source, fmt=fmt, max_length=max_length, rows=len(dataset), packed=packing)
    info = datasets.DatasetInfo(dataset_name=source)

    if fmt == "classification":
        columns = _tokenize_classification(dataset, tokenizer, max_length, label_names, stats)
        stats.examples = len(columns["label"])
        return datasets.Dataset.from_dict(columns, info=info), stats

    rows: list[_Row] = []
    for _, row in _causal_rows(_progress(dataset, source), tokenizer, fmt, completion_only_loss, source):
        if not packing and len(row.input_ids) > max_length:
            stats.truncated += 1
            row = _Row(row.input_ids[:max_length], row.labels[:max_length])
        # Position 0 is never a target (labels are shifted inside the model), so it does not count.
        if not any(label != IGNORE_INDEX for label in row.labels[1:]):
            stats.dropped += 1
            continue
        rows.append(row)
    if packing:
        stream_ids = [t for row in rows for t in row.input_ids]
        stream_labels = [t for row in rows for t in row.labels]
        rows = [
            _Row(stream_ids[k : k + max_length], stream_labels[k : k + max_length])
            for k in range(0, len(stream_ids), max_length)
            if len(stream_ids[k : k + max_length]) >= 2
        ]
    if not rows:
        raise ValueError(f"{source}: no row has a token to learn from (all {stats.rows} rows dropped)")
    stats.examples = len(rows)
    stats.tokens = sum(len(row.input_ids) for row in rows)
    stats.trainable_tokens = sum(sum(label != IGNORE_INDEX for label in row.labels) for row in rows)
    columns = {
        "input_ids": [row.input_ids for row in rows],
        "attention_mask": [[1] * len(row.input_ids) for row in rows],
        "labels": [row.labels for row in rows],
    }
    return datasets.Dataset.from_dict(columns, info=info), stats


# ---------------------------------------------------------------------------------------------------------------------
# Splitting and batching


def train_eval_split(
    dataset: datasets.Dataset, eval_ratio: float, seed: int = 42
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Shuffle and split off ``eval_ratio`` of the rows (at least one, leaving at least one); 0 -> ``(dataset, None)``."""
    if eval_ratio == 0:
        return dataset, None
    if not 0 < eval_ratio < 1:
        raise ValueError(f"eval_ratio={eval_ratio}: use a fraction in [0, 1)")
    n = len(dataset)
    if n < 2:
        raise ValueError(f"{_source(dataset)}: {n} row(s) cannot be split into train and eval; set eval_ratio=0")
    n_eval = min(n - 1, max(1, round(n * eval_ratio)))
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


@dataclass
class DataCollatorForCausalLM:
    """Pad causal-LM rows to the batch's longest (rounded up to ``pad_to_multiple_of``).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` with -100 (so padding
    never counts in the loss even when pad == eos). Returns LongTensors of shape ``(batch, seq_len)``. Rows without
    ``labels`` get ``input_ids`` as labels.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            values = {
                "input_ids": (ids, self.pad_token_id),
                "attention_mask": (list(f.get("attention_mask") or [1] * len(ids)), 0),
                "labels": (list(f["labels"]) if f.get("labels") is not None else list(ids), IGNORE_INDEX),
            }
            for key, (seq, pad) in values.items():
                fill = [pad] * (length - len(seq))
                batch[key].append(fill + seq if self.padding_side == "left" else seq + fill)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def make_collator(tokenizer: PreTrainedTokenizerBase, fmt: str, pad_to_multiple_of: int | None = None) -> Any:
    """The collator for ``fmt``: :class:`DataCollatorForCausalLM` for causal formats, else
    ``transformers.DataCollatorWithPadding`` (which also renames ``label`` to ``labels``)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: load it with models.load_model/load_tokenizer or set one")
    if fmt == "classification":
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    if fmt not in CAUSAL_FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return DataCollatorForCausalLM(tokenizer.pad_token_id, pad_to_multiple_of, tokenizer.padding_side)


__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "DataCollatorForCausalLM",
    "TokenizeStats",
    "detect_format",
    "load_records",
    "make_collator",
    "tokenize_dataset",
    "train_eval_split",
]
