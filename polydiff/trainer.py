"""The domain-agnostic trainer: AdamW, warm-up, clipping, EMA, bf16, compile, DDP, checkpoints.

Launched by ``polydiff train`` (or :func:`train` from Python). Under ``torchrun`` it runs
DistributedDataParallel over the launched processes (NCCL on GPUs, gloo on CPUs). The trainer wires the parts
together and keeps the loop; one step is :func:`polydiff.train_step.train_step`, checkpoints are
:class:`polydiff.checkpointer.Checkpointer`'s, stop signals :class:`polydiff.stop.StopSignals`'.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from .build import Parts, sampling_schedule, to_plain
from .checkpoint import check_loadable, load_checkpoint
from .checkpointer import Checkpointer, CheckpointWriteError, DataPosition, generator_seed, rank_seed
from .config import check_keys, check_trainer
from .data import ResumableBatchSampler
from .generate import check_sampler, generate
from .processes import Processes
from .report import report_step
from .resume import check_resumable, move_previous_run, resume_source, start_from
from .run_log import MetricsLog, format_metrics, plain_metrics, trim_metrics
from .stop import StopSignals, TrainingInterrupted, ignore_stop_signals
from .train_step import (
    NonFiniteLossError,
    StepSettings,
    apply_recipe,
    forward_backward,
    lr_schedule,
    make_ema,
    make_optimizer,
    train_step,
)

__all__ = ["Trainer", "train", "NonFiniteLossError", "CheckpointWriteError", "TrainingInterrupted"]

log = logging.getLogger("polydiff")


def _check_config(cfg: Mapping[str, Any]) -> None:
    """Refuse unknown keys, ``trainer`` values out of range and ``sampler`` options the schedule cannot take, before
    anything is built or a previous run is moved aside."""
    check_keys(cfg)
    check_trainer(cfg["trainer"])
    if "sampler" in cfg:  # its typos would otherwise surface only when sampling, after training
        check_sampler(cfg["sampler"], sampling_schedule(cfg))


class Trainer:
    """Trains a recipe's network in ``run_dir``: reads the config, builds the parts, the optimizer, EMA and
    checkpointer, resumes where the run stopped; :meth:`fit` trains, checkpoints, samples and scores."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path | str) -> None:
        self.cfg = to_plain(cfg)
        _check_config(self.cfg)
        self.tc, self.run_dir, seed = self.cfg["trainer"], Path(run_dir), self.cfg["seed"]

        self.processes = Processes(self.tc["device"], self.tc["threads"])
        self.world_size, self.rank, self.is_main = (
            self.processes.world_size,
            self.processes.rank,
            self.processes.is_main,
        )
        self.device = self.processes.device
        self.stop_signals = StopSignals(self.rank, self.world_size)

        torch.manual_seed(seed)  # identical initial weights on every rank
        self.parts = Parts.from_config(self.cfg)
        self.domain, self.train_set = self.parts.domain, self.parts.train_set
        check_loadable(self.domain.state_dict(), f"{type(self.domain).__qualname__}.state_dict()")
        self.net = self.parts.net.to(self.device)
        if self.rank > 0:  # dropout and augmentation draw apart from here (rank 0 keeps a single process's stream)
            torch.manual_seed(rank_seed(seed, self.rank))
        self.ema = make_ema(self.net, self.tc["ema_decay"])
        if hasattr(self.parts.objective, "use_target"):  # consistency distillation's target network is the EMA
            self.parts.objective.use_target(self.ema.module)
        self.opt = make_optimizer(self.net, self.tc, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(generator_seed(seed, self.rank))
        self.step = 0

        self.data_position = DataPosition(self.tc["batch_size"] * self.world_size, self.tc["grad_accum"])
        self.checkpoints = Checkpointer(
            self.run_dir, self.cfg, self.device, self.data_position, self.rank, self.world_size
        )
        # Before resume=never moves the previous run aside:
        ResumableBatchSampler.check(len(self.train_set), self.tc["batch_size"], self.world_size)
        if self.is_main:
            self.checkpoints.remove_stale_temporaries()
        self._resume()
        self.sched = lr_schedule(self.opt, self.tc, self.step)  # the recipe's warm-up and decay, from this step

        self.settings = StepSettings.from_config(self.tc, self.device, self.domain.guidance_keys)
        self.autocast = self.settings.autocast
        model: nn.Module = self.net
        if self.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self._ddp = model if self.world_size > 1 else None
        self.model = torch.compile(model) if self.tc["compile"] else model
        self.metrics = MetricsLog(self.run_dir) if self.is_main else None

    def _resume(self) -> None:
        """Go on from ``trainer.resume``'s checkpoint (the run's own ``last.pt`` first), or start afresh."""
        mode, own = self.tc["resume"], self.checkpoints.path
        path = None if mode == "never" else resume_source(mode, own)
        if mode == "never" and own.exists() and self.is_main:
            move_previous_run(self.run_dir)
        if path is None and self.tc.get("init"):
            start_from(self.tc["init"], self.cfg, self.net, self.ema)
        if mode == "never":
            return
        if path is not None:
            # On the CPU first: load_state_dict moves each tensor to its parameter's device; Adam's step counters
            # stay on the CPU (where a GPU would sync per parameter and step), or go to the GPU for fused AdamW.
            ckpt = load_checkpoint(path, map_location="cpu")
            check_resumable(ckpt, self.cfg, path)
            self.step = self.checkpoints.restore(
                ckpt, path, domain=self.domain, net=self.net, ema=self.ema, opt=self.opt, generator=self.generator
            )
            apply_recipe(self.opt, self.tc, announce=self.is_main)  # a resumed run may change lr, betas, decay
        if not self.is_main:
            return
        # Records past the checkpoint (or any, for a run stopped before its first one) are logged again from here.
        trim_metrics(self.run_dir / "metrics.jsonl", self.step, finished=self.step >= self.tc["max_steps"])
        if path is not None:
            if mode != "auto" and path == own:
                log.info("trainer.resume=%s: this run's own %s (step %d) goes on from there", mode, path, self.step)
            log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> None:
        """Checkpoint this step (:meth:`Checkpointer.save`); every process calls it."""
        self.checkpoints.save(
            self.step,
            domain=self.domain,
            net=self.net,
            ema=self.ema,
            opt=self.opt,
            sched=self.sched,
            generator=self.generator,
        )

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to ``metrics.jsonl`` (rank 0 alone)."""
        if self.metrics is not None:
            self.metrics.write(record)

    # ------------------------------------------------------------------ train
    def _loader(self) -> DataLoader:
        position = self.data_position.at(self.step)
        sampler = ResumableBatchSampler(
            len(self.train_set),
            self.tc["batch_size"],
            seed=self.cfg["seed"],
            start=position,
            rank=self.rank,
            world_size=self.world_size,
        )
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=self.domain.collate,
            num_workers=self.tc["num_workers"],
            persistent_workers=self.tc["num_workers"] > 0,
            worker_init_fn=ignore_stop_signals,  # the main process handles them
            # The workers' base seed (drawn as iteration starts, workers or not) from a stream of its own: from
            # torch's global one, a resume would shift dropout's stream (the draw follows the checkpoint's restore).
            generator=torch.Generator().manual_seed(rank_seed(self.cfg["seed"], self.rank) + position),
        )

    def _micro_step(self, batch: Any, last: bool) -> torch.Tensor:
        """:func:`polydiff.train_step.forward_backward` of one micro-batch with this run's parts; under DDP the
        gradients are averaged over the processes on a step's last micro-batch only."""
        sync = self._ddp.no_sync() if self._ddp is not None and not last else None
        return forward_backward(
            self.model, self.parts.objective, self.parts.schedule, batch, self.generator, self.settings, sync
        )

    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.max_steps``, then checkpoint, sample and evaluate."""
        self.train_steps()
        self.save()
        result = self.sample_and_evaluate(reference=True)
        if self.metrics is not None:
            self.metrics.close()
        return result

    def train_steps(self) -> None:
        """The optimizer steps up to ``trainer.max_steps`` (with their logs, checkpoints and ``sample_every`` draws):
        :meth:`fit` without its final checkpoint and draw. A stop signal ends them with a checkpoint, then raises
        :class:`TrainingInterrupted`."""
        max_steps = self.tc["max_steps"]
        data = iter(self._loader())
        bar = None
        if self.is_main and self.tc["progress"]:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.net.train()
        try:
            with self.stop_signals:
                self._steps(data, bar, max_steps)
                if self.stop_signals.agreed(self.step, final=True):
                    self._save_and_stop()
        finally:
            if bar is not None:
                bar.close()

    def _save_and_stop(self) -> None:
        """Checkpoint the step all processes stopped at, then raise :class:`TrainingInterrupted` (how to resume)."""
        self.save()
        self.wait_for_rank_zero()  # no process leaves while rank 0 writes: a launcher ends the rest when one exits
        if self.metrics is not None:
            self.metrics.close()
        signum = self.stop_signals.agreed(self.step)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        raise TrainingInterrupted(
            f"training {how} at step {self.step} of {self.tc['max_steps']}; {self.checkpoints.path} holds it: run the "
            f"same command again with hydra.run.dir={self.run_dir} to resume",
            signum,
        )

    def _steps(self, data: Iterator[Any], bar: Any, max_steps: int) -> None:
        """Optimizer steps until ``max_steps`` (or a stop signal), logging, checkpointing and sampling on schedule."""
        tc = self.tc
        t_last, n_last, losses = time.perf_counter(), 0, []  # since the last log record
        while self.step < max_steps and not self.stop_signals.agreed(self.step):
            try:
                done = train_step(
                    self.net,
                    self.opt,
                    self.sched,
                    self.ema,
                    lambda: next(data).to(self.device),
                    self._micro_step,
                    self.settings,
                )
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{err} at step {self.step}; {self.checkpoints.kept()}. Check the data for NaN/Inf values first, "
                    "then lower trainer.lr or keep trainer.grad_clip > 0"
                ) from None
            self.step += 1
            n_last += done.num_samples * self.world_size
            losses += done.losses
            if bar is not None:
                bar.update(1)
            if self.step % tc["log_every"] == 0 or self.step == max_steps:
                dt = time.perf_counter() - t_last
                record = {
                    "kind": "train",
                    "step": self.step,
                    "loss": self.processes.mean(torch.stack(losses).mean()),
                    "lr": done.lr,
                    "grad_norm": float(done.grad_norm),
                    "samples_per_s": n_last / max(dt, 1e-9),
                    "world_size": self.world_size,
                }
                self.log(record)
                if bar is not None:
                    bar.set_postfix({"loss": f"{record['loss']:.4f}", "samples/s": f"{record['samples_per_s']:.1f}"})
                t_last, n_last, losses = time.perf_counter(), 0, []
            if self.step % tc["ckpt_every"] == 0 or (tc["keep_every"] > 0 and self.step % tc["keep_every"] == 0):
                self.save()
            if tc["sample_every"] > 0 and self.step % tc["sample_every"] == 0 and self.step < max_steps:
                self.sample_and_evaluate()
                self.wait_for_rank_zero()

    def wait_for_rank_zero(self) -> None:
        """Every process waits here while rank 0 samples and scores (no-op in one process)."""
        self.processes.wait_for_rank_zero()

    @torch.no_grad()
    def sample_and_evaluate(self, reference: bool = False) -> dict[str, Any]:
        """Sample with the EMA weights into ``samples/``, then log the domain's metrics."""
        if not self.is_main:
            return {}
        n = self.tc["num_samples"]
        own = self.parts.objective.score(self.ema.module, self.domain, self.parts.schedule, n, self.device)
        if own is not None:  # a run that draws no samples (a classifier) scores itself
            self.log({"kind": "eval", "step": self.step, "num_samples": n, **own})
            log.info("step %d: %s", self.step, format_metrics(own))
            return {"kind": "eval", "step": self.step, **own}
        labels = self.domain.default_labels(n, self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg["seed"] + 1)
        sampler_cfg = dict(self.cfg["sampler"])
        batch = generate(
            self.domain,
            self.ema.module,
            self.parts.schedule,
            self.parts.objective,
            n,
            sampler=sampler_cfg,
            guidance=self.cfg["guidance"],
            labels=labels,
            device=self.device,
            generator=gen,
        )
        paths = self.domain.save_samples(batch, self.run_dir / "samples", prefix=f"step_{self.step:07d}")
        record: dict[str, Any] = {"kind": "eval", "step": self.step, "num_samples": n, "sampler": sampler_cfg["name"]}
        if self.tc["eval"]:
            record.update(plain_metrics(self.domain.evaluate(batch), record))
        self.log(record)
        if reference and self.tc["eval"]:
            ref = self.domain.reference_metrics(n)
            if ref:
                self.log({"kind": "reference", "step": self.step, "num_samples": n, **ref})
                record["reference"] = ref
        report_step(self.run_dir, self.domain, batch, self.step, self.metrics, self.cfg)  # warns, never raises
        shown = {k: v for k, v in record.items() if k not in ("kind", "step", "reference")}
        log.info(
            "step %d: %d samples, %d files in %s; %s",
            self.step,
            n,
            len(paths),
            self.run_dir / "samples",
            format_metrics(shown),
        )
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
        trainer.processes.close()
