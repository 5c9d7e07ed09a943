"""Raw records handed to PeftTrainer (a datasets.Dataset or a data file path) made into training rows, as TRL's
SFTTrainer does: the tokenizer's chat template, loss on completions only, packing."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from .checks import source_of
from .collate import make_collator
from .records import detect_format, load_records
from .tokenize import tokenize_dataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def is_raw(dataset: Any) -> bool:
    """True for a data file path, or a ``datasets.Dataset`` of records (no ``input_ids`` column yet)."""
    if isinstance(dataset, (str, os.PathLike)):
        return True
    import datasets

    return isinstance(dataset, datasets.Dataset) and "input_ids" not in dataset.column_names


def tokenize_raw(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 512,
    completion_only_loss: bool = True,
    packing: bool = False,
) -> tuple[Any, str]:
    """Training rows and their format (``messages``, ``prompt_completion``, ``text`` or ``classification``)
    from a data file path or a ``datasets.Dataset`` of records; bad rows are reported by row and column."""
    records = load_records(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    fmt = detect_format(records, source_of(records))
    rows, stats = tokenize_dataset(
        records, tokenizer, fmt=fmt, max_length=max_length, completion_only_loss=completion_only_loss,
        packing=packing and fmt != "classification",
    )  # fmt: skip
    logger.info(
        "%s: %d rows -> %d examples (%s%s), %d truncated to max_length=%d, %d tokens of which %d trained on",
        stats.source, stats.rows, stats.examples, fmt, ", packed" if stats.packed else "", stats.truncated,
        max_length, stats.tokens, stats.trainable_tokens,
    )  # fmt: skip
    return rows, fmt


def prepare_raw(
    args: Any, tokenizer: PreTrainedTokenizerBase | None, train_dataset: Any, eval_dataset: Any, collator: Any
) -> tuple[Any, Any, Any]:
    """``(train_dataset, eval_dataset, data_collator)`` with raw records tokenized (evaluation rows never packed)
    and, when none was given, the collator for their format. Tokenized datasets pass through untouched."""
    raw = [d for d in (train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]))
           if d is not None and is_raw(d)]  # fmt: skip
    if not raw:
        return train_dataset, eval_dataset, collator
    if tokenizer is None:
        raise ValueError(
            "train_dataset/eval_dataset hold raw records (messages, prompt/completion or text), which PeftTrainer "
            "tokenizes with the tokenizer's chat template: pass processing_class=<the model's tokenizer>"
        )
    options = dict(
        max_length=getattr(args, "max_length", 512), completion_only_loss=getattr(args, "completion_only_loss", True)
    )
    formats = []

    def rows(dataset: Any, packing: bool) -> Any:
        if dataset is None or not is_raw(dataset):
            return dataset
        tokenized, fmt = tokenize_raw(dataset, tokenizer, packing=packing, **options)
        formats.append(fmt)
        return tokenized

    train_dataset = rows(train_dataset, getattr(args, "packing", False))
    if isinstance(eval_dataset, dict):
        eval_dataset = {name: rows(d, False) for name, d in eval_dataset.items()}
    else:
        eval_dataset = rows(eval_dataset, False)
    if collator is None:
        collator = make_collator(tokenizer, formats[0])
    return train_dataset, eval_dataset, collator
