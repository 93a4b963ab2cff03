"""Stop signals: Ctrl-C, SIGTERM and SIGUSR1 end training after the step in progress, every process at the same step."""

from __future__ import annotations

import logging
import signal
import threading
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["StopSignals", "TrainingInterrupted", "STOP_SIGNALS", "STOP_POLL_EVERY", "ignore_stop_signals"]

log = logging.getLogger("polydiff")

# Signals that end training after the step in progress with a checkpoint: Ctrl-C, and what cluster schedulers send
# some time before their SIGKILL (SLURM at preemption or the time limit, Kubernetes; SLURM's --signal=USR1@SECONDS).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
# Under DDP the processes agree on a stop signal every this many steps (a 4-byte all-reduce over gloo, on the CPU):
# all stop at the same step, at most this many steps (the one in progress included) after the signal.
STOP_POLL_EVERY = 10


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or a scheduler's SIGTERM (or SIGUSR1) after a checkpoint of the last whole step."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)  # the signal that stopped it: the command line exits with 128 + signum

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        """Pickle with the signal (launchers such as submitit send a job's exception back pickled)."""
        return type(self), (self.args[0], self.signum)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers serve batches through Ctrl-C and a scheduler's SIGTERM, so the step in progress can finish.

    A terminal's Ctrl-C, SLURM and ``torchrun`` signal every process of the job, these workers too; one killed would
    fail the main process's step. They still end with it (they watch their parent) and on the loader's shutdown.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopSignals:
    """While entered, :data:`STOP_SIGNALS` are noted rather than raised; :meth:`agreed` says when to stop.

    A second Ctrl-C stops at once (Python's own ``KeyboardInterrupt``), a repeated SIGTERM does not. Under DDP every
    process stops at the same step, within :data:`STOP_POLL_EVERY` steps of the signal.
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        # Stop signals are agreed on over gloo on the CPU (no device sync), with the default timeout; every process
        # creates its groups in the same order, so this one is made once, here.
        self._group = dist.new_group(backend="gloo") if world_size > 1 else None
        self._received = 0  # the stop signal this process received (the highest number of several); 0: none
        self._agreed = 0  # the one every process stops on, once they agreed
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._received = self._agreed = 0
        # Python sets handlers on the main thread only: elsewhere the signals keep their handlers.
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._note) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        """Note a stop signal; training stops at the next step where :meth:`agreed` says so."""
        self._received = max(self._received, signum)
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.world_size > 1:
            log.warning(
                "%s (rank %d): every process stops with a checkpoint within %d steps", name, self.rank, STOP_POLL_EVERY
            )
        else:
            log.warning(
                "%s: stopping at the end of the step in progress with a checkpoint%s",
                name,
                " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
            )

    def agreed(self, step: int, final: bool = False) -> int:
        """The signal training stops on now, 0 for none: at once in one process; under DDP only where every process
        agrees, their signals being gathered every :data:`STOP_POLL_EVERY` steps and at the end of training (``final``),
        so that no step has a per-step collective."""
        if not self._agreed:
            if self.world_size == 1:
                self._agreed = self._received
            elif final or step % STOP_POLL_EVERY == 0:
                flag = torch.tensor([self._received], dtype=torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
                self._agreed = int(flag)
        return self._agreed
