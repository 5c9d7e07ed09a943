"""Shared benchmark helpers: the SmolLM2 / tiny models, a peak-RSS sampler, and running cases in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import torch


def smollm2(random_weights: bool = False):
    """SmolLM2-135M-Instruct from the embedded pip package (random weights of the same shape if asked)."""
    if not random_weights and not os.environ.get("BENCH_RANDOM_WEIGHTS"):
        try:
            from peft_trainer.models import load_model

            return load_model("smollm2-135m-instruct")[0]
        except ImportError:
            pass
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(cfg)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4096)  # fmt: skip
    return LlamaForCausalLM(cfg)


# Llama-3.2-1B's shape: 1.24 B parameters (embeddings tied), for the GPU comparison
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)  # fmt: skip


def base_model(name: str, device: str = "cpu"):
    """``smollm2``, ``tiny`` (float32) or ``llama1b`` (random weights, bfloat16), on ``device``."""
    if name == "llama1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16)
    return (smollm2() if name == "smollm2" else tiny_llama()).to(device)


class PeakRSS:
    """Samples this process's RSS every 5 ms between start() and stop(); ``peak`` is in MiB."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss / 2**20)
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """A benchmark case living in its own process: ``step()`` runs one timed step there and returns seconds.

    Running several workers' steps in turn (interleaved) exposes every case to the same background load,
    which on shared machines moves absolute times by 2-4x within minutes while the ratios stay put.
    """

    def __init__(self, script: str, case: dict) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        self.case = case
        self.proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(case)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        self._ask("ready")

    def _ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.case} died (exit code {self.proc.wait()})")
        return json.loads(line)

    def step(self) -> float:
        return self._ask("step")["seconds"]

    def finish(self) -> dict:
        result = self._ask("finish")
        self.proc.wait()
        return result


def serve(setup, step, device: str = "cpu") -> None:
    """Worker side: ``setup()`` once, then answer "step" (time one call of ``step``) and "finish" (peak RSS, and on
    CUDA the peak of allocated GPU memory while stepping)."""
    rss, cuda = PeakRSS(), device.startswith("cuda")
    for line in sys.stdin:
        command = line.strip()
        if command == "ready":
            setup()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            rss.__enter__()
            out = {}
        elif command == "step":
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            out = {"seconds": time.perf_counter() - t0}
        else:
            rss.__exit__(None, None, None)
            out = {"peak_rss_mib": rss.peak}
            if cuda:
                out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(out), flush=True)
        if command == "finish":
            return


def interleave(script: str, cases: dict[str, dict], warmup: int, steps: int) -> dict[str, dict]:
    """Start one worker per case, run their steps round-robin, and return median/min seconds and peak RSS."""
    workers = {name: Worker(script, case) for name, case in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for i in range(warmup + steps):
            for name, worker in workers.items():
                seconds = worker.step()
                if i >= warmup:
                    times[name].append(seconds)
        return {
            name: {"median_s": median(times[name]), "min_s": min(times[name]), **worker.finish()}
            for name, worker in workers.items()
        }
    finally:
        for worker in workers.values():
            worker.proc.kill()


def run_case(script: str, case: dict, timeout: int = 900) -> dict:
    """Run ``script --case JSON`` in a fresh process and return the JSON dict it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(
        [sys.executable, script, "--case", json.dumps(case)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
