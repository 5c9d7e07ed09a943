"""The Space serving while its Train tab trains: SmolLM2-135M, an adapter served to CLIENTS concurrent greedy
requests (the batcher), alone and while a 30-step training on 30 pirate rows runs, and the training alone.

python bench/bench_space_training.py [--clients 4] [--tokens 32] [--window 60] -> bench/results/space_training.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_space import make_adapters  # noqa: E402
from peft_trainer.models import load_model  # noqa: E402
from peft_trainer.recipe import RECIPES_DIR  # noqa: E402
from peft_trainer_space.engine import AdapterEngine, Sampling  # noqa: E402
from peft_trainer_space.training import AdapterTraining, TrainSettings, read_rows  # noqa: E402

PROMPTS = ["Tell me about the sea.", "What is the capital of France?", "Name three colours.", "Why is the sky blue?"]


def serve(engine: AdapterEngine, clients: int, tokens: int, until) -> dict[str, float]:
    """``clients`` threads each asking for ``tokens`` greedy tokens again and again until ``until()``; tokens/s."""
    done: list[int] = []
    began = time.perf_counter()

    def client(i: int) -> None:
        while not until():
            text = engine.generate("served", PROMPTS[i % len(PROMPTS)], Sampling(tokens))
            done.append(len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - began
    return {"requests": len(done), "tokens": sum(done), "seconds": took, "tokens_per_s": sum(done) / took}


def train(engine: AdapterEngine, name: str) -> tuple[AdapterTraining, object]:
    rows = (RECIPES_DIR / "data" / "quickstart_pirate.jsonl").read_text().splitlines()[:30]
    training = AdapterTraining(engine)
    return training, training.start(read_rows("\n".join(rows), None, training.limits), TrainSettings(name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of serving alone")
    opts = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m-instruct")
    engine = AdapterEngine(model, tokenizer, "smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        engine.add(str(make_adapters(Path(tmp), 16)[0]), "served", removable=False)
        engine.generate("served", PROMPTS[0], Sampling(opts.tokens))  # warm-up
        end = time.perf_counter() + opts.window
        alone = serve(engine, opts.clients, opts.tokens, lambda: time.perf_counter() > end)
        _, run = train(engine, "pirate-1")
        during = serve(engine, opts.clients, opts.tokens, run.finished.is_set)
        trained_beside = run.elapsed()
        assert run.status == "done", run.message
        _, run = train(engine, "pirate-2")
        run.finished.wait()
        trained_alone = run.elapsed()
    engine.close()
    result = {
        "clients": opts.clients, "tokens": opts.tokens, "serving_alone": alone, "serving_while_training": during,
        "serving_ratio": during["tokens_per_s"] / alone["tokens_per_s"], "training_alone_s": trained_alone,
        "training_while_serving_s": trained_beside, "training_ratio": trained_beside / trained_alone,
    }  # fmt: skip
    out = Path(__file__).parent / "results" / "space_training.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
