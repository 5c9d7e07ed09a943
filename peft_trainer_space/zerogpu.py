"""ZeroGPU (Spaces' shared GPUs, ``SPACES_ZERO_GPU`` set): GPU work runs inside ``@spaces.GPU`` calls.

On ZeroGPU a process holds a GPU only while a function decorated with ``spaces.GPU`` runs, so the shared decoding
thread of ``batcher.py`` would never get one: there, batching is off and each request generates inside its own GPU
call. Everywhere else (locally, CPU and dedicated-GPU Spaces) ``gpu_task`` returns the function unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def on_zero_gpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "true", "yes")


def gpu_task(fn: F) -> F:
    """``spaces.GPU(fn)`` on ZeroGPU (generator functions stream as usual), else ``fn`` itself."""
    if not on_zero_gpu():
        return fn
    import spaces  # preinstalled on ZeroGPU hardware

    return spaces.GPU(fn)
