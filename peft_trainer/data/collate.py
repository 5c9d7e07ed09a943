"""Splitting off evaluation rows and collating rows into padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .checks import source_of
from .records import CAUSAL_FORMATS, FORMATS
from .tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase


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
        raise ValueError(f"{source_of(dataset)}: {n} row(s) cannot be split into train and eval; set eval_ratio=0")
    n_eval = min(n - 1, max(1, round(n * eval_ratio)))
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


@dataclass
class DataCollatorForCausalLM:
    """Pad causal-LM rows to the batch's longest (rounded up to ``pad_to_multiple_of``).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` with -100 (so padding
    never counts in the loss even when pad == eos). Returns LongTensors of shape ``(batch, seq_len)``. Rows without
    ``labels`` get ``input_ids`` as labels.

    Packed rows (with ``position_ids``, from ``tokenize_dataset(packing=True)``) get no ``attention_mask``: the
    restarting positions mark where each row starts, and the padding's positions count from 0 as one more row.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = features[0].get("position_ids") is not None
        batch: dict[str, list[list[int]]] = {}
        for f in features:
            ids = list(f["input_ids"])
            fill = length - len(ids)
            values = {
                "input_ids": (ids, [self.pad_token_id] * fill),
                "labels": (list(f["labels"]) if f.get("labels") is not None else list(ids), [IGNORE_INDEX] * fill),
            }
            if packed:
                values["position_ids"] = (list(f["position_ids"]), list(range(fill)))
            else:
                values["attention_mask"] = (list(f.get("attention_mask") or [1] * len(ids)), [0] * fill)
            for key, (seq, pad) in values.items():
                batch.setdefault(key, []).append(pad + seq if self.padding_side == "left" else seq + pad)
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
