"""Datasets to training rows: read records, check rows, tokenize with chat templates (labels masked to completions,
packing), split and collate."""

from ..prompts import FALLBACK_CHAT_TEMPLATE
from .collate import DataCollatorForCausalLM, make_collator, train_eval_split
from .records import CAUSAL_FORMATS, DATA_EXTENSIONS, FORMATS, detect_format, load_records
from .tokenize import IGNORE_INDEX, TokenizeStats, tokenize_dataset

__all__ = [
    "CAUSAL_FORMATS",
    "DATA_EXTENSIONS",
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
