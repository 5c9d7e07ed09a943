"""load_best_model_at_end with adapter-only checkpoints, when the best checkpoint is not the last one."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from peft_trainer import PeftTrainer
from tests.conftest import tiny_llama
from tests.trainer_helpers import adapter_file, assert_same_tensors, fast_args, token_dataset

SCORES = [3.0, 1.0, 2.0, 4.0]  # evaluated at steps 2, 4, 6, 8; lower is better: the best is step 4


class Snapshot(TrainerCallback):
    """The adapter right after the last optimizer step (before the best one is loaded back)."""

    def __init__(self, step: int) -> None:
        self.step, self.tensors = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.tensors = {k: v.detach().clone() for k, v in model.adapter_tensors("default").items()}


@pytest.mark.parametrize(
    "save_strategy, limit, kept, only_model",
    [("steps", 1, [4], False), ("steps", 2, [4, 8], False), ("best", None, [2, 4], False), ("steps", 2, [4, 8], True)],
    ids=["steps-limit1", "steps-limit2", "save-best", "save-only-model"],
)
def test_best_adapter_is_loaded_back(tmp_path, save_strategy, limit, kept, only_model):
    scores = iter(SCORES)
    args = fast_args(
        tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy=save_strategy, save_steps=2,
        save_total_limit=limit, load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=False,
        save_only_model=only_model,
    )  # fmt: skip
    snapshot = Snapshot(8)
    trainer = PeftTrainer(
        tiny_llama(), args, train_dataset=token_dataset(16), eval_dataset=token_dataset(4, seed=1),
        compute_metrics=lambda _: {"score": next(scores)}, callbacks=[snapshot],
    )  # fmt: skip
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*")) == kept
    assert not list(tmp_path.glob("tmp-*"))
    live = trainer.model.adapter_tensors("default")
    assert_same_tensors(live, adapter_file(tmp_path / "checkpoint-4"))
    assert any(not torch.equal(live[k], snapshot.tensors[k]) for k in live)  # not simply the last step's weights
