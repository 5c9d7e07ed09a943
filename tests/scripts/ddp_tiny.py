"""Two-process DDP (gloo, CPU) training of the tiny Llama with reentrant activation checkpointing.

python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_tiny.py OUT [--find-unused]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from peft_trainer import PeftTrainer  # noqa: E402
from peft_trainer.distributed import end_process_group  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402
from tests.trainer_helpers import fast_args, token_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--find-unused", action="store_true", help="what the vanilla Trainer picks for a wrapper")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {"ddp_find_unused_parameters": True} if opts.find_unused else {}
    args = fast_args(
        opts.out, max_steps=3, per_device_train_batch_size=2, save_strategy="steps", save_steps=3,
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}, **overrides,
    )  # fmt: skip
    trainer = PeftTrainer(tiny_llama(), args, train_dataset=token_dataset(16))
    trainer.train()
    ddp = trainer.model_wrapped
    tensors = torch.cat([t.detach().flatten() for t in trainer.model.adapter_tensors("default").values()])
    gathered = [torch.empty_like(tensors) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensors)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    print(f"RANK {dist.get_rank()} ddp={type(ddp).__name__} find_unused={ddp.find_unused_parameters} same={same}")
    end_process_group()  # gloo's worker thread lets go of the all_gather's tensors before the interpreter exits


if __name__ == "__main__":
    main()
