"""Reading records: local JSONL/JSON/CSV/TSV/Parquet files, data folders or Hub ids, and which format they hold."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import _kind, check_messages, describe, is_missing, source_of

if TYPE_CHECKING:
    import datasets

FORMATS = ("messages", "prompt_completion", "text", "classification")
CAUSAL_FORMATS = ("messages", "prompt_completion", "text")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
}
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: file is empty (no rows)")
    data: Any = None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON Lines with a .json name: parsed below
        if isinstance(data, dict):
            columns = {k: v for k, v in data.items() if isinstance(v, list)}
            if len(data) == 1 and columns:  # {"data": [{...}, ...]}
                data = next(iter(columns.values()))
            elif columns and len(columns) == len(data) and len({len(v) for v in columns.values()}) == 1:
                data = [dict(zip(columns, values)) for values in zip(*columns.values())]  # columnar
            else:
                raise ValueError(f"{path}: expected a list of row objects (or JSON Lines), got one object")
    if data is None:
        data = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of row objects, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: file is empty (no rows)")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i}: expected an object with columns, got {describe(row)}")
    return data


def _rows_to_dataset(rows: list[dict[str, Any]], source: str) -> datasets.Dataset:
    """Columns from the union of keys (missing -> None); checks each column holds one kind of value."""
    import datasets
    import pyarrow as pa

    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for key, values in columns.items():
        values.extend(row.get(key) for row in rows)
        if key == "messages":  # checked in depth here: Arrow's own error would not name the row
            for i, value in enumerate(values, start=1):
                problem = None if is_missing(value) else check_messages(value)
                if problem:
                    raise ValueError(f"{source}: row {i}, column 'messages': {problem}")
            continue
        first: tuple[int, str] | None = None
        for i, value in enumerate(values, start=1):
            kind = _kind(value)
            if kind is None:
                continue
            if first is None:
                first = (i, kind)
            elif kind != first[1]:
                raise ValueError(
                    f"{source}: row {i}, column {key!r}: expected a {first[1]} like row {first[0]}, got {describe(value)}"
                )
    info = datasets.DatasetInfo(dataset_name=source)
    try:
        return datasets.Dataset.from_dict(columns, info=info)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as err:
        for key, values in columns.items():
            try:
                pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as column_err:
                raise ValueError(f"{source}: column {key!r}: values do not share one type ({column_err})") from None
        raise ValueError(f"{source}: cannot build a dataset ({err})") from None


def load_records(path_or_id: str | os.PathLike[str], split: str = "train", **kwargs: Any) -> datasets.Dataset:
    """Load rows from a local ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file, a data folder or a Hub id.

    Local files hold one split (``split`` is ignored for them); folders and Hub ids go through
    ``datasets.load_dataset(path_or_id, split=split, **kwargs)``. JSON rows may differ in their keys (missing
    values become ``None``); a column whose values differ in type, invalid JSON or an empty file raise
    ``ValueError`` naming the file, row and column. The dataset's ``info.dataset_name`` is set to the path, which
    :func:`tokenize_dataset` uses in its error messages.
    """
    import datasets

    name = os.fspath(path_or_id)
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        source = str(path)
        if suffix in (".jsonl", ".json"):
            return _rows_to_dataset(_read_json_rows(path), source)
        if suffix in (".csv", ".tsv"):
            import pandas as pd

            try:
                frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
            except pd.errors.EmptyDataError:
                raise ValueError(f"{path}: file is empty (no rows)") from None
            except pd.errors.ParserError as err:
                raise ValueError(f"{path}: cannot parse ({err})") from None
            if frame.empty:
                raise ValueError(f"{path}: file is empty (no rows)")
            records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
            return _rows_to_dataset([{str(k): v for k, v in row.items()} for row in records], source)
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            from datasets.table import InMemoryTable

            table = pq.read_table(path)
            if table.num_rows == 0:
                raise ValueError(f"{path}: file is empty (no rows)")
            return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(dataset_name=source))
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(DATA_EXTENSIONS)}")
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split, **kwargs)
    if suffix in DATA_EXTENSIONS or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name}: no such data file or folder")
    return datasets.load_dataset(name, split=split, **kwargs)


def detect_format(dataset: datasets.Dataset, source: str | None = None) -> str:
    """Which of ``FORMATS`` the columns describe.

    ``messages`` -> "messages"; ``prompt`` + ``completion`` -> "prompt_completion"; ``text`` + ``label`` ->
    "classification"; ``text`` -> "text". Raises ``ValueError`` naming the missing column otherwise.
    """
    source = source or source_of(dataset)
    columns = set(dataset.column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"text", "label"} <= columns:
        return "classification"
    if "text" in columns:
        return "text"
    found = ", ".join(repr(c) for c in dataset.column_names) or "none"
    for have, need in (("prompt", "completion"), ("completion", "prompt"), ("label", "text")):
        if have in columns:
            raise ValueError(f"{source}: missing column {need!r} (found columns {found}) to go with {have!r}")
    raise ValueError(
        f"{source}: missing column: expected 'messages', 'prompt' + 'completion', 'text' + 'label' or 'text' "
        f"(found columns {found})"
    )
