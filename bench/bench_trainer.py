"""PeftTrainer vs peft + transformers.Trainer: same model, data and settings; median step time and peak RSS.

    python bench/bench_trainer.py [--quick] [--steps 6] [--warmup 2] [--configs "tiny 4x128 QLoRA,..."]

Configurations: SmolLM2-135M-Instruct LoRA (batch 4 x seq 128, batch 1 x seq 512; r=16, alpha=32, dropout 0.05,
all linear layers), SmolLM2 QLoRA (4-bit NF4, double quantization) and a tiny Llama with LoRA and with QLoRA, on
CPU; on a GPU (``--configs "llama1b 4x512 LoRA,llama1b 4x512 QLoRA"``) a Llama-3.2-1B-shaped model with random
weights in bfloat16, trained with ``bf16=True``. Each (configuration, trainer) pair runs in its own process; their
steps are run in turn (interleaved) so both see the same background load. A TrainerCallback times on_step_begin ->
on_step_end (forward, backward, optimizer step; data loading excluded); peak memory is RSS sampled (psutil, every
5 ms) while training, with ru_maxrss for the whole process, or on CUDA the peak of allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PeakRSS, base_model, interleave  # noqa: E402

CONFIGS = {
    "smollm2 4x128": dict(model="smollm2", batch=4, seq=128, quant=False),
    "smollm2 1x512": dict(model="smollm2", batch=1, seq=512, quant=False),
    "smollm2 4x128 QLoRA": dict(model="smollm2", batch=4, seq=128, quant=True),
    "tiny 4x128 LoRA": dict(model="tiny", batch=4, seq=128, quant=False),
    "tiny 4x128 QLoRA": dict(model="tiny", batch=4, seq=128, quant=True),
    "llama1b 4x512 LoRA": dict(model="llama1b", batch=4, seq=512, quant=False, device="cuda"),
    "llama1b 4x512 QLoRA": dict(model="llama1b", batch=4, seq=512, quant=True, device="cuda"),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


def _base(case: dict):
    """The base model; for QLoRA it is saved to a folder and reloaded in 4 bit (``str`` path for ours)."""
    model = base_model(case["model"], case.get("device", "cpu"))
    weights = "random weights" if getattr(model.config, "_name_or_path", "") == "" else "real weights"
    if not case["quant"]:
        return model, weights
    path = Path(tempfile.mkdtemp()) / case["model"]
    model.save_pretrained(path)
    return str(path), weights


def _bnb(dtype: str):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )  # fmt: skip


def build_trainer(case: dict, callback):
    import torch
    from datasets import Dataset

    torch.manual_seed(0)
    n = case["total_steps"] * case["batch"]
    ids = torch.randint(0, 4096, (n, case["seq"])).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * case["seq"]] * n, "labels": ids})
    cuda = case.get("device") == "cuda"
    compute = "bfloat16" if cuda else "float32"
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=case["batch"], max_steps=case["total_steps"],
        learning_rate=1e-4, logging_strategy="no", save_strategy="no", report_to="none", use_cpu=not cuda,
        bf16=cuda, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    base, weights = _base(case)
    if case["variant"] == "ours":
        from peft_trainer import PeftTrainer, PeftTrainingArguments

        args = PeftTrainingArguments(
            **common, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
            lora_target_modules=LORA["target_modules"], load_in_4bit=case["quant"], bnb_4bit_compute_dtype=compute,
        )  # fmt: skip
        trainer = PeftTrainer(base, args, train_dataset=data, callbacks=[callback])
    else:
        import peft
        from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

        if case["quant"]:
            placement = {"device_map": {"": 0}} if cuda else {}
            base = AutoModelForCausalLM.from_pretrained(base, quantization_config=_bnb(compute), **placement)
            base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        model = peft.get_peft_model(base, peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
        trainer = Trainer(model, TrainingArguments(**common), train_dataset=data, callbacks=[callback])
    return trainer, weights


def worker(case: dict) -> None:
    """Answer the bench.common.Worker protocol: "ready" (build), one "step" per optimizer step, "finish"."""
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # the Trainer prints its metrics; keep the protocol channel clean

    def send(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    cuda = case.get("device") == "cuda"

    class Gate(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            assert sys.stdin.readline().strip() == "step"
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            send({"seconds": time.perf_counter() - self.t0})

    assert sys.stdin.readline().strip() == "ready"
    trainer, weights = build_trainer(case, Gate())
    send({"weights": weights})
    with PeakRSS() as rss:
        trainer.train()
    assert sys.stdin.readline().strip() == "finish"
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
    send({"peak_rss_mib": rss.peak, "ru_maxrss_mib": max_rss, "weights": weights, **gpu})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--quick", action="store_true", help="tiny Llama configurations only")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    names = [n for n in names if not (args.quick and n.startswith("smollm2"))]
    if not args.configs:
        names = [n for n in names if "device" not in CONFIGS[n]]  # the GPU ones run when named
    head = [
        "configuration", "ours step s", "peft+Trainer step s", "step ratio", "ours peak MiB",
        "peft+Trainer peak MiB", "peak ratio", "ru_maxrss ratio",
    ]  # fmt: skip
    print(f"{args.warmup} warm-up + {args.steps} timed steps per run; median step time; training-phase peak memory "
          "(RSS; GPU rows: allocated GPU memory)")  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    notes = set()
    for name in names:
        total = args.warmup + args.steps
        cases = {v: dict(CONFIGS[name], variant=v, total_steps=total) for v in ("ours", "peft")}
        res = interleave(__file__, cases, warmup=args.warmup, steps=args.steps)
        notes.add(f"{CONFIGS[name]['model']}: {res['ours']['weights']}")
        o, p = res["ours"], res["peft"]
        peak = "peak_gpu_mib" if "peak_gpu_mib" in o else "peak_rss_mib"
        row = [
            name, f"{o['median_s']:.3f}", f"{p['median_s']:.3f}", f"{o['median_s'] / p['median_s']:.2f}",
            f"{o[peak]:.0f}", f"{p[peak]:.0f}", f"{o[peak] / p[peak]:.2f}", f"{o['ru_maxrss_mib'] / p['ru_maxrss_mib']:.2f}",
        ]  # fmt: skip
        print("| " + " | ".join(row) + " |", flush=True)
    print("models: " + "; ".join(sorted(notes)))


if __name__ == "__main__":
    main()
