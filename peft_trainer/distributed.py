"""accelerate on CPU-only machines: the two fixes that let DeepSpeed and FSDP run on CPU processes (gloo).

Both are installed by ``install()`` when ``peft_trainer.arguments`` is imported, before any ``TrainingArguments``
sets up its devices. Neither changes anything on a machine with GPUs.

- DeepSpeed (always on): with no accelerator, accelerate's ``PartialState`` lets DeepSpeed start its process group
  (gloo) but then, finding no backend name of its own, records 1 process; every rank then believes it is alone and
  DeepSpeed fails at once ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
  The fix reads the process group's real size, rank and backend into the state. A plain ``transformers.Trainer``
  script is fixed by it too, once ``peft_trainer.arguments`` (or ``PeftTrainer``) is imported.
  With a DeepSpeed config, leave ``ACCELERATE_USE_CPU`` unset: with it, accelerate ignores DeepSpeed (warned here).
- FSDP (opt-in, ``PEFT_TRAINER_CPU_FSDP=1``, for tests): accelerate enables FSDP only on accelerators, so with
  ``ACCELERATE_USE_CPU=true`` an FSDP config silently trains as plain data parallel. With the variable set, a
  multi-CPU state that was given an FSDP plugin is relabelled FSDP. Use FSDP v2 configs with
  ``fsdp_sync_module_states: false`` (syncing needs an accelerator).
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

CPU_FSDP_ENV = "PEFT_TRAINER_CPU_FSDP"
_MARK = "_peft_trainer_cpu_fixes"


def repair_cpu_deepspeed_state(state: Any) -> None:
    """Give a DeepSpeed ``PartialState`` without a backend the size and rank of its live process group."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    if state.distributed_type != DistributedType.DEEPSPEED or state.backend is not None or not dist.is_initialized():
        return
    state.backend = dist.get_backend()
    state.num_processes = dist.get_world_size()
    state.process_index = dist.get_rank()
    state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))


def install() -> None:
    """Wrap ``PartialState.__init__`` and ``AcceleratorState.__init__`` once with the fixes above (idempotent)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(PartialState.__init__, _MARK, False):
        return
    partial_init, accelerator_init = PartialState.__init__, AcceleratorState.__init__

    def partial_state_init(self: Any, *args: Any, **kwargs: Any) -> None:
        fresh = not PartialState._shared_state
        partial_init(self, *args, **kwargs)
        repair_cpu_deepspeed_state(self)
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        if fresh and deepspeed and self.distributed_type == DistributedType.MULTI_CPU:
            logger.warning(
                "The DeepSpeed config is not used: with ACCELERATE_USE_CPU=true accelerate runs plain multi-CPU data "
                "parallel. DeepSpeed runs on CPU-only machines without ACCELERATE_USE_CPU (it picks its CPU backend)."
            )

    def accelerator_state_init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        accelerator_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        relabel = os.environ.get(CPU_FSDP_ENV, "").strip() == "1"
        if relabel and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    for wrapper in (partial_state_init, accelerator_state_init):
        setattr(wrapper, _MARK, True)
    PartialState.__init__ = partial_state_init  # type: ignore[method-assign]
    AcceleratorState.__init__ = accelerator_state_init  # type: ignore[method-assign]
    if PartialState._shared_state:  # a state set up before this import
        repair_cpu_deepspeed_state(PartialState())


def end_process_group() -> None:
    """Leave a multi-process run cleanly (the CLI's last step): wait until every rank is past its last collective,
    then destroy the process group while the interpreter is still whole.

    Without it, gloo's worker thread may release the last collective's work object (and with it Python tensors,
    which needs the GIL) only after the main thread has begun interpreter finalization; the thread is then ended
    inside that destructor and the process aborts with "terminate called without an active exception".
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
