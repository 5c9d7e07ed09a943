"""Embedded base models: name resolution, tiny models from configs, the atomic cache and the SmolLM2 GGUF conversion."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch

from peft_trainer import models
from peft_trainer.models import EMBEDDED_MODELS, MARKER_NAME, load_model, load_tokenizer, resolve_model

pytestmark = pytest.mark.usefixtures("embedded_cache")


def test_embedded_names() -> None:
    assert set(EMBEDDED_MODELS) == {
        "smollm2-135m-instruct",
        "minilm-l6",
        "tiny-llama",
        "tiny-mixtral",
        "tiny-gpt2",
        "tiny-bert",
    }
    for spec in EMBEDDED_MODELS.values():
        assert set(spec.tasks) <= set(models.TASKS)
        assert spec.locate().exists()  # the pip packages are installed and hold the files


@pytest.mark.parametrize(
    ("name", "task", "model_type"),
    [
        ("tiny-llama", "causal-lm", "llama"),
        ("tiny-gpt2", "causal-lm", "gpt2"),
        ("tiny-mixtral", "causal-lm", "mixtral"),
        ("tiny-bert", "seq-cls", "bert"),
        ("tiny-llama", "seq-cls", "llama"),
    ],
)
def test_tiny_models_forward(name: str, task: str, model_type: str) -> None:
    model, tokenizer = load_model(name, task=task, num_labels=3 if task == "seq-cls" else None)
    assert model.config.model_type == model_type
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["hello world, how are you?", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    expected = (2, batch["input_ids"].shape[1], len(tokenizer)) if task == "causal-lm" else (2, 3)
    assert tuple(logits.shape) == expected
    assert torch.isfinite(logits).all()


def test_tiny_causal_lm_has_chat_template_and_loss() -> None:
    model, tokenizer = load_model("tiny-llama")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == tokenizer.eos_token
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], return_tensors="pt", return_dict=True)
    out = model(**ids, labels=ids["input_ids"])
    assert torch.isfinite(out.loss)


def test_minilm_classifier() -> None:
    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=2)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert resolve_model("minilm-l6") == str(models._minilm_dir())  # loads from the pip package, no copy
    batch = tokenizer(["a fine day", "rain"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 2)
    with pytest.raises(ValueError, match="supports task seq-cls"):
        load_model("minilm-l6", task="causal-lm")


def test_torch_dtype() -> None:
    model, _ = load_model("tiny-llama", torch_dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown torch_dtype"):
        load_model("tiny-llama", torch_dtype="float13")
    with pytest.raises(ValueError, match="task="):
        load_model("tiny-llama", task="seq2seq")


def test_resolve_passes_paths_and_hub_ids(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("TINY-LLAMA") == resolve_model("tiny-llama")  # embedded names ignore case


@pytest.mark.parametrize(("name", "why"), [("smollm2", "not an embedded"), ("./no/such/model", "no such file")])
def test_unknown_names_list_embedded(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        resolve_model(name)
    for embedded in EMBEDDED_MODELS:
        assert embedded in str(info.value)


def test_cached_folder_is_reused(embedded_cache: Path) -> None:
    folder = Path(resolve_model("tiny-bert"))
    assert folder == embedded_cache / "models" / "tiny-bert"
    assert (folder / MARKER_NAME).is_file() and (folder / "model.safetensors").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model("tiny-bert")) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt


def test_cache_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    root = tmp_path / "models"
    # Leftovers of an interrupted build: a temp folder and a final-looking folder without the completion marker.
    stale = root / ".tmp-tiny-bert-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    (root / "tiny-bert").mkdir()
    (root / "tiny-bert" / "config.json").write_text("{}")

    folder = Path(resolve_model("tiny-bert"))
    assert folder == root / "tiny-bert"
    assert json.loads((folder / MARKER_NAME).read_text())["name"] == "tiny-bert"
    assert not stale.exists()
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == ["tiny-bert"]
    model, _ = load_model("tiny-bert", task="seq-cls")
    assert model.config.hidden_size == 64

    # A build that fails half way leaves neither a final folder nor a temp folder behind.
    def broken(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    spec = dataclasses.replace(EMBEDDED_MODELS["tiny-gpt2"], build=broken)
    monkeypatch.setitem(EMBEDDED_MODELS, "tiny-gpt2", spec)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("tiny-gpt2")
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == ["tiny-bert"]


@pytest.mark.slow
def test_smollm2_conversion_and_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One-time GGUF -> safetensors conversion (~35 s on 2 cores), then a reload from the cache (< 2 s) that
    generates; the cache is not rewritten."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m-instruct")
    convert_s = time.perf_counter() - start
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert {"model.safetensors", "config.json", "tokenizer.json", MARKER_NAME} <= set(os.listdir(folder))
    assert not any(p.name.startswith(".tmp-") for p in folder.parent.iterdir())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m-instruct")
    reload_s = time.perf_counter() - start
    print(f"\nsmollm2 conversion {convert_s:.1f} s, cached reload {reload_s:.2f} s")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written  # read from the cache, not rebuilt

    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert load_tokenizer("smollm2-135m-instruct").chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


BUILD_ON_RANK_1 = """
import sys
import torch.distributed as dist
from peft_trainer import models

dist.init_process_group("gloo")
if dist.get_rank() == 1:  # the rank that happens to take the build lock under `accelerate launch`
    models.resolve_model("tiny-gpt2")
dist.barrier()
if dist.get_rank() == 0:
    model, _ = models.load_model("tiny-gpt2")
    print("loaded", model.config.model_type, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_cache_built_by_rank_1_of_a_process_group_holds_the_model(tmp_path: Path) -> None:
    """transformers' save_pretrained writes weights only on rank 0 of an initialized group; the cache must not care."""
    import sys

    from tests import processes
    from tests.space_helpers import free_port

    script = tmp_path / "build.py"
    script.write_text(BUILD_ON_RANK_1)
    env = {**os.environ, models.CACHE_ENV: str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(script)]  # fmt: skip
    done = processes.run(command, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded gpt2" in done.stdout
    assert (tmp_path / "cache" / "models" / "tiny-gpt2" / "model.safetensors").is_file()
