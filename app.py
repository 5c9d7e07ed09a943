"""Hugging Face Space entry point: serve one base model with many LoRA adapters (settings: see peft_trainer_space/__init__.py)."""

from __future__ import annotations

import os

if os.environ.get("SPACES_ZERO_GPU"):
    import spaces  # noqa: F401  # ZeroGPU: imported before torch touches CUDA

from peft_trainer_space import launch

if __name__ == "__main__":
    launch()
