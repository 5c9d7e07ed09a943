"""Adapter folders: file names, where each adapter of a folder lives ("default" at the root, others in subfolders),
and finding a folder's files locally or on the Hub."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
DEFAULT = "default"
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def validate_adapter_name(name: Any) -> str:
    """Adapter names become folder names and module keys: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == "__base__":
        raise ValueError(
            f"Invalid adapter name {name!r}: use a non-empty name of letters, digits, '_' or '-' "
            "(no path separators, dots or '..'; '__base__' is reserved for the bare base model)"
        )
    return name


def subfolder_of(name: str) -> str | None:
    """Where adapter ``name`` lives inside a folder of several: None (the root) for "default", else ``name``."""
    return None if name == DEFAULT else validate_adapter_name(name)


def adapter_dir(root: str | os.PathLike, name: str = DEFAULT) -> Path:
    """The folder holding adapter ``name``'s files inside ``root``."""
    sub = subfolder_of(name)
    return Path(root) / sub if sub else Path(root)


def missing_files(root: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """The adapter files of ``names`` that ``root`` lacks, relative to it (empty: every adapter is complete)."""
    needed = [(adapter_dir("", n) / f).as_posix() for n in names for f in ADAPTER_FILES]
    return [f for f in needed if not (Path(root) / f).is_file()]


def resolve_file(path: str | os.PathLike, filename: str, subfolder: str | None = None, **hub: Any) -> Path:
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
