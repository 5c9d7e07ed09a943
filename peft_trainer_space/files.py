"""Adapter folders on disk: safe extraction of uploaded zips, export zips, and the training loss log."""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from peft_trainer.card import CARD_NAME
from peft_trainer.folders import ADAPTER_FILES as _FILES
from peft_trainer.folders import CONFIG_NAME, WEIGHTS_NAME

TRAINER_STATE = "trainer_state.json"
# The only files taken from an upload (anything else in the zip, e.g. a pickled training_args.bin, is left out).
ADAPTER_FILES = (*_FILES, CARD_NAME, TRAINER_STATE)  # what the Space reads of an adapter folder
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipLimits:
    """Caps checked before anything is extracted: the upload's size, the sum of declared sizes, the entry count."""

    max_zip_bytes: int = 200 * 2**20
    max_unzipped_bytes: int = 1 * 2**30
    max_entries: int = 64


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _check_entry(info: zipfile.ZipInfo) -> None:
    """Refuse entries that could land outside the target folder or are not plain files/folders."""
    name = info.filename
    parts = PurePosixPath(name).parts
    if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise ValueError(f"Unsafe zip: entry {name!r} points outside its folder (absolute path or '..')")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ValueError(f"Unsafe zip: entry {name!r} is a symbolic link; zip the adapter's files themselves")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no file type recorded (e.g. Windows)
        raise ValueError(f"Unsafe zip: entry {name!r} is not a regular file")
    if info.flag_bits & 0x1:
        raise ValueError(f"Zip entry {name!r} is encrypted; upload an unencrypted zip")


def _copy_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: list[int]) -> None:
    """Extract one entry, counting real bytes (declared sizes can lie) against the remaining ``budget[0]``."""
    with zf.open(info) as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise ValueError("The zip unpacks to more than its declared size allows; refused (zip bomb?)")
            dst.write(chunk)


def extract_adapter_zip(zip_path: str | os.PathLike, dest: Path, limits: ZipLimits) -> tuple[Path, str | None]:
    """Check every entry of ``zip_path``, then extract the one adapter folder it holds into ``dest/adapter``.

    The adapter folder is the one holding ``adapter_config.json`` (at the zip's root or in a subfolder); its
    parent's ``trainer_state.json`` goes to ``dest``, so the loss curve is found like for a local folder.
    Returns the extracted folder and the adapter folder's name inside the zip (None at the root).
    """
    size = os.path.getsize(zip_path)
    if size > limits.max_zip_bytes:
        raise ValueError(f"The upload is {_mb(size)}, over this Space's {_mb(limits.max_zip_bytes)} limit")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"The upload is not a readable zip file ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise ValueError(f"The zip has {len(infos)} entries; at most {limits.max_entries} are accepted")
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_unzipped_bytes:
            raise ValueError(
                f"The zip unpacks to {_mb(declared)}, over the {_mb(limits.max_unzipped_bytes)} limit (zip bomb?)"
            )
        for info in infos:
            _check_entry(info)
        configs = [PurePosixPath(i.filename) for i in infos if PurePosixPath(i.filename).name == CONFIG_NAME]
        if not configs:
            raise ValueError(
                f"No {CONFIG_NAME} in the zip: zip an adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME}) as saved by "
                "save_pretrained"
            )
        if len(configs) > 1:
            raise ValueError(f"The zip holds {len(configs)} adapters ({', '.join(map(str, configs))}); upload one")
        folder = configs[0].parent
        wanted = {folder / n: dest / "adapter" / n for n in ADAPTER_FILES}
        if folder != PurePosixPath("."):
            wanted.setdefault(folder.parent / TRAINER_STATE, dest / TRAINER_STATE)
        (dest / "adapter").mkdir(parents=True, exist_ok=True)
        budget = [limits.max_unzipped_bytes]
        try:
            for info in infos:
                target = wanted.get(PurePosixPath(info.filename))
                if target is not None and not info.is_dir():
                    _copy_bounded(zf, info, target, budget)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            raise ValueError(f"The zip is corrupt or uses an unsupported format ({e})") from None
    return dest / "adapter", (folder.name or None)


def zip_folder(folder: Path, zip_path: Path) -> Path:
    """Zip ``folder`` as ``<folder name>/...``; weights are stored (incompressible), the rest deflated."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            big = file.suffix in (".safetensors", ".bin")
            arcname = str(PurePosixPath(folder.name, *file.relative_to(folder).parts))
            zf.write(file, arcname, compress_type=zipfile.ZIP_STORED if big else zipfile.ZIP_DEFLATED)
    return zip_path


def trainer_state_file(folder: Path | None) -> Path | None:
    """The ``trainer_state.json`` of an adapter folder: in the folder itself, else in its parent."""
    if folder is None:
        return None
    for candidate in (folder / TRAINER_STATE, folder.parent / TRAINER_STATE):
        if candidate.is_file():
            return candidate
    return None


def loss_history(folder: Path | None) -> list[tuple[float, float]]:
    """``(step, loss)`` pairs from the ``log_history`` entries that carry a training ``loss``; [] when none."""
    file = trainer_state_file(folder)
    if file is None:
        return []
    try:
        history = json.loads(file.read_text(encoding="utf-8")).get("log_history") or []
    except (OSError, ValueError, AttributeError):
        return []
    points = []
    for i, entry in enumerate(history):
        if isinstance(entry, dict) and isinstance(entry.get("loss"), (int, float)):
            step = entry.get("step", i)
            points.append((float(step if isinstance(step, (int, float)) else i), float(entry["loss"])))
    return points
