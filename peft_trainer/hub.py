"""The Hub: what an adapter folder may upload (allow-lists), pushing a folder, and errors that say what went wrong."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .card import CARD_NAME
from .errors import CommandError, UsageError
from .folders import ADAPTER_FILES, CONFIG_NAME

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-"  # PeftTrainer writes tmp-checkpoint-N/ and renames it once complete
TOKENIZER_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.*", "preprocessor_config.json", "processor_config.json",
)  # fmt: skip
# What may reach the Hub from an output folder: adapter files (root and one subfolder deep), the model card,
# tokenizer/processor files, the loss history (trainer_state.json, which the Space plots). Never base weights,
# checkpoints, optimizer state or training_args.bin.
ALLOW_PATTERNS = [
    CARD_NAME,
    *ADAPTER_FILES,
    *[f"*/{f}" for f in ADAPTER_FILES],
    *TOKENIZER_FILES,
    "trainer_state.json",
    "runs/*",  # TensorBoard logs (report_to="tensorboard"): the Hub's metrics tab reads them
]
IGNORE_PATTERNS = ["_*", f"{PREFIX_CHECKPOINT_DIR}-*", f"{STAGING_PREFIX}*"]


def files_to_push(folder: str | os.PathLike[str]) -> list[str]:
    """The files of ``folder`` a push uploads: the filter ``upload_folder`` applies with :data:`ALLOW_PATTERNS`."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS  # what upload_folder adds to ignore_patterns

    root = Path(folder)
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    ignore = IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS
    return list(filter_repo_objects(found, allow_patterns=ALLOW_PATTERNS, ignore_patterns=ignore))


def describe_error(error: BaseException, repo_id: str | None) -> str:
    """What a failed Hub call means for the user: refused token, missing rights, unknown repo, unreachable Hub."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(error, "response", None), "status_code", None)
    detail = " ".join(str(error).split())
    repo = repo_id or "the repository"
    if isinstance(error, HfHubHTTPError) and status is not None:
        hint = {
            401: "the token was refused: check HF_TOKEN or --token",
            403: f"the token may not write to {repo}: use a write token for that namespace",
            404: f"repository or namespace of {repo} not found",
        }.get(status, "the Hub answered with an error")
        return f"HTTP {status}: {hint} ({detail})"
    if isinstance(error, OSError) or type(error).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
        from huggingface_hub import constants

        return f"cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {detail})"
    return f"{type(error).__name__}: {detail}"


def push_folder(
    folder: str | os.PathLike[str], repo_id: str, token: str | None = None, private: bool | None = None,
    revision: str | None = None, message: str | None = None,
) -> Any:  # fmt: skip
    """Create ``repo_id`` if needed and upload the allow-listed files of an adapter folder in one commit.

    Local files are only read. Raises UsageError for a folder that is not an adapter folder, CommandError (with the
    cause: refused token, missing rights, unreachable Hub) when the Hub fails. Returns the commit info.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{folder}: no such folder")
    files = files_to_push(root)
    if not any(f.count("/") <= 1 and f.endswith(CONFIG_NAME) for f in files):
        raise UsageError(f"{folder}: no {CONFIG_NAME}: not an adapter output folder")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    logger.info("pushing %d file(s) from %s to %s: %s", len(files), folder, repo_id, ", ".join(files))
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo.repo_id, folder_path=str(root), allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS, commit_message=message or f"Upload adapter from {root.name}",
            revision=revision,
        )  # fmt: skip
    except Exception as e:  # the Hub's and the network's errors alike; nothing local was changed
        raise CommandError(
            f"push of {folder} to {repo_id} failed: {describe_error(e, repo_id)}. The local files in {folder} are intact."
        ) from e
