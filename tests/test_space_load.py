"""The Space under load: 32 gradio_client clients with mixed adapters against `python app.py`, 4 requests each.

No errors, every output equal to the oracle's greedy text for its adapter and prompt, the app's peak RSS bounded.
Requests served, queue waits (submit to first streamed output) and latencies are printed.
The run is capped by work, not time: PEFT_TRAINER_LOAD_REQUESTS requests per client (default 4).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from gradio_client import Client

from tests import processes, space_helpers
from tests.space_helpers import BASE, NEW_TOKENS, PROMPT, adapter_paths, greedy, oracle_model

pytestmark = pytest.mark.slow
space_cache, adapter_dir = space_helpers.space_cache, space_helpers.adapter_dir

CLIENTS = 32
REQUESTS = int(os.environ.get("PEFT_TRAINER_LOAD_REQUESTS", "4"))  # per client
CONCURRENCY = 8  # the app's default queue concurrency (CONCURRENCY)
COMBOS = [(a, p) for p in (PROMPT, "Write one line about mountains") for a in ("__base__", "pirate", "poet")]
RSS_FACTOR, RSS_SLACK_MB = 2, 100  # peak RSS under load must stay below 2 x idle + 100 MB


@pytest.fixture(scope="module")
def expected(adapter_dir: Path) -> dict[tuple[str, str], str]:
    """Greedy text for each (adapter, prompt) from our PeftModel with global set_adapter: no Space code involved."""
    model, tokenizer = oracle_model(adapter_dir)
    texts = {(a, p): greedy(model, tokenizer, a, p) for a, p in COMBOS}
    for prompt in {p for _, p in COMBOS}:
        assert len({t for (_, p), t in texts.items() if p == prompt}) == 3, f"adapters must differ to show: {texts}"
    return texts


@pytest.fixture(scope="module")
def app(adapter_dir: Path, space_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """The app with BASE_MODEL=tiny-llama and two adapters; yields (process, url, log file); always stopped."""
    cwd = tmp_path_factory.mktemp("space_load")
    paths = adapter_paths(adapter_dir)
    env = {"BASE_MODEL": BASE, "ADAPTERS": f"pirate={paths['pirate']},poet={paths['poet']}",
           "CONCURRENCY": str(CONCURRENCY), "PEFT_TRAINER_CACHE": str(space_cache)}  # fmt: skip
    proc, url = space_helpers.start_app(env, cwd / "app.log", cwd)
    try:
        yield proc, url, cwd / "app.log"
    finally:
        space_helpers.stop_app(proc)


def rss_mb(pid: int) -> float:
    """Resident memory of the app process and its children."""
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def request(client: Client, adapter: str, prompt: str) -> tuple[str, float, float]:
    """One /generate call, polled every 10 ms: (final text, seconds to the first streamed output, total seconds)."""
    start = time.perf_counter()
    job = client.submit(adapter, prompt, NEW_TOKENS, False, 0.7, 0.95, 50, True, api_name="/generate")
    first = None
    while not job.done():
        if first is None and job.outputs():
            first = time.perf_counter()
        time.sleep(0.01)
    text = job.result()
    end = time.perf_counter()
    return text, (first or end) - start, end - start


def test_32_clients_with_mixed_adapters(app, expected: dict[tuple[str, str], str]) -> None:
    proc, url, log = app
    warm = Client(url, analytics_enabled=False, verbose=False)
    for adapter, prompt in COMBOS:  # every path once, then the idle footprint
        assert request(warm, adapter, prompt)[0] == expected[adapter, prompt]
    time.sleep(1)
    idle = rss_mb(proc.pid)
    bound = RSS_FACTOR * idle + RSS_SLACK_MB

    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb(proc.pid))
            stop.wait(0.1)

    served: list[tuple[str, str, str, float, float]] = []  # adapter, prompt, text, first output, latency
    errors: list[str] = []
    ready = threading.Barrier(CLIENTS + 1)

    def run_client(index: int) -> None:
        client = None
        try:
            client = Client(url, analytics_enabled=False, verbose=False)
        except Exception as e:
            errors.append(f"client {index} could not connect: {e!r}")
        ready.wait(timeout=processes.HANG_S)
        for n in range(index, index + REQUESTS) if client is not None else ():
            adapter, prompt = COMBOS[n % len(COMBOS)]
            try:
                served.append((adapter, prompt, *request(client, adapter, prompt)))
            except Exception as e:
                errors.append(f"client {index}, {adapter}: {type(e).__name__}: {e}")

    sampler = threading.Thread(target=sample, daemon=True)
    threads = [threading.Thread(target=run_client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    ready.wait(timeout=processes.HANG_S)
    sampler.start()
    began = time.monotonic()
    for t in threads:
        t.join(timeout=2 * processes.HANG_S)
    took = time.monotonic() - began
    stop.set()
    sampler.join()

    assert not any(t.is_alive() for t in threads), "a client hung"
    assert proc.poll() is None, "the app died under load"
    waits, latencies = [s[3] for s in served], [s[4] for s in served]
    peak = max(samples)
    in_flight = [int(n) for n in re.findall(r"in_flight=(\d+)", log.read_text(errors="replace"))]
    print(
        f"\nspace load: {CLIENTS} clients, {took:.0f} s: {len(served)} requests served "
        f"({len(served) / took:.1f}/s; {dict(Counter(s[0] for s in served))}), {len(errors)} errors; "
        f"queue wait (submit to first output) median {percentile(waits, 0.5):.2f} s, p95 {percentile(waits, 0.95):.2f} s; "
        f"latency median {percentile(latencies, 0.5):.2f} s, p95 {percentile(latencies, 0.95):.2f} s; "
        f"app RSS idle {idle:.0f} MB, peak {peak:.0f} MB (bound {bound:.0f} MB); peak in flight {max(in_flight)}"
    )
    assert errors == [], errors[:5]
    wrong = [(a, p, t) for a, p, t, *_ in served if t != expected[a, p]]
    assert wrong == [], f"{len(wrong)} outputs differ from the oracle, e.g. {wrong[:3]}"
    assert len(served) == CLIENTS * REQUESTS, "some requests were not served"
    assert set(s[0] for s in served) == {"__base__", "pirate", "poet"}
    assert len(in_flight) == len(COMBOS) + len(served), "the app logged a different number of generations"
    assert 1 < max(in_flight) <= CONCURRENCY, "the queue did not run requests side by side within its limit"
    assert peak < bound, f"app RSS peaked at {peak:.0f} MB; idle {idle:.0f} MB, bound {bound:.0f} MB"
