"""The Space under load, through the real app: N concurrent clients (gradio_client, mixed adapters and the base),
continuous batching (BATCHING=1) against one generate() thread per request (BATCHING=0), in one run.

python -m bench.bench_serving [--clients 8 32] [--tokens 32] [--model smollm2-135m-instruct]

Per design and client count: requests/s, generated tokens/s, and the wait (submit to first streamed text) median and
p95. Each client sends 2 requests one after the other. Adapters: 3 random rank-8 LoRAs on the attention and MLP
projections (same compute as trained ones), written to a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from peft_trainer import LoraConfig, get_peft_model
from peft_trainer.models import load_model
from tests.space_helpers import start_app, stop_app

ADAPTERS = ("a", "b", "c")
PROMPTS = ("Write a short poem about the sea.", "What is the capital of France? Answer in one sentence.",
           "Give me three tips for learning to cook.", "Explain LoRA to a ten-year-old.")  # fmt: skip


def make_adapters(model_name: str, folder: Path) -> str:
    """Random adapters (B != 0) for the base; returns the ADAPTERS value for the app."""
    specs = []
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(i)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
        )
        get_peft_model(load_model(model_name)[0], config).save_pretrained(folder / name)
        specs.append(f"{name}={folder / name}")
    return ",".join(specs)


def load(url: str, clients: int, tokens: int, tokenizer) -> dict[str, float]:
    from gradio_client import Client

    waits: list[float] = []
    produced: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        c = Client(url, analytics_enabled=False, verbose=False)
        start.wait()
        for k in range(2):
            adapter = ("__base__", *ADAPTERS)[(i + k) % 4]
            sent = time.perf_counter()
            job = c.submit(adapter, PROMPTS[(i + k) % len(PROMPTS)], tokens, False, 0.7, 0.95, 50, True,
                           api_name="/generate")  # fmt: skip
            first = None
            for _ in job:
                first = first or time.perf_counter()
            text = job.result()
            with lock:
                waits.append((first or time.perf_counter()) - sent)
                produced.append(len(tokenizer(text)["input_ids"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    waits.sort()
    return {"requests/s": len(waits) / wall, "tokens/s": sum(produced) / wall, "wait median s": statistics.median(waits),
            "wait p95 s": waits[max(0, round(0.95 * len(waits)) - 1)], "wall s": wall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    opts = parser.parse_args()
    _, tokenizer = load_model(opts.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(opts.model, Path(tmp))
        for batching in ("1", "0"):
            env = {"BASE_MODEL": opts.model, "ADAPTERS": adapters, "BATCHING": batching, "MAX_NEW_TOKENS": "256"}
            proc, url = start_app(env, Path(tmp) / f"app-{batching}.log", Path(tmp), timeout=300)
            try:
                load(url, 2, 4, tokenizer)  # warm-up: first requests pay one-time costs
                for clients in opts.clients:
                    result = load(url, clients, opts.tokens, tokenizer)
                    rows.append((("batched" if batching == "1" else "per-thread"), clients, result))
                    print(rows[-1], file=sys.stderr, flush=True)
            finally:
                stop_app(proc)
    print(
        "| design | clients | requests/s | tokens/s | wait median (s) | wait p95 (s) |\n|---|---:|---:|---:|---:|---:|"
    )
    for design, clients, r in rows:
        print(f"| {design} | {clients} | {r['requests/s']:.2f} | {r['tokens/s']:.1f} | {r['wait median s']:.2f} | "
              f"{r['wait p95 s']:.2f} |")  # fmt: skip
    by = {(d, c): r for d, c, r in rows}
    for clients in opts.clients:
        new, old = by[("batched", clients)], by[("per-thread", clients)]
        print(f"{clients} clients: tokens/s x{new['tokens/s'] / old['tokens/s']:.2f}, "
              f"p95 wait x{new['wait p95 s'] / old['wait p95 s']:.2f} (batched / per-thread)")  # fmt: skip


if __name__ == "__main__":
    main()
