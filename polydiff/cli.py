"""The ``polydiff`` command: ``train`` (Hydra recipes), ``reflow`` and ``distill`` (a new run learning from a trained
one), ``sample`` (from a run directory), ``eval`` (score sample files), ``report`` (a run's offline page), ``bench``;
each command's body lives in its own module (cli_train, cli_sample, report, bench)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cli_common import USAGE, fail
from .recipes import compose_recipe

__all__ = ["main", "compose_recipe"]


def _report(args: Sequence[str]) -> None:
    from .cli_common import USER_ERRORS, user_message
    from .report import main as report_main

    try:
        report_main(args)
    except USER_ERRORS as err:
        raise fail(user_message(err)) from err


def _bench(args: Sequence[str]) -> None:
    from .bench import main as bench_main

    bench_main(list(args))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``polydiff`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        # "module:Class" domains in recipes resolve from here, as with python -m; packages installed from a wheel come
        # first, so a folder of the user's own named domains/ or benchmarks/ does not hide polydiff's.
        sys.path.append(str(Path.cwd()))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    from .cli_sample import eval_command, sample_command
    from .cli_train import distill_command, reflow_command, train_command

    commands = {
        "train": train_command,
        "reflow": reflow_command,
        "distill": distill_command,
        "sample": sample_command,
        "eval": eval_command,
        "bench": _bench,
        "report": _report,
    }
    if command not in commands:
        raise fail(f"unknown command {command!r}; choose one of {sorted(commands)}")
    try:
        commands[command](rest)
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGUSR1: the trainer has saved what it could and says so
        message = err.args[0] if err.args else "interrupted"
        if not err.args and command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            message += (
                "; under torchrun the last periodic checkpoint (trainer.ckpt_every) holds the run: the same "
                "command resumes from it"
            )
        if not err.args or int(os.environ.get("RANK", "0")) == 0:  # DDP processes stop alike: rank 0 says so
            print(f"polydiff: {message}", file=sys.stderr)
        # 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), as a shell reports it: a scheduler sees an unfinished run.
        raise SystemExit(128 + getattr(err, "signum", 2)) from None


if __name__ == "__main__":
    main()
