"""Recipes: flat YAML of ModelArguments + DataArguments + PeftTrainingArguments + BehaviourArguments fields, parsed
(with ``--field value`` overrides) into one :class:`Recipe`; the recipes shipped in ``peft_trainer/recipes/``."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import UsageError

if TYPE_CHECKING:
    from transformers import HfArgumentParser

    from .arguments import DataArguments, ModelArguments, PeftTrainingArguments
    from .behaviour import BehaviourArguments

DEFAULT_MODEL = "smollm2-135m-instruct"
# Recipe fields holding data paths: a relative path is looked up next to the recipe file first.
PATH_FIELDS = ("dataset", "eval_dataset", "behaviour_prompts")
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # shipped with the package


def find_recipe(name: str | os.PathLike[str]) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (``quickstart-pirate``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (path if path.suffix in (".yaml", ".yml") else path.with_suffix(".yaml"))
    if not path.is_absolute() and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(str(name), names, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UsageError(f"{name}: no such recipe file ({hint}shipped recipes: {', '.join(names)})")


@dataclass
class Recipe:
    """A parsed recipe: one instance of each argument dataclass, plus where it came from."""

    model: ModelArguments
    data: DataArguments
    training: PeftTrainingArguments
    behaviour: BehaviourArguments
    path: str | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return self.model.model_name_or_path or DEFAULT_MODEL


def _parser_class() -> type[HfArgumentParser]:
    from transformers import HfArgumentParser

    class RecipeParser(HfArgumentParser):
        """HfArgumentParser whose errors raise UsageError (no 300-option usage dump, no SystemExit)."""

        def error(self, message: str) -> None:  # type: ignore[override]
            raise UsageError(f"{self.prog}: {message}")

    return RecipeParser


def recipe_parser(prog: str = "peft-trainer train") -> HfArgumentParser:
    """The parser of every recipe field (also the ``--field value`` command-line overrides)."""
    from .arguments import DataArguments, ModelArguments, PeftTrainingArguments
    from .behaviour import BehaviourArguments

    return _parser_class()(
        (ModelArguments, DataArguments, PeftTrainingArguments, BehaviourArguments),
        prog=prog,
        allow_abbrev=False,  # --max_step is an unknown field, not silently --max_steps
        description=(
            "Train a LoRA/QLoRA adapter. RECIPE.yaml is a flat mapping of the fields below (or the name of a recipe "
            "shipped in peft_trainer/recipes, e.g. quickstart-pirate); --field value on the command line overrides "
            "the recipe. Relative data paths in a recipe are looked up next to the recipe file first. Bad recipes or "
            "data exit with code 2 and a message naming the problem."
        ),
    )


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe file as a flat dict; relative ``PATH_FIELDS`` that exist next to the recipe become such paths."""
    recipe = find_recipe(path)
    try:
        values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: invalid YAML ({e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: a recipe is a flat mapping of field: value, got {type(values).__name__}")
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise UsageError(f"{path}: recipes are flat; field(s) {', '.join(map(str, nested))} hold a mapping")
    for key in PATH_FIELDS:
        value = values.get(key)
        if isinstance(value, str) and not os.path.isabs(value):
            beside = recipe.parent / value
            if beside.exists():
                values[key] = str(beside)
    return values


def parse_recipe(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Recipe:
    """Parse a recipe file or shipped recipe name (or none) and ``--field value`` overrides into a :class:`Recipe`.

    Every problem (unknown keys with suggestions, each dataclass's validation, cross-field checks) is collected
    and raised as one :class:`UsageError`.
    """
    from .arguments import DataArguments, ModelArguments, PeftTrainingArguments
    from .behaviour import BehaviourArguments

    path = find_recipe(path) if path is not None else None
    parser = recipe_parser()
    values = read_recipe(path) if path is not None else {}
    known = {a.dest for a in parser._actions if a.dest != "help"}
    problems = []
    for key in values:
        if key not in known:
            close = " or ".join(repr(c) for c in difflib.get_close_matches(str(key), known, n=3))
            problems.append(f"unknown field {key!r}" + (f" (did you mean {close}?)" if close else ""))
    defaults = {"output_dir": f"outputs/{Path(path).stem}"} if path is not None else {}
    parser.set_defaults(**{**defaults, **{k: v for k, v in values.items() if k in known}})
    namespace, rest = parser.parse_known_args(list(overrides))
    if rest:
        flags = [a.removeprefix("--").partition("=")[0] for a in rest if a.startswith("--")]
        close = [c for f in flags for c in difflib.get_close_matches(f, known, n=1)]
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        problems.append(f"unknown command-line argument(s): {' '.join(rest)} (fields are written --name value{hint})")
    built: dict[type, Any] = {}
    for cls in (ModelArguments, DataArguments, PeftTrainingArguments, BehaviourArguments):
        kwargs = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}
        try:
            built[cls] = cls(**kwargs)
        except (ValueError, TypeError) as e:
            problems.append(str(e).replace("\n", "\n  "))
    problems += _cross_field_problems(namespace)
    if problems:
        where = f"{path}" if path is not None else "arguments"
        raise UsageError(f"invalid recipe {where}:\n  - " + "\n  - ".join(problems))
    return Recipe(
        built[ModelArguments], built[DataArguments], built[PeftTrainingArguments], built[BehaviourArguments],
        str(path) if path is not None else None, list(overrides),
    )  # fmt: skip


def _cross_field_problems(values: argparse.Namespace) -> list[str]:
    """Problems that involve fields of different dataclasses, checked on the raw values (so they are reported even
    when a dataclass itself failed to build)."""
    p = []
    if not values.dataset:
        p.append("dataset: name the training data (a local .jsonl/.json/.csv/.parquet file or a Hub dataset id)")
    evaluating = str(getattr(values.eval_strategy, "value", values.eval_strategy)).lower() != "no"
    if evaluating and not (values.eval_dataset or values.eval_ratio):
        p.append("eval_strategy is set but there is no eval data: set eval_ratio (e.g. 0.1) or eval_dataset")
    if values.task == "seq-cls" and values.packing:
        p.append("packing applies to causal-lm training, not task seq-cls: remove packing")
    return p
