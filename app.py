"""Hugging Face Space entry point: serve one base model with many LoRA adapters (settings: see space/__init__.py)."""

from __future__ import annotations

from space import launch

if __name__ == "__main__":
    launch()
