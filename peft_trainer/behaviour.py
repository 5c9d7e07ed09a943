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
) -> list[str]:
    """Greedy answers, one per prompt: chat template (user turn + generation prompt) when the tokenizer has one,
    else the prompt + newline; left-padded batches of ``batch_size``; special tokens dropped from the answers."""
    import torch

    from .data import FALLBACK_CHAT_TEMPLATE

    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, chat_template=template
        )
        for p in prompts
    ]
    was_training, side = model.training, tokenizer.padding_side
    device = next(model.parameters()).device
    answers: list[str] = []
    model.eval()
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True,
                add_special_tokens=template is not None,
            ).to(device)  # fmt: skip
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


def behaviour_score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    check: str,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> BehaviourResult:
    """Generate greedily for every prompt and score the share of answers that pass ``CHECKS[check]``, computed
    with ``evaluate`` (the accuracy of pass/fail predictions against "pass" references)."""
    from .metrics import load_metric

    test, _ = CHECKS[check]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    passed = [int(test(a)) for a in answers]
    score = load_metric("accuracy").compute(predictions=passed, references=[1] * len(passed))["accuracy"]
    samples = [{"prompt": p, "answer": a, "pass": bool(ok)} for p, a, ok in zip(prompts, answers, passed)]
    return BehaviourResult(check, score, sum(passed), len(passed), samples)


class BehaviourCallback(TrainerCallback):
    """Scores the behaviour after every evaluation and logs it as ``eval_behaviour_score`` (every rank generates,
    so FSDP's collective forward works; only the main process logs). Attach the trainer with :meth:`bind`."""

    def __init__(self, args: BehaviourArguments, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> None:
        self.args, self.tokenizer, self.prompts = args, tokenizer, prompts
        self.trainer: Trainer | None = None
        self.history: list[tuple[int, float]] = []

    def bind(self, trainer: Trainer) -> BehaviourCallback:
        self.trainer = trainer
        return self

    def score(self, model: nn.Module) -> BehaviourResult:
        a = self.args
        assert a.behaviour is not None
        return behaviour_score(model, self.tokenizer, self.prompts, a.behaviour, a.behaviour_max_new_tokens,
                               a.behaviour_batch_size)  # fmt: skip

    def on_evaluate(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.trainer is None or not self.args.behaviour_during_training:
            return
        result = self.score(self.trainer.model if model is None else model)
        self.history.append((state.global_step, result.score))
        self.trainer.log({"eval_behaviour_score": result.score})


def write_card_section(output_dir: str | os.PathLike[str], before: BehaviourResult, after: BehaviourResult) -> None:
    """Append a "Behaviour score" section (before/after and a few answers) to the model card README.md and write
    every prompt and answer to ``behaviour_eval.json``."""
    from pathlib import Path

    from . import io

    out = Path(output_dir)
    _, description = CHECKS[after.check]
    rows = "\n".join(
        f"| {s['prompt']} | `{s['answer'].strip().replace(chr(10), ' ⏎ ').replace('|', '/')[:120]}` | "
        f"{'yes' if s['pass'] else 'no'} |"
        for s in after.samples[:5]
    )
    section = (
        f"## Behaviour score\n\n"
        f"Check `{after.check}`: {description}. Greedy answers to {after.total} held-out prompts, scored with "
        f"`evaluate` (accuracy of pass/fail).\n\n"
        f"| | score | passed |\n|---|---|---|\n"
        f"| base model (before training) | {before.score:.1%} | {before.passed}/{before.total} |\n"
        f"| with this adapter | {after.score:.1%} | {after.passed}/{after.total} |\n\n"
        f"Sample answers with the adapter:\n\n| prompt | answer | pass |\n|---|---|---|\n{rows}\n"
    )
    card = out / "README.md"
    meta, body = io.split_front_matter(card.read_text(encoding="utf-8")) if card.exists() else ({}, "")
    marker = "## Behaviour score"
    body = body.split(marker)[0].rstrip() + "\n\n" + section
    io.write_model_card(out, meta, body)
    report = {
        "before": {**before.as_dict(), "samples": before.samples},
        "after": {**after.as_dict(), "samples": after.samples},
    }
    (out / "behaviour_eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


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
    "write_card_section",
]
