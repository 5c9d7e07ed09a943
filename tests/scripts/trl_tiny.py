"""Two steps of TRL's SFTTrainer or DPOTrainer on the tiny Llama, with peft or with peft_trainer (the same script).

python tests/scripts/trl_tiny.py {sft,dpo} {peft,peft_trainer} {config,wrapped} OUT   prints the result as JSON

``config`` passes ``peft_config=LoraConfig(...)`` to the trainer; ``wrapped`` passes a model from get_peft_model
whose adapter is already trained (non-zero B), as when a trained adapter is fine-tuned further.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch
from datasets import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.conftest import tiny_llama  # noqa: E402
from tests.trainer_helpers import tiny_tokenizer  # noqa: E402

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def _rows(kind: str) -> Dataset:
    if kind == "sft":
        return Dataset.from_list([{"prompt": f"w{2 + i} w{3 + i} w{4 + i}", "completion": f" w{10 + i} w{11 + i}"}
                                  for i in range(8)])  # fmt: skip
    return Dataset.from_list([{"prompt": f"w{2 + i} w{3 + i} w{4 + i}", "chosen": f" w{10 + i} w{11 + i}",
                               "rejected": f" w{40 + i}"} for i in range(8)])  # fmt: skip


def run(kind: str, library: str, mode: str, out: str) -> dict:
    """Train two steps; return the logged losses, the adapters, the DPO reference and each saved folder's files."""
    lib = importlib.import_module(library)
    trl = importlib.import_module("peft_trainer.trl" if library == "peft_trainer" else "trl")
    config_cls, trainer_cls = (trl.SFTConfig, trl.SFTTrainer) if kind == "sft" else (trl.DPOConfig, trl.DPOTrainer)
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "w99"
    args = config_cls(output_dir=out, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                      save_steps=1, report_to=[], seed=0, use_cpu=True, bf16=False)  # fmt: skip
    lora = lib.LoraConfig(**LORA, init_lora_weights=mode == "config")
    model, extra = tiny_llama(), {"peft_config": lora}
    if mode == "wrapped":
        torch.manual_seed(1)  # a trained adapter: B random, not zero
        model, extra = lib.get_peft_model(model, lora), {}
    trainer = trainer_cls(model=model, args=args, train_dataset=_rows(kind), processing_class=tokenizer, **extra)
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "adapters": sorted(trainer.model.peft_config),
        "ref_model": getattr(trainer, "ref_model", None) is not None,
        "files": {d: sorted(os.listdir(os.path.join(out, d))) for d in ("checkpoint-1", "checkpoint-2", "final")},
    }


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:5])))
