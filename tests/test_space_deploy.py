"""The Space as pushed to Hugging Face Spaces: requirements.txt alone installs what app.py needs, the base and the
adapters come from the Hub (a local Hub-API server holding the embedded SmolLM2), and ZeroGPU gets its GPU calls."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from gradio_client import Client
from huggingface_hub import HfApi

from peft_trainer import PeftModel
from peft_trainer.models import EMBEDDED_MODELS, load_model, resolve_model
from peft_trainer_space import create_engine, default_base_model
from peft_trainer_space.engine import Sampling
from tests import processes, space_helpers
from tests.hub_server import client_environment, start_hub_server
from tests.space_helpers import NEW_TOKENS, PROMPT, ROOT, greedy, save_adapter

SMOLLM2 = "smollm2-135m-instruct"
HUB_ID = EMBEDDED_MODELS[SMOLLM2].hub_id


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_txt_is_the_package_dependencies_plus_the_space_extra() -> None:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in [*project["dependencies"], *project["optional-dependencies"]["space"]]}
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = {_name(ln): ln for ln in lines if ln and not ln.startswith("#")}
    assert listed.keys() == wanted.keys()
    for name, requirement in listed.items():  # the same version bounds; extras (gradio[oauth]) may be added
        assert re.sub(r"\[.*?\]", "", requirement) == wanted[name], name


def test_on_spaces_the_base_is_the_embedded_models_hub_id(monkeypatch) -> None:
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert default_base_model() == SMOLLM2
    monkeypatch.setenv("SPACE_ID", "someone/adapters")
    assert default_base_model() == HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_zero_gpu_runs_gpu_work_in_spaces_gpu_calls_and_decodes_without_the_batch_thread(
    monkeypatch, embedded_cache
) -> None:
    """``spaces`` here is a recorder standing in for the package ZeroGPU hardware preinstalls (its real GPU calls
    need that hardware): what is checked is which handlers go through ``spaces.GPU`` and that requests still run."""
    wrapped: list[str] = []
    recorder = types.ModuleType("spaces")
    recorder.GPU = lambda fn: wrapped.append(fn.__name__) or fn
    monkeypatch.setitem(sys.modules, "spaces", recorder)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.delenv("BATCHING", raising=False)
    engine = create_engine("tiny-llama", "")
    try:
        assert engine.batcher is None
        from peft_trainer_space.ui import build_demo

        build_demo(engine)
        assert sorted(wrapped) == [
            "chat",
            "compare",
            "compare_chat",
            "export_merged",
            "generate",
            "merge",
            "retry_last",
        ]
        assert list(engine.stream("__base__", PROMPT, Sampling(4)))  # decodes in its own generate()
    finally:
        engine.close()
    monkeypatch.delenv("SPACES_ZERO_GPU")
    engine = create_engine("tiny-llama", "")
    try:
        assert engine.batcher is not None  # elsewhere nothing changes
    finally:
        engine.close()


@pytest.mark.slow
def test_fresh_venv_from_requirements_txt_serves_a_hub_adapter_as_spaces_runs_app_py(
    tmp_path: Path, embedded_cache: Path
) -> None:
    venv = tmp_path / "venv"
    processes.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off"]
    processes.run([*pip, "torch==2.13.0"], check=True)  # the CPU build (see README); Spaces' GPUs take the default
    processes.run([*pip, "-r", str(ROOT / "requirements.txt")], check=True)

    base, tokenizer = load_model(SMOLLM2)
    adapter = save_adapter(tmp_path / "pirate", seed=1, base=base)
    oracle = PeftModel.from_pretrained(load_model(SMOLLM2)[0], adapter, adapter_name="pirate")
    expected = {name: greedy(oracle, tokenizer, name) for name in ("__base__", "pirate")}
    assert expected["pirate"] != expected["__base__"]

    with start_hub_server(tmp_path / "hub") as hub, client_environment(hub, tmp_path / "hf_home"):
        hub.add_token("hf_smollm2_owner", HUB_ID.split("/")[0])
        owner = HfApi(endpoint=hub.url, token="hf_smollm2_owner")
        owner.create_repo(HUB_ID)
        owner.upload_folder(repo_id=HUB_ID, folder_path=resolve_model(SMOLLM2))  # the local copy stands in
        HfApi(endpoint=hub.url).create_repo("pirate")
        HfApi(endpoint=hub.url).upload_folder(repo_id=f"{hub.user}/pirate", folder_path=str(adapter))

        guard = space_helpers.netguard(tmp_path / "guard")  # peft is not in this venv: nothing to hide
        env = {
            "SPACE_ID": f"{hub.user}/adapters",
            "SYSTEM": "spaces",
            "ADAPTERS": f"pirate={hub.user}/pirate",
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "space_home"),
            **guard,
        }
        unset = ("BASE_MODEL", "HF_HUB_OFFLINE", "HF_TOKEN", "GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY",
                 "GRADIO_SHARE", "PEFT_TRAINER_CACHE", "HF_HUB_CACHE")  # fmt: skip
        command = [str(venv / "bin" / "python"), str(ROOT / "app.py")]
        proc, url = space_helpers.start_app(env, tmp_path / "app.log", tmp_path, unset=unset, command=command)
        try:
            client = Client(url, analytics_enabled=False, verbose=False)
            for name, text in expected.items():
                answer = client.predict(name, PROMPT, NEW_TOKENS, False, 0.7, 0.95, 50, True, api_name="/generate")
                assert answer == text, name
        finally:
            space_helpers.stop_app(proc)
    log = (tmp_path / "app.log").read_text(errors="replace")
    assert f"loading base model {HUB_ID}" in log, log[-3000:]
    attempts = tmp_path / "guard" / "attempts.log"
    assert not attempts.exists(), attempts.read_text()  # the Hub it used was the one at HF_ENDPOINT
