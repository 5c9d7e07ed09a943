"""The adapter Space: settings from the environment and ``launch()`` (used by app.py and ``peft-trainer space``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from peft_trainer.folders import CONFIG_NAME
from peft_trainer.models import EMBEDDED_MODELS

from .engine import AdapterEngine, Limits
from .files import ZipLimits
from .training import AdapterTraining, TrainLimits
from .zerogpu import on_zero_gpu

log = logging.getLogger("peft_trainer_space")

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
QUICKSTART_ADAPTERS = f"outputs/quickstart/*/{CONFIG_NAME}"
# Opt-in: let visitors push with the Space's own HF_TOKEN (on a public Space: anyone). Off, they sign in or type one.
PUSH_WITH_SPACE_TOKEN = "PUSH_WITH_SPACE_TOKEN"


def on_spaces() -> bool:
    """Running on Hugging Face Spaces (which sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID", "").strip())


def default_base_model() -> str:
    """The embedded SmolLM2 locally; on Spaces its Hub id (the embedded copy's pip package cannot be installed there
    without its llama.cpp dependencies)."""
    return EMBEDDED_MODELS[DEFAULT_BASE_MODEL].hub_id if on_spaces() else DEFAULT_BASE_MODEL


def quickstart_adapters(root: str | os.PathLike = ".") -> list[tuple[str | None, str]]:
    """Every folder matching ``outputs/quickstart/*/adapter_config.json`` under ``root``, named by its folder."""
    return [(p.parent.name, str(p.parent)) for p in sorted(Path(root).glob(QUICKSTART_ADAPTERS))]


def parse_adapters(value: str | list[str] | None) -> list[tuple[str | None, str]]:
    """``ADAPTERS``: comma-separated folders or Hub repo ids, each optionally ``name=source``; None = quickstart."""
    if value is None:
        return quickstart_adapters()
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[tuple[str | None, str]] = []
    for item in (i.strip() for i in items):
        if item:
            name, sep, source = item.partition("=")
            out.append((name.strip(), source.strip()) if sep else (None, item))
    return out


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def limits_from_env() -> Limits:
    """MAX_NEW_TOKENS (cap per request), MAX_ADAPTERS, MAX_UPLOAD_MB (zip uploads), MAX_MERGED_MB (merged model)."""
    upload = _int_env("MAX_UPLOAD_MB", 200) * 2**20
    return Limits(
        max_new_tokens=_int_env("MAX_NEW_TOKENS", 512),
        max_adapters=_int_env("MAX_ADAPTERS", 32),
        zip=ZipLimits(max_zip_bytes=upload, max_unzipped_bytes=max(2 * upload, 64 * 2**20)),
        max_merged_model_bytes=_int_env("MAX_MERGED_MB", 2048) * 2**20,
    )


def train_limits_from_env() -> TrainLimits:
    """MAX_TRAIN_ROWS, MAX_TRAIN_STEPS, MAX_TRAIN_RANK, MAX_TRAIN_MINUTES: the Train tab's bounds."""
    return TrainLimits(
        max_rows=_int_env("MAX_TRAIN_ROWS", 1000), max_steps=_int_env("MAX_TRAIN_STEPS", 200),
        max_rank=_int_env("MAX_TRAIN_RANK", 64), max_seconds=60.0 * _int_env("MAX_TRAIN_MINUTES", 15),
    )  # fmt: skip


def create_engine(base_model: str | None = None, adapters: str | list[str] | None = None) -> AdapterEngine:
    """BASE_MODEL (default: ``default_base_model()``), ADAPTERS, HF_TOKEN (private downloads; pushes only with
    PUSH_WITH_SPACE_TOKEN=1), BATCHING (default on, off on ZeroGPU), unless given here."""
    base = base_model or os.environ.get("BASE_MODEL") or default_base_model()
    specs = parse_adapters(adapters if adapters is not None else os.environ.get("ADAPTERS"))
    if not specs and on_spaces():
        log.warning("no adapters: set the Space variable ADAPTERS=name=owner/repo,... (`peft-trainer push FOLDER... "
                    "--namespace YOU` prints it), or add them in the app")  # fmt: skip
    push_with_space_token = os.environ.get(PUSH_WITH_SPACE_TOKEN, "").strip() == "1"
    batching = os.environ.get("BATCHING", "0" if on_zero_gpu() else "1").strip() != "0"
    if on_zero_gpu() and batching:
        log.warning("BATCHING=1 on ZeroGPU: the shared decoding thread runs outside any @spaces.GPU call")
    elif on_zero_gpu():
        log.info("ZeroGPU: batching is off; each request generates inside its own @spaces.GPU call")
    return AdapterEngine.load(
        base, specs, limits_from_env(), token=os.environ.get("HF_TOKEN") or None,
        push_with_space_token=push_with_space_token, batching=batching,
    )  # fmt: skip


def launch(
    base_model: str | None = None, adapters: str | list[str] | None = None, host: str | None = None,
    port: int | None = None,
) -> None:  # fmt: skip
    """Start the Space and block. Host and port default to GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, as on Spaces;
    no share link; Gradio's analytics and the Hub's telemetry are off unless the environment turns them on."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = create_engine(base_model, adapters)
    from .ui import build_demo  # gradio is imported only now, after the switches above

    # Batching serves a request per batch row at once; threads running their own generate() contend beyond a few.
    concurrency = _int_env("CONCURRENCY", 32 if engine.batcher is not None else 8)
    demo = build_demo(engine, concurrency, AdapterTraining(engine, train_limits_from_env()))
    try:  # quiet: no "set share=True" hint (no share link is wanted); the URL line is printed here instead
        demo.launch(server_name=host, server_port=port, share=False, max_file_size=engine.limits.zip.max_zip_bytes,
                    quiet=True, prevent_thread_lock=True)  # fmt: skip
        print(f"* Running on local URL:  {demo.local_url.rstrip('/')}", flush=True)
        demo.block_thread()
    finally:
        engine.close()


__all__ = [
    "AdapterEngine", "Limits", "create_engine", "default_base_model", "launch", "on_spaces", "parse_adapters",
    "quickstart_adapters", "train_limits_from_env",
]  # fmt: skip
