"""`accelerate launch` of the CLI with 2 CPU processes (gloo): DDP, FSDP2 (QLoRA included) and DeepSpeed ZeRO-2/3
train the same adapter as one process with the same global batch, rank 0 alone writes it (adapter files only, no
empty tensors), and peft loads it. Runs killed right after a checkpoint (DDP, FSDP2, ZeRO-3) resume bit-identically to
uninterrupted ones; the checkpoint holds the whole adapter (not one rank's shard) and no base weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file

from peft_trainer import PeftModel, models
from peft_trainer.distributed import CPU_FSDP_ENV
from peft_trainer.recipe import RECIPES_DIR
from tests import processes
from tests.space_helpers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = RECIPES_DIR / "accelerate"
# One process with batch 8 vs 2 processes with batch 4: the same 8 rows every step (8 rows = one global batch, so the
# sampler order does not matter). SGD keeps the update linear in the gradient: only float summation order differs.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
ROWS = [{"prompt": f"What is {a} plus {a + 1}?", "completion": json.dumps({"topic": "math", "answer": str(2 * a + 1)})}
        for a in range(8)]  # fmt: skip
RECIPE = {
    "model_name_or_path": "tiny-llama", "dataset": "train.jsonl", "max_length": 64, "lora_r": 4, "lora_alpha": 8,
    "lora_dropout": 0.0, "optim": "sgd", "learning_rate": 0.5, "per_device_train_batch_size": 4, "max_steps": 3,
    "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 7,
}  # fmt: skip


def write_recipe(folder: Path) -> None:
    """``train.jsonl`` (the 8 rows) and ``recipe.yaml`` in ``folder``: what every run here trains on."""
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("dist")
    write_recipe(folder)
    cache = tmp_path_factory.getbasetemp() / "peft_trainer_cache"  # the session's embedded-model cache
    env = {**os.environ, models.CACHE_ENV: str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name in (CPU_FSDP_ENV, "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    single = _run(
        [sys.executable, "-m", "peft_trainer.cli"], folder, "single", env, "--per_device_train_batch_size", "8"
    )
    return {"folder": folder, "env": env, "single": single}


def _run(launcher: list[str], folder: Path, name: str, env: dict, *extra: str) -> tuple[Path, str]:
    out = folder / name
    command = [*launcher, "train", str(folder / "recipe.yaml"), "--output_dir", str(out), *extra]
    result = processes.run(command, env=env, cwd=ROOT)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return out, log


def launcher(config: str, *target: str) -> list[str]:
    """``accelerate launch`` of ``target`` (default: the CLI module) on 2 processes with a recipe's accelerate config."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    return [accelerate, "launch", "--config_file", str(ACCELERATE / config), "--num_processes", "2",
            "--main_process_port", str(free_port()), *(target or ("-m", "peft_trainer.cli"))]  # fmt: skip


def cpu_env(config: str) -> dict[str, str]:
    """What CPU processes need per config: DDP and FSDP run as accelerate's multi-CPU (FSDP relabelled, see
    peft_trainer.distributed); DeepSpeed picks its CPU backend itself, and ACCELERATE_USE_CPU would switch it off."""
    if config.startswith("deepspeed"):
        return {}
    return {"ACCELERATE_USE_CPU": "true", **({CPU_FSDP_ENV: "1"} if config.startswith("fsdp") else {})}


def _launch(setup: dict, config: str, name: str, *extra: str) -> tuple[Path, str]:
    return _run(launcher(config), setup["folder"], name, {**setup["env"], **cpu_env(config)}, *extra)


def _trainable_line(log: str) -> str:
    return next(line.partition("trainable params:")[2] for line in log.splitlines() if "trainable params:" in line)


def _check_against_single_process(setup: dict, out: Path, log: str, reference: str = "single") -> None:
    assert log.count("adapter written to") == 1 and "by rank 0" in log  # one writer: rank 0
    files = {p.name for p in out.iterdir()}
    assert ADAPTER_FILES <= files
    assert not [f for f in files if "fsdp" in f or f.startswith(("model", "pytorch_model", "optimizer"))], files
    single, single_log = setup[reference]
    assert _trainable_line(log) == _trainable_line(single_log)  # ZeRO-3 shards hold 0 elements: counted right
    ours, reference = load_file(out / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert sorted(ours) == sorted(reference) and all(t.numel() > 0 for t in ours.values())
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], **TOLERANCE, msg=key)
    assert any(key.endswith("lora_B.weight") and reference[key].abs().max() > 0 for key in reference)  # it trained

    base, tokenizer = models.load_model("tiny-llama")
    theirs = peft.PeftModel.from_pretrained(base, str(out))
    mine = PeftModel.from_pretrained(models.load_model("tiny-llama")[0], str(single))
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, mine(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_ddp_two_cpu_processes_match_one_process(setup: dict, monkeypatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV, setup["env"][models.CACHE_ENV])
    out, log = _launch(setup, "ddp.yaml", "ddp")
    assert "distributed: MULTI_CPU, 2 process(es)" in log
    _check_against_single_process(setup, out, log)


def test_fsdp2_two_cpu_processes_match_one_process(setup: dict, monkeypatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV, setup["env"][models.CACHE_ENV])
    out, log = _launch(setup, "fsdp2.yaml", "fsdp")
    assert "distributed: FSDP, 2 process(es)" in log  # the CPU-testing relabel made accelerate shard the model
    _check_against_single_process(setup, out, log)


def test_qlora_fsdp2_shards_the_4bit_base_and_matches_one_process(setup: dict, monkeypatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV, setup["env"][models.CACHE_ENV])
    qlora = ("--load_in_4bit", "true", "--bnb_4bit_quant_storage", "float32")
    setup["single-qlora"] = _run(
        [sys.executable, "-m", "peft_trainer.cli"], setup["folder"], "single-qlora", setup["env"], *qlora,
        "--per_device_train_batch_size", "8",
    )  # fmt: skip
    out, log = _launch(setup, "fsdp2.yaml", "fsdp-qlora", *qlora)
    assert "distributed: FSDP, 2 process(es), base in 4 bit" in log
    assert "Excluding from FSDP2 sharding" not in log  # accelerate keeps uint8-stored 4-bit weights whole
    _check_against_single_process(setup, out, log, reference="single-qlora")


@pytest.mark.parametrize("config", ["deepspeed-zero2.yaml", "deepspeed-zero3.yaml"])
def test_deepspeed_two_cpu_processes_match_one_process(setup: dict, monkeypatch, config: str) -> None:
    pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install -e '.[deepspeed]'")
    monkeypatch.setenv(models.CACHE_ENV, setup["env"][models.CACHE_ENV])
    out, log = _launch(setup, config, config.removesuffix(".yaml"))
    assert "distributed: DEEPSPEED, 2 process(es)" in log  # not 1: see peft_trainer.distributed
    _check_against_single_process(setup, out, log)


# 6 steps of 2 rows per rank (two epochs of the 8 rows, shuffled), AdamW state, dropout: all of it must resume.
TRAINING = ["--save_strategy", "steps", "--save_steps", "3", "--max_steps", "6", "--per_device_train_batch_size", "2",
            "--optim", "adamw_torch", "--learning_rate", "0.01", "--lora_dropout", "0.1"]  # fmt: skip
KILLED_CLI = str(ROOT / "tests" / "scripts" / "killed_cli.py")  # dies right after checkpoint-3
BASE_BYTES = 6_373_696 * 4  # the tiny Llama in float32: a checkpoint holding it would be this large


def _train(setup: dict, config: str, out, *target: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*launcher(config, *target), "train", str(setup["folder"] / "recipe.yaml"), "--output_dir", str(out),
               *TRAINING, *extra]  # fmt: skip
    env = {**setup["env"], **cpu_env(config)}
    return processes.run(command, env=env, cwd=ROOT)


def _losses(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("{'loss'")]


@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp2.yaml", "deepspeed-zero3.yaml"])
def test_killed_run_resumes_bit_identically(setup: dict, tmp_path, config: str) -> None:
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install -e '.[deepspeed]'")
    full = _train(setup, config, tmp_path / "full")
    assert full.returncode == 0, (full.stdout + full.stderr)[-4000:]
    killed = _train(setup, config, tmp_path / "run", KILLED_CLI, "3")
    assert killed.returncode != 0 and "SIGKILL" in killed.stdout + killed.stderr
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-3"]  # died before anything else

    saved, reference = (
        load_file(checkpoint / "adapter_model.safetensors"),
        load_file(tmp_path / "full" / "checkpoint-3" / "adapter_model.safetensors"),
    )
    final = load_file(tmp_path / "full" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(final)  # every layer's A and B, each whole: not one rank's shard
    assert all(saved[k].shape == final[k].shape and saved[k].abs().sum() > 0 for k in saved)
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    assert sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) < BASE_BYTES / 4  # no base weights

    resumed = _train(setup, config, tmp_path / "run", extra=("--resume_from_checkpoint", str(checkpoint)))
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert _losses(log) == _losses(full.stdout + full.stderr)[3:]  # steps 4-6, same losses and gradient norms
    ours = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(final)
    for key in final:
        assert torch.equal(ours[key], final[key]), key
