"""TRL's SFTTrainer and DPOTrainer with peft_trainer's LoRA (``peft_trainer.trl``): the same two-step runs as with
peft give the same losses and write the same files; DPO's reference is the adapter disabled; no peft needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts.trl_tiny import run
from tests.space_helpers import netguard

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "scripts" / "trl_tiny.py")


def _same_runs(ours: dict, theirs: dict) -> None:
    assert ours["losses"] == theirs["losses"] and len(ours["losses"]) == 2
    assert ours["files"] == theirs["files"]
    assert all("model.safetensors" not in files and "adapter_model.safetensors" in files
               for files in ours["files"].values())  # fmt: skip


def test_sft_trains_like_trl_with_peft(tmp_path: Path) -> None:
    _same_runs(
        run("sft", "peft_trainer", "config", str(tmp_path / "ours")),
        run("sft", "peft", "config", str(tmp_path / "peft")),
    )


@pytest.mark.parametrize("mode", ["config", "wrapped"])
def test_dpo_trains_like_trl_with_peft(tmp_path: Path, mode: str) -> None:
    ours = run("dpo", "peft_trainer", mode, str(tmp_path / "ours"))
    _same_runs(ours, run("dpo", "peft", mode, str(tmp_path / "peft")))
    assert not ours["ref_model"]  # no second copy of the base model
    # A new adapter's reference is the model with adapters off; a trained one's is a frozen copy of it, "ref".
    assert ours["adapters"] == (["default"] if mode == "config" else ["default", "ref"])


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_without_peft_installed(tmp_path: Path, kind: str) -> None:
    """As in the main command's venv: peft is not installed, and TRL takes peft_trainer's LoraConfig and model."""
    env = {**os.environ, **netguard(tmp_path / "guard", hide=("peft",))}
    out = subprocess.run([sys.executable, SCRIPT, kind, "peft_trainer", "config", str(tmp_path / "ours")],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    _same_runs(json.loads(out.stdout.splitlines()[-1]), run(kind, "peft", "config", str(tmp_path / "peft")))
