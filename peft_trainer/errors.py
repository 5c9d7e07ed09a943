"""The project's exceptions: their message is the whole story, so the CLI prints it without a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PeftTrainerError(Exception):
    """Base class: a failure whose message names the problem and the fix."""


class UsageError(PeftTrainerError, ValueError):
    """Bad input (recipe, arguments, data, model name): the CLI exits with code 2."""


class CommandError(PeftTrainerError, RuntimeError):
    """An operation that failed for an outside reason (e.g. the Hub refused a push): the CLI exits with code 1."""


@contextlib.contextmanager
def as_usage_error(what: str = "") -> Iterator[None]:
    """Turn the errors that bad input raises (ValueError, missing files, unreachable Hub ids) into UsageError,
    prefixed with ``what`` unless the message already says it. Other exceptions pass unchanged (with traceback)."""
    try:
        yield
    except PeftTrainerError:
        raise
    except (ValueError, OSError, ImportError) as e:  # OSError covers FileNotFoundError and ConnectionError
        message = str(e) or type(e).__name__
        raise UsageError(f"{what}{message}" if what and what not in message else message) from e
