"""DoRA decoding on SmolLM2-135M: ours (weight norm cached for inference) vs our plain LoRA vs peft's DoRA.

    python bench/bench_dora.py [--steps 200] [--rank 16]

Token-interleaved decoding steps (``bench_space.interleaved_steps``): each case decodes the same tokens on its own
KV cache, in turn; ratios are medians of per-step ratios against the plain base model. The DoRA and LoRA adapters
share their A and B; DoRA's magnitudes are moved off their initial value, as training would. DoRA's training step
is measured by ``bench_step.py --variants ours,ours-dora,peft-dora``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_space import PROMPT, TARGETS, interleaved_steps  # noqa: E402
from peft_trainer import LoraConfig, get_peft_model  # noqa: E402
from peft_trainer.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    config = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False)
    dora = get_peft_model(load_model("smollm2-135m-instruct")[0], LoraConfig(use_dora=True, **config))
    with torch.no_grad():
        for name, p in dora.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a trained adapter's size
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.05 * torch.randn_like(p))
    dora.save_pretrained(folder / "dora")
    lora = get_peft_model(load_model("smollm2-135m-instruct")[0], LoraConfig(**config))
    tensors = {k: v for k, v in dora.adapter_tensors("default").items() if "magnitude" not in k}
    lora.load_adapter_tensors("default", tensors)  # the same A and B, without the magnitudes
    import peft

    theirs = peft.PeftModel.from_pretrained(load_model("smollm2-135m-instruct")[0], str(folder / "dora")).eval()
    plain, tokenizer = load_model("smollm2-135m-instruct")
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")  # fmt: skip
    none = contextlib.nullcontext
    steps = interleaved_steps(
        {
            "plain base model": (plain.eval(), none),
            "ours: LoRA (unmerged)": (lora.eval(), none),
            "ours: DoRA (unmerged)": (dora.eval(), none),
            "peft: DoRA (unmerged)": (theirs, none),
        },
        inputs["input_ids"],
        args.steps,
    )
    steps["ours DoRA / ours LoRA"] = (
        steps["ours: DoRA (unmerged)"]["vs_first"] / steps["ours: LoRA (unmerged)"]["vs_first"]
    )
    steps["ours DoRA / peft DoRA"] = (
        steps["ours: DoRA (unmerged)"]["vs_first"] / steps["peft: DoRA (unmerged)"]["vs_first"]
    )
    print(json.dumps({"model": "SmolLM2-135M-Instruct (float32, CPU)", "threads": args.threads, "rank": args.rank,
                      "steps": args.steps, "cases": steps}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
