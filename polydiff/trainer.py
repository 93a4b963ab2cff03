"""The domain-agnostic trainer: AdamW, warm-up, clipping, EMA, bf16, compile, DDP, checkpoints.

Launched by ``polydiff train`` (or :func:`train` from Python). Under ``torchrun`` it runs
DistributedDataParallel over the launched processes (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
import signal
import threading
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from .build import Parts, build_schedule, domain_class_path, resolve_device, to_plain
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, check_loadable, keep_copy, load_checkpoint
from .config import check_keys, check_trainer
from .conditioning import drop_condition
from .data import ResumableBatchSampler
from .resume import IncompatibleCheckpointError, check_resumable, resume_source
from .generate import check_sampler, generate

__all__ = ["Trainer", "train", "NonFiniteLossError", "CheckpointWriteError", "TrainingInterrupted"]

log = logging.getLogger("polydiff")

# Signals that end training after the step in progress with a checkpoint: Ctrl-C, and what cluster schedulers send
# some time before their SIGKILL (SLURM at preemption or the time limit, Kubernetes; SLURM's --signal=USR1@SECONDS).
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
# Under DDP the processes agree on a stop signal every this many steps (a 4-byte all-reduce over gloo, on the CPU):
# all stop at the same step, at most this many steps (the one in progress included) after the signal.
STOP_POLL_EVERY = 10


def _record_step(line: str, path: Path) -> tuple[float, str]:
    """The step and kind of one metrics.jsonl record; a torn line (a kill mid-write) counts as past every step."""
    try:
        record = json.loads(line)
        return float(record.get("step", 0)), str(record.get("kind", ""))
    except (ValueError, AttributeError):
        log.warning("%s: dropped a line that is not a JSON record (a kill during a write?): %r", path, line[:80])
        return math.inf, ""


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers serve batches through Ctrl-C and a scheduler's SIGTERM, so the step in progress can finish.

    A terminal's Ctrl-C, SLURM and ``torchrun`` signal every process of the job, these workers too; one killed would
    fail the main process's step. They still end with it (they watch their parent) and on the loader's shutdown.
    """
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@torch.no_grad()
def _update_ema(ema: AveragedModel, net: nn.Module) -> None:
    """``ema.update_parameters(net)`` without its per-step host-to-device copy of ``n_averaged``.

    AveragedModel hands ``n_averaged.to(device)`` to its multi_avg_fn, a blocking copy that waits for the
    GPU every step, although the EMA function ignores it; the update itself is the same foreach lerp.
    """
    if ema.multi_avg_fn is None or not ema.use_buffers or int(ema.n_averaged) == 0:  # n_averaged lives on the CPU
        ema.update_parameters(net)  # the first call copies the weights
        return
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for p_ema, p in zip(itertools.chain(ema.module.parameters(), ema.module.buffers()),
                        itertools.chain(net.parameters(), net.buffers())):
        mine, theirs = groups.setdefault((p_ema.device, p_ema.dtype), ([], []))
        mine.append(p_ema.detach())
        theirs.append(p.detach().to(p_ema.device))  # a no-op where both share a device, as here
    for mine, theirs in groups.values():
        ema.multi_avg_fn(mine, theirs, None)
    ema.n_averaged += 1


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or a scheduler's SIGTERM (or SIGUSR1) after a checkpoint of the last whole step."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)  # the signal that stopped it: the command line exits with 128 + signum

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        """Pickle with the signal (launchers such as submitit send a job's exception back pickled)."""
        return type(self), (self.args[0], self.signum)


class NonFiniteLossError(FloatingPointError):
    """A NaN or Inf loss or gradient: training stops before anything is saved."""


class CheckpointWriteError(OSError):
    """``last.pt`` could not be written (a full disk, a read-only folder): the previous one is kept."""


def _lr_lambda(warmup: int, max_steps: int, decay: str) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warm-up, then constant or cosine decay (``decay`` as checked
    by :func:`polydiff.config.check_trainer`)."""

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if decay == "cosine":
            progress = min(1.0, step / max(1, max_steps))
            return w * 0.5 * (1 + math.cos(math.pi * progress))
        return w

    return f


def _plain_metrics(metrics: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """``Domain.evaluate``'s figures as JSON values (one-element tensors and numpy scalars become numbers); a metric
    named like a field of the log record (``step``, ``kind``, ...) is logged as ``metric_NAME``."""
    plain = {}
    for key, value in metrics.items():
        if (isinstance(value, torch.Tensor) and value.numel() == 1) or isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (int, float, str, bool, type(None))):
            raise TypeError(f"Domain.evaluate returned {key!r}={value!r} ({type(value).__name__}): metrics must be "
                            f"numbers (float(v)) or strings")
        plain[f"metric_{key}" if key in record else key] = value
    return plain


def _rank_seed(seed: int, rank: int) -> int:
    """The global random stream of process ``rank`` > 0 (dropout, augmentation): distinct from every other rank's."""
    return seed * 7919 + 15_485_863 * rank


class Trainer:
    """Trains a recipe's network in ``run_dir``; state lives here, maths in the functional core."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path | str) -> None:
        self.cfg = to_plain(cfg)
        check_keys(self.cfg)
        self.tc = self.cfg["trainer"]
        check_trainer(self.tc)
        if "sampler" in self.cfg:  # its typos would otherwise surface only when sampling, after training
            check_sampler(self.cfg["sampler"], build_schedule(self.cfg["schedule"]))
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        self.metrics_file = self.run_dir / "metrics.jsonl"

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(self.tc["device"])
        if self.tc["device"] == "auto" and self.device.type == "cpu" and self.rank == 0:
            log.warning(
                "no GPU found: training on the CPU with trainer.device=auto. Shipped recipes' defaults are sized "
                "for one GPU; add profile=cpu for their few-minute CPU version (or trainer.device=cpu to silence this)"
            )
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # dense batches keep one shape: cuDNN picks its fastest convolutions
        if self.world_size > 1 and self.device.type == "cuda":
            # Launchers that show each task one GPU still number LOCAL_RANK across the node.
            self.device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)  # code that asks for "cuda" (metric classifiers) lands here too
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")  # default timeouts: a hung rank fails
        # Rank 0 samples and scores alone (sample_every, the end of training) while the others wait at a barrier of
        # their own, longer than the training collectives' timeout would allow on a big evaluation.
        self._wait_group = (dist.new_group(backend="gloo", timeout=timedelta(hours=2)) if self.world_size > 1
                            else None)
        # Stop signals are agreed on over gloo on the CPU (no device sync), with the default timeout.
        self._stop_group = dist.new_group(backend="gloo") if self.world_size > 1 else None
        self._stop_signal = 0  # the stop signal this process received (the highest number of several); 0: none
        self._stop_agreed = 0  # the one every process stops on, once they agreed
        self.is_main = self.rank == 0

        torch.manual_seed(self.cfg["seed"])  # identical initial weights on every rank
        self.parts = Parts.from_config(self.cfg)
        self.domain = self.parts.domain
        self.train_set = self.parts.train_set
        check_loadable(self.domain.state_dict(), f"{type(self.domain).__qualname__}.state_dict()")
        self.net = self.parts.net.to(self.device)
        if self.rank > 0:  # dropout and augmentation draw apart from here (rank 0 keeps a single process's stream)
            torch.manual_seed(_rank_seed(self.cfg["seed"], self.rank))
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(self.tc["ema_decay"]), use_buffers=True)
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=self.tc["lr"], betas=tuple(self.tc["betas"]), weight_decay=self.tc["weight_decay"],
            fused=self.device.type == "cuda",  # one kernel for every parameter's update on a GPU
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _lr_lambda(self.tc["warmup_steps"], self.tc["max_steps"], self.tc["lr_decay"])
        )
        self.generator = torch.Generator(device=self.device).manual_seed(self.cfg["seed"] * 7919 + self.rank)
        self.step = 0
        self._saved_step: int | None = None  # the step this run's last.pt holds: never written twice
        # Where the data order stands: batch number data_start (of the current global batch) at step data_step.
        self._data_step, self._data_start = 0, 0
        # Before resume=never moves the previous run aside:
        ResumableBatchSampler.check(len(self.train_set), self.tc["batch_size"], self.world_size)
        self._maybe_resume()

        precision = self.tc["precision"]  # one of check_trainer's choices
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else (lambda: nullcontext())
        )
        model: nn.Module = self.net
        if self.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.model = torch.compile(model) if self.tc["compile"] else model
        self._ddp = model if self.world_size > 1 else None
        self.tb = self._tensorboard() if self.is_main else None

    # ------------------------------------------------------------ checkpoints
    def _maybe_resume(self) -> None:
        mode = self.tc["resume"]
        if mode == "never":
            if self.ckpt_path.exists() and self.is_main:
                self._move_previous_run()
            return
        path = resume_source(mode, self.ckpt_path)
        if path is None:
            if self.is_main:
                self._trim_metrics()  # a run stopped before its first checkpoint starts again from step 0
            return
        # On the CPU first: load_state_dict moves each tensor to its parameter's device; Adam's step counters
        # stay on the CPU (where a GPU would sync per parameter and step), or go to the GPU for fused AdamW.
        ckpt = load_checkpoint(path, map_location="cpu")
        check_resumable(ckpt, self.cfg, path)
        self._load_states(ckpt, path)
        self.step = int(ckpt["step"])
        if path == self.ckpt_path:
            self._saved_step = self.step
        self._restore_data_position(ckpt, path)
        self._restore_rng(ckpt["rng"], path)
        self._apply_optimizer_settings()
        if self.is_main:
            self._trim_metrics()
            if mode not in ("auto", "never") and path == self.ckpt_path:
                log.info("trainer.resume=%s: this run's own %s (step %d) goes on from there", mode, path, self.step)
            log.info("resumed from %s at step %d", path, self.step)

    def _load_states(self, ckpt: Mapping[str, Any], path: Path) -> None:
        """Network, EMA, optimizer, schedule and domain states; one that does not fit names the checkpoint."""
        try:
            self.net.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema"])
            self.opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()
            raise IncompatibleCheckpointError(
                f"checkpoint {path} holds a network that this recipe builds differently ({' '.join(first[:3])}): "
                f"a domain setting that shapes the network (classes, channels) differs from the run's. Use the "
                f"run's settings, another hydra.run.dir, or trainer.resume=never to start afresh"
            ) from err
        self.sched.load_state_dict(ckpt["lr_scheduler"])
        self.domain.load_state_dict(ckpt["domain_state"])

    def _apply_optimizer_settings(self) -> None:
        """The recipe's lr, betas and weight decay over the checkpoint's: a resumed run may change them
        (the checkpoint's optimizer and scheduler states carry the old values), and the learning rate
        follows the recipe's warm-up and decay from the checkpoint's step."""
        tc, lam = self.tc, self.sched.lr_lambdas[0]
        wanted = {"betas": tuple(tc["betas"]), "weight_decay": tc["weight_decay"]}
        for key, value in [("lr", tc["lr"]), *wanted.items()]:
            old = self.sched.base_lrs[0] if key == "lr" else self.opt.param_groups[0][key]
            if (tuple(old) if key == "betas" else old) != value and self.is_main:
                log.info("trainer.%s=%s replaces the checkpoint's %s from here on", key, tc[key], old)
        for group in self.opt.param_groups:
            group.update(wanted, initial_lr=tc["lr"], lr=tc["lr"] * lam(self.sched.last_epoch))
        self.sched.base_lrs = [tc["lr"]] * len(self.opt.param_groups)
        self.sched._last_lr = [group["lr"] for group in self.opt.param_groups]

    def _trim_metrics(self) -> None:
        """Drop records logged after the checkpoint's step (a run stopped between checkpoints logs them again),
        and a finished run's final evaluation, which running it again draws and scores anew."""
        path = self.metrics_file
        if not path.is_file():
            return
        finished = self.step >= self.tc["max_steps"]

        def keep(line: str) -> bool:
            step, kind = _record_step(line, path)
            return step < self.step or (step == self.step and not (finished and kind in ("eval", "reference")))

        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and keep(line)]
        if len(kept) < len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
            log.info("metrics.jsonl: dropped %d record(s) %s", len(lines) - len(kept),
                     f"of the final evaluation at step {self.step}, drawn again now" if finished
                     else f"after step {self.step}, logged before the run stopped")

    def _global_batch(self) -> int:
        return self.tc["batch_size"] * self.world_size

    def _data_position(self, step: int) -> int:
        """The number of global batches the data order has given out by ``step``."""
        return self._data_start + (step - self._data_step) * self.tc["grad_accum"]

    def _restore_data_position(self, ckpt: Mapping[str, Any], path: Path) -> None:
        """Go on from the checkpoint's place in the data; with another global batch (batch size or number of
        processes) from the same point of the data, counted in samples."""
        saved_tc = ckpt["config"]["trainer"]
        data = ckpt.get("data") or {  # older checkpoints: one global batch throughout, one generator per process
            "position": self.step * saved_tc.get("grad_accum", 1),
            "global_batch": saved_tc["batch_size"] * max(1, len(ckpt["rng"]["generators"])),
        }
        position, old, new = int(data["position"]), int(data["global_batch"]), self._global_batch()
        if old != new:
            position = round(position * old / new)
            if self.is_main:
                log.warning("%s was trained with a global batch of %d (trainer.batch_size x processes), this run has "
                            "%d: the data order goes on from the same point of the data, not bit-identically", path,
                            old, new)
        self._data_step, self._data_start = self.step, position

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        """A logged figure averaged over every process (each holds its own shard's)."""
        if self.world_size > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    def _restore_rng(self, rng: dict[str, Any], path: Path) -> None:
        """The random streams of the run, where the checkpoint's come from the same kind of device and rank."""
        ranks = rng.get("torch_ranks") or []
        if self.rank < len(ranks):
            torch.set_rng_state(ranks[self.rank].cpu())
        elif self.rank == 0:
            torch.set_rng_state(rng["torch"].cpu())
        else:  # an older checkpoint holds rank 0's stream only: draw apart from it
            torch.manual_seed(_rank_seed(self.cfg["seed"], self.rank) + 104_729 * (self.step + 1))
        gen, cuda = rng["generators"], rng.get("cuda") or []
        # Checkpoints without the key: a CUDA generator's state is 16 bytes, a CPU one's 5,056.
        saved = rng.get("device_type") or ("cuda" if gen and gen[0].numel() < 100 else "cpu")
        same_device = saved == self.device.type
        if same_device and self.rank < len(gen):
            self.generator.set_state(gen[self.rank].cpu())
            if self.device.type == "cuda" and self.rank < len(cuda):
                torch.cuda.set_rng_state(cuda[self.rank].cpu(), self.device)
        else:  # a CPU generator's state does not fit a CUDA one (and back): continue on a fresh, distinct stream
            self.generator.manual_seed(self.cfg["seed"] * 7919 + self.rank + 104_729 * (self.step + 1))
            if self.is_main:
                log.warning("%s was trained on %s, this run is on %s: training continues with new random streams, so "
                            "it is not bit-identical to an uninterrupted run", path, saved, self.device.type)

    def _move_previous_run(self) -> None:
        """``resume=never`` in a used run directory: move its results aside rather than overwrite them."""
        old = self.run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
        old.mkdir(parents=True)
        for name in ("checkpoints", "samples", "metrics.jsonl", "tensorboard"):
            if (self.run_dir / name).exists():
                (self.run_dir / name).rename(old / name)
        log.warning("trainer.resume=never: the previous run's checkpoints, samples and metrics moved to %s", old)

    def save(self) -> None:
        """Write ``last.pt`` atomically (once per step); a non-finite weight or a failed write never replaces a good checkpoint."""
        if self._saved_step == self.step:
            return  # e.g. the final save when max_steps is a multiple of ckpt_every
        for name, p in self.net.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise NonFiniteLossError(f"parameter {name!r} is not finite at step {self.step}; {self.ckpt_path} is kept")
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None  # dropout's stream
        states = [(self.generator.get_state().cpu(), cuda, torch.get_rng_state())]
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, states[0])
            states = gathered
        if not self.is_main:
            self._saved_step = self.step  # as rank 0 does: every rank must skip (or gather) alike
            return
        target = self.ckpt_path
        try:
            self._write_checkpoint(states)
            self._saved_step = self.step
            if self.tc["keep_every"] > 0 and self.step % self.tc["keep_every"] == 0:
                target = self.ckpt_path.with_name(f"step_{self.step:07d}.pt")
                keep_copy(self.ckpt_path, target)
        except OSError as err:
            kept = (f"{self.ckpt_path} still holds the last checkpoint written" if self.ckpt_path.is_file()
                    else "no checkpoint was written yet")
            raise CheckpointWriteError(
                err.errno, f"could not write the checkpoint of step {self.step} to {target} "
                f"({err.strerror or err}); {kept}. Free disk space (or make the folder writable) and run the same "
                f"command again with hydra.run.dir={self.run_dir} to resume"
            ) from err

    def _write_checkpoint(self, states: list[Any]) -> None:
        """``atomic_save`` of everything a bit-identical resume needs; ``states``: every rank's generator states."""
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "step": self.step,
                "config": self.cfg,
                "domain_state": self.domain.state_dict(),
                "domain_class": domain_class_path(self.domain),
                "model": self.net.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(),
                "lr_scheduler": self.sched.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(), "device_type": self.device.type,
                    "generators": [g for g, _, _ in states], "cuda": [c for _, c, _ in states if c is not None],
                    "torch_ranks": [r for _, _, r in states],
                },
                "data": {"position": self._data_position(self.step), "global_batch": self._global_batch()},
                "torch_version": str(torch.__version__),
            },
            self.ckpt_path,
        )

    # ---------------------------------------------------------------- logging
    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record.get("step", 0))

    # ------------------------------------------------------------------ train
    def _loader(self) -> DataLoader:
        sampler = ResumableBatchSampler(
            len(self.train_set),
            self.tc["batch_size"],
            seed=self.cfg["seed"],
            start=self._data_position(self.step),
            rank=self.rank,
            world_size=self.world_size,
        )
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=self.domain.collate,
            num_workers=self.tc["num_workers"],
            persistent_workers=self.tc["num_workers"] > 0,
            worker_init_fn=_ignore_stop_signals,  # the main process handles them
            # The workers' base seed (drawn as iteration starts, workers or not) from a stream of its own: from
            # torch's global one, a resume would shift dropout's stream (the draw follows the checkpoint's restore).
            generator=torch.Generator().manual_seed(_rank_seed(self.cfg["seed"], self.rank)
                                                    + self._data_position(self.step)),
        )

    def _micro_step(self, batch, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the detached loss (no device sync)."""
        keys = [k for k in self.domain.guidance_keys if k in batch.cond]
        if keys and self.tc["label_dropout"] > 0:
            batch.cond = drop_condition(batch.cond, keys, self.tc["label_dropout"], self.generator)
        sync = nullcontext() if (last or self._ddp is None) else self._ddp.no_sync()
        with sync:
            with self.autocast():
                loss = self.parts.objective.loss(self.model, batch, self.parts.schedule, self.generator)
            (loss / self.tc["grad_accum"]).backward()
        # A NaN or Inf loss makes the gradient norm non-finite: fit() checks it once per step.
        return loss.detach()

    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.max_steps``, then checkpoint, sample and evaluate."""
        self.train_steps()
        self.save()
        result = self.sample_and_evaluate(reference=True)
        if self.tb is not None:
            self.tb.close()
        return result

    def train_steps(self) -> None:
        """The optimizer steps up to ``trainer.max_steps`` (with their logs, checkpoints and ``sample_every`` draws):
        :meth:`fit` without its final checkpoint and draw."""
        tc = self.tc
        max_steps = tc["max_steps"]
        data = iter(self._loader())
        bar = None
        if self.is_main and tc["progress"]:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.net.train()
        try:
            with self._stop_on_signals():
                self._steps(data, bar, max_steps)
        finally:
            if bar is not None:
                bar.close()

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Ctrl-C (SIGINT), SIGTERM and SIGUSR1 end training after the step in progress with a checkpoint, then raise
        :class:`TrainingInterrupted`; a second Ctrl-C stops at once, a repeated SIGTERM does not. Under DDP every
        process stops at the same step, within :data:`STOP_POLL_EVERY` steps of the signal (:meth:`_should_stop`)."""
        self._stop_signal = self._stop_agreed = 0
        previous = self._install_stop_handlers()
        try:
            yield
            if self._should_stop(final=True):
                self._save_and_stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _install_stop_handlers(self) -> dict[int, Any]:
        """Route the stop signals to :meth:`_on_stop_signal`; returns the handlers they replace (none off the main
        thread, where Python cannot set any)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self._on_stop_signal) for signum in _STOP_SIGNALS}

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        """Note a stop signal; training stops at the next step where :meth:`_should_stop` says so."""
        self._stop_signal = max(self._stop_signal, signum)
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.world_size > 1:
            log.warning("%s (rank %d): every process stops with a checkpoint within %d steps", name, self.rank,
                        STOP_POLL_EVERY)
        else:
            log.warning("%s: stopping at the end of the step in progress with a checkpoint%s", name,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")

    def _should_stop(self, final: bool = False) -> bool:
        """Whether training stops now on a stop signal: at once in one process; under DDP only where every process
        agrees, their signals being gathered every :data:`STOP_POLL_EVERY` steps and at the end of training, so that
        no step has a per-step collective."""
        if not self._stop_agreed:
            if self.world_size == 1:
                self._stop_agreed = self._stop_signal
            elif final or self.step % STOP_POLL_EVERY == 0:
                flag = torch.tensor([self._stop_signal], dtype=torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
                self._stop_agreed = int(flag)
        return bool(self._stop_agreed)

    def _save_and_stop(self) -> None:
        """Checkpoint the step all processes stopped at, then raise :class:`TrainingInterrupted` (how to resume)."""
        self.save()
        self.wait_for_rank_zero()  # no process leaves while rank 0 writes: a launcher ends the rest when one exits
        if self.tb is not None:
            self.tb.close()
        signum = self._stop_agreed
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        raise TrainingInterrupted(
            f"training {how} at step {self.step} of {self.tc['max_steps']}; {self.ckpt_path} holds it: run the same "
            f"command again with hydra.run.dir={self.run_dir} to resume", signum
        )

    def _steps(self, data: Iterator[Any], bar: Any, max_steps: int) -> None:
        """Optimizer steps until ``max_steps`` (or a stop signal), logging, checkpointing and sampling on schedule."""
        tc = self.tc
        t_last, n_last, losses = time.perf_counter(), 0, []  # since the last log record
        while self.step < max_steps and not self._should_stop():
            self.opt.zero_grad(set_to_none=True)
            for micro in range(tc["grad_accum"]):
                batch = next(data).to(self.device)
                n_last += batch.num_samples * self.world_size
                losses.append(self._micro_step(batch, last=micro == tc["grad_accum"] - 1))
            grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), tc["grad_clip"] if tc["grad_clip"] > 0 else float("inf"))
            if not torch.isfinite(grad_norm):  # the one device sync of a step
                raise NonFiniteLossError(
                    f"loss {float(losses[-1])}, gradient norm {float(grad_norm)} at step {self.step}; the last good "
                    f"checkpoint {self.ckpt_path} is kept. Lower trainer.lr, keep trainer.grad_clip > 0, or check "
                    "the data for NaN/Inf values."
                )
            self.opt.step()
            lr = self.opt.param_groups[0]["lr"]  # this step's rate (the scheduler then sets the next one's)
            self.sched.step()
            _update_ema(self.ema, self.net)
            self.step += 1
            if bar is not None:
                bar.update(1)
            if self.step % tc["log_every"] == 0 or self.step == max_steps:
                dt = time.perf_counter() - t_last
                record = {
                    "kind": "train",
                    "step": self.step,
                    "loss": self._mean_over_ranks(torch.stack(losses).mean()),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples_per_s": n_last / max(dt, 1e-9),
                    "world_size": self.world_size,
                }
                self.log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}")
                t_last, n_last, losses = time.perf_counter(), 0, []
            if self.step % tc["ckpt_every"] == 0 or (tc["keep_every"] > 0 and self.step % tc["keep_every"] == 0):
                self.save()
            if tc["sample_every"] > 0 and self.step % tc["sample_every"] == 0 and self.step < max_steps:
                self.sample_and_evaluate()
                self.wait_for_rank_zero()

    def wait_for_rank_zero(self) -> None:
        """Every process waits here while rank 0 samples and scores (up to 2 hours; no-op in one process)."""
        if self._wait_group is not None:
            dist.barrier(group=self._wait_group)

    @torch.no_grad()
    def sample_and_evaluate(self, reference: bool = False) -> dict[str, Any]:
        """Sample with the EMA weights into ``samples/``, then log the domain's metrics."""
        if not self.is_main:
            return {}
        n = self.tc["num_samples"]
        labels = self.domain.default_labels(n, self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg["seed"] + 1)
        sampler_cfg = dict(self.cfg["sampler"])
        batch = generate(
            self.domain, self.ema.module, self.parts.schedule, self.parts.objective, n,
            sampler=sampler_cfg, guidance=self.cfg["guidance"], labels=labels, device=self.device, generator=gen,
        )
        paths = self.domain.save_samples(batch, self.run_dir / "samples", prefix=f"step_{self.step:07d}")
        record: dict[str, Any] = {"kind": "eval", "step": self.step, "num_samples": n, "sampler": sampler_cfg["name"]}
        if self.tc["eval"]:
            record.update(_plain_metrics(self.domain.evaluate(batch), record))
        self.log(record)
        if reference and self.tc["eval"]:
            ref = self.domain.reference_metrics(n)
            if ref:
                self.log({"kind": "reference", "step": self.step, "num_samples": n, **ref})
                record["reference"] = ref
        log.info("step %d: wrote %d files to %s; metrics %s", self.step, len(paths), self.run_dir / "samples", record)
        return record


def train(cfg: Mapping[str, Any], run_dir: Path | str) -> dict[str, Any]:
    """Train a recipe config (a mapping shaped like :class:`polydiff.config.RecipeConfig`) in ``run_dir``."""
    from omegaconf import OmegaConf

    from .config import RecipeConfig

    plain = to_plain(cfg)  # a plain copy: a typed Hydra node would carry keys added with '+' through the merge
    check_keys(plain)
    merged = OmegaConf.merge(OmegaConf.structured(RecipeConfig), plain)  # fills defaults
    trainer = Trainer(merged, run_dir)
    try:
        result = trainer.fit()
        trainer.wait_for_rank_zero()  # rank 0 samples at the end: the others wait rather than tear the group down
        return result
    finally:
        if trainer.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
