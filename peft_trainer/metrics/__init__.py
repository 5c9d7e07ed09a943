"""Metric scripts that ``evaluate.load`` reads from local files (the Hub's metric scripts are not fetched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str = "accuracy") -> Any:
    """``evaluate.load`` on this folder's ``<name>.py``: works offline, kept in memory (no cache files)."""
    import evaluate

    path = METRICS_DIR / f"{name}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in METRICS_DIR.glob("*.py") if p.stem != "__init__"))
        raise ValueError(f"unknown metric {name!r}: local metric scripts are {known}")
    return evaluate.load(str(path), keep_in_memory=True)


__all__ = ["METRICS_DIR", "load_metric"]
