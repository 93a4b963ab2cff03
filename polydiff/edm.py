"""EDM's preconditioned denoiser (``objective.name=edm``): Karras et al. 2022, Table 1 and eq. 7-8.

The state is ``x = x_0 + sigma eps``; the network ``F`` sees ``c_in x`` and the time of ``sigma`` on the path
:class:`polydiff.paths.EDMSchedule` (a monotone map of ``sigma``, standing in for EDM's ``c_noise``), and the denoiser
is ``D = c_skip x + c_out F``. Training draws ``ln sigma ~ N(p_mean, p_std^2)`` and weights the error of ``D`` by
``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, which makes ``F``'s effective target unit-variance.
``weighting=min_snr`` replaces ``lambda`` by ``min(SNR, gamma)``, ``SNR = 1 / sigma^2``: min-SNR-gamma's weight of an
error of ``x_0`` (here ``D``; Hang et al. 2023, eq. 9), as ``objective.name=vp`` with x0-prediction weights it. It
stops the low noise levels from dominating the gradient; at ``sigma_data = 1`` it is ``lambda min(SNR, gamma) /
(SNR + 1)``, min-SNR for v-prediction, which ``F`` then is. ``precond`` picks the column of EDM's Table 1 that
sets ``c_skip`` and ``c_out`` (what ``F`` predicts); ``c_in`` and the rest of EDM stay. The recipe's ``schedule``
section is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .objective_base import BaseObjective, check_weighting, checked_output, min_snr_weight, register_objective
from .paths import EDMSchedule
from .schedules import Schedule
from .space import Space
from .state import Batch, DenoiserFn, Prediction

__all__ = ["EDMObjective", "PRECONDITIONINGS", "preconditioning"]

# (c_skip, c_out) of each column of EDM's Table 1 that sets what F predicts: EDM's mix (a v-prediction at
# sigma_data = 1), the clean data over sigma_data, or the noise (the VP column, D = x - sigma F). Each F target has
# unit variance.
PRECONDITIONINGS: dict[str, Callable[[Tensor, float], tuple[Tensor, Tensor]]] = {
    "edm": lambda sigma, sd: (sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()),
    "x0": lambda sigma, sd: (torch.zeros_like(sigma), torch.full_like(sigma, sd)),
    "eps": lambda sigma, sd: (torch.ones_like(sigma), -sigma),
}


def preconditioning(sigma: Tensor, sigma_data: float, precond: str = "edm") -> tuple[Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in)`` at noise levels ``sigma`` (Karras et al. 2022, Table 1)."""
    return (*PRECONDITIONINGS[precond](sigma, sigma_data), (sigma**2 + sigma_data**2).rsqrt())


@register_objective("edm")
@dataclass
class EDMObjective(BaseObjective):
    """EDM: ``sigma_data`` (the data's standard deviation), training noise ``ln sigma ~ N(p_mean, p_std^2)`` clipped
    to ``sigma_max``, the path's ``sigma_min``, ``sigma_max`` and ``rho``, the loss ``weighting`` (``uniform``: unit
    weight on ``F``'s error, ``1 / c_out^2``, which is EDM's own lambda; ``min_snr``: min-SNR-``gamma``) and
    ``precond`` (one of :data:`PRECONDITIONINGS`)."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    weighting: str = "uniform"
    gamma: float = 5.0
    precond: str = "edm"

    def __post_init__(self) -> None:
        for key in ("sigma_data", "p_std"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"objective.{key}={value} must be positive and finite")
        if not math.isfinite(self.p_mean):
            raise ValueError(f"objective.p_mean={self.p_mean} must be finite (EDM uses -1.2)")
        check_weighting(self.weighting, self.gamma)
        if self.precond not in PRECONDITIONINGS:
            raise ValueError(f"objective.precond={self.precond!r} is not one of {', '.join(PRECONDITIONINGS)}")
        self.path = EDMSchedule(self.sigma_min, self.sigma_max, self.rho)

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-sample weighted denoising errors ``[B]`` (EDM eq. 8), each a mean over the sample's valid elements."""
        space, x0 = batch.space, batch.x
        if t is None:
            gdev = generator.device if generator is not None else x0.device
            z = torch.randn(space.num_samples, generator=generator, device=gdev, dtype=torch.float64).to(x0.device)
            t = self.path.t_at_sigma((self.p_mean + self.p_std * z).exp())
        sigma = self.path.sigma(t)  # [B] float64
        eps = space.randn(generator=generator, dtype=x0.dtype)
        x = x0 + space.expand(sigma.to(x0.dtype)) * eps
        denoised = self._denoise(net, x, t, sigma, space, batch.cond)
        if self.weighting == "min_snr":
            weight = min_snr_weight(sigma**-2, self.gamma)  # [B]
        else:
            weight = preconditioning(sigma, self.sigma_data, self.precond)[1] ** -2  # [B]: EDM's lambda for "edm"
        return space.mean((denoised.float() - x0.float()) ** 2) * weight.float()

    def _denoise(self, net: Callable[..., Tensor], x: Tensor, t: Tensor, sigma: Tensor, space: Space, cond) -> Tensor:
        """``D(x; sigma) = c_skip x + c_out F(c_in x, t)`` on EDM's state ``x = x_0 + sigma eps``."""
        c_skip, c_out, c_in = (
            space.expand(c.to(x.dtype)) for c in preconditioning(sigma, self.sigma_data, self.precond)
        )
        out = checked_output(net(c_in * x, t.to(x.dtype), **cond), x).to(x.dtype)
        return torch.addcmul(c_skip * x, c_out, out)

    def sampling_schedule(self, schedule: Schedule) -> EDMSchedule:
        return self.path

    def denoiser(
        self, net: Callable[..., Tensor], schedule: Schedule, space: Space, cond: Optional[dict] = None
    ) -> DenoiserFn:
        """``(x, t) -> (x0, eps)`` on the VP state ``x``: scaled to ``x_0 + sigma eps``, denoised by ``D``."""
        if not isinstance(schedule, EDMSchedule):
            raise ValueError(
                f"objective 'edm' samples on its own sigma path, not on {schedule!r}: pass "
                "objective.sampling_schedule(schedule) (as polydiff.build.Parts does) to the denoiser and the sampler"
            )
        cond = dict(cond or {})

        def denoise(x: Tensor, t: Tensor) -> Prediction:
            sigma = schedule.sigma(t)  # [B] float64
            x_ve = x * space.expand(schedule.scale(t).to(x.dtype))
            x0 = self._denoise(net, x_ve, t, sigma, space, cond)
            return Prediction(x0, (x_ve - x0) / space.expand(sigma.to(x.dtype)))

        return denoise
