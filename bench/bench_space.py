"""The Space's speed on SmolLM2-135M: adapter switch time, time to first token and per-token time (base/adapter/merged),
and a token-interleaved per-token comparison with peft.

python bench/bench_space.py [--tokens 32] [--rounds 15] [--steps 200] [--threads 1] [--profile]
    -> bench/results/space.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peft_trainer import LoraConfig, get_peft_model  # noqa: E402
from peft_trainer.lora.layer import AdapterState, Linear  # noqa: E402
from peft_trainer.models import load_model  # noqa: E402
from peft_trainer_space.engine import AdapterEngine, Sampling  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class Clock(BaseStreamer):
    """Records when each new token arrives (generate's first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def make_adapters(folder: Path, rank: int) -> list[Path]:
    """Two random adapters shaped like trained ones (B scaled down so the output stays reasonable)."""
    paths = []
    for seed in (0, 1):
        model, _ = load_model("smollm2-135m-instruct")
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                      init_lora_weights=False))  # fmt: skip
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data *= 0.05
        peft_model.save_pretrained(folder / f"ad{seed}")
        paths.append(folder / f"ad{seed}")
    return paths


def switch_times(engine: AdapterEngine, n: int) -> dict[str, float]:
    """Median µs of one use_adapter enter+exit and of one set_adapter, alternating between two adapters."""
    model, (a, b) = engine.peft, engine.names()[:2]
    out = {}

    def enter_exit(name: str) -> None:
        with model.use_adapter(name):
            pass

    for label, step in (("use_adapter_enter_exit_us", enter_exit), ("set_adapter_us", model.set_adapter)):
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            step(a if i % 2 else b)
            times.append(time.perf_counter() - t0)
        out[label] = statistics.median(times) * 1e6
    return out


def decode(model, inputs: dict, tokens: int, adapter: str | None) -> dict[str, float]:
    """Greedy ``tokens`` new tokens; returns time to first token and mean time per later token (ms)."""
    clock = Clock()
    selected = model.use_adapter(adapter) if adapter is not None else torch.no_grad()
    with selected, torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock)
    ttft = clock.times[0] - t0
    per_token = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
    return {"ttft_ms": ttft * 1e3, "per_token_ms": per_token * 1e3}


def interleaved_steps(cases: dict, prompt: torch.Tensor, steps: int) -> dict[str, dict[str, float]]:
    """One decoding step (a forward of one token on a KV cache) per case in turn, rotating the order, ``steps`` times.

    Every case gets the same prompt and then the same tokens (the plain model's greedy continuation), so each step
    does the same work everywhere. Neighbouring steps see the same background load, which on these shared machines
    moves per-token times by 20-50% within seconds: medians of per-step ratios are far steadier than ratios of whole
    generations. ``cases``: name -> (model, context manager factory); the first is the reference.
    """
    names = list(cases)
    reference, _ = cases[names[0]]
    with torch.inference_mode():
        tokens = reference.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        tokens = tokens[0, prompt.shape[1] :]
        caches, times = {}, {name: [] for name in names}
        for name, (model, context) in cases.items():
            caches[name] = DynamicCache(config=reference.config)
            with context():
                model(input_ids=prompt, cache=caches[name], use_cache=True)
        for i in range(steps):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                model, context = cases[name]
                with context():
                    t0 = time.perf_counter()
                    model(input_ids=tokens[i : i + 1].view(1, 1), cache=caches[name], use_cache=True)
                    times[name].append(time.perf_counter() - t0)
    for name, cache in caches.items():  # every case really decoded on its own growing cache
        assert cache.get_seq_length() == prompt.shape[1] + steps, (name, cache.get_seq_length())
    return {
        name: {
            "per_token_ms": statistics.median(times[name]) * 1e3,
            "vs_first": statistics.median(t / r for t, r in zip(times[name], times[names[0]])),
        }
        for name in names
    }


def bare_copy(model, adapter: str):
    """A copy whose LoRA layers do only the arithmetic of an unmerged adapter (the base's F.linear and the adapter's
    two, added in place) without any lookup or check: not a usable layer, the floor for one on this machine."""
    bare = copy.deepcopy(model, memo={id(model.adapter_state): AdapterState()})
    for layer in bare.modules():
        if isinstance(layer, Linear):
            w, bias, a, b = (
                layer.base_layer.weight,
                layer.base_layer.bias,
                layer.lora_A[adapter].weight,
                layer.lora_B[adapter].weight,
            )

            def forward(x, w=w, bias=bias, a=a, b=b, s=layer.scaling[adapter]):
                return F.linear(x, w, bias).add_(F.linear(F.linear(x, a), b), alpha=s)

            layer.forward = forward
    return bare.eval()


def profile(model, inputs: dict, adapter: str | None, label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(model, inputs, 16, adapter)
    print(f"\n--- {label}: top ops by self CPU time (16 tokens) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200, help="token-interleaved decoding steps")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)  # 2 threads swing 2-4x when a neighbour runs
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp())
    paths = make_adapters(folder, args.rank)
    model, tokenizer = load_model("smollm2-135m-instruct")
    engine = AdapterEngine(model, tokenizer, "smollm2-135m-instruct", None)
    for path in paths:
        engine.add(str(path))
    adapter = engine.names()[0]
    # the Space's merged download: merge_and_unload on a copy; the plain base: unload() on another copy
    merged = copy.deepcopy(engine.peft, memo={id(engine.peft.adapter_state): AdapterState()})
    merged = merged.merge_and_unload(adapter_names=[adapter]).eval()
    plain = copy.deepcopy(engine.peft, memo={id(engine.peft.adapter_state): AdapterState()}).unload().eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")  # fmt: skip

    switch = switch_times(engine, 20000)
    cases = {
        "base": (engine.peft, "__base__"),
        "adapter (unmerged)": (engine.peft, adapter),
        "merged": (merged, None),
        "base without LoRA wrappers": (plain, None),
    }
    runs: dict[str, list[dict]] = {name: [] for name in [*cases, "engine stream (Space path)"]}
    sampling = Sampling(max_new_tokens=args.tokens)
    for _, (m, a) in cases.items():  # warm-up
        decode(m, inputs, 8, a)
    for _ in range(args.rounds):  # interleaved, so each case sees the same background load
        for name, (m, a) in cases.items():
            runs[name].append(decode(m, inputs, args.tokens, a))
        t0 = time.perf_counter()
        engine.generate(adapter, PROMPT, sampling)
        runs["engine stream (Space path)"].append({"total_ms": (time.perf_counter() - t0) * 1e3})
    import peft

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(paths[0])).eval()
    plain_ctx, base = contextlib.nullcontext, engine.peft
    steps = interleaved_steps(
        {
            "plain base model": (plain, plain_ctx),
            "ours: base (none active)": (base, lambda: base.use_adapter("__base__")),
            "ours: adapter (unmerged)": (base, lambda: base.use_adapter(adapter)),
            "ours: merged": (merged, plain_ctx),
            "floor: unmerged adapter, bare arithmetic": (bare_copy(engine.peft, adapter), plain_ctx),
            "peft: adapter (unmerged)": (theirs, plain_ctx),
            "peft: disable_adapter()": (theirs, theirs.disable_adapter),
        },
        inputs["input_ids"],
        args.steps,
    )
    result = {
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "threads": args.threads,
        "adapters": f"2 x r={args.rank}, {len(TARGETS)} target modules per layer",
        "new_tokens": args.tokens,
        "rounds": args.rounds,
        "switch": switch,
        "decode": {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()},
        "per_token_ms_each_round": {name: [round(r["per_token_ms"], 2) for r in runs[name]] for name in cases},
        "interleaved_steps": {"steps": args.steps, "vs_first": "plain base model", "cases": steps},
    }
    for name in cases:  # medians of per-round ratios: both sides of each ratio ran back to back
        for key, reference in (("per_token_vs_base", "base"), ("per_token_vs_plain", "base without LoRA wrappers")):
            ratios = [r["per_token_ms"] / b["per_token_ms"] for r, b in zip(runs[name], runs[reference])]
            result["decode"][name][key] = statistics.median(ratios)
        result["decode"][name]["per_token_ms_min"] = min(r["per_token_ms"] for r in runs[name])
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / "space.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.profile:
        profile(engine.peft, inputs, "__base__", "base")
        profile(engine.peft, inputs, adapter, "adapter (unmerged)")


if __name__ == "__main__":
    main()
