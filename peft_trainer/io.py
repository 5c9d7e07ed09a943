"""PEFT's adapter file format: locating files (local or Hub), safetensors I/O, key names and the model card."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import CONFIG_NAME, PEFT_FORMAT_VERSION, LoraConfig

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# Largest adapter file read without complaint: guards against absurd declared shapes.
MAX_ADAPTER_BYTES = int(os.environ.get("PEFT_TRAINER_MAX_ADAPTER_BYTES", 8 * 1024**3))
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def validate_adapter_name(name: Any) -> str:
    """Adapter names become folder names and module keys: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == "__base__":
        raise ValueError(
            f"Invalid adapter name {name!r}: use a non-empty name of letters, digits, '_' or '-' "
            "(no path separators, dots or '..'; '__base__' is reserved for the bare base model)"
        )
    return name


def resolve_adapter_file(path: str | os.PathLike, filename: str, subfolder: str | None = None, **hub: Any) -> Path:
    """A local file inside ``path`` (a folder), or the file downloaded from the Hub repo ``path``."""
    if subfolder and (os.path.isabs(subfolder) or ".." in re.split(r"[\\/]", subfolder)):
        raise ValueError(f"subfolder={subfolder!r} must be a relative path inside {path} (no '..', not absolute)")
    local = Path(path)
    if local.is_dir():
        file = local / (subfolder or "") / filename
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist: {local} is not a saved adapter folder")
        return file
    if local.exists() or os.path.isabs(str(path)) or str(path).startswith("."):
        raise FileNotFoundError(f"{path} is not a folder with an adapter ({filename} expected inside)")
    from huggingface_hub import hf_hub_download

    kwargs = {k: v for k, v in hub.items() if k in ("revision", "token", "cache_dir", "local_files_only")}
    return Path(hf_hub_download(repo_id=str(path), filename=filename, subfolder=subfolder, **kwargs))


def load_weights(path: str | os.PathLike, subfolder: str | None = None, allow_pickle: bool = False, **hub: Any):
    """Read the adapter tensors; a pickled ``adapter_model.bin`` is refused unless ``allow_pickle``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        file = resolve_adapter_file(path, WEIGHTS_NAME, subfolder, **hub)
    except FileNotFoundError:
        try:
            pickled = resolve_adapter_file(path, PICKLE_WEIGHTS_NAME, subfolder, **hub)
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


def _atomic_write(path: Path, write) -> None:
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
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
    text = config.to_json_string()
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def normalize_key(key: str) -> str:
    """Drop an adapter-name segment some writers leave in keys (``lora_A.default.weight`` -> ``lora_A.weight``)."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.(weight|bias)$", r".\1.\2", key)


def split_front_matter(text: str) -> tuple[dict, str]:
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            meta = yaml.safe_load(text[4:end]) or {}
            return (meta if isinstance(meta, dict) else {}), text[end + 4 :].lstrip("\n")
    return {}, text


def write_model_card(directory: str | os.PathLike, meta: dict[str, Any], body: str) -> None:
    """Create or update README.md: front matter keys are merged (tags unioned), the body replaced if given."""
    path = Path(directory) / "README.md"
    old_meta, old_body = split_front_matter(path.read_text(encoding="utf-8")) if path.exists() else ({}, "")
    tags = sorted(set(old_meta.get("tags") or []) | set(meta.get("tags") or []))
    merged = {**old_meta, **{k: v for k, v in meta.items() if v is not None}, "tags": tags}
    text = "---\n" + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True) + "---\n\n" + (body or old_body)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def default_card(base_model: str | None, configs: dict[str, LoraConfig], extra: str = "") -> tuple[dict, str]:
    """Front matter and body for an adapter folder's README.md."""
    tags = ["lora", "peft-trainer", "transformers"] + ([f"base_model:adapter:{base_model}"] if base_model else [])
    meta: dict[str, Any] = {"base_model": base_model, "library_name": "peft", "tags": tags}
    if any(c.task_type == "CAUSAL_LM" for c in configs.values()):
        meta["pipeline_tag"] = "text-generation"
    lines = [
        "# LoRA adapter",
        "",
        f"LoRA adapter(s) for `{base_model or 'a base model'}`, trained with peft-trainer.",
        "",
    ]
    for name, c in configs.items():
        targets = c.target_modules if isinstance(c.target_modules, str) else ", ".join(c.target_modules or [])
        lines.append(f"- `{name}`: r={c.r}, lora_alpha={c.lora_alpha}, dropout={c.lora_dropout}, targets: {targets}")
    lines += ["", extra, "", "### Framework versions", "", f"- PEFT {PEFT_FORMAT_VERSION} (file format)", ""]
    return meta, "\n".join(lines)
