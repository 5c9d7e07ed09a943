"""The CLI, with every rank killed (SIGKILL) right after checkpoint-STEP is complete: an interrupted run.

accelerate launch [--config_file ...] tests/scripts/killed_cli.py STEP train RECIPE.yaml [--field value ...]
"""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from peft_trainer import cli  # noqa: E402
from peft_trainer.trainer import PeftTrainer  # noqa: E402

STEP = int(sys.argv.pop(1))
_save_checkpoint = PeftTrainer._save_checkpoint


def save_then_die(self: PeftTrainer, model, trial) -> None:
    _save_checkpoint(self, model, trial)
    if self.state.global_step >= STEP:
        self.accelerator.wait_for_everyone()  # every rank is done with the checkpoint: none dies mid-write
        os.kill(os.getpid(), signal.SIGKILL)


PeftTrainer._save_checkpoint = save_then_die

if __name__ == "__main__":
    sys.exit(cli.main())
