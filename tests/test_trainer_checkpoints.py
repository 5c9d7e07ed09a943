"""Adapter-only checkpoints: content, rotation, atomic writes, exact resume in a fresh process, optimizer guard."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from peft_trainer import PeftTrainer
from tests import processes
from tests.conftest import tiny_llama
from tests.trainer_helpers import (
    adapter_file,
    assert_same_optimizer,
    assert_same_tensors,
    fast_args,
    files_under,
    token_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"
CHECKPOINT_FILES = [
    "README.md", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "optimizer_param_names.json",
    "rng_state.pth", "scheduler.pt", "trainer_state.json", "training_args.bin",
]  # fmt: skip


def _trainer(out, **overrides) -> PeftTrainer:
    args = fast_args(out, **{"save_strategy": "steps", "save_steps": 2, **overrides})
    return PeftTrainer(tiny_llama(), args, train_dataset=token_dataset(16))


def test_checkpoint_holds_adapter_and_training_state_only(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    assert files_under(ckpt) == CHECKPOINT_FILES
    tensors = adapter_file(ckpt)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    base_bytes = sum(p.numel() * p.element_size() for p in trainer.model.get_base_model().parameters())
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < base_bytes / 2
    names = json.loads((ckpt / "optimizer_param_names.json").read_text())["param_groups"]
    assert [n for g in names for n in g] == [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert not any(p.name.startswith("tmp-") for p in tmp_path.iterdir())


def test_save_total_limit_rotates(tmp_path):
    _trainer(tmp_path, max_steps=4, save_steps=1, save_total_limit=2).train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-3", "checkpoint-4"]


def test_interrupted_save_never_looks_complete_and_resume_skips_it(tmp_path, monkeypatch, caplog):
    trainer = _trainer(tmp_path, max_steps=4)
    real = PeftTrainer._save_rng_state

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError("disk full (simulated)")
        real(self, output_dir)

    monkeypatch.setattr(PeftTrainer, "_save_rng_state", crash_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint-4").exists()
    partial = tmp_path / "tmp-checkpoint-4" / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")  # Trainer's own lookup agrees

    bogus = tmp_path / "checkpoint-9"  # e.g. left by a non-atomic writer: no trainer state
    bogus.mkdir()
    (bogus / "adapter_config.json").write_text("{}")
    resumed = _trainer(tmp_path, max_steps=4)
    steps_run = []
    resumed.add_callback(
        type("Count", (TrainerCallback,), {"on_step_end": lambda s, a, st, c, **k: steps_run.append(st.global_step)})
    )
    with pytest.raises(ValueError, match="incomplete"):
        resumed.train(resume_from_checkpoint=str(bogus))
    with caplog.at_level(logging.WARNING, logger="peft_trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert "tmp-checkpoint-4" in caplog.text and "checkpoint-9 (missing trainer_state.json" in caplog.text
    assert resumed.state.global_step == 4
    assert steps_run == [3, 4]  # resumed from checkpoint-2
    assert files_under(tmp_path / "checkpoint-4") == CHECKPOINT_FILES


def _run(*argv: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    processes.run([sys.executable, str(SCRIPT), *argv], check=True, cwd=ROOT, env=env)


def _optimizer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "optimizer.pt", weights_only=True)


@pytest.mark.slow
def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    """10 steps straight == 5 steps, stop, resume for 5 in a new process (dropout, shuffle, GA 2, checkpointing)."""
    straight, split, no_rng = tmp_path / "straight", tmp_path / "split", tmp_path / "no_rng"
    _run(str(straight))
    _run(str(split), "--stop-after", "5")
    assert sorted(p.name for p in split.iterdir() if p.is_dir()) == ["checkpoint-5"]
    shutil.copytree(split / "checkpoint-5", no_rng / "checkpoint-5")
    _run(str(split), "--resume", "last")
    end, resumed = straight / "checkpoint-10", split / "checkpoint-10"
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    assert not torch.equal(adapter_file(straight / "checkpoint-5")[key], adapter_file(end)[key])  # it trained on
    assert_same_tensors(adapter_file(end), adapter_file(resumed))
    assert_same_optimizer(_optimizer_state(end), _optimizer_state(resumed))

    def losses(ckpt: Path) -> list:
        return [e["loss"] for e in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "loss" in e]

    assert losses(end) == losses(resumed)
    # Negative control: the same resume without the saved RNG state draws other dropout masks.
    (no_rng / "checkpoint-5" / "rng_state.pth").unlink()
    _run(str(no_rng), "--resume", "last")
    assert not torch.equal(adapter_file(end)[key], adapter_file(no_rng / "checkpoint-10")[key])


def test_optimizer_state_for_other_parameters_is_refused(tmp_path):
    _trainer(tmp_path, max_steps=2).train()
    names_file = tmp_path / "checkpoint-2" / "optimizer_param_names.json"
    groups = json.loads(names_file.read_text())["param_groups"]
    group = next(g for g in groups if len(g) > 2)
    group[0], group[2] = group[2], group[0]  # same shapes (q_proj vs k_proj lora_A), other parameters
    names_file.write_text(json.dumps({"param_groups": groups}))
    with pytest.raises(ValueError, match="optimizer state is for other parameters") as err:
        _trainer(tmp_path, max_steps=4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "q_proj.lora_A" in str(err.value) and "k_proj.lora_A" in str(err.value)


def test_checkpoint_of_another_adapter_layout_is_refused(tmp_path):
    """Adapter tensors are loaded strictly: a checkpoint for other target modules fails loudly, naming the keys."""
    _trainer(tmp_path, max_steps=2, lora_target_modules=["q_proj"]).train()
    other = _trainer(tmp_path, max_steps=4, lora_target_modules=["v_proj"])
    with pytest.raises(ValueError, match="does not fit this base model") as err:
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "v_proj" in str(err.value) and "q_proj" in str(err.value)
