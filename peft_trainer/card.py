"""Model cards (README.md) of adapter folders: PEFT's metadata, the LoRA settings, the training summary, extra sections.

One builder, :func:`adapter_card`, serves ``PeftModel.save_pretrained`` (settings only), ``PeftTrainer`` (plus the
Trainer's hyperparameters and results) and extra sections such as the behaviour score; :func:`write_card` writes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .config import PEFT_FORMAT_VERSION

if TYPE_CHECKING:
    from transformers.modelcard import TrainingSummary

    from .config import LoraConfig

CARD_NAME = "README.md"
PIPELINE_TAGS = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification"}


def split_front_matter(text: str) -> tuple[dict, str]:
    """A README's YAML front matter (a dict, empty if none) and the Markdown after it."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            meta = yaml.safe_load(text[4:end]) or {}
            return (meta if isinstance(meta, dict) else {}), text[end + 4 :].lstrip("\n")
    return {}, text


def read_card(directory: str | os.PathLike) -> tuple[dict, str]:
    path = Path(directory) / CARD_NAME
    return split_front_matter(path.read_text(encoding="utf-8")) if path.is_file() else ({}, "")


def _lora_lines(configs: dict[str, LoraConfig]) -> list[str]:
    lines = []
    for name, c in configs.items():
        targets = c.target_modules if isinstance(c.target_modules, str) else ", ".join(sorted(c.target_modules or []))
        lines.append(f"- `{name}`: r={c.r}, lora_alpha={c.lora_alpha}, dropout={c.lora_dropout}, targets: {targets}")
    return lines


def adapter_card(
    base_model: str | None, configs: dict[str, LoraConfig], training: TrainingSummary | None = None,
    sections: dict[str, str] | None = None, model_name: str | None = None,
) -> tuple[dict[str, Any], str]:  # fmt: skip
    """Front matter and Markdown body of an adapter folder's README.md.

    ``training``: the Trainer's summary (hyperparameters, evaluation results, model-index metadata);
    ``sections``: extra ``{title: markdown}`` sections, e.g. the behaviour score.
    """
    from transformers.modelcard import make_markdown_table

    tags = {"lora", "peft", "peft-trainer", "transformers"} | (
        {f"base_model:adapter:{base_model}"} if base_model else set()
    )
    meta: dict[str, Any] = {}
    if training is not None:
        meta = training.create_metadata()
        tags |= set(meta.pop("tags", None) or [])
    meta = {
        **({"base_model": base_model, "base_model_relation": "adapter"} if base_model else {}),
        "library_name": "peft",
        **{k: v for k, v in meta.items() if k not in ("library_name", "base_model")},
        "tags": sorted(tags),
    }
    task = next((PIPELINE_TAGS[c.task_type] for c in configs.values() if c.task_type in PIPELINE_TAGS), None)
    if task:
        meta["pipeline_tag"] = task
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local base model"
    dataset = getattr(training, "dataset", None)
    dataset = dataset[0] if isinstance(dataset, list) and len(dataset) == 1 else dataset
    lines = [f"# {model_name or 'LoRA adapter'}", "", f"A LoRA adapter for {base}, trained with peft-trainer"
             + (f" on {dataset}." if dataset else ".")]  # fmt: skip
    if training is not None and training.eval_results:
        lines += ["", "Results on the evaluation set:", ""]
        lines += [
            f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in training.eval_results.items()
        ]
    lines += ["", "## LoRA adapter(s)", "", *_lora_lines(configs)]
    if training is not None and training.hyperparameters:
        lines += ["", "## Training hyperparameters", ""]
        lines += [f"- {k}: {v}" for k, v in training.hyperparameters.items()]
    if training is not None and training.eval_lines:
        lines += ["", "## Training results", "", make_markdown_table(training.eval_lines).rstrip()]
    for title, text in (sections or {}).items():
        lines += ["", f"## {title}", "", text.strip()]
    lines += ["", "## Framework versions", "", f"- PEFT {PEFT_FORMAT_VERSION} (file format)"]
    if training is not None:
        import torch
        import transformers

        lines += [f"- Transformers {transformers.__version__}", f"- PyTorch {torch.__version__}"]
    return meta, "\n".join(lines) + "\n"


def write_card(directory: str | os.PathLike, meta: dict[str, Any], body: str) -> None:
    """Write README.md atomically: front matter keys already there are kept unless replaced (tags unioned)."""
    from .io import atomic_write

    old_meta, _ = read_card(directory)
    tags = sorted(set(old_meta.get("tags") or []) | set(meta.get("tags") or []))
    merged = {**old_meta, **{k: v for k, v in meta.items() if v is not None}, "tags": tags}
    text = "---\n" + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True) + "---\n\n" + body
    path = Path(directory) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
