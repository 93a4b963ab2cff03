"""Training objectives: what the network predicts (eps, v or x0), exact conversions, loss weights.

With ``x_t = alpha x_0 + sigma eps`` and ``alpha^2 + sigma^2 = 1``:

* eps-prediction (Ho et al. 2020): ``x_0 = (x_t - sigma eps) / alpha``;
* v-prediction (Salimans & Ho 2022): ``v = alpha eps - sigma x_0``, so
  ``x_0 = alpha x_t - sigma v`` and ``eps = sigma x_t + alpha v`` (defined at SNR 0 too);
* x0-prediction: ``eps = (x_t - alpha x_0) / sigma``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .domain import Batch
from .schedules import NoiseSchedule
from .space import Space

__all__ = ["Prediction", "PREDICTIONS", "to_prediction", "target_of", "loss_weight", "Objective", "DenoiserFn"]

PREDICTIONS = ("eps", "v", "x0")
WEIGHTINGS = ("uniform", "min_snr")


class Prediction(NamedTuple):
    """A denoiser's estimate of the clean state ``x0`` and of the noise ``eps``."""

    x0: Tensor
    eps: Tensor


#: What samplers call: ``denoiser(x_t, t[B]) -> Prediction``.
DenoiserFn = Callable[[Tensor, Tensor], Prediction]


def _check(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise KeyError(f"unknown objective.prediction {kind!r}; choose one of {list(PREDICTIONS)}")


def to_prediction(kind: str, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
    """Convert a network output of parameterisation ``kind`` to ``(x0, eps)``; alpha, sigma broadcast."""
    # addcmul fuses the scale-and-add: these run once per sampler step on the whole state.
    if kind == "eps":
        return Prediction(torch.addcmul(x_t, sigma, out, value=-1).div_(alpha), out)
    if kind == "v":
        return Prediction(torch.addcmul(alpha * x_t, sigma, out, value=-1), torch.addcmul(sigma * x_t, alpha, out))
    if kind == "x0":
        return Prediction(out, torch.addcmul(x_t, alpha, out, value=-1).div_(sigma))
    _check(kind)
    raise AssertionError


def target_of(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of parameterisation ``kind``."""
    if kind == "eps":
        return eps
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "x0":
        return x0
    _check(kind)
    raise AssertionError


def loss_weight(kind: str, weighting: str, snr: Tensor, gamma: float = 5.0) -> Tensor:
    """Per-sample loss weight; ``min_snr`` is min-SNR-gamma (Hang et al. 2023, eq. 9) in ``kind``'s space.

    The x0-space weight ``min(SNR, gamma)`` is divided by what ``kind``'s loss already carries
    (``SNR`` for eps, ``SNR + 1`` for v), written so that SNR = 0 needs no division by zero.
    """
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise KeyError(f"unknown objective.weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
    clipped = snr.clamp(max=gamma)
    if kind == "eps":
        return gamma / snr.clamp(min=gamma)
    if kind == "v":
        return clipped / (snr + 1)
    if kind == "x0":
        return clipped
    _check(kind)
    raise AssertionError


@dataclass
class Objective:
    """The denoising objective: parameterisation, loss weighting and the denoiser it defines."""

    prediction: str = "eps"
    weighting: str = "uniform"
    gamma: float = 5.0

    def __post_init__(self) -> None:
        _check(self.prediction)
        if self.weighting not in WEIGHTINGS:
            raise KeyError(f"unknown objective.weighting {self.weighting!r}; choose one of {list(WEIGHTINGS)}")
        if self.weighting == "min_snr" and not self.gamma > 0:
            raise ValueError(f"objective.gamma={self.gamma} must be positive (min-SNR weighting clips the SNR at gamma)")

    def sample_t(self, n: int, schedule: NoiseSchedule, device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
        """Per-sample training times ``[B]``: uniform over the trained steps ``i / T``, ``i = 1..T``."""
        gdev = generator.device if generator is not None else device
        i = torch.randint(1, schedule.num_steps + 1, (n,), generator=generator, device=gdev).to(device)
        return schedule.timestep_to_t(i).float()

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: NoiseSchedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Weighted per-sample losses ``[B]``, each a mean over the sample's valid elements."""
        space, x0 = batch.space, batch.x
        if t is None:
            t = self.sample_t(space.num_samples, schedule, x0.device, generator)
        eps = space.randn(generator=generator, dtype=x0.dtype)
        alpha, sigma = schedule.alpha_sigma(t, dtype=x0.dtype)  # [B]
        a, s = space.expand(alpha), space.expand(sigma)
        x_t = a * x0 + s * eps
        out = _checked(net(x_t, t, **batch.cond), x_t)
        target = target_of(self.prediction, x0, eps, a, s)
        per_sample = space.mean((out.float() - target.float()) ** 2)  # [B]
        weight = loss_weight(self.prediction, self.weighting, schedule.snr(t).float(), self.gamma)
        return per_sample * weight

    def loss(self, net: Callable[..., Tensor], batch: Batch, schedule: NoiseSchedule, generator: Optional[torch.Generator] = None) -> Tensor:
        """Mean weighted loss over the batch."""
        return self.losses(net, batch, schedule, generator).mean()

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        """Refuse an eps-prediction on a zero-terminal-SNR schedule (Lin et al. 2024, sec. 3.2): x0 = (x_t - sigma eps)
        / alpha divides by alpha = 0 at t = 1, and every sample would be NaN."""
        if self.prediction == "eps" and float(schedule.alpha_bar_table[-1]) == 0.0:
            raise ValueError("a zero-terminal-SNR schedule (schedule.zero_terminal_snr=true) needs prediction 'v' or "
                             "'x0' (objective.prediction=v): an eps-prediction cannot recover x0 where the signal is "
                             "exactly zero")

    def denoiser(self, net: Callable[..., Tensor], schedule: NoiseSchedule, space: Space, cond: Optional[dict] = None) -> DenoiserFn:
        """The sampler-facing denoiser ``(x_t, t[B]) -> Prediction`` of ``net`` under this objective."""
        cond = dict(cond or {})
        kind = self.prediction
        self.check_schedule(schedule)

        def denoise(x_t: Tensor, t: Tensor) -> Prediction:
            alpha, sigma = schedule.alpha_sigma(t, dtype=x_t.dtype)
            out = _checked(net(x_t, t.to(x_t.dtype), **cond), x_t)
            return to_prediction(kind, out.to(x_t.dtype), x_t, space.expand(alpha), space.expand(sigma))

        return denoise


def _checked(out: Tensor, x_t: Tensor) -> Tensor:
    """The network's output, which must have the state's shape (broadcasting would silently mix elements)."""
    if not isinstance(out, Tensor) or out.shape != x_t.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the network returned {got} for a state x_t of shape {tuple(x_t.shape)}: "
                         "net(x_t, t, **cond) must return a tensor of x_t's shape")
    return out
