"""DDP on CPU (2 processes, gloo): PeftTrainer needs no find_unused_parameters, even with reentrant checkpointing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import processes
from tests.space_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_tiny.py"


def _launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    port = str(free_port())  # not the default 29500, which another run's processes may still hold
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, str(SCRIPT),
           str(out), *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return processes.run(cmd, cwd=ROOT, env=env)


@pytest.mark.slow
def test_ddp_with_reentrant_checkpointing_trains_with_the_default(tmp_path):
    done = _launch(tmp_path / "ok")
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"RANK {rank} ddp=DistributedDataParallel find_unused=False same=True" in done.stdout
    ckpt = tmp_path / "ok" / "checkpoint-3"
    assert {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    assert not list((tmp_path / "ok").glob("tmp-*"))


@pytest.mark.slow
def test_find_unused_parameters_true_breaks_reentrant_checkpointing(tmp_path):
    """Negative control: what the vanilla Trainer would pick for a non-PreTrainedModel wrapper."""
    failed = _launch(tmp_path / "bad", "--find-unused")
    assert failed.returncode != 0
    assert "Expected to mark a variable ready only once" in failed.stderr
