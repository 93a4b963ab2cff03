"""Classifier-free guidance as a denoiser wrapper, so it works with every sampler.

Guidance mixes a conditional and an unconditional prediction (Ho & Salimans 2022):
``x0 = x0_u + w (x0_c - x0_u)``; the same affine mix holds for eps, so both stay consistent.
``w = 0`` is the unconditional model and ``w = 1`` the conditional one; a learned variance's ``v``
(Nichol & Dhariwal 2021) is the conditional prediction's. Optional guidance
rescale (Lin et al. 2024, eq. 15-16) pulls the guided x0 back to the conditional
prediction's per-sample standard deviation.

:func:`stacked_guidance` gets both predictions from one network call on the state stacked with
itself (``[x; x]``, the conditional rows first), as :func:`polydiff.generate.generate` does on
CUDA (``guidance.batched``); :func:`classifier_free_guidance` calls two denoisers, one after the other.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .objectives import DenoiserFn, Prediction
from .schedules import Schedule
from .space import Space

log = logging.getLogger("polydiff")

#: Above this ``sigma / alpha`` (``alpha_bar`` below about 1e-6), classifier guidance's move of ``x0`` is
#: ``sigma^2 / alpha`` times the classifier's gradient: a warning says so at a guided denoiser's first call.
STEEP = 1e3

__all__ = ["classifier_free_guidance", "stacked_guidance", "classifier_guidance", "check_classifier_scale"]

#: ``(x_t, t[B]) -> (conditional, unconditional)`` predictions.
PairFn = Callable[[Tensor, Tensor], tuple[Prediction, Prediction]]


def classifier_free_guidance(
    cond_denoiser: DenoiserFn,
    uncond_denoiser: DenoiserFn,
    scale: float,
    space: Space,
    schedule: Optional[Schedule] = None,
    rescale: float = 0.0,
) -> DenoiserFn:
    """A denoiser that guides ``cond_denoiser`` away from ``uncond_denoiser`` with weight ``scale``."""
    _check_rescale(rescale, schedule)
    if scale == 1.0 and rescale == 0.0:
        return cond_denoiser  # exactly the conditional model: skip the second call
    if scale == 0.0 and rescale == 0.0:
        return uncond_denoiser
    return _guided(lambda x, t: (cond_denoiser(x, t), uncond_denoiser(x, t)), scale, space, schedule, rescale)


def stacked_guidance(
    joint_denoiser: DenoiserFn,
    scale: float,
    space: Space,
    schedule: Optional[Schedule] = None,
    rescale: float = 0.0,
) -> DenoiserFn:
    """Guidance from one call of ``joint_denoiser`` on ``[x; x]`` and ``[t; t]`` per step: its first rows see the
    condition, the rest the null condition (as :meth:`polydiff.Domain.concat` joins a batch and its null copy).

    The network sees twice the rows at once: fewer, larger calls, and twice the activation memory.
    """
    _check_rescale(rescale, schedule)

    def pair(x: Tensor, t: Tensor) -> tuple[Prediction, Prediction]:
        both = joint_denoiser(torch.cat([x, x]), torch.cat([t, t]))  # [2 rows, ...]
        rows = x.shape[0]
        v = both.v  # a learned variance's, when the model has one: split like the rest
        c_v, u_v = (None, None) if v is None else (v[:rows], v[rows:])
        return Prediction(both.x0[:rows], both.eps[:rows], c_v), Prediction(both.x0[rows:], both.eps[rows:], u_v)

    return _guided(pair, scale, space, schedule, rescale)


def _check_rescale(rescale: float, schedule: Optional[Schedule]) -> None:
    """Guidance rescale is a fraction and needs the schedule."""
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance.rescale must be in [0, 1], got {rescale}")
    if rescale > 0 and schedule is None:
        raise ValueError("guidance rescale needs the schedule to keep eps consistent with the rescaled x0")


def _guided(pair: PairFn, scale: float, space: Space, schedule: Optional[Schedule], rescale: float) -> DenoiserFn:
    """The guided denoiser mixing the two predictions of ``pair``."""

    def guided(x: Tensor, t: Tensor) -> Prediction:
        c, u = pair(x, t)
        x0 = u.x0 + scale * (c.x0 - u.x0)
        eps = u.eps + scale * (c.eps - u.eps)
        if rescale > 0:
            factor = space.expand(space.std(c.x0) / space.std(x0).clamp(min=1e-12))  # 0 for an empty sample
            x0 = rescale * (x0 * factor) + (1 - rescale) * x0
            alpha, sigma = schedule.alpha_sigma(t, dtype=x.dtype)
            eps = (x - space.expand(alpha) * x0) / space.expand(sigma)
        return Prediction(x0, eps, c.v)  # a learned variance: the conditional model's (None for a fixed one)

    return guided


def check_classifier_scale(scale: float) -> float:
    """``guidance.classifier_scale`` as a finite number >= 0, or a clear error."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"guidance.classifier_scale={scale} must be a finite number >= 0: 0 leaves the model as it is, larger "
            "values steer harder towards the class or property (e.g. 1 to 10)"
        )
    return value


def classifier_guidance(
    denoiser: DenoiserFn,
    log_prob: Callable[[Tensor, Tensor], Tensor],
    scale: float,
    space: Space,
    schedule: Schedule,
) -> DenoiserFn:
    """Classifier guidance in eps form (Dhariwal & Nichol 2021, eq. 14 and Alg. 2):
    ``eps <- eps - sigma(t) scale grad_x log p(y | x_t)``, and ``x0`` moved to match.

    ``log_prob(x_t, t[B]) -> [B]`` is differentiated with respect to ``x_t`` (projected onto the space, so a
    zero-mean subspace stays one); it wraps any denoiser, a classifier-free guided one too."""
    scale = check_classifier_scale(scale)
    if scale == 0.0:
        return denoiser

    checked: list[bool] = []  # whether the first call looked at its steepness

    def guided(x: Tensor, t: Tensor) -> Prediction:
        pred = denoiser(x, t)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_prob(xg, t).sum(), xg)
        grad = space.project(grad.to(x.dtype))
        alpha, sigma = schedule.alpha_sigma(t, dtype=x.dtype)  # [B]
        shift = space.expand(sigma * scale) * grad  # [like x]
        # x0 = (x - sigma eps) / alpha moves by sigma^2 / alpha * scale * grad; left as it is where alpha = 0.
        to_x0 = torch.where(alpha > 0, sigma / alpha.clamp(min=1e-30), torch.zeros_like(alpha))
        if not checked and float(to_x0.max()) > STEEP:  # the first call: a sampler's noisiest step
            log.warning(
                "classifier guidance at t=%.4g moves x0 by %.3g times the classifier's gradient (scale sigma^2 / alpha "
                "at nearly pure noise, where a classifier's gradient is least reliable): if samples diverge, start "
                "the grid below pure noise with sampler.spacing=leading, or lower guidance.classifier_scale",
                float(t.max()),
                float((to_x0 * sigma).max()) * scale,
            )
        checked.append(True)
        return Prediction(pred.x0 + space.expand(to_x0) * shift, pred.eps - shift, pred.v)

    return guided
