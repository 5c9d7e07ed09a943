"""Train the tiny Llama with PeftTrainer in its own process (resume tests): dropout, shuffled data, GA 2, checkpointing.

python tests/scripts/train_tiny.py OUT [--stop-after K] [--resume CHECKPOINT|last] [--max-steps N] [--save-steps S]
python tests/scripts/train_tiny.py --serve   (kill tests: imports once, then forks one fresh process per run)

``--serve`` reads commands on stdin and answers on stdout, one line each: ``run {"out": ..., "log": ..., "resume":
..., "max_steps": ..., "save_steps": ...}`` -> ``pid PID`` (a forked child trains with stdout/stderr in ``log`` and
writes ``OUT/start_step.json`` when training begins); ``wait PID`` -> ``exit PID CODE`` (negative: killed by signal).
``TRAIN_TINY_SLOW_SAVE=S`` (seconds, test-only) sleeps inside every checkpoint write, before the optimizer state and
before the RNG state are written, so that a kill can land mid-write; it does not change what is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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


class RecordStart(TrainerCallback):
    """Writes the step training (re)starts from to ``OUT/start_step.json``."""

    def on_train_begin(self, args, state, control, **kwargs):
        with open(os.path.join(args.output_dir, "start_step.json"), "w") as f:
            json.dump({"global_step": state.global_step}, f)


class SlowSaveTrainer(PeftTrainer):
    """PeftTrainer whose checkpoint writes pause (test hook only): the library code runs unchanged around it."""

    slow = float(os.environ.get("TRAIN_TINY_SLOW_SAVE", "0") or 0)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        time.sleep(self.slow)
        super()._save_optimizer_and_scheduler(output_dir)

    def _save_rng_state(self, output_dir: str) -> None:
        time.sleep(self.slow)
        super()._save_rng_state(output_dir)


def train(
    out: str,
    stop_after: int | None = None,
    resume: str | None = None,
    max_steps: int = 10,
    save_steps: int = 5,
    record_start: bool = False,
) -> None:
    args = fast_args(
        out, max_steps=max_steps, save_strategy="steps", save_steps=save_steps,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1,
        activation_checkpointing=True, learning_rate=2e-2,
    )  # fmt: skip
    callbacks = ([RecordStart()] if record_start else []) + ([StopAfter(stop_after)] if stop_after else [])
    cls = SlowSaveTrainer if SlowSaveTrainer.slow > 0 else PeftTrainer
    trainer = cls(tiny_llama(), args, train_dataset=token_dataset(24), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)


def _child(job: dict) -> None:
    """Runs in the forked process: never returns."""
    code = 1
    try:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        import logging

        import torch

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
        torch.set_num_threads(1)
        train(job["out"], None, job.get("resume"), job["max_steps"], job["save_steps"], record_start=True)
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """A zygote: the slow imports happen once here; every run is a fresh forked process that can be killed."""
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "run":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(json.loads(rest))
            print(f"pid {pid}", flush=True)
        elif command == "wait":
            pid = int(rest)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            print(f"exit {pid} {code}", flush=True)
        else:
            print(f"error unknown command {command!r}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=5)
    opts = parser.parse_args()
    if opts.serve:
        serve()
        return
    if opts.out is None:
        parser.error("OUT is required unless --serve")
    train(opts.out, opts.stop_after, opts.resume, opts.max_steps, opts.save_steps)


if __name__ == "__main__":
    main()
