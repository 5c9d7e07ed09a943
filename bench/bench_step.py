"""LoRA training step (forward + backward + AdamW): ours vs peft vs the frozen-base limit vs full fine-tuning.

    python bench/bench_step.py [--quick] [--model smollm2|tiny|llama1b] [--device cpu|cuda] [--bf16]
                               [--variants ours,peft,frozen,full]   (ours-dora, peft-dora: the same with DoRA;
                                                                      a "-compiled" suffix: under torch.compile)

Each (model, shape, dropout, variant) runs in its own process; medians of the timed steps and the peak memory of
the training phase (RSS; on CUDA, allocated GPU memory) are printed as a table with ratios. ``--bf16`` runs the
forward under bfloat16 autocast, as the Trainer's ``bf16=True`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import base_model, interleave, serve  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(case: dict):
    model = base_model(case["model"], case["device"])
    model.config.use_cache = False
    variant = case["variant"].removesuffix("-compiled")
    variant, dora = variant.removesuffix("-dora"), variant.endswith("-dora")
    kwargs = dict(r=16, lora_alpha=32, lora_dropout=case["dropout"], target_modules=TARGETS, use_dora=dora)
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
    if case["variant"].endswith("-compiled"):  # as the Trainer's torch_compile=True: the model, not the optimizer
        model = torch.compile(model)
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
        shape = (case["batch"], case["seq"])
        state["batch"] = torch.randint(0, model.config.vocab_size, shape, device=case["device"])

    def step() -> None:
        model, opt, batch = state["model"], state["opt"], state["batch"]
        with torch.autocast(torch.device(case["device"]).type, dtype=torch.bfloat16, enabled=case["bf16"]):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    serve(setup, step, case["device"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--variants", default="ours,peft,frozen,full")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--shapes", default="4x128:0.05,4x128:0,1x512:0.05,1x512:0", help="batch x seq : dropout")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "llama1b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as the Trainer's bf16=True")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    model = "tiny" if args.quick else args.model
    shapes = []
    for item in ("4x128:0.05" if args.quick else args.shapes).split(","):
        size, dropout = item.split(":")
        batch, seq = size.split("x")
        shapes.append((int(batch), int(seq), float(dropout)))
    variants = args.variants.split(",")
    memory = "GPU MiB" if args.device.startswith("cuda") else "RSS MiB"
    pairs = [("ours", "peft"), ("ours", "frozen"), ("ours-dora", "peft-dora"), ("ours-dora", "ours")]
    pairs += [("ours-compiled", "ours"), ("ours-compiled", "peft-compiled"), ("peft-compiled", "peft")]
    pairs = [(a, b) for a, b in pairs if a in variants and b in variants]
    head = ["model", "batch x seq", "dropout"] + [f"{v} step s" for v in variants] + [f"{a}/{b}" for a, b in pairs]
    head += [f"{v} {memory}" for v in variants] + [f"{a}/{b} memory" for a, b in pairs]
    print(f"{model} on {args.device}{', bf16 autocast' if args.bf16 else ''}")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    for b, s, p in shapes:
        case = dict(model=model, batch=b, seq=s, dropout=p, device=args.device, bf16=args.bf16)
        res = interleave(__file__, {v: dict(case, variant=v) for v in variants}, warmup=2, steps=args.steps)
        step = {v: res[v]["median_s"] for v in variants}
        mem = {v: res[v].get("peak_gpu_mib", res[v]["peak_rss_mib"]) for v in variants}

        row = [model, f"{b}x{s}", str(p)] + [f"{step[v]:.3f}" for v in variants]
        row += [f"{step[x] / step[y]:.2f}" for x, y in pairs] + [f"{mem[v]:.0f}" for v in variants]
        row += [f"{mem[x] / mem[y]:.2f}" for x, y in pairs]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
