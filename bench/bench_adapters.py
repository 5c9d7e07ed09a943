"""Adapter operations on SmolLM2-135M, ours vs peft in one run: switch, load, weighted merge.

python bench/bench_adapters.py     (decoding with adapters: bench/bench_space.py)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import smollm2  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_adapters(folder: Path) -> None:
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(smollm2(), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                           init_lora_weights=False))  # fmt: skip
    for layer in model.modules():  # keep the adapters' effect moderate, as a trained adapter's would be
        if hasattr(layer, "lora_B") and "default" in getattr(layer, "lora_B", {}):
            layer.lora_B["default"].weight.data *= 0.05
    model.save_pretrained(folder / "a")
    model.save_pretrained(folder / "b")


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    torch.set_num_threads(2)
    import peft

    from peft_trainer import PeftModel

    folder = Path(tempfile.mkdtemp())
    make_adapters(folder)
    ours = PeftModel.from_pretrained(smollm2(), folder / "a", adapter_name="a")
    theirs = peft.PeftModel.from_pretrained(smollm2(), folder / "a", adapter_name="a")
    rows = []

    def load(model, name):
        model.load_adapter(folder / "b", adapter_name=name)

    for label, model in (("ours", ours), ("peft", theirs)):
        names = iter(f"x{i}" for i in range(100))
        seconds = timed(lambda m=model, n=names: load(m, next(n)), 5)
        rows.append((f"load adapter onto loaded base, {label} (ms)", seconds * 1e3))
    ratio_load = rows[0][1] / rows[1][1]
    ours.load_adapter(folder / "b", "b")
    theirs.load_adapter(folder / "b", adapter_name="b")
    flip = iter(["a", "b"] * 1000)
    switch_ours = timed(lambda: ours.set_adapter(next(flip)), 200) * 1e6
    switch_peft = timed(lambda: theirs.set_adapter(next(flip)), 20) * 1e6
    with_ctx = timed(lambda: ours.use_adapter("b").__enter__(), 200) * 1e6
    rows += [("set_adapter, ours (us)", switch_ours), ("set_adapter, peft (us)", switch_peft),
             ("use_adapter() enter, ours (us)", with_ctx)]  # fmt: skip

    t_ours = timed(lambda: ours.add_weighted_adapter(["a", "b"], [0.6, 0.4], f"m{time.perf_counter_ns()}",
                                                     combination_type="svd"), 3)  # fmt: skip
    t_peft = timed(lambda: theirs.add_weighted_adapter(["a", "b"], [0.6, 0.4], f"m{time.perf_counter_ns()}",
                                                       combination_type="svd"), 1)  # fmt: skip
    rows += [("add_weighted_adapter svd, ours (s)", t_ours), ("add_weighted_adapter svd, peft (s)", t_peft)]

    print("| figure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.4g} |")
    print(f"| load ratio ours/peft | {ratio_load:.2f} |\n| svd merge speedup peft/ours | {t_peft / t_ours:.0f}x |")


if __name__ == "__main__":
    main()
