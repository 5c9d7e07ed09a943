"""Train the tiny Llama with PeftTrainer in its own process (resume tests): dropout, shuffled data, GA 2, checkpointing.

python tests/scripts/train_tiny.py OUT [--stop-after K] [--resume CHECKPOINT|last] [--max-steps N] [--save-steps S]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import TrainerCallback  # noqa: E402

from peft_trainer import PeftTrainer  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402
from tests.trainer_helpers import fast_args, token_dataset  # noqa: E402


class StopAfter(TrainerCallback):
    """Simulates an interruption right after the checkpoint of step ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=5)
    opts = parser.parse_args()
    args = fast_args(
        opts.out, max_steps=opts.max_steps, save_strategy="steps", save_steps=opts.save_steps,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1,
        activation_checkpointing=True, learning_rate=2e-2,
    )  # fmt: skip
    callbacks = [StopAfter(opts.stop_after)] if opts.stop_after else None
    trainer = PeftTrainer(tiny_llama(), args, train_dataset=token_dataset(24), callbacks=callbacks)
    resume = True if opts.resume == "last" else opts.resume
    trainer.train(resume_from_checkpoint=resume)


if __name__ == "__main__":
    main()
