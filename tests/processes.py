"""Subprocesses and waits bounded by progress (new output, a growing log), never by a guess of how long work takes.

A cold or busy machine only makes work slower; a hang makes no progress at all. So every wait here restarts its clock
whenever something moves, and gives up only after ``HANG_S`` seconds of stillness (pytest-timeout stays the last net).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

HANG_S = float(os.environ.get("PEFT_TRAINER_TEST_HANG_S", "300"))  # this long without progress is a hang


class Stalled(AssertionError):
    """Nothing moved for ``HANG_S`` seconds."""


def run(
    command: list[str], *, quiet_limit: float = HANG_S, check: bool = False, **popen
) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)``, killed (the whole process group) only when it
    prints nothing for ``quiet_limit`` seconds; then ``Stalled`` is raised with the tail of what it printed."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True, **popen)  # fmt: skip
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    last = [time.monotonic()]

    def pump(stream, into: list[str]) -> None:
        for line in iter(stream.readline, ""):
            into.append(line)
            last[0] = time.monotonic()

    readers = [threading.Thread(target=pump, args=(s, chunks[k]), daemon=True)
               for s, k in ((proc.stdout, "out"), (proc.stderr, "err"))]  # fmt: skip
    for reader in readers:
        reader.start()
    while proc.poll() is None:
        if time.monotonic() - last[0] > quiet_limit:
            _kill_group(proc)
            tail = "".join(chunks["out"][-40:] + chunks["err"][-40:])
            raise Stalled(f"{command[:4]}... printed nothing for {quiet_limit:.0f} s (a hang); killed. Tail:\n{tail}")
        time.sleep(0.2)
    for reader in readers:
        reader.join()
    result = subprocess.CompletedProcess(command, proc.returncode, "".join(chunks["out"]), "".join(chunks["err"]))
    if check:
        result.check_returncode()
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for(condition: Callable[[], object], progress: Callable[[], object], *, what: str,
             quiet_limit: float = HANG_S, poll: float = 0.05):  # fmt: skip
    """Poll ``condition`` until it returns something truthy (returned); fail only after ``progress()`` (a log's size,
    a step count) has stayed the same for ``quiet_limit`` seconds."""
    seen, since = progress(), time.monotonic()
    while not (value := condition()):
        now_seen = progress()
        if now_seen != seen:
            seen, since = now_seen, time.monotonic()
        elif time.monotonic() - since > quiet_limit:
            raise Stalled(f"no progress for {quiet_limit:.0f} s while waiting for {what}")
        time.sleep(poll)
    return value


def tree_of(folder: Path) -> list[str]:
    """The paths under a folder that a running process is writing, as progress for ``wait_for``; what is renamed or
    removed while it is read (a checkpoint moving into place) is simply not listed."""
    found = []
    for root, dirs, files in os.walk(folder):  # os.walk skips a folder that vanished before it was read
        found += [os.path.relpath(os.path.join(root, name), folder) for name in (*dirs, *files)]
    return sorted(found)


def size_of(path: Path) -> int:
    """A file's size, 0 while it does not exist: progress for ``wait_for``."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
