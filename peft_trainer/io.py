"""PEFT's adapter file format: reading and writing an adapter's config and safetensors, and its tensor key names."""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig
from .folders import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, resolve_file

PREFIX = "base_model.model."
# Largest adapter file read without complaint: guards against absurd declared shapes.
MAX_ADAPTER_BYTES = int(os.environ.get("PEFT_TRAINER_MAX_ADAPTER_BYTES", 8 * 1024**3))


def read_adapter(
    source: str | os.PathLike, config: LoraConfig | None = None, is_trainable: bool = False, **kwargs: Any
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter's config (``config`` if given, a copy either way; ``inference_mode`` = not ``is_trainable``) and
    its tensors, from a folder or Hub repo; ``subfolder``, ``allow_pickle`` and Hub options pass through. Reading
    never touches a model: attach the result with ``PeftModel.attach_adapter``."""
    config = copy.deepcopy(config or LoraConfig.from_pretrained(source, **kwargs))
    config.inference_mode = not is_trainable
    return config, load_weights(source, **kwargs)


def load_weights(path: str | os.PathLike, subfolder: str | None = None, allow_pickle: bool = False, **hub: Any):
    """Read the adapter tensors; a pickled ``adapter_model.bin`` is refused unless ``allow_pickle``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        file = resolve_file(path, WEIGHTS_NAME, subfolder, **hub)
    except FileNotFoundError:
        try:
            pickled = resolve_file(path, PICKLE_WEIGHTS_NAME, subfolder, **hub)
        except Exception:
            raise FileNotFoundError(f"No {WEIGHTS_NAME} found for adapter {path}") from None
        if not allow_pickle:
            raise ValueError(
                f"{pickled} is a pickle file, which can run code when loaded; it was not read. Convert it to "
                f"{WEIGHTS_NAME}, or pass allow_pickle=True to load it with torch.load(weights_only=True)"
            ) from None
        return _load_pickle(pickled)
    size = file.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise ValueError(f"{file} is {size} bytes, over the {MAX_ADAPTER_BYTES}-byte limit for adapter files")
    try:
        return load_file(file)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{file} is truncated or not a safetensors file ({e}); re-save or re-download it") from None


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, no code run; anything else is refused."""
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"unsupported (?:global: )?(?:GLOBAL|operand) \S+", str(e), re.IGNORECASE)
        detail = found.group(0) if found else type(e).__name__
        raise ValueError(
            f"{file} was refused by torch.load(weights_only=True): it is not a torch file or holds objects other "
            f"than tensors ({detail}); nothing in it was run"
        ) from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{file} does not hold a mapping of tensor names to tensors")
    return loaded


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; an adapter file is an ordinary file
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: LoraConfig) -> None:
    """Write ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) and ``adapter_config.json``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
    text = config.to_json_string()
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def normalize_key(key: str) -> str:
    """Drop an adapter-name segment some writers leave in keys (``lora_A.default.weight`` -> ``lora_A.weight``)."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.(weight|bias)$", r".\1.\2", key)
