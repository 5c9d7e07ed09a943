"""Kill -9 a training run at seeded random moments, mid-step and mid-checkpoint-write, then resume in a fresh process:
every checkpoint-N left behind is complete, the interrupted save is reported and never picked, and the resumed run
ends bit-identical (adapter, optimizer state, losses) to an uninterrupted run.

The runs are real processes forked from one helper process (``tests/scripts/train_tiny.py --serve``) that did the slow
imports once, so a dozen kill/resume trials fit in a couple of minutes on two cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import processes
from tests.trainer_helpers import adapter_file, assert_same_optimizer, assert_same_tensors

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"
MAX_STEPS, SAVE_STEPS, SLOW_SAVE = 8, 1, 0.15
TRIALS = 12
SEED = 20240
CHECKPOINT_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "optimizer_param_names.json",
    "rng_state.pth", "scheduler.pt", "trainer_state.json", "training_args.bin",
}  # fmt: skip
REPORT = "Ignoring incomplete checkpoint(s) when resuming"


class Runner:
    """Talks to the ``--serve`` helper: ``start`` forks a training process, ``wait`` reaps it."""

    def __init__(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", "TRAIN_TINY_SLOW_SAVE": str(SLOW_SAVE)}
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--serve"], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self._ask(None) == "ready"

    def _ask(self, line: str | None) -> str:
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, f"the training helper died (exit code {self.proc.poll()})"
        return answer

    def start(self, out: Path, resume: bool = False) -> int:
        out.mkdir(parents=True, exist_ok=True)
        job = {"out": str(out), "log": str(out) + ".log", "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS}
        return int(self._ask("run " + json.dumps({**job, "resume": "last" if resume else None})).split()[1])

    def wait(self, pid: int) -> int:
        return int(self._ask(f"wait {pid}").split()[2])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=processes.HANG_S)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


def _checkpoints(out: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in out.glob("checkpoint-*") if p.is_dir()}


def _staging(out: Path) -> list[Path]:
    return sorted(out.glob("tmp-checkpoint-*"))


def _wait_until(out: Path, condition) -> None:
    """Wait for ``condition`` while the run makes progress (new files in ``out``, a growing log)."""

    def progress() -> tuple:
        return processes.tree_of(out), processes.size_of(Path(str(out) + ".log"))

    processes.wait_for(condition, progress, what=f"the training run in {out}", poll=0.005)


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory) -> tuple[Path, float, float]:
    """One uninterrupted run: its folder, and when its first checkpoint and its last checkpoint appeared (s)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    start = time.monotonic()
    pid = runner.start(out)
    _wait_until(out, lambda: _checkpoints(out))
    first = time.monotonic() - start
    _wait_until(out, lambda: MAX_STEPS in _checkpoints(out))
    last = time.monotonic() - start
    assert runner.wait(pid) == 0, Path(str(out) + ".log").read_text()
    assert sorted(_checkpoints(out)) == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    return out / f"checkpoint-{MAX_STEPS}", first, last


def _optimizer(ckpt: Path) -> dict:
    return torch.load(ckpt / "optimizer.pt", weights_only=True)


def _losses(ckpt: Path) -> list[float]:
    history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in history if "loss" in e]


def _kill_at_random_moment(runner: Runner, out: Path, rng: random.Random, aim: str, first: float, last: float):
    """Start a run and kill -9 it: ``aim`` "write" waits for a staging folder and kills inside the (slowed) write,
    "step" kills just after a checkpoint was renamed into place, "any" after a random delay. Returns the exit code
    and the delay in seconds."""
    start = time.monotonic()
    pid = runner.start(out)
    span = last - first if aim == "any" else 0.6 * (last - first)  # aimed kills should land before the last save
    time.sleep(rng.uniform(first, first + span - 0.3))  # a random moment of the run
    _wait_until(out, lambda: _checkpoints(out))  # resuming needs one complete checkpoint
    if aim == "write":
        _wait_until(out, lambda: _staging(out) or MAX_STEPS in _checkpoints(out))
        time.sleep(rng.uniform(0, SLOW_SAVE))
    elif aim == "step":
        done = set(_checkpoints(out))
        _wait_until(out, lambda: set(_checkpoints(out)) - done or MAX_STEPS in done)
        time.sleep(rng.uniform(0, 0.02))
    delay = time.monotonic() - start
    os.kill(pid, signal.SIGKILL)
    return runner.wait(pid), delay


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(runner, reference, tmp_path):
    end, first, last = reference
    rng = random.Random(SEED)
    landed = {"write": 0, "step": 0, "end": 0, "finished": 0}
    for trial in range(TRIALS + 4):  # until TRIALS kills have landed; a run may end before its kill
        if landed["write"] + landed["step"] + landed["end"] == TRIALS:
            break
        aim = ("write", "step", "any")[trial % 3]
        out = tmp_path / f"trial{trial}"
        code, delay = _kill_at_random_moment(runner, out, rng, aim, first, last)
        where = f"trial {trial} (aim {aim}, killed after {delay:.2f}s)"
        if code == 0:  # the run ended before the kill: nothing to resume, nothing to count
            landed["finished"] += 1
            continue
        assert code == -signal.SIGKILL, where
        staging, checkpoints = _staging(out), _checkpoints(out)
        landed["write" if staging else "step" if max(checkpoints) < MAX_STEPS else "end"] += 1
        for step, ckpt in checkpoints.items():  # atomic: whatever is named checkpoint-N is complete
            assert {p.name for p in ckpt.iterdir()} == CHECKPOINT_FILES, f"{where}: checkpoint-{step}"
        newest = max(checkpoints)
        for folder in staging:
            inside = list(folder.iterdir())
            assert not inside or int(folder.name.split("-")[-1]) > newest, where

        (out / "start_step.json").unlink()
        pid = runner.start(out, resume=True)
        log = Path(str(out) + ".log")
        assert runner.wait(pid) == 0, f"{where}: resume failed\n{log.read_text()[-3000:]}"
        assert json.loads((out / "start_step.json").read_text())["global_step"] == newest, where
        if staging:
            assert REPORT in log.read_text(), where
            for folder in staging:
                assert f"{folder} (interrupted save)" in log.read_text(), where
        else:
            assert REPORT not in log.read_text(), where
        assert not _staging(out), where
        resumed = out / f"checkpoint-{MAX_STEPS}"
        assert_same_tensors(adapter_file(end), adapter_file(resumed))
        assert_same_optimizer(_optimizer(end), _optimizer(resumed))
        assert _losses(end) == _losses(resumed), where
    kills = landed["write"] + landed["step"] + landed["end"]
    print(
        f"\nkill -9 trials: {kills + landed['finished']} runs, {kills} killed ({landed['write']} during a checkpoint write, "
        f"{landed['step']} during steps, {landed['end']} after the last checkpoint), {landed['finished']} finished "
        "before the kill; every kill resumed bit-identical"
    )
    assert kills == TRIALS and landed["write"] >= 2 and landed["step"] >= 2, landed
