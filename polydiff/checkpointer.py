"""A run's checkpoints: what one holds (weights, optimizer, random streams, data position), writing and resuming."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

from .build import domain_class_path
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, keep_copy, remove_stale_temporaries
from .resume import IncompatibleCheckpointError
from .train_step import NonFiniteLossError

if TYPE_CHECKING:
    from .domain import Domain

__all__ = ["Checkpointer", "CheckpointWriteError", "DataPosition", "generator_seed", "rank_seed", "saved_device_type"]

log = logging.getLogger("polydiff")


class CheckpointWriteError(OSError):
    """``last.pt`` could not be written (a full disk, a read-only folder): the previous one is kept."""


def rank_seed(seed: int, rank: int) -> int:
    """The global random stream of process ``rank`` > 0 (dropout, augmentation): distinct from every other rank's."""
    return seed * 7919 + 15_485_863 * rank


def generator_seed(seed: int, rank: int, step: int = -1) -> int:
    """The seed of a process's training generator (noise, times, label dropout): at the start (``step`` -1), or
    after a resume whose saved stream does not fit this run's (``step``: the checkpoint's)."""
    return seed * 7919 + rank + 104_729 * (step + 1)


@dataclass
class DataPosition:
    """Where the data order stands: global batch number ``start`` at optimizer step ``step``."""

    global_batch: int  # trainer.batch_size x processes
    grad_accum: int  # global batches per optimizer step
    step: int = 0
    start: int = 0

    def at(self, step: int) -> int:
        """The number of global batches the data order has given out by ``step``."""
        return self.start + (step - self.step) * self.grad_accum

    def state(self, step: int) -> dict[str, int]:
        """A checkpoint's ``data`` entry at ``step``."""
        return {"position": self.at(step), "global_batch": self.global_batch}

    def restore(self, ckpt: Mapping[str, Any], path: Path, announce: bool = True) -> None:
        """Go on from the checkpoint's place in the data; with another global batch (batch size or number of
        processes) from the same point of the data, counted in samples."""
        step, saved_tc = int(ckpt["step"]), ckpt["config"]["trainer"]
        data = ckpt.get("data") or {  # older checkpoints: one global batch throughout, one generator per process
            "position": step * saved_tc.get("grad_accum", 1),
            "global_batch": saved_tc["batch_size"] * max(1, len(ckpt["rng"]["generators"])),
        }
        position, old = int(data["position"]), int(data["global_batch"])
        if old != self.global_batch:
            position = round(position * old / self.global_batch)
            if announce:
                log.warning(
                    "%s was trained with a global batch of %d (trainer.batch_size x processes), this run has "
                    "%d: the data order goes on from the same point of the data, not bit-identically",
                    path,
                    old,
                    self.global_batch,
                )
        self.step, self.start = step, position


def saved_device_type(ckpt: Mapping[str, Any], path: Path) -> str:
    """The kind of device (``cpu``, ``cuda``) whose generators a checkpoint's random streams are: ``rng.device_type``,
    or for a checkpoint written before that key, the device its ``trainer.device`` named."""
    stored = ckpt["rng"].get("device_type")
    if stored:
        return str(stored)
    named = str(ckpt["config"]["trainer"].get("device", "auto"))
    if named != "auto":
        return torch.device(named).type
    raise ValueError(
        f"checkpoint {path} has no rng.device_type (it predates the key) and its trainer.device is auto, so the kind "
        f"of device its random streams come from is unknown. Add it, naming the device it was trained on (cpu or "
        f'cuda), e.g.: python -c "import sys, torch; c = torch.load(sys.argv[1], weights_only=True); '
        f"c['rng']['device_type'] = sys.argv[2]; torch.save(c, sys.argv[1])\" {path} cuda"
    )


def _random_streams(generator: torch.Generator, device: torch.device, world_size: int) -> list[Any]:
    """Every process's (training generator, CUDA, torch) random states, gathered on every process."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None  # dropout's stream on a GPU
    streams = [(generator.get_state().cpu(), cuda, torch.get_rng_state())]
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, streams[0])
        streams = gathered
    return streams


class Checkpointer:
    """A run's ``checkpoints/last.pt``, replaced atomically, with a ``step_NNNNNNN.pt`` copy every
    ``trainer.keep_every`` steps; every process calls :meth:`save` and :meth:`restore`, rank 0 alone writes."""

    def __init__(
        self,
        run_dir: Path,
        cfg: Mapping[str, Any],
        device: torch.device,
        data: DataPosition,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "checkpoints" / "last.pt"
        self.cfg, self.device, self.data = cfg, device, data
        self.rank, self.world_size = rank, world_size
        self.saved_step: int | None = None  # the step last.pt holds: never written twice

    def remove_stale_temporaries(self) -> None:
        """Remove the temporary files of writes killed mid-way (each as large as a checkpoint); rank 0's job."""
        removed = remove_stale_temporaries(self.path.parent)
        if removed:
            log.info(
                "removed %d stale temporary checkpoint file(s) left by a killed write: %s",
                len(removed),
                ", ".join(str(p) for p in removed),
            )

    def kept(self) -> str:
        """What a failure leaves of this run: the last checkpoint written, or that there is none yet."""
        if self.path.is_file() and self.saved_step is not None:
            return f"the last good checkpoint {self.path} (step {self.saved_step}) is kept"
        if self.path.is_file():
            return f"{self.path} is kept"
        return f"no checkpoint was written yet (the first at step {self.cfg['trainer']['ckpt_every']})"

    def save(
        self,
        step: int,
        *,
        domain: Domain,
        net: nn.Module,
        ema: AveragedModel,
        opt: Optimizer,
        sched: LRScheduler,
        generator: torch.Generator,
    ) -> None:
        """Write ``last.pt`` atomically (once per step); a non-finite weight or a failed write never replaces a
        good checkpoint."""
        if self.saved_step == step:
            return  # e.g. the final save when max_steps is a multiple of ckpt_every
        for name, p in net.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise NonFiniteLossError(f"parameter {name!r} is not finite at step {step}; {self.kept()}")
        streams = _random_streams(generator, self.device, self.world_size)
        if self.rank != 0:
            self.saved_step = step  # as rank 0 does: every rank must skip (or gather) alike
            return
        target, keep_every = self.path, self.cfg["trainer"]["keep_every"]
        try:
            atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "config": self.cfg,
                    "domain_state": domain.state_dict(),
                    "domain_class": domain_class_path(domain),
                    "model": net.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "lr_scheduler": sched.state_dict(),  # rebuilt from the recipe on resume; kept for older readers
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "device_type": self.device.type,
                        "generators": [g for g, _, _ in streams],
                        "cuda": [c for _, c, _ in streams if c is not None],
                        "torch_ranks": [r for _, _, r in streams],
                    },
                    "data": self.data.state(step),
                    "torch_version": str(torch.__version__),
                },
                self.path,
            )
            self.saved_step = step
            if keep_every > 0 and step % keep_every == 0:
                target = self.path.with_name(f"step_{step:07d}.pt")
                keep_copy(self.path, target)
            log.info(
                "step %d: checkpoint %s%s", step, self.path, f" (kept as {target.name})" if target != self.path else ""
            )
        except OSError as err:
            kept = (
                f"{self.path} still holds the last checkpoint written"
                if self.path.is_file()
                else "no checkpoint was written yet"
            )
            raise CheckpointWriteError(
                err.errno,
                f"could not write the checkpoint of step {step} to {target} "
                f"({err.strerror or err}); {kept}. Free disk space (or make the folder writable) and run the same "
                f"command again with hydra.run.dir={self.run_dir} to resume",
            ) from err

    def restore(
        self,
        ckpt: Mapping[str, Any],
        path: Path,
        *,
        domain: Domain,
        net: nn.Module,
        ema: AveragedModel,
        opt: Optimizer,
        generator: torch.Generator,
    ) -> int:
        """Load a checkpoint (checked by :func:`polydiff.resume.check_resumable`): weights, EMA, optimizer, domain
        state, data position and random streams; returns its step. The learning-rate schedule is the recipe's at
        that step (:func:`polydiff.train_step.lr_schedule`)."""
        try:
            net.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()
            raise IncompatibleCheckpointError(
                f"checkpoint {path} holds a network that this recipe builds differently ({' '.join(first[:3])}): "
                f"a domain setting that shapes the network (classes, channels) differs from the run's. Use the "
                f"run's settings, another hydra.run.dir, or trainer.resume=never to start afresh"
            ) from err
        domain.load_state_dict(ckpt["domain_state"])
        step = int(ckpt["step"])
        if Path(path) == self.path:
            self.saved_step = step
        self.data.restore(ckpt, path, announce=self.rank == 0)
        self._restore_random_streams(ckpt, path, generator)
        return step

    def _restore_random_streams(self, ckpt: Mapping[str, Any], path: Path, generator: torch.Generator) -> None:
        """The run's random streams, where the checkpoint's come from the same kind of device and this rank."""
        rng, step, seed, rank = ckpt["rng"], int(ckpt["step"]), self.cfg["seed"], self.rank
        ranks = rng.get("torch_ranks") or []
        if rank < len(ranks):
            torch.set_rng_state(ranks[rank].cpu())
        elif rank == 0:
            torch.set_rng_state(rng["torch"].cpu())
        else:  # an older checkpoint holds rank 0's stream only: draw apart from it
            torch.manual_seed(rank_seed(seed, rank) + 104_729 * (step + 1))
        gen, cuda = rng["generators"], rng.get("cuda") or []
        saved = saved_device_type(ckpt, path)
        if saved == self.device.type and rank < len(gen):
            generator.set_state(gen[rank].cpu())
            if self.device.type == "cuda" and rank < len(cuda):
                torch.cuda.set_rng_state(cuda[rank].cpu(), self.device)
        else:  # a CPU generator's state does not fit a CUDA one (and back): continue on a fresh, distinct stream
            generator.manual_seed(generator_seed(seed, rank, step))
            if rank == 0:
                log.warning(
                    "%s was trained on %s, this run is on %s: training continues with new random streams, so "
                    "it is not bit-identical to an uninterrupted run",
                    path,
                    saved,
                    self.device.type,
                )
