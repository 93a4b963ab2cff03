"""Flow matching on the straight path (``objective.name=flow``): the network predicts the velocity ``eps - x_0``.

Conditional flow matching with the rectified-flow path ``x_t = (1 - t) x_0 + t eps`` (Lipman et al. 2023, eq. 23
with sigma_min = 0; Liu et al. 2023), times uniform or logit-normal (Esser et al. 2024, eq. 19), noise drawn by the
space (zero centre of mass for molecules, so the flow stays in that subspace), paired with the data independently
or by a coupling (:mod:`polydiff.couplings`). The recipe's ``schedule`` section is not used: the path is fixed.
``weighting=min_snr`` weights the velocity error by ``t^2 min(SNR, gamma) = min((1 - t)^2, gamma t^2)``, the
path's ``SNR = (1 - t)^2 / t^2``: since ``x0 = x_t - t v``, that is min-SNR-gamma on the implied ``x0`` (Hang et al.
2023, eq. 9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .couplings import COUPLINGS, couple
from .objective_base import BaseObjective, check_weighting, checked_output, min_snr_weight, register_objective
from .paths import FlowSchedule
from .schedules import Schedule
from .space import Space
from .state import Batch, DenoiserFn, Prediction

__all__ = ["FlowObjective", "sample_times"]

TIMES = ("uniform", "logit_normal")


def sample_times(
    n: int, kind: str, mean: float, std: float, device: torch.device, generator: Optional[torch.Generator]
) -> Tensor:
    """Training times ``[n]`` in (0, 1): uniform, or ``sigmoid(N(mean, std^2))`` (logit-normal)."""
    gdev = generator.device if generator is not None else device
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=gdev).to(device)
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=gdev)).to(device)


def _require_flow(schedule: Schedule) -> FlowSchedule:
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(
            f"objective 'flow' samples on its own straight path, not on {schedule!r}: pass "
            "objective.sampling_schedule(schedule) (as polydiff.build.Parts does) to the denoiser and the sampler"
        )
    return schedule


@register_objective("flow")
@dataclass
class FlowObjective(BaseObjective):
    """Flow matching: ``time`` ``uniform`` or ``logit_normal`` (``mean``, ``std``), ``coupling`` of noise and data
    ``independent``, ``ot`` (minibatch optimal transport, Tong et al. 2024) or ``aligned`` (per-sample rotation and
    permutation of the noise onto the data, as EquiFM does for molecules), and the loss ``weighting`` (``uniform``
    or ``min_snr`` with ``gamma``)."""

    time: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    coupling: str = "independent"
    weighting: str = "uniform"
    gamma: float = 5.0

    def __post_init__(self) -> None:
        if self.time not in TIMES:
            raise KeyError(f"unknown objective.time {self.time!r}; choose one of {list(TIMES)}")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(
                f"objective.mean={self.mean} and objective.std={self.std} must be finite and std positive "
                "(logit-normal times: t = sigmoid(mean + std * z))"
            )
        if self.coupling not in COUPLINGS:
            raise KeyError(f"unknown objective.coupling {self.coupling!r}; choose one of {list(COUPLINGS)}")
        check_weighting(self.weighting, self.gamma)

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-sample (weighted) squared velocity errors ``[B]``, each a mean over the sample's valid elements."""
        eps = couple(self.coupling, batch.x, batch.space.randn(generator=generator, dtype=batch.x.dtype), batch.space)
        return self.pair_losses(net, batch, eps, generator, t)

    def pair_losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        eps: Tensor,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """The losses of :meth:`losses` with the noise ``eps`` each sample is paired with given."""
        space, x0 = batch.space, batch.x
        if t is None:
            t = sample_times(space.num_samples, self.time, self.mean, self.std, x0.device, generator)
        tt = space.expand(t.to(x0.dtype))
        x_t = torch.lerp(x0, eps, tt)  # (1 - t) x0 + t eps
        out = checked_output(net(x_t, t, **batch.cond), x_t)
        per_sample = space.mean((out.float() - (eps - x0).float()) ** 2)  # [B]
        if self.weighting == "min_snr":
            tf = t.float()
            snr = (1 - tf) ** 2 / tf.clamp(min=1e-12) ** 2  # [B]
            per_sample = per_sample * tf**2 * min_snr_weight(snr, self.gamma)
        return per_sample

    def sampling_schedule(self, schedule: Schedule) -> FlowSchedule:
        return FlowSchedule()

    def denoiser(
        self, net: Callable[..., Tensor], schedule: Schedule, space: Space, cond: Optional[dict] = None
    ) -> DenoiserFn:
        """``(x, t) -> (x0, eps)`` on the VP state ``x``: scaled onto the path, ``x0 = x_t - t v``,
        ``eps = x_t + (1 - t) v``."""
        path, cond = _require_flow(schedule), dict(cond or {})

        def denoise(x: Tensor, t: Tensor) -> Prediction:
            x_t = x * space.expand(path.scale(t).to(x.dtype))
            tt = space.expand(t.to(x.dtype))
            v = checked_output(net(x_t, t.to(x.dtype), **cond), x_t).to(x.dtype)
            return Prediction(torch.addcmul(x_t, tt, v, value=-1), torch.addcmul(x_t, 1 - tt, v))

        return denoise
