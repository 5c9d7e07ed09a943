"""Training a new adapter in the Space: one run at a time, in a worker thread, with PeftTrainer on a copy of the base's
module tree around the same weights, so serving goes on meanwhile; bounded (rows, steps, rank, time), cancellable,
and the adapter joins the served ones only when it has finished. Nothing here imports gradio."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from peft_trainer.folders import validate_adapter_name

from .zerogpu import on_zero_gpu

if TYPE_CHECKING:
    import datasets

    from .engine import AdapterEngine

log = logging.getLogger("peft_trainer_space")


@dataclass(frozen=True)
class TrainLimits:
    """What one visitor's training may ask for."""

    max_rows: int = 1000
    max_steps: int = 200
    max_rank: int = 64
    max_seconds: float = 900.0


@dataclass(frozen=True)
class TrainSettings:
    """What the visitor picks; the rest follows the quickstart recipes (alpha = 2r, all linear layers, batch 8)."""

    name: str
    rank: int = 16
    steps: int = 30
    learning_rate: float = 1e-3
    max_length: int = 256


@dataclass
class TrainingRun:
    """One training's state, read by the UI while the worker writes it."""

    name: str
    steps: int
    rows: int
    status: str = "starting"  # starting -> training -> done | cancelled | failed
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    message: str = ""
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        loss = f", loss {self.losses[-1][1]:.3f}" if self.losses else ""
        head = f"{self.name}: {self.status}, step {self.step}/{self.steps}{loss}, {self.elapsed():.0f} s"
        return head + (f". {self.message}" if self.message else "")


def read_rows(text: str | None, upload: str | Path | None, limits: TrainLimits) -> datasets.Dataset:
    """Rows pasted as JSON Lines (or CSV with a header line), or an uploaded .jsonl/.json/.csv file: ``messages``
    or ``prompt``/``completion`` (checked when tokenized); at most ``limits.max_rows``."""
    from peft_trainer.data import detect_format, load_records

    if upload:
        records = load_records(upload)
    elif text and text.strip():
        suffix = ".jsonl" if text.lstrip().startswith("{") else ".csv"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"pasted{suffix}"
            path.write_text(text.strip() + "\n", encoding="utf-8")
            try:
                records = load_records(path)
            except ValueError as e:  # name what the visitor pasted, not this server's temporary file
                raise ValueError(str(e).replace(str(path), "the pasted rows")) from None
            records.info.dataset_name = "the pasted rows"
    else:
        raise ValueError("No rows: paste JSON Lines or CSV rows, or upload a .jsonl or .csv file")
    if len(records) > limits.max_rows:
        raise ValueError(f"{len(records)} rows: this Space trains on at most {limits.max_rows}")
    fmt = detect_format(records, records.info.dataset_name)
    if fmt not in ("messages", "prompt_completion"):
        raise ValueError(f"rows in format {fmt!r}: use 'messages' or 'prompt' + 'completion' columns")
    return records


class _Progress(TrainerCallback):
    """Copies steps and losses into the run; stops the Trainer on cancel or at the time limit."""

    def __init__(self, run: TrainingRun, max_seconds: float) -> None:
        self.run, self.max_seconds = run, max_seconds

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.run.losses = [*self.run.losses, (state.global_step, float(logs["loss"]))]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.run.step = state.global_step
        if self.run.elapsed() > self.max_seconds and not self.run.cancel.is_set():
            self.run.message = f"stopped at this Space's time limit ({self.max_seconds:.0f} s): try fewer steps"
            self.run.cancel.set()
        if self.run.cancel.is_set():
            control.should_training_stop = True


class AdapterTraining:
    """At most one training at a time for ``engine``; its adapter is added to the engine when it finishes."""

    def __init__(self, engine: AdapterEngine, limits: TrainLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or TrainLimits()
        self.current: TrainingRun | None = None
        self._lock = threading.Lock()

    def start(self, records: datasets.Dataset, settings: TrainSettings) -> TrainingRun:
        """Check the settings, then train in a worker thread; raises ValueError when one is already running."""
        lim = self.limits
        if on_zero_gpu():
            raise ValueError("Training needs CPU or dedicated GPU hardware: ZeroGPU grants a GPU per request only")
        validate_adapter_name(settings.name)
        if settings.name in self.engine.names():
            raise ValueError(f"An adapter named {settings.name!r} exists already: pick another name")
        if not 1 <= settings.rank <= lim.max_rank or not 1 <= settings.steps <= lim.max_steps:
            raise ValueError(f"rank must be 1..{lim.max_rank} and steps 1..{lim.max_steps} on this Space")
        if not 0 < settings.learning_rate <= 0.1:
            raise ValueError(f"learning rate {settings.learning_rate} is outside (0, 0.1]")
        with self._lock:
            if self.current is not None and not self.current.finished.is_set():
                raise ValueError(f"A training is running ({self.current.summary()}); try again when it ends")
            run = self.current = TrainingRun(settings.name, settings.steps, len(records))
        worker = threading.Thread(target=self._train, args=(run, records, settings), daemon=True, name="training")
        worker.start()
        return run

    def cancel(self) -> str:
        run = self.current
        if run is None or run.finished.is_set():
            return "No training is running."
        run.cancel.set()
        return f"Cancelling {run.name!r} at the end of its current step."

    def _train(self, run: TrainingRun, records: datasets.Dataset, settings: TrainSettings) -> None:
        out = Path(tempfile.mkdtemp(prefix=f"train-{run.name}-", dir=self.engine.work_dir))
        try:
            trainer = self._trainer(run, records, settings, out)
            run.status = "training"
            trainer.train()
            if run.cancel.is_set():
                run.status = "cancelled"
                return
            trainer.save_model()
            trainer.state.save_to_json(str(out / "trainer_state.json"))  # the adapter card's loss curve
            self.engine.add(str(out), run.name)
            run.status = "done"
            run.message = "it is ready in every tab"
        except Exception as e:  # the visitor's data or settings, or a failure: what is served stays as it was
            log.exception("training %s failed", run.name)
            run.status, run.message = "failed", str(e) or type(e).__name__
        finally:
            if run.status != "done":
                shutil.rmtree(out, ignore_errors=True)
            log.info("training %s", run.summary())
            run.finished.set()

    def _trainer(self, run: TrainingRun, records: datasets.Dataset, settings: TrainSettings, out: Path) -> Any:
        from peft_trainer import PeftTrainer, PeftTrainingArguments
        from peft_trainer.data import make_collator, tokenize_dataset

        tokenizer = self.engine.tokenizer
        train, stats = tokenize_dataset(records, tokenizer, max_length=settings.max_length)
        args = PeftTrainingArguments(
            output_dir=str(out), lora_r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.05,
            lora_target_modules="all-linear", learning_rate=settings.learning_rate, lr_scheduler_type="linear",
            warmup_steps=min(4, settings.steps // 10), max_steps=settings.steps, per_device_train_batch_size=8,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=42,
        )  # fmt: skip
        return PeftTrainer(
            self.engine.training_base(), args, train_dataset=train, processing_class=tokenizer,
            data_collator=make_collator(tokenizer, stats.fmt), callbacks=[_Progress(run, self.limits.max_seconds)],
        )  # fmt: skip
