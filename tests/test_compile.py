"""``torch_compile=True`` with the chunked loss: the training step compiles once, as one graph (no graph breaks in
the LoRA layers, the loss or the adapter state), however many label tokens each batch has."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from peft_trainer import PeftTrainer
from tests.conftest import tiny_llama
from tests.trainer_helpers import fast_args, token_dataset


def _train(tmp_path, compile_: bool, **lora) -> float:
    args = fast_args(tmp_path / str(compile_), max_steps=4, torch_compile=compile_, **lora)
    assert args.chunked_loss  # the default
    return PeftTrainer(tiny_llama(), args, train_dataset=token_dataset(16)).train().training_loss


@pytest.mark.parametrize(
    "lora",
    [
        dict(lora_target_modules="all-linear"),
        dict(lora_target_modules="all-linear", lora_dropout=0.1),
        dict(lora_dropout=0.1, use_dora=True),
    ],
    ids=["all-linear", "dropout", "dropout-dora"],
)
def test_compiles_once_without_graph_breaks(tmp_path, lora: dict) -> None:
    torch._dynamo.reset()
    counters.clear()
    assert len({sum(r["labels"][i] != -100 for i in range(12)) for r in token_dataset(16)}) > 2  # batches differ
    compiled = _train(tmp_path, True, **lora)
    assert dict(counters["frames"]) == {"total": 1, "ok": 1}  # one frame compiled, in step 1, never again
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    if not lora.get("lora_dropout"):  # dropout draws its masks from another generator when compiled
        assert compiled == pytest.approx(_train(tmp_path, False, **lora), rel=1e-5)
