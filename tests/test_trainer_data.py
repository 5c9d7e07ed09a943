"""PeftTrainer takes raw records as SFTTrainer does (a datasets.Dataset or a data file with messages, prompt/completion
or text) and packs them without attention across rows."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from peft_trainer import PeftTrainer, PeftTrainingArguments, models
from peft_trainer.data import make_collator, tokenize_dataset
from tests.trainer_helpers import fast_args

pytestmark = pytest.mark.usefixtures("embedded_cache")

CHAT = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
    for i in range(8)
]
PAIRS = [{"prompt": f"Spell {w}.", "completion": " ".join(w)} for w in ("cat", "house", "tree", "lamp", "river")] * 2
TEXT = [{"text": f"Line {i}: {'more words ' * (i % 3)}done."} for i in range(8)]


def _losses(trainer: PeftTrainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("rows", [CHAT, PAIRS, TEXT], ids=["messages", "prompt_completion", "text"])
@pytest.mark.parametrize("as_file", [False, True], ids=["dataset", "jsonl"])
def test_raw_records_train_as_tokenized_rows_do(tmp_path, rows, as_file):
    """Raw records (and the tokenizer loaded from the model name) train exactly as the rows tokenize_dataset makes
    with make_collator's collator: the chat template, completion-only labels."""
    raw = datasets.Dataset.from_list(rows)
    if as_file:
        raw = tmp_path / "train.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = PeftTrainer("tiny-llama", fast_args(tmp_path / "raw", max_steps=2), train_dataset=raw)
    tok = models.load_tokenizer("tiny-llama")
    rows_, stats = tokenize_dataset(datasets.Dataset.from_list(rows), tok)
    model, _ = models.load_model("tiny-llama")
    ref = PeftTrainer(
        model, fast_args(tmp_path / "ref", max_steps=2), train_dataset=rows_, processing_class=tok,
        data_collator=make_collator(tok, stats.fmt),
    )  # fmt: skip
    assert _losses(ours) == _losses(ref)


def test_packed_batch_has_the_loss_of_its_rows_unpacked(tmp_path):
    """With packing=True a batch holds fewer, longer rows whose loss (chunked, as in training) is the loss of the
    same rows padded side by side; then it trains."""
    raw = datasets.Dataset.from_list(TEXT)
    packed = PeftTrainer("tiny-llama", fast_args(tmp_path / "p", packing=True, max_length=128), train_dataset=raw)
    plain = PeftTrainer(
        "tiny-llama", fast_args(tmp_path / "u", per_device_train_batch_size=len(TEXT)), train_dataset=raw
    )
    assert len(packed.train_dataset) < len(TEXT) == len(plain.train_dataset)
    collate = packed.data_collator
    packed_batch, plain_batch = collate(list(packed.train_dataset)), collate(list(plain.train_dataset))
    assert "attention_mask" not in packed_batch and "position_ids" in packed_batch
    assert packed_batch["input_ids"].numel() < plain_batch["input_ids"].numel()
    model = packed.model.train()
    assert model.get_base_model().config.use_cache is False  # transformers reads packed rows only without a cache
    with torch.no_grad():
        torch.testing.assert_close(model(**packed_batch).loss, model(**plain_batch).loss)
    losses = _losses(packed)
    assert len(losses) == packed.state.global_step == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_raw_records_need_a_tokenizer_and_valid_settings(tmp_path):
    model, _ = models.load_model("tiny-llama")
    with pytest.raises(ValueError, match="processing_class=<the model's tokenizer>"):
        PeftTrainer(model, fast_args(tmp_path), train_dataset=datasets.Dataset.from_list(CHAT))
    bad = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"row 1, column 'messages': no assistant message"):
        PeftTrainer("tiny-llama", fast_args(tmp_path), train_dataset=bad)
    with pytest.raises(ValueError, match="packing with use_cache=True") as err:
        PeftTrainingArguments(output_dir=str(tmp_path), packing=True, use_cache=True, max_length=1)
    assert "max_length=1" in str(err.value)
