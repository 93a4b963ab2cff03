"""One optimizer step: forward and backward of its micro-batches, clipping, AdamW, the learning-rate schedule, EMA."""

from __future__ import annotations

import itertools
import logging
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .conditioning import drop_condition

if TYPE_CHECKING:  # type hints only: a step calls what it is given
    from .objectives import BaseObjective
    from .schedules import NoiseSchedule
    from .state import Batch

__all__ = [
    "NonFiniteLossError",
    "StepSettings",
    "StepResult",
    "make_optimizer",
    "make_ema",
    "lr_factor",
    "lr_schedule",
    "apply_recipe",
    "update_ema",
    "forward_backward",
    "train_step",
]

log = logging.getLogger("polydiff")


class NonFiniteLossError(FloatingPointError):
    """A NaN or Inf loss or gradient: training stops before anything is saved."""


@dataclass(frozen=True)
class StepSettings:
    """The ``trainer`` values a step reads, and the autocast of its forward pass."""

    grad_accum: int
    grad_clip: float  # 0: no clipping
    label_dropout: float
    guidance_keys: tuple[str, ...]  # the conditions label dropout nulls
    device_type: str
    bf16: bool

    @classmethod
    def from_config(cls, tc: Mapping[str, Any], device: torch.device, guidance_keys: tuple[str, ...]) -> StepSettings:
        """``trainer.precision=auto`` computes in bf16 on a GPU, in fp32 on the CPU."""
        bf16 = tc["precision"] == "bf16" or (tc["precision"] == "auto" and device.type == "cuda")
        return cls(tc["grad_accum"], tc["grad_clip"], tc["label_dropout"], tuple(guidance_keys), device.type, bf16)

    def autocast(self) -> AbstractContextManager[Any]:
        """The forward pass's precision: bf16 autocast, or as the weights are."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


@dataclass
class StepResult:
    """What a step reports: each micro-batch's detached loss, the gradient norm before clipping, the step's rate."""

    losses: list[Tensor]
    grad_norm: Tensor
    lr: float
    num_samples: int  # in this process's micro-batches


def make_optimizer(net: nn.Module, tc: Mapping[str, Any], device: torch.device) -> Optimizer:
    """AdamW with the recipe's rate, betas and weight decay."""
    return torch.optim.AdamW(
        net.parameters(),
        lr=tc["lr"],
        betas=tuple(tc["betas"]),
        weight_decay=tc["weight_decay"],
        fused=device.type == "cuda",  # one kernel for every parameter's update on a GPU
    )


def make_ema(net: nn.Module, decay: float) -> AveragedModel:
    """The exponential moving average of ``net``'s weights and buffers: ``ema = decay * ema + (1 - decay) * w``."""
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def lr_factor(warmup: int, max_steps: int, decay: str) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warm-up, then constant or cosine decay (``decay`` as checked
    by :func:`polydiff.config.check_trainer`)."""

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if decay == "cosine":
            progress = min(1.0, step / max(1, max_steps))
            return w * 0.5 * (1 + math.cos(math.pi * progress))
        return w

    return f


def lr_schedule(opt: Optimizer, tc: Mapping[str, Any], step: int = 0) -> LambdaLR:
    """The recipe's warm-up and decay of each group's ``initial_lr``, standing at ``step`` (a resumed run's).

    The schedule holds nothing but the recipe and the step, so a resumed run builds it anew rather than loading it.
    """
    return LambdaLR(opt, lr_factor(tc["warmup_steps"], tc["max_steps"], tc["lr_decay"]), last_epoch=step - 1)


def apply_recipe(opt: Optimizer, tc: Mapping[str, Any], announce: bool = True) -> None:
    """The recipe's lr, betas and weight decay over a loaded optimizer state's: a resumed run may change them. Build
    :func:`lr_schedule` afterwards: it sets each group's rate from ``initial_lr``."""
    group = opt.param_groups[0]
    old = {
        "lr": group.get("initial_lr", group["lr"]),
        "betas": tuple(group["betas"]),
        "weight_decay": group["weight_decay"],
    }
    new = {"lr": tc["lr"], "betas": tuple(tc["betas"]), "weight_decay": tc["weight_decay"]}
    for key, value in new.items():
        if old[key] != value and announce:
            log.info("trainer.%s=%s replaces the checkpoint's %s from here on", key, tc[key], old[key])
    for group in opt.param_groups:
        group.update(betas=new["betas"], weight_decay=new["weight_decay"], initial_lr=new["lr"])


@torch.no_grad()
def update_ema(ema: AveragedModel, net: nn.Module) -> None:
    """``ema.update_parameters(net)`` without its per-step host-to-device copy of ``n_averaged``.

    AveragedModel hands ``n_averaged.to(device)`` to its multi_avg_fn, a blocking copy that waits for the
    GPU every step, although the EMA function ignores it; the update itself is the same foreach lerp.
    """
    if ema.multi_avg_fn is None or not ema.use_buffers or int(ema.n_averaged) == 0:  # n_averaged lives on the CPU
        ema.update_parameters(net)  # the first call copies the weights
        return
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for p_ema, p in zip(
        itertools.chain(ema.module.parameters(), ema.module.buffers()),
        itertools.chain(net.parameters(), net.buffers()),
        strict=True,
    ):
        mine, theirs = groups.setdefault((p_ema.device, p_ema.dtype), ([], []))
        mine.append(p_ema.detach())
        theirs.append(p.detach().to(p_ema.device))  # a no-op where both share a device, as here
    for mine, theirs in groups.values():
        ema.multi_avg_fn(mine, theirs, None)
    ema.n_averaged += 1


def forward_backward(
    model: nn.Module,
    objective: BaseObjective,
    schedule: NoiseSchedule,
    batch: Batch,
    generator: torch.Generator,
    settings: StepSettings,
    sync: AbstractContextManager[Any] | None = None,
) -> Tensor:
    """Label dropout, the objective's loss and its backward pass for one micro-batch; returns the detached loss (no
    device sync). ``sync``: DDP's ``no_sync()`` on every micro-batch but a step's last."""
    keys = [k for k in settings.guidance_keys if k in batch.cond]
    if keys and settings.label_dropout > 0:
        batch.cond = drop_condition(batch.cond, keys, settings.label_dropout, generator)
    with sync or nullcontext():
        with settings.autocast():
            loss = objective.loss(model, batch, schedule, generator)
        (loss / settings.grad_accum).backward()
    # A NaN or Inf loss makes the gradient norm non-finite: train_step checks it once per step.
    return loss.detach()


def train_step(
    net: nn.Module,
    opt: Optimizer,
    sched: LRScheduler,
    ema: AveragedModel,
    next_batch: Callable[[], Batch],
    micro_step: Callable[[Batch, bool], Tensor],
    settings: StepSettings,
) -> StepResult:
    """One optimizer step of ``net``: ``settings.grad_accum`` micro-batches from ``next_batch`` through ``micro_step``
    (:func:`forward_backward` with the run's parts; its second argument says whether the micro-batch is the step's
    last), gradient clipping, AdamW, the learning-rate schedule and the EMA. A non-finite gradient norm raises
    :class:`NonFiniteLossError` before the weights change."""
    opt.zero_grad(set_to_none=True)
    losses, num_samples = [], 0
    for micro in range(settings.grad_accum):
        batch = next_batch()
        num_samples += batch.num_samples
        losses.append(micro_step(batch, micro == settings.grad_accum - 1))
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), settings.grad_clip if settings.grad_clip > 0 else math.inf)
    if not torch.isfinite(grad_norm):  # the one device sync of a step
        raise NonFiniteLossError(f"loss {float(losses[-1])}, gradient norm {float(grad_norm)}")
    opt.step()
    lr = opt.param_groups[0]["lr"]  # this step's rate (the scheduler then sets the next one's)
    sched.step()
    update_ema(ema, net)
    return StepResult(losses, grad_norm, lr, num_samples)
