"""Shared by the Space tests: tiny adapters on disk, an independent greedy oracle, and running app.py in a group."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from peft_trainer import LoraConfig, PeftModel, get_peft_model
from peft_trainer.models import load_model
from tests import processes

ROOT = Path(__file__).resolve().parent.parent
BASE = "tiny-llama"
PROMPT = "Tell me about the sea"
NEW_TOKENS = 12
TARGETS = ["q_proj", "v_proj", "down_proj"]
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SSR_MODE": "False",
    "GRADIO_SHARE": "False",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="module")
def space_cache(embedded_cache: Path) -> Path:
    """The session's embedded-model cache (tests/conftest.py), also handed to the app processes."""
    return embedded_cache


def save_adapter(folder: Path, seed: int, r: int = 4, base: torch.nn.Module | None = None) -> Path:
    """A random, non-trivial LoRA adapter (B != 0) for tiny-llama (or ``base``) saved in PEFT's format."""
    model = base if base is not None else load_model(BASE)[0]
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=4 * r, target_modules=TARGETS, init_lora_weights=False)
    )
    peft_model.save_pretrained(folder)
    return folder


def write_trainer_state(folder: Path, losses: list[float]) -> None:
    history = [{"step": 10 * (i + 1), "loss": loss, "learning_rate": 1e-4} for i, loss in enumerate(losses)]
    history.append({"step": 10 * len(losses), "eval_loss": 1.0})  # no "loss": not on the curve
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))


@pytest.fixture(scope="module")
def adapter_dir(space_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pirate/`` (trainer_state.json inside) and ``poet-run/poet/`` (trainer_state.json in the parent)."""
    root = tmp_path_factory.mktemp("space_adapters")
    save_adapter(root / "pirate", seed=1)
    write_trainer_state(root / "pirate", [2.5, 2.0, 1.6])
    save_adapter(root / "poet-run" / "poet", seed=2)
    write_trainer_state(root / "poet-run", [3.0, 2.2])
    return root


def adapter_paths(root: Path) -> dict[str, Path]:
    return {"pirate": root / "pirate", "poet": root / "poet-run" / "poet"}


def encode(tokenizer, prompt: str | list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """A prompt (one user turn) or a conversation, through the tokenizer's chat template, ready to answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")


def oracle_model(root: Path) -> tuple[PeftModel, object]:
    """Our PeftModel with both adapters, switched with the global ``set_adapter`` (no Space code involved)."""
    model, tokenizer = load_model(BASE)
    paths = adapter_paths(root)
    peft_model = PeftModel.from_pretrained(model, paths["pirate"], adapter_name="pirate")
    peft_model.load_adapter(paths["poet"], adapter_name="poet")
    return peft_model, tokenizer


def greedy(
    model: PeftModel,
    tokenizer,
    adapter: str,
    prompt: str | list[dict[str, str]] = PROMPT,
    new_tokens: int = NEW_TOKENS,
) -> str:
    """Greedy text of ``adapter`` ("__base__" = adapters disabled), decoded like the Space's streamer."""
    inputs = encode(tokenizer, prompt)
    with torch.no_grad():
        if adapter == "__base__":
            with model.disable_adapter():
                out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        else:
            model.set_adapter(adapter)
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def oracle(adapter_dir: Path) -> dict[str, str]:
    """Expected greedy outputs for PROMPT: base, each adapter and their equal-weight svd merge."""
    model, tokenizer = oracle_model(adapter_dir)
    expected = {name: greedy(model, tokenizer, name) for name in ("__base__", "pirate", "poet")}
    model.add_weighted_adapter(["pirate", "poet"], [0.5, 0.5], "both", combination_type="svd")
    expected["both"] = greedy(model, tokenizer, "both")
    assert len(set(expected.values())) == 4, (
        f"adapters must change the output for the tests to mean anything: {expected}"
    )
    return expected


def make_zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16) | 0
            zf.writestr(info, target)
    return path


def zip_adapter(folder: Path, path: Path, inner: str | None = None) -> Path:
    entries = {f"{inner}/{f.name}" if inner else f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    return make_zip(path, entries)


# ---- the app in its own process group -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(
    env: dict[str, str],
    log_path: Path,
    cwd: Path,
    unset: tuple[str, ...] = (),
    command: list[str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """``python app.py`` (or ``command``) on 127.0.0.1 in a new session; returns the process and the URL it printed."""
    full_env = {**os.environ, **OFFLINE_ENV, "GRADIO_SERVER_NAME": "127.0.0.1",
                "GRADIO_SERVER_PORT": str(free_port()), "GRADIO_TEMP_DIR": str(cwd / ".gradio_tmp"), **env}  # fmt: skip
    for name in unset:
        full_env.pop(name, None)
    log = open(log_path, "w")  # noqa: SIM115 - closed by stop_app
    proc = subprocess.Popen(
        command or [sys.executable, str(ROOT / "app.py")], cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    proc.log_file = log  # type: ignore[attr-defined]

    def url_or_exit() -> str | bool | None:
        match = re.search(r"Running on local URL:\s+(http://[^\s,]+)", log_path.read_text(errors="replace"))
        return match.group(1).rstrip("/") if match else proc.poll() is not None

    try:  # a cold start (model cache, first imports) is slow but keeps logging; only silence is a hang
        url = processes.wait_for(url_or_exit, lambda: processes.size_of(log_path), what="app.py to start", poll=0.2)
    except processes.Stalled:
        url = None
    if isinstance(url, str):
        return proc, url
    stop_app(proc)
    raise RuntimeError(f"app.py did not start:\n{log_path.read_text(errors='replace')[-4000:]}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_app(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the whole process group, SIGKILL what is left, and wait until the group is gone."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc.poll()
            if not _group_alive(pgid):
                break
            time.sleep(0.1)
        if not _group_alive(pgid):
            break
    proc.wait(timeout=timeout)
    proc.log_file.close()  # type: ignore[attr-defined]
    assert not _group_alive(pgid), f"processes of group {pgid} survived SIGKILL"


NETGUARD = """
import os, sys

def _netguard(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect":
        host = args[1][0] if isinstance(args[1], tuple) else args[1]
    else:
        return
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host not in ("127.0.0.1", "localhost", "::1", "None") and not host.startswith("/"):
        with open(os.environ["NETGUARD_LOG"], "a") as f:
            f.write(f"{event} {host}\\n")

sys.addaudithook(_netguard)
for _name in filter(None, os.environ.get("NETGUARD_HIDE", "").split(",")):
    sys.modules[_name] = None  # not installed, as far as imports and importlib.util.find_spec can tell
"""


def netguard(folder: Path, hide: tuple[str, ...] = ()) -> dict[str, str]:
    """Environment that makes a Python process log every DNS lookup or connect to a non-loopback host; the packages
    in ``hide`` look uninstalled to it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(NETGUARD)
    return {"PYTHONPATH": str(folder), "NETGUARD_LOG": str(folder / "attempts.log"), "NETGUARD_HIDE": ",".join(hide)}
