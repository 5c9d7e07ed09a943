"""Shared pieces of the trainer tests: token-id datasets, fast CPU arguments, an offline tokenizer, file readers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from peft_trainer import PeftTrainingArguments

SEQ = 12


def token_dataset(n: int = 16, seed: int = 0, vocab: int = 100, extra_column: bool = True) -> Dataset:
    """Rows of ``SEQ`` token ids with right padding, a 3-token "prompt" masked to -100 and varying lengths, so the
    number of label tokens differs between batches; plus an unused ``text`` column (must be dropped)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (i * 7) % (SEQ - 4)
        ids = torch.randint(1, vocab, (SEQ,), generator=g).tolist()
        ids[length:] = [0] * (SEQ - length)
        labels = [-100] * 3 + ids[3:length] + [-100] * (SEQ - length)
        row = {"input_ids": ids, "attention_mask": [1] * length + [0] * (SEQ - length), "labels": labels}
        if extra_column:
            row["text"] = f"example {i}"
        rows.append(row)
    return Dataset.from_list(rows)


def fast_args(output_dir: str | os.PathLike, cls: type = PeftTrainingArguments, **overrides: Any) -> Any:
    """CPU-only, quiet, deterministic training arguments for tiny models (``cls`` may be TrainingArguments)."""
    defaults: dict[str, Any] = dict(
        output_dir=str(output_dir), report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2, max_steps=4,
        logging_steps=1, save_strategy="no", seed=7,
    )  # fmt: skip
    if cls is PeftTrainingArguments:
        defaults.update(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    defaults.update(overrides)
    return cls(**defaults)


def tiny_tokenizer(vocab: int = 100) -> Any:
    """A word-level fast tokenizer with ``vocab`` tokens ("<pad>"=0, "<unk>"=1, "w2".. ), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def adapter_file(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float | None = None) -> None:
    """Equal key sets and tensors: bit-equal by default, else within ``atol`` (rtol 1e-5)."""
    assert sorted(a) == sorted(b)
    for k in a:
        if atol is None:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=k)


def assert_same_optimizer(a: dict, b: dict) -> None:
    """Two optimizer state dicts (torch.load of optimizer.pt) are bit-identical."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def files_under(folder: str | os.PathLike) -> list[str]:
    root = Path(folder)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
