"""Training in the Space: a visitor's rows become an adapter in a worker thread while serving goes on; it joins the
others when done; one at a time, bounded and cancellable; a failed or cancelled training loses nothing served."""

from __future__ import annotations

import json
import time
from pathlib import Path

import peft
import pytest

from peft_trainer import PeftModel
from peft_trainer.behaviour import behaviour_score, load_prompts
from peft_trainer.models import load_model
from peft_trainer.recipe import RECIPES_DIR
from peft_trainer_space.engine import AdapterEngine, Limits, Sampling
from peft_trainer_space.training import AdapterTraining, TrainLimits, TrainSettings, read_rows
from tests import space_helpers
from tests.space_helpers import BASE, NEW_TOKENS, PROMPT, adapter_paths, greedy

space_cache, adapter_dir, oracle = space_helpers.space_cache, space_helpers.adapter_dir, space_helpers.oracle
ROWS = "\n".join(
    json.dumps({"prompt": f"Say something about number {i}.", "completion": f"Arr, matey! Number {i} be fine."})
    for i in range(16)
)
CSV_ROWS = "prompt,completion\nHi,Arr hello\nBye,Arr goodbye\n"


@pytest.fixture
def engine(adapter_dir: Path):
    model, tokenizer = load_model(BASE)
    engine = AdapterEngine(model, tokenizer, BASE, Limits(max_new_tokens=64))
    for name, path in adapter_paths(adapter_dir).items():
        engine.add(str(path), name, removable=False)
    yield engine
    engine.close()


def _serve_until(engine: AdapterEngine, done, adapter: str = "pirate") -> list[str]:
    """Greedy answers of ``adapter`` requested one after another until ``done()`` (at least one)."""
    answers = [engine.generate(adapter, PROMPT, Sampling(NEW_TOKENS))]
    while not done():
        answers.append(engine.generate(adapter, PROMPT, Sampling(NEW_TOKENS)))
    return answers


def test_training_runs_beside_serving_and_joins_the_adapters(engine: AdapterEngine, oracle: dict[str, str]) -> None:
    training = AdapterTraining(engine)
    run = training.start(read_rows(ROWS, None, training.limits), TrainSettings("sailor", 4, 6, 1e-2))
    served = _serve_until(engine, run.finished.is_set)
    assert run.status == "done", run.message
    assert set(served) == {oracle["pirate"]}  # serving went on, unchanged, while it trained
    assert [step for step, _ in run.losses] == list(range(1, 7)) and run.step == 6
    assert engine.names() == ["pirate", "poet", "sailor"]
    assert len(engine.card("sailor")["loss"]) == 6  # the adapter card's curve

    folder = engine.adapters["sailor"].folder
    theirs = peft.PeftModel.from_pretrained(load_model(BASE)[0], str(folder))  # peft reads what the Space wrote
    assert engine.generate("sailor", PROMPT, Sampling(NEW_TOKENS)) == greedy(theirs, engine.tokenizer, "default")
    assert engine.generate("__base__", PROMPT, Sampling(NEW_TOKENS)) == oracle["__base__"]  # the base is untouched


def test_csv_rows_and_an_upload_are_read_like_pasted_json_lines(tmp_path: Path) -> None:
    limits = TrainLimits(max_rows=20)
    assert read_rows(CSV_ROWS, None, limits)["completion"] == ["Arr hello", "Arr goodbye"]
    (tmp_path / "rows.jsonl").write_text(ROWS)
    assert len(read_rows("ignored when a file is given", str(tmp_path / "rows.jsonl"), limits)) == 16
    with pytest.raises(ValueError, match="at most 10"):
        read_rows(ROWS, None, TrainLimits(max_rows=10))
    with pytest.raises(ValueError, match="No rows"):
        read_rows("  ", None, limits)
    with pytest.raises(ValueError, match="'text'"):
        read_rows('{"text": "plain text rows are not a chat"}', None, limits)


def test_one_at_a_time_cancel_and_failures_lose_nothing_served(engine: AdapterEngine, oracle: dict[str, str]) -> None:
    training = AdapterTraining(engine)
    rows = read_rows(ROWS, None, training.limits)
    with pytest.raises(ValueError, match="exists already"):
        training.start(rows, TrainSettings("pirate"))
    with pytest.raises(ValueError, match="steps 1..200"):
        training.start(rows, TrainSettings("new", steps=500))
    with pytest.raises(ValueError, match="Invalid adapter name"):
        training.start(rows, TrainSettings("../up"))

    run = training.start(rows, TrainSettings("long", 4, 200, 1e-3))
    with pytest.raises(ValueError, match="A training is running"):
        training.start(rows, TrainSettings("second"))
    _serve_until(engine, lambda: run.step >= 2)
    assert "Cancelling 'long'" in training.cancel()
    run.finished.wait()
    assert run.status == "cancelled" and 2 <= run.step < 200
    assert training.cancel() == "No training is running."

    with pytest.raises(ValueError, match="the pasted rows: row 2, column 'completion'"):
        read_rows('{"prompt": "a", "completion": 5}\n{"prompt": "b", "completion": "ok"}', None, training.limits)
    bad = read_rows('{"prompt": "a"}\n{"prompt": "b", "completion": "ok"}', None, training.limits)
    failed = training.start(bad, TrainSettings("broken"))
    failed.finished.wait()
    assert failed.status == "failed" and "the pasted rows: row 1, column 'completion'" in failed.message

    timed = AdapterTraining(engine, TrainLimits(max_seconds=0.0)).start(rows, TrainSettings("slow", 4, 50))
    timed.finished.wait()
    assert timed.status == "cancelled" and "time limit" in timed.message and timed.step == 1

    assert engine.names() == ["pirate", "poet"]  # none of them joined, nothing was lost
    assert not list(engine.work_dir.glob("train-*"))  # nor left files behind
    for name in ("pirate", "poet", "__base__"):
        assert engine.generate(name, PROMPT, Sampling(NEW_TOKENS)) == oracle[name]


@pytest.mark.slow
def test_thirty_pirate_rows_thirty_steps_on_smollm2_pass_the_pirate_check(embedded_cache: Path) -> None:
    rows = (RECIPES_DIR / "data" / "quickstart_pirate.jsonl").read_text().splitlines()[:30]
    model, tokenizer = load_model("smollm2-135m-instruct")
    engine = AdapterEngine(model, tokenizer, "smollm2-135m-instruct")
    try:
        training = AdapterTraining(engine)
        began = time.monotonic()
        run = training.start(read_rows("\n".join(rows), None, training.limits), TrainSettings("pirate"))
        run.finished.wait()
        took = time.monotonic() - began
        assert run.status == "done", run.message
        folder = engine.adapters["pirate"].folder
        trained = PeftModel.from_pretrained(load_model("smollm2-135m-instruct")[0], folder)
        prompts = load_prompts(RECIPES_DIR / "data" / "quickstart_heldout.jsonl")
        score = behaviour_score(trained, tokenizer, prompts, "pirate")
    finally:
        engine.close()
    print(f"\nSpace training: 30 rows, 30 steps in {took:.0f} s, final loss {run.losses[-1][1]:.3f}, "
          f"pirate check {score.passed}/{score.total}")  # fmt: skip
    assert score.score >= 0.9, score.samples


def test_loss_curves_are_numeric_from_the_first_empty_frame() -> None:
    """The live curve starts empty; an empty frame of object columns would turn its axes categorical for good."""
    import gradio as gr

    from peft_trainer_space.ui import _loss_frame

    plot = gr.LinePlot(x="step", y="loss")
    for points in ([], [(1, 2.5), (2, 2.25)]):
        assert plot.postprocess(_loss_frame(points)).datatypes == {"step": "quantitative", "loss": "quantitative"}
