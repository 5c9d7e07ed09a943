"""LoRA training step (forward + backward + AdamW): ours vs peft vs the frozen-base limit vs full fine-tuning.

    python bench/bench_step.py [--quick]

Each (model, shape, dropout, variant) runs in its own process; medians of the timed steps and the peak RSS of
the training phase are printed as a table with ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import interleave, serve, smollm2, tiny_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(case: dict):
    model = smollm2() if case["model"] == "smollm2" else tiny_llama()
    model.config.use_cache = False
    variant = case["variant"]
    kwargs = dict(r=16, lora_alpha=32, lora_dropout=case["dropout"], target_modules=TARGETS)
    if variant in ("ours", "ours-logits"):
        from peft_trainer import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**kwargs))
        model.chunked_loss = variant == "ours"  # PeftTrainer's default; "ours-logits" keeps the model's own loss
    elif variant == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    elif variant == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
    return model


def worker(case: dict) -> None:
    state = {}

    def setup() -> None:
        torch.manual_seed(0)
        torch.set_num_threads(2)
        model = build(case)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW: the Trainer's default optimizer ("adamw_torch_fused"), for every variant alike
        state.update(model=model, opt=torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None)
        state["batch"] = torch.randint(0, model.config.vocab_size, (case["batch"], case["seq"]))

    def step() -> None:
        model, opt, batch = state["model"], state["opt"], state["batch"]
        model(input_ids=batch, labels=batch).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    serve(setup, step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--variants", default="ours,peft,frozen,full")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--shapes", help='e.g. "4x128:0.05,1x512:0" (SmolLM2; default: all four)')
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    shapes = [("tiny", 4, 128, 0.05)] if args.quick else [
        ("smollm2", 4, 128, 0.05), ("smollm2", 4, 128, 0.0), ("smollm2", 1, 512, 0.05), ("smollm2", 1, 512, 0.0),
    ]  # fmt: skip
    if args.shapes:
        shapes = []
        for item in args.shapes.split(","):
            size, dropout = item.split(":")
            batch, seq = size.split("x")
            shapes.append(("smollm2", int(batch), int(seq), float(dropout)))
    variants = args.variants.split(",")
    head = ["model", "batch x seq", "dropout"] + [f"{v} step s" for v in variants] + ["ours/peft", "ours/frozen"]
    head += [f"{v} RSS MiB" for v in variants] + ["ours/peft RSS", "ours/frozen RSS"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    for model, b, s, p in shapes:
        cases = {v: dict(model=model, batch=b, seq=s, dropout=p, variant=v) for v in variants}
        res = interleave(__file__, cases, warmup=2, steps=args.steps)
        step = {v: res[v]["median_s"] for v in variants}
        mem = {v: res[v]["peak_rss_mib"] for v in variants}

        def ratio(d: dict, a: str, b: str) -> str:
            return f"{d[a] / d[b]:.2f}" if a in d and b in d else "-"

        row = [model, f"{b}x{s}", str(p)] + [f"{step[v]:.3f}" for v in variants]
        row += [ratio(step, "ours", "peft"), ratio(step, "ours", "frozen")] + [f"{mem[v]:.0f}" for v in variants]
        row += [ratio(mem, "ours", "peft"), ratio(mem, "ours", "frozen")]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
