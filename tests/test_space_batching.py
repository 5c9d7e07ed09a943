"""Continuous batching in the Space's engine: concurrent requests with different adapters, prompt lengths, token
budgets and sampling decode together, each greedy one exactly as alone; a reader that leaves frees its row."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from peft_trainer.models import load_model
from peft_trainer_space.engine import AdapterEngine, Limits, Sampling
from tests import processes, space_helpers
from tests.space_helpers import BASE, NEW_TOKENS, PROMPT, adapter_paths, greedy, oracle_model

space_cache, adapter_dir, oracle = space_helpers.space_cache, space_helpers.adapter_dir, space_helpers.oracle
# (adapter, prompt, new tokens): other prompt lengths and budgets than the oracle's, base rows among adapter rows
REQUESTS = [
    ("pirate", PROMPT, NEW_TOKENS), ("poet", "Tell me a story about the sea and a ship", 5),
    ("__base__", "Hi", 12), ("pirate", "One two three four five six seven eight nine ten", 9),
    ("poet", PROMPT, NEW_TOKENS), ("__base__", PROMPT, 3),
]  # fmt: skip


@pytest.fixture(scope="module")
def alone(adapter_dir: Path) -> dict[tuple, str]:
    """Each request's greedy text from generate() on its own (no Space code)."""
    model, tokenizer = oracle_model(adapter_dir)
    return {r: greedy(model, tokenizer, r[0], r[1], r[2]) for r in REQUESTS}


def _engine(adapter_dir: Path, batching: bool = True) -> AdapterEngine:
    model, tokenizer = load_model(BASE)
    engine = AdapterEngine(model, tokenizer, BASE, Limits(max_new_tokens=64), batching=batching)
    for name, path in adapter_paths(adapter_dir).items():
        engine.add(str(path), name, removable=False)
    return engine


def _eventually(check, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.005)
    return check()


def _run_together(engine: AdapterEngine, requests: list, sampling: dict | list[dict] | None = None) -> list[str]:
    """Every request at once; ``sampling``: settings for all, or one dict per request."""
    results: list[str | None] = [None] * len(requests)
    start = threading.Barrier(len(requests))
    settings = sampling if isinstance(sampling, list) else [sampling or {}] * len(requests)

    def one(i: int, adapter: str, prompt: str, tokens: int) -> None:
        start.wait()
        results[i] = engine.generate(adapter, prompt, Sampling(max_new_tokens=tokens, **settings[i]))

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=processes.HANG_S)
    return results


def test_concurrent_mixed_requests_share_steps_and_match_alone(adapter_dir: Path, alone: dict) -> None:
    engine = _engine(adapter_dir)
    try:
        results = _run_together(engine, REQUESTS)
        assert results == [alone[r] for r in REQUESTS]
        batcher = engine.batcher
        assert batcher.peak_batch >= 3  # rows decoded together ...
        assert batcher.steps < sum(r[2] for r in REQUESTS) - len(REQUESTS)  # ... in fewer steps than one by one
        assert engine.in_flight == 0 and not batcher._rows
    finally:
        engine.close()


def test_top_k_1_sampling_in_a_batch_is_greedy(adapter_dir: Path, alone: dict) -> None:
    engine = _engine(adapter_dir)
    try:
        results = _run_together(engine, REQUESTS[:3], {"do_sample": True, "temperature": 0.8, "top_k": 1})
        assert results == [alone[r] for r in REQUESTS[:3]]
        hot = {"do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 0.9}
        mixed = _run_together(engine, REQUESTS[:4], [{}, hot, {}, hot])  # greedy and sampled rows in one batch
        assert [mixed[0], mixed[2]] == [alone[REQUESTS[0]], alone[REQUESTS[2]]]
        assert engine.batcher.peak_batch >= 3
    finally:
        engine.close()


def test_a_reader_that_leaves_frees_its_row_and_the_lock(adapter_dir: Path, alone: dict) -> None:
    engine = _engine(adapter_dir)
    try:
        stream = engine.stream("pirate", PROMPT, Sampling(max_new_tokens=64))
        next(stream)  # the first token comes from the prefill, just before the row joins the batch
        assert _eventually(lambda: len(engine.batcher._rows) == 1) and engine.in_flight == 1
        stream.close()  # a closed tab: returns once the batcher has let go of the row
        assert engine.in_flight == 0 and _eventually(lambda: not engine.batcher._rows)
        engine.merge(["pirate", "poet"], None, "both", "linear")  # the write lock is free again
        assert engine.generate(*REQUESTS[1][:2], Sampling(max_new_tokens=5)) == alone[REQUESTS[1]]
    finally:
        engine.close()


def test_unbatched_engine_gives_the_same_outputs(adapter_dir: Path, alone: dict) -> None:
    engine = _engine(adapter_dir, batching=False)
    try:
        assert engine.batcher is None
        assert _run_together(engine, REQUESTS[:3]) == [alone[r] for r in REQUESTS[:3]]
    finally:
        engine.close()
