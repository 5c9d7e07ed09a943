"""Run every 2-process script the tests launch N times in a row and count the runs that abort at exit.

python tests/scripts/count_aborts.py [--runs 40] [--only ddp-cli,zero3-resume,...]

An abort is a run whose output says "terminate called" or whose launcher reports a rank killed by SIGABRT; any other
failure is counted apart (and printed), since it is a different bug. The killed-and-resumed kinds run the killed
half (SIGKILL after checkpoint-3) then the resume, and count the resume, the run that has to exit cleanly.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from peft_trainer import models  # noqa: E402
from peft_trainer.distributed import CPU_FSDP_ENV  # noqa: E402
from tests import processes  # noqa: E402
from tests.space_helpers import free_port  # noqa: E402
from tests.test_distributed import KILLED_CLI, ROOT, TRAINING, cpu_env, launcher, write_recipe  # noqa: E402

CLI_KINDS = {"ddp-cli": "ddp.yaml", "fsdp2-cli": "fsdp2.yaml", "zero2-cli": "deepspeed-zero2.yaml",
             "zero3-cli": "deepspeed-zero3.yaml"}  # fmt: skip
RESUME_KINDS = {"ddp-resume": "ddp.yaml", "fsdp2-resume": "fsdp2.yaml", "zero3-resume": "deepspeed-zero3.yaml"}
KINDS = ["ddp-tiny", *CLI_KINDS, *RESUME_KINDS]


def aborted(result) -> bool:
    log = result.stdout + result.stderr
    return "terminate called" in log or "Signal 6 (SIGABRT)" in log or result.returncode in (-6, 134)


def run_once(kind: str, folder: Path, env: dict, out: Path):
    """One run of ``kind`` into ``out``; returns the completed process that must have exited cleanly."""
    if kind == "ddp-tiny":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), str(ROOT / "tests" / "scripts" / "ddp_tiny.py"), str(out)]  # fmt: skip
        return processes.run(command, cwd=ROOT, env=env)
    config = CLI_KINDS.get(kind) or RESUME_KINDS[kind]
    env = {**env, **cpu_env(config)}
    train = ["train", str(folder / "recipe.yaml"), "--output_dir", str(out)]
    if kind in CLI_KINDS:
        return processes.run([*launcher(config), *train], cwd=ROOT, env=env)
    killed = processes.run([*launcher(config, KILLED_CLI, "3"), *train, *TRAINING], cwd=ROOT, env=env)
    if "SIGKILL" not in killed.stdout + killed.stderr:
        return killed  # the killed half went wrong: reported as a failure
    resume = ("--resume_from_checkpoint", str(out / "checkpoint-3"))
    return processes.run([*launcher(config), *train, *TRAINING, *resume], cwd=ROOT, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--only", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    opts = parser.parse_args()
    kinds = opts.only.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_recipe(folder)  # the recipe and rows the distributed tests train on
        env = {**os.environ, models.CACHE_ENV: str(folder / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        for name in (CPU_FSDP_ENV, "ACCELERATE_USE_CPU"):
            env.pop(name, None)
        for kind in kinds:
            counts, began = {"clean": 0, "aborted": 0, "failed": 0}, time.monotonic()
            for n in range(opts.runs):
                result = run_once(kind, folder, env, folder / f"{kind}-{n}")
                verdict = "aborted" if aborted(result) else "clean" if result.returncode == 0 else "failed"
                counts[verdict] += 1
                if verdict != "clean":
                    print(f"{kind} run {n}: {verdict} (exit {result.returncode})\n{result.stderr[-2000:]}", flush=True)
            took = time.monotonic() - began
            print(f"{kind}: {opts.runs} runs, {counts['aborted']} aborted, {counts['failed']} failed otherwise "
                  f"({took / opts.runs:.1f} s a run)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
