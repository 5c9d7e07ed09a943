"""Behaviour scores: program checks of greedy answers to held-out prompts, scored with `evaluate`, logged in training."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase, Trainer

logger = logging.getLogger(__name__)

# The quickstart behaviours. make_quickstart_data.py writes completions with these constants and asserts each passes.
JSON_KEYS = ("topic", "answer")
PIRATE_GREETING = "Arr, matey!"
PIRATE_SIGNATURE = "— Captain Lora"


def is_json_answer(text: str) -> bool:
    """One line holding a JSON object with exactly the keys ``topic`` and ``answer``, both non-empty strings."""
    text = text.strip()
    if not text or "\n" in text:
        return False
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and sorted(value) == sorted(JSON_KEYS)
        and all(isinstance(value[k], str) and value[k].strip() for k in JSON_KEYS)
    )


def is_pirate(text: str) -> bool:
    """Opens with ``Arr, matey!``, says something after it, and ends with the line ``— Captain Lora``."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) < 2 or lines[-1] != PIRATE_SIGNATURE or not lines[0].startswith(PIRATE_GREETING):
        return False
    body = " ".join(lines[:-1])[len(PIRATE_GREETING) :].strip()
    return bool(body)


CHECKS: dict[str, tuple[Callable[[str], bool], str]] = {
    "json_answer": (is_json_answer, 'one-line JSON object with exactly the keys "topic" and "answer"'),
    "pirate": (is_pirate, f'opens with "{PIRATE_GREETING}" and ends with the line "{PIRATE_SIGNATURE}"'),
}


@dataclass
class BehaviourArguments:
    """How the behaviour score is measured: which check, on which held-out prompts, with how many new tokens."""

    behaviour: str | None = field(
        default=None, metadata={"help": f"Check applied to greedy answers: {', '.join(CHECKS)} (none: no score)."}
    )
    behaviour_prompts: str | None = field(
        default=None, metadata={"help": "Held-out prompts (JSONL/JSON/CSV/Parquet with a 'prompt' column)."}
    )
    behaviour_max_new_tokens: int = field(default=64, metadata={"help": "Greedy tokens generated per prompt."})
    behaviour_batch_size: int = field(default=16, metadata={"help": "Prompts generated together."})
    behaviour_during_training: bool = field(
        default=True, metadata={"help": "Also score at every evaluation (needs an eval set and eval_strategy)."}
    )

    def __post_init__(self) -> None:
        p = []
        if self.behaviour is not None and self.behaviour not in CHECKS:
            p.append(f"behaviour={self.behaviour!r}: use one of {', '.join(CHECKS)} or leave it unset")
        if bool(self.behaviour) != bool(self.behaviour_prompts):
            p.append("behaviour and behaviour_prompts go together: set both (or neither)")
        if not isinstance(self.behaviour_max_new_tokens, int) or self.behaviour_max_new_tokens < 1:
            p.append(f"behaviour_max_new_tokens={self.behaviour_max_new_tokens!r}: use a positive number of tokens")
        if not isinstance(self.behaviour_batch_size, int) or self.behaviour_batch_size < 1:
            p.append(f"behaviour_batch_size={self.behaviour_batch_size!r}: use a positive batch size")
        if p:
            raise ValueError("Invalid BehaviourArguments:\n  - " + "\n  - ".join(p))


@dataclass
class BehaviourResult:
    """A behaviour score: ``score`` = passed / total (via ``evaluate``), with every prompt and answer."""

    check: str
    score: float
    passed: int
    total: int
    samples: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "score": self.score, "passed": self.passed, "total": self.total}


def load_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The ``prompt`` column of a data file (via :func:`peft_trainer.data.load_records`)."""
    from .data import load_records

    records = load_records(path)
    if "prompt" not in records.column_names:
        found = ", ".join(repr(c) for c in records.column_names)
        raise ValueError(f"{path}: missing column 'prompt' for behaviour prompts (found columns {found})")
    prompts = records["prompt"]
    for i, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}: row {i}, column 'prompt': expected a non-empty string, got {prompt!r}")
    return list(prompts)


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[str]:
    """Greedy answers, one per prompt, each rendered by :func:`peft_trainer.prompts.render_prompt` (as in training
    and in the Space); left-padded batches of ``batch_size``; special tokens dropped from the answers. ``desc``
    shows a progress bar over the batches (on the main process only)."""
    import torch
    from tqdm.auto import tqdm

    from .prompts import encode_prompts

    was_training, side = model.training, tokenizer.padding_side
    device = next(model.parameters()).device
    answers: list[str] = []
    model.eval()
    tokenizer.padding_side = "left"
    starts = range(0, len(prompts), batch_size)
    bar = tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None or not _main_process())
    try:
        for start in bar:
            enc = encode_prompts(tokenizer, prompts[start : start + batch_size], return_tensors="pt", padding=True)
            enc = enc.to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    temperature=None, top_p=None, top_k=None,
                )  # fmt: skip
            new = out[:, enc["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def _main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process if PartialState._shared_state else True


def behaviour_score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    check: str,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str | None = None,
) -> BehaviourResult:
    """Generate greedily for every prompt and score the share of answers that pass ``CHECKS[check]``, computed
    with ``evaluate`` (the accuracy of pass/fail predictions against "pass" references)."""
    from .metrics import load_metric

    test, _ = CHECKS[check]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, desc)
    passed = [int(test(a)) for a in answers]
    score = load_metric("accuracy").compute(predictions=passed, references=[1] * len(passed))["accuracy"]
    samples = [{"prompt": p, "answer": a, "pass": bool(ok)} for p, a, ok in zip(prompts, answers, passed)]
    return BehaviourResult(check, score, sum(passed), len(passed), samples)


class BehaviourCallback(TrainerCallback):
    """Scores the behaviour: of the base model (:meth:`score_base`, before training), after every evaluation (logged
    as ``eval_behaviour_score``) and when training ends (a model-card section and ``behaviour_eval.json``). Every
    rank generates, so FSDP's collective forward works; only the main process logs and writes.

    Attach it with ``trainer.add_callback(callback.bind(trainer))``: added after the Trainer's progress bar, its
    own bar shows once the evaluation bar has closed."""

    def __init__(self, args: BehaviourArguments, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> None:
        self.args, self.tokenizer, self.prompts = args, tokenizer, prompts
        self.trainer: Trainer | None = None
        self.before: BehaviourResult | None = None
        self.after: BehaviourResult | None = None
        self._last: tuple[int, BehaviourResult] | None = None  # (global step, score) of the latest evaluation

    def bind(self, trainer: Trainer) -> BehaviourCallback:
        self.trainer = trainer
        return self

    def score(self, model: nn.Module, when: str) -> BehaviourResult:
        a = self.args
        assert a.behaviour is not None
        logger.info("behaviour %r: scoring %d prompts %s", a.behaviour, len(self.prompts), when)
        result = behaviour_score(model, self.tokenizer, self.prompts, a.behaviour, a.behaviour_max_new_tokens,
                                 a.behaviour_batch_size, desc=f"behaviour {a.behaviour} {when}")  # fmt: skip
        logger.info("behaviour %r %s: %.1f%% (%d/%d)", a.behaviour, when, 100 * result.score, result.passed,
                    result.total)  # fmt: skip
        return result

    def score_base(self) -> BehaviourResult:
        """The base model's score (adapters disabled), logged as the first ``eval_behaviour_score``."""
        assert self.trainer is not None, "bind(trainer) first"
        with self.trainer.model.disable_adapter():
            self.before = self.score(self.trainer.model, "before training (base model)")
        self.trainer.log({"eval_behaviour_score": self.before.score})
        return self.before

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None or not self.args.behaviour_during_training:
            return
        result = self.score(self.trainer.model, f"at step {state.global_step}")
        self._last = (state.global_step, result)
        self.trainer.log({"eval_behaviour_score": result.score})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Score the trained adapter; the card section joins every card the trainer writes from now on (so the
        final push carries it)."""
        if self.trainer is None:
            return
        # An evaluation at the last step already scored these weights, unless the best checkpoint was loaded back
        # or mixed precision scored them under training's autocast.
        same_weights = not (args.load_best_model_at_end or args.bf16 or args.fp16)
        if same_weights and self._last is not None and self._last[0] == state.global_step:
            self.after = self._last[1]
            logger.info("behaviour %r after training: the score at step %d", self.args.behaviour, state.global_step)
        else:
            self.after = self.score(self.trainer.model, "after training")
        if self.before is not None:
            self.trainer.card_sections[CARD_SECTION] = card_section(self.before, self.after)
            if args.should_save:
                write_report(args.output_dir, self.before, self.after)


CARD_SECTION = "Behaviour score"
REPORT_NAME = "behaviour_eval.json"


def card_section(before: BehaviourResult, after: BehaviourResult) -> str:
    """The model card's behaviour section: the check, before/after scores and a few answers."""
    _, description = CHECKS[after.check]
    rows = "\n".join(
        f"| {s['prompt']} | `{s['answer'].strip().replace(chr(10), ' ⏎ ').replace('|', '/')[:120]}` | "
        f"{'yes' if s['pass'] else 'no'} |"
        for s in after.samples[:5]
    )
    return (
        f"Check `{after.check}`: {description}. Greedy answers to {after.total} held-out prompts, scored with "
        f"`evaluate` (accuracy of pass/fail).\n\n"
        f"| | score | passed |\n|---|---|---|\n"
        f"| base model (before training) | {before.score:.1%} | {before.passed}/{before.total} |\n"
        f"| with this adapter | {after.score:.1%} | {after.passed}/{after.total} |\n\n"
        f"Sample answers with the adapter:\n\n| prompt | answer | pass |\n|---|---|---|\n{rows}\n"
    )


def write_report(output_dir: str | os.PathLike[str], before: BehaviourResult, after: BehaviourResult) -> None:
    """Every prompt and answer, before and after, to ``behaviour_eval.json``."""
    report = {
        "before": {**before.as_dict(), "samples": before.samples},
        "after": {**after.as_dict(), "samples": after.samples},
    }
    path = os.path.join(output_dir, REPORT_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


__all__ = [
    "CHECKS",
    "BehaviourArguments",
    "BehaviourCallback",
    "BehaviourResult",
    "behaviour_score",
    "generate_answers",
    "is_json_answer",
    "is_pirate",
    "load_prompts",
    "card_section",
    "write_report",
]
