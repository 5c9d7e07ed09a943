"""Command line `peft-trainer train|merge|push|space|quickstart`: argument parsing, printing and exit codes only (the
work is in pipeline.py, hub.py and the Space package); also the module that `accelerate launch -m` runs."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from .distributed import end_process_group
from .errors import CommandError, UsageError
from .pipeline import QUICKSTART_GLOB, QUICKSTART_ROOT, merge_adapters, run_training, setup_logging, train_quickstart
from .recipe import DEFAULT_MODEL, parse_recipe, recipe_parser

PROG = "peft-trainer"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
__all__ = ["COMMANDS", "CommandError", "UsageError", "main"]


# ---------------------------------------------------------------------------------------------------------------------
# train


def train_help(full: bool = False) -> str:
    """``train --help``: this project's fields (model, data, LoRA/QLoRA, behaviour) first, then the most used
    TrainingArguments fields; ``--help-all`` lists every TrainingArguments field too."""
    from dataclasses import fields

    from transformers import TrainingArguments

    from .arguments import DataArguments, ModelArguments, PeftTrainingArguments
    from .behaviour import BehaviourArguments

    parser = recipe_parser()
    by_dest: dict[str, list[argparse.Action]] = {}  # a boolean field has two flags: --x and --no_x
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
    trainer_fields = {f.name for f in fields(TrainingArguments)}
    ours = [f.name for f in fields(PeftTrainingArguments) if f.name not in trainer_fields]
    groups = [
        ("model", [f.name for f in fields(ModelArguments)]),
        ("data", [f.name for f in fields(DataArguments)]),
        ("LoRA / QLoRA (PeftTrainingArguments)", ours),
        ("behaviour score", [f.name for f in fields(BehaviourArguments)]),
    ]
    others = [f.name for f in fields(TrainingArguments) if f.init and f.name in by_dest]
    shown = others if full else [n for n in COMMON_TRAINING_FIELDS if n in by_dest]
    title = "TrainingArguments" + (
        "" if full else f" (the most used {len(shown)} of {len(others)}: --help-all lists all)"
    )
    groups.append((title, shown))
    help_parser = argparse.ArgumentParser(
        prog=parser.prog, usage=f"{PROG} train [RECIPE.yaml | shipped recipe name] [--field value ...]",
        description=parser.description, add_help=False,
    )  # fmt: skip
    for name, dests in groups:
        group = help_parser.add_argument_group(name)
        for dest in dests:
            for action in by_dest.get(dest, []):
                if action.option_strings[0].startswith("--no_"):  # argparse gave it the positive flag's help
                    action.help = f"Turn --{dest} off (it is on by default)."
                group._add_action(action)
    by_dest["resume_from_checkpoint"][0].help = (
        "Resume from this checkpoint folder, or 'true' for the newest complete checkpoint in output_dir: adapters, "
        "optimizer, scheduler, RNG states and data order, so the run continues exactly."
    )
    return help_parser.format_help()


COMMON_TRAINING_FIELDS = (
    "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps",
    "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit",
    "load_best_model_at_end", "metric_for_best_model", "seed", "bf16", "fp16", "activation_checkpointing",
    "optim", "report_to", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
)  # fmt: skip


def _split_recipe(args: Sequence[str]) -> tuple[str | None, list[str]]:
    if args and not args[0].startswith("-"):
        return args[0], list(args[1:])
    return None, list(args)


def cmd_train(args: Sequence[str]) -> int:
    if any(a in ("-h", "--help", "--help-all") for a in args):
        print(train_help(full="--help-all" in args))
        return EXIT_OK
    path, overrides = _split_recipe(args)
    run_training(parse_recipe(path, overrides))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# merge


def cmd_merge(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} merge",
        description=(
            "Without --weights: merge the adapter(s) into the base model and write a full model folder (weights, "
            "config, tokenizer) that loads without peft. With --weights: combine the adapters with "
            "add_weighted_adapter into one new adapter folder (PEFT format)."
        ),
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folder(s) or Hub repo id(s)")
    parser.add_argument("-o", "--output", required=True, help="folder to write (must be empty or new)")
    parser.add_argument("--base", help="base model: embedded name, folder or Hub id (default: the adapter's base)")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per adapter: write a combined adapter")
    parser.add_argument(
        "--combination-type", default="svd",
        help="add_weighted_adapter combination: svd, linear, cat, ties, dare_linear, ... (default svd)",
    )  # fmt: skip
    parser.add_argument("--svd-rank", type=int, help="rank of the combined adapter (svd family)")
    parser.add_argument("--density", type=float, help="kept fraction for ties/dare/magnitude_prune")
    parser.add_argument("--safe-merge", action="store_true", help="check merged weights are finite first")
    parser.add_argument("--dtype", help="save the merged model in this dtype (float32, bfloat16, float16)")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    opts = parser.parse_args(args)
    setup_logging()
    written = merge_adapters(
        opts.adapters, opts.output, opts.base, opts.weights, opts.combination_type, opts.svd_rank, opts.density,
        opts.safe_merge, opts.dtype, opts.overwrite,
    )  # fmt: skip
    print(f"{PROG}: {written}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# push


def cmd_push(args: Sequence[str]) -> int:
    from .hub import files_to_push, push_folder

    parser = argparse.ArgumentParser(
        prog=f"{PROG} push",
        description=(
            "Upload an existing output folder to the Hub: adapter files, README.md model card, tokenizer files, "
            "trainer_state.json and TensorBoard runs/ only (no base weights, checkpoints, optimizer state or "
            "training_args.bin). The local folder is never modified; on failure the cause is printed and the exit "
            "code is 1."
        ),
    )
    parser.add_argument("folders", nargs="+", metavar="folder", help="output folder(s) of training runs")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", help="target repository, 'owner/name' or 'name' (one folder)")
    target.add_argument("--namespace", help="push each folder to NAMESPACE/<folder name> (e.g. your user name)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repositories as private")
    parser.add_argument("--revision", help="branch to push to")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be pushed and stop")
    opts = parser.parse_args(args)
    if opts.repo_id and len(opts.folders) > 1:
        parser.error("--repo-id takes one folder; for several, use --namespace (each goes to NAMESPACE/<folder name>)")
    names = {f: Path(f).resolve().name for f in opts.folders}
    targets = {f: opts.repo_id or f"{opts.namespace.strip('/')}/{name}" for f, name in names.items()}
    setup_logging()
    for folder, repo_id in targets.items():
        if opts.dry_run:
            print(f"{folder} -> {repo_id}:", *files_to_push(folder), sep="\n  ")
            continue
        commit = push_folder(folder, repo_id, opts.token, opts.private, opts.revision, opts.commit_message)
        print(f"{PROG}: pushed {folder} to {getattr(commit, 'commit_url', None) or repo_id}")
    if opts.namespace and not opts.dry_run:  # what a Space serving them needs (README: "Deploy the Space")
        print("ADAPTERS=" + ",".join(f"{names[f]}={r}" for f, r in targets.items()))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# space


def launch_space(
    base_model: str | None = None, adapters: list[str] | None = None, host: str | None = None, port: int | None = None
) -> None:
    """``peft_trainer_space.launch`` (the Gradio Space), with a clear error when the Space or gradio is not installed."""
    try:
        import peft_trainer_space as space
    except ImportError as e:
        raise UsageError(f"the Space cannot be imported ({e}): install it with pip install -e '.[space]'") from e
    try:
        space.launch(base_model=base_model, adapters=adapters, host=host, port=port)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "gradio":
            raise UsageError("gradio is not installed: pip install -e '.[space]'") from e
        raise


def _space_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: GRADIO_SERVER_PORT or 7860)")


def cmd_space(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} space",
        description="Start the Gradio Space: one base model, many adapters (see peft_trainer_space/__init__.py for settings).",
    )
    parser.add_argument(
        "--base-model", help=f"embedded name, folder or Hub id (default: BASE_MODEL or {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--adapter", action="append", dest="adapters", metavar="[NAME=]SOURCE",
        help=f"adapter folder or Hub repo id, repeatable (default: ADAPTERS or every {QUICKSTART_ROOT}/*/)",
    )  # fmt: skip
    _space_options(parser)
    opts = parser.parse_args(args)
    launch_space(opts.base_model, opts.adapters, opts.host, opts.port)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# quickstart


def cmd_quickstart(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} quickstart",
        description=(
            f"Train the quickstart adapters (peft_trainer/recipes/{QUICKSTART_GLOB}) on the embedded SmolLM2-135M-Instruct, print "
            "each behaviour score before and after training, then start the Space with them. Adapters already "
            "trained from the same recipe are reused. Any recipe field can be overridden for all recipes with "
            "--field value (e.g. --max_steps 3 --model_name_or_path tiny-llama)."
        ),
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        metavar="RECIPE",
        help=f"recipe files (default: the shipped peft_trainer/recipes/{QUICKSTART_GLOB})",
    )
    parser.add_argument(
        "--output-root", default=QUICKSTART_ROOT, help=f"adapters go to ROOT/<name> ({QUICKSTART_ROOT})"
    )
    parser.add_argument("--retrain", action="store_true", help="train again even if an adapter exists")
    parser.add_argument("--no-space", action="store_true", help="train only; do not start the Space")
    _space_options(parser)
    opts, overrides = parser.parse_known_args(args)
    setup_logging()
    rows = train_quickstart(opts.recipes, opts.output_root, overrides, opts.retrain)
    bases = sorted({row.base_model for row in rows})
    print(f"\n{PROG}: quickstart adapters ({', '.join(bases)})")
    print(f"  {'adapter':<12} {'before':>8} {'after':>8} {'train s':>8}")
    for row in rows:
        pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731  (as the training log prints it)
        seconds = "-" if row.train_seconds is None else f"{row.train_seconds:.0f}"
        print(f"  {row.name:<12} {pct(row.before):>8} {pct(row.after):>8} {seconds:>8}")
    if opts.no_space:
        return EXIT_OK
    if len(bases) != 1:
        raise UsageError(f"the quickstart recipes use different base models ({', '.join(bases)})")
    adapters = [f"{row.name}={row.folder}" for row in rows]
    print(f"{PROG}: starting the Space with {', '.join(adapters)}", flush=True)
    launch_space(base_model=bases[0], adapters=adapters, host=opts.host, port=opts.port)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# main

COMMANDS = {
    "train": (cmd_train, "train an adapter from a YAML recipe (+ --field value overrides)"),
    "merge": (cmd_merge, "merge adapter(s) into the base model, or combine them into a new adapter"),
    "push": (cmd_push, "upload an output folder's adapter, card and tokenizer files to the Hub"),
    "space": (cmd_space, "start the Gradio Space with a base model and adapters"),
    "quickstart": (cmd_quickstart, "train the quickstart adapters on the embedded SmolLM2, then start the Space"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA/QLoRA fine-tuning on the Hugging Face Trainer. Also runs under "
        "`accelerate launch [--config_file peft_trainer/recipes/accelerate/X.yaml] -m peft_trainer.cli train RECIPE.yaml`.",
        epilog=f"`{PROG} COMMAND --help` describes each command. Exit codes: 0 ok, 1 failure, 2 bad input.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-trainer`` console script and of ``python -m peft_trainer.cli``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        _top_parser().print_help()
        return EXIT_OK if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"{PROG}: error: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        code = COMMANDS[command][0](rest)
        end_process_group()  # every rank got here: no collective is left in flight at exit
        return code
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
