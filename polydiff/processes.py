"""The processes of a run under ``torchrun``: each one's device and rank, the process groups, a figure averaged over
them, and the wait while rank 0 samples alone. One process without ``torchrun`` is the same with a world of one."""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .build import resolve_device

__all__ = ["Processes"]

log = logging.getLogger("polydiff")


class Processes:
    """This process's place among the run's (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), its training device and its
    CPU threads (``trainer.threads``)."""

    def __init__(self, device: str, threads: int = 0) -> None:
        if isinstance(threads, bool) or int(threads) != threads or threads < 0:
            raise ValueError(f"trainer.threads={threads!r} must be a whole number >= 0 (0: torch's default)")
        self._threads = torch.get_num_threads()  # restored by close(): the setting is the process's
        if threads:
            # One thread on a CPU shared with other jobs: two that wait on each other spend several times the CPU time.
            torch.set_num_threads(int(threads))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.device = self._device(device)
        # Rank 0 samples and scores alone (sample_every, the end of training) while the others wait at a barrier of
        # their own, longer than the training collectives' timeout would allow on a big evaluation.
        self._wait_group = dist.new_group(backend="gloo", timeout=timedelta(hours=2)) if self.world_size > 1 else None

    def _device(self, setting: str) -> torch.device:
        """``trainer.device`` (this process's GPU under ``torchrun``); the process group joined where there are
        several processes."""
        dev = resolve_device(setting)
        if setting == "auto" and dev.type == "cpu" and self.is_main:
            log.warning(
                "no GPU found: training on the CPU with trainer.device=auto. Shipped recipes' defaults are sized "
                "for one GPU; add profile=cpu for their few-minute CPU version (or trainer.device=cpu to silence this)"
            )
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # dense batches keep one shape: cuDNN picks its fastest convolutions
        if self.world_size > 1 and dev.type == "cuda":
            # Launchers that show each task one GPU still number LOCAL_RANK across the node.
            dev = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)  # code that asks for "cuda" (metric classifiers) lands here too
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")  # default timeouts: a hung rank fails
            atexit.register(_leave_process_group)
        return dev

    def mean(self, value: torch.Tensor) -> float:
        """A logged figure averaged over every process (each holds its own shard's)."""
        if self.world_size > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    def wait_for_rank_zero(self) -> None:
        """Every process waits here while rank 0 samples and scores (up to 2 hours; no-op in one process)."""
        if self._wait_group is not None:
            dist.barrier(group=self._wait_group)

    def close(self) -> None:
        """Leave this run's own process group; the process's thread count as it was. The default group stays for
        the process's next run (a distillation's next round) and is left when the process ends: made afresh, its
        rendezvous could read the last one's keys, still in ``torchrun``'s store, and hang."""
        torch.set_num_threads(self._threads)
        if self._wait_group is not None:
            dist.destroy_process_group(self._wait_group)
            self._wait_group = None


def _leave_process_group() -> None:
    """Leave the default process group at the process's end (torch warns of one left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()
