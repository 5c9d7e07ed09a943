"""Tokenizing records into training rows: chat spans for completion-only labels, classification ids, packing."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..prompts import adds_special_tokens, render_chat
from .checks import check_messages, check_string, class_id, class_names, is_missing, row_error, source_of
from .records import FORMATS, REQUIRED_COLUMNS, detect_format

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


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
    position_ids: list[int] = field(default_factory=list)  # packed rows only: restart at 0 for each row


def _pack(rows: list[_Row], max_length: int) -> list[_Row]:
    """Rows (each at most ``max_length``) concatenated in order into blocks of at most ``max_length`` tokens.

    ``position_ids`` restart at 0 for each row, which tells the model where rows start: transformers then masks
    attention across rows (as with TRL's padding-free packing), and each row's first label is -100, so no row
    learns to predict its first token from the row before it. A packed row computes what the row alone does.
    """
    blocks: list[_Row] = []
    for row in rows:
        if not blocks or len(blocks[-1].input_ids) + len(row.input_ids) > max_length:
            blocks.append(_Row([], []))
        block = blocks[-1]
        block.input_ids.extend(row.input_ids)
        block.labels.extend([IGNORE_INDEX, *row.labels[1:]])
        block.position_ids.extend(range(len(row.input_ids)))
    return blocks


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return its text and the character span of each assistant turn.

    A span runs from the end of the generation prompt to the end of the turn (content + end-of-turn token, trailing
    whitespace excluded), found by rendering prefixes of the conversation. Templates whose prefixes are not
    prefixes of the full text fall back to locating the content itself (+ eos when it follows).
    """
    full = render_chat(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = end = None
        if i > 0:
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
            if full.startswith(before) and len(before) >= cursor:
                start = len(before)
        after = render_chat(tokenizer, messages[: i + 1]).rstrip()
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


def _tokenize_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], completion_only: bool) -> _Row:
    text, spans = _assistant_spans(tokenizer, messages)
    add_special = adds_special_tokens(tokenizer)
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
    for i, row in enumerate(dataset, start=1):
        if fmt == "messages":
            messages = row["messages"]
            problem = "missing value" if is_missing(messages) else check_messages(messages)
            if problem:
                raise row_error(source, i, "messages", problem)
            if completion_only and not any(m["role"] == "assistant" for m in messages):
                raise row_error(
                    source, i, "messages", "no assistant message to learn from (completion_only_loss=True)"
                )
            try:
                yield i, _tokenize_chat(tokenizer, _clean_messages(messages), completion_only)
            except ValueError as err:
                raise row_error(source, i, "messages", str(err)) from None
        elif fmt == "prompt_completion":
            for column in ("prompt", "completion"):
                problem = check_string(row[column])
                if problem:
                    raise row_error(source, i, column, problem)
            turns = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
            yield i, _tokenize_chat(tokenizer, turns, completion_only)
        else:
            problem = check_string(row["text"])
            if problem:
                raise row_error(source, i, "text", problem)
            ids = list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
            if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids.append(tokenizer.eos_token_id)
            yield i, _Row(ids, list(ids))


def _tokenize_classification(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_names: Sequence[str] | None,
    stats: TokenizeStats,
) -> dict[str, list[Any]]:
    names = class_names(dataset, label_names, stats.source)
    columns: dict[str, list[Any]] = {}
    top = -1
    for i, row in enumerate(_progress(dataset, stats.source), start=1):
        problem = check_string(row["text"])
        if problem:
            raise row_error(stats.source, i, "text", problem)
        label = class_id(row["label"], names)
        if isinstance(label, str):
            raise row_error(stats.source, i, "label", label)
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

    - ``messages``: rendered by :func:`peft_trainer.prompts.render_chat` (the tokenizer's chat template, else
      ``FALLBACK_CHAT_TEMPLATE``); with ``completion_only_loss`` only assistant turns (content + end-of-turn token)
      keep labels, all else -100.
    - ``prompt_completion``: the prompt is a user turn and the completion the assistant turn, rendered the same
      way (so training sees what :func:`peft_trainer.prompts.render_prompt` gives scoring and the Space).
    - ``text``: the text + eos, loss on every token.

    Rows longer than ``max_length`` are cut (counted in ``stats.truncated``); rows left with no label to learn from
    are dropped (``stats.dropped``). ``packing`` puts consecutive rows together into rows of at most ``max_length``
    tokens with a ``position_ids`` column (restarting at 0 for each row) and no ``attention_mask``: the model
    attends within each row only, so a packed row gives each of its rows the logits it has alone
    (:class:`~peft_trainer.data.DataCollatorForCausalLM` keeps it that way in batches).

    ``classification`` gives the tokenizer's fields (truncated to ``max_length``) and an int ``label``; labels may
    be ids or class names (``label_names`` fixes their order, else a ``ClassLabel`` feature's names, else the
    sorted names found); ``stats.label_names``/``stats.num_labels`` say what the model head needs.

    Bad rows raise ``ValueError`` "<source>: row <n>, column '<col>': <problem>" with 1-based row numbers
    (== line numbers of a JSONL file without blank lines). ``source`` defaults to the path :func:`load_records` read.
    """
    import datasets

    source = source or source_of(dataset)
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
        if len(row.input_ids) > max_length:
            stats.truncated += 1
            row = _Row(row.input_ids[:max_length], row.labels[:max_length])
        # Position 0 is never a target (labels are shifted inside the model), so it does not count.
        if not any(label != IGNORE_INDEX for label in row.labels[1:]):
            stats.dropped += 1
            continue
        rows.append(row)
    if not rows:
        raise ValueError(f"{source}: no row has a token to learn from (all {stats.rows} rows dropped)")
    if packing:
        rows = _pack(rows, max_length)
    stats.examples = len(rows)
    stats.tokens = sum(len(row.input_ids) for row in rows)
    stats.trainable_tokens = sum(sum(label != IGNORE_INDEX for label in row.labels) for row in rows)
    columns = {"input_ids": [row.input_ids for row in rows], "labels": [row.labels for row in rows]}
    if packing:
        columns["position_ids"] = [row.position_ids for row in rows]
    else:
        columns["attention_mask"] = [[1] * len(row.input_ids) for row in rows]
    return datasets.Dataset.from_dict(columns, info=info), stats
