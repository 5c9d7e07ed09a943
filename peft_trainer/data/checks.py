"""Row checks: each names what is wrong with a value, so errors can say "<file>: row <n>, column <c>: <problem>"."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets


def describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _kind(value: Any) -> str | None:
    if is_missing(value):
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def check_messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of {{role, content}} dicts, got {describe(value)}"
    for j, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return f"message {j}: expected a {{role, content}} dict, got {describe(message)}"
        for key in ("role", "content"):
            if is_missing(message.get(key)):
                return f"message {j}: key {key!r} is missing"
            if not isinstance(message[key], str):
                return f"message {j}: {key!r} must be a string, got {describe(message[key])}"
    return None


def check_string(value: Any) -> str | None:
    if is_missing(value):
        return "missing value"
    if not isinstance(value, str):
        return f"expected a string, got {describe(value)}"
    return None


def source_of(dataset: datasets.Dataset) -> str:
    return getattr(dataset.info, "dataset_name", None) or "dataset"


def row_error(source: str, row: int, column: str, problem: str) -> ValueError:
    return ValueError(f"{source}: row {row}, column {column!r}: {problem}")


def class_names(dataset: datasets.Dataset, given: Sequence[str] | None, source: str) -> list[str] | None:
    if given is not None:
        return list(given)
    feature = dataset.features.get("label")
    if getattr(feature, "names", None):
        return list(feature.names)
    values = dataset["label"]
    names = sorted({v for v in values if isinstance(v, str)})
    if names:
        for i, value in enumerate(values, start=1):
            if not isinstance(value, str) and not is_missing(value):
                raise row_error(
                    source, i, "label", f"mixes a number with class names {names[:5]}: got {describe(value)}"
                )
    return names or None


def class_id(value: Any, names: list[str] | None) -> int | str:
    """The class id of ``value``, or a problem description (str) when it is none."""
    if is_missing(value):
        return "missing value"
    if isinstance(value, str):
        if names and value in names:
            return names.index(value)
        known = f"known class names: {', '.join(names)}" if names else "labels are class ids (ints)"
        return f"unknown class name {value!r} ({known})"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an int class id or a class name, got {describe(value)}"
    if value < 0 or (names is not None and value >= len(names)):
        return f"class id {value} out of range" + (f" for {len(names)} classes" if names else "")
    return value
