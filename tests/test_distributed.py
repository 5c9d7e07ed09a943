"""`accelerate launch` of the CLI with 2 CPU processes (gloo): DDP and FSDP2 train the same adapter as one process
with the same global batch, rank 0 alone writes it (adapter files only), and peft loads it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import yaml

from peft_trainer import PeftModel, models
from peft_trainer.cli import CPU_FSDP_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = ROOT / "recipes" / "accelerate"
# One process with batch 8 vs 2 processes with batch 4: the same 8 rows every step (8 rows = one global batch, so the
# sampler order does not matter). SGD keeps the update linear in the gradient: only float summation order differs.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("dist")
    rows = [{"prompt": f"What is {a} plus {a + 1}?", "completion": json.dumps({"topic": "math", "answer": str(2 * a + 1)})}
            for a in range(8)]  # fmt: skip
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model_name_or_path": "tiny-llama", "dataset": "train.jsonl", "max_length": 64, "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "optim": "sgd", "learning_rate": 0.5, "per_device_train_batch_size": 4, "max_steps": 3,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 7,
    }  # fmt: skip
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cache = tmp_path_factory.getbasetemp() / "peft_trainer_cache"  # the session's embedded-model cache
    env = {**os.environ, models.CACHE_ENV: str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(CPU_FSDP_ENV, None)
    single = _run(
        [sys.executable, "-m", "peft_trainer.cli"], folder, "single", env, "--per_device_train_batch_size", "8"
    )
    return {"folder": folder, "env": env, "single": single}


def _run(launcher: list[str], folder: Path, name: str, env: dict, *extra: str) -> tuple[Path, str]:
    out = folder / name
    command = [*launcher, "train", str(folder / "recipe.yaml"), "--output_dir", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return out, log


def _launch(setup: dict, config: str, name: str, **env: str) -> tuple[Path, str]:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    launcher = [accelerate, "launch", "--config_file", str(ACCELERATE / config), "--num_processes", "2",
                "--main_process_port", str(_free_port()), "-m", "peft_trainer.cli"]  # fmt: skip
    return _run(launcher, setup["folder"], name, {**setup["env"], "ACCELERATE_USE_CPU": "true", **env})


def _check_against_single_process(setup: dict, out: Path, log: str) -> None:
    from safetensors.torch import load_file

    assert log.count("adapter written to") == 1 and "by rank 0" in log  # one writer: rank 0
    files = {p.name for p in out.iterdir()}
    assert ADAPTER_FILES <= files
    assert not [f for f in files if "fsdp" in f or f.startswith(("model", "pytorch_model", "optimizer"))], files
    single, _ = setup["single"]
    ours, reference = load_file(out / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert sorted(ours) == sorted(reference)
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
    out, log = _launch(setup, "fsdp2.yaml", "fsdp", **{CPU_FSDP_ENV: "1"})
    assert "distributed: FSDP, 2 process(es)" in log  # the CPU-testing relabel made accelerate shard the model
    _check_against_single_process(setup, out, log)
