"""Classifier-free guidance as a denoiser wrapper, so it works with every sampler.

Guidance mixes a conditional and an unconditional prediction (Ho & Salimans 2022):
``x0 = x0_u + w (x0_c - x0_u)``; the same affine mix holds for eps, so both stay consistent.
``w = 0`` is the unconditional model and ``w = 1`` the conditional one; a learned variance's ``v``
(Nichol & Dhariwal 2021) is the conditional prediction's. Optional guidance
rescale (Lin et al. 2024, eq. 15-16) pulls the guided x0 back to the conditional
prediction's per-sample standard deviation.

Either guidance may act only where the noise level ``sigma / alpha`` (EDM's sigma) lies in an interval
(Kynkaenniemi et al. 2024): outside it classifier-free guidance gives the conditional prediction and classifier
guidance adds nothing. Classifier guidance defaults to ``CLASSIFIER_INTERVAL``, which leaves out nearly pure noise,
where a classifier is at chance and its gradient moves ``x0`` by ``sigma^2 / alpha`` times itself.

:func:`stacked_guidance` gets both predictions from one network call on the state stacked with
itself (``[x; x]``, the conditional rows first), as :func:`polydiff.generate.generate` does on
CUDA (``guidance.batched``); :func:`classifier_free_guidance` calls two denoisers, one after the other.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .objectives import DenoiserFn, Prediction
from .schedules import Schedule
from .space import Space

log = logging.getLogger("polydiff")

#: Above this ``sigma / alpha`` (``alpha_bar`` below about 1e-6), classifier guidance's move of ``x0`` is
#: ``sigma^2 / alpha`` times the classifier's gradient: a warning says so at a guided denoiser's first call.
STEEP = 1e3

#: ``guidance.classifier_interval``'s default: EDM's sigma (``sigma / alpha``) up to 20, where a cosine schedule's
#: ``alpha_bar`` is 0.0025: trailing and leading grids alike then leave out nearly pure noise.
CLASSIFIER_INTERVAL = (0.0, 20.0)

__all__ = [
    "classifier_free_guidance",
    "stacked_guidance",
    "classifier_guidance",
    "check_classifier_scale",
    "check_interval",
    "in_interval",
    "CLASSIFIER_INTERVAL",
]

#: ``(x_t, t[B]) -> (conditional, unconditional)`` predictions.
PairFn = Callable[[Tensor, Tensor], tuple[Prediction, Prediction]]


def classifier_free_guidance(
    cond_denoiser: DenoiserFn,
    uncond_denoiser: DenoiserFn,
    scale: float,
    space: Space,
    schedule: Optional[Schedule] = None,
    rescale: float = 0.0,
    interval: Optional[Sequence[float]] = None,
) -> DenoiserFn:
    """A denoiser that guides ``cond_denoiser`` away from ``uncond_denoiser`` with weight ``scale``, at the noise
    levels of ``interval`` (``[lo, hi]`` of ``sigma / alpha``; None: all), and is ``cond_denoiser`` elsewhere."""
    _check_rescale(rescale, schedule)
    interval = _interval_with(interval, schedule)
    if scale == 1.0 and rescale == 0.0:
        return cond_denoiser  # exactly the conditional model: skip the second call
    if scale == 0.0 and rescale == 0.0 and interval is None:
        return uncond_denoiser

    def pair(x: Tensor, t: Tensor) -> tuple[Prediction, Prediction]:
        return cond_denoiser(x, t), uncond_denoiser(x, t)

    return _guided(pair, scale, space, schedule, rescale, interval, cond_denoiser)


def stacked_guidance(
    joint_denoiser: DenoiserFn,
    scale: float,
    space: Space,
    schedule: Optional[Schedule] = None,
    rescale: float = 0.0,
    interval: Optional[Sequence[float]] = None,
) -> DenoiserFn:
    """Guidance from one call of ``joint_denoiser`` on ``[x; x]`` and ``[t; t]`` per step: its first rows see the
    condition, the rest the null condition (as :meth:`polydiff.Domain.concat` joins a batch and its null copy).

    The network sees twice the rows at once: fewer, larger calls, and twice the activation memory. ``interval`` as
    :func:`classifier_free_guidance`'s.
    """
    _check_rescale(rescale, schedule)
    interval = _interval_with(interval, schedule)

    def pair(x: Tensor, t: Tensor) -> tuple[Prediction, Prediction]:
        both = joint_denoiser(torch.cat([x, x]), torch.cat([t, t]))  # [2 rows, ...]
        rows = x.shape[0]
        v = both.v  # a learned variance's, when the model has one: split like the rest
        c_v, u_v = (None, None) if v is None else (v[:rows], v[rows:])
        return Prediction(both.x0[:rows], both.eps[:rows], c_v), Prediction(both.x0[rows:], both.eps[rows:], u_v)

    return _guided(pair, scale, space, schedule, rescale, interval)


def check_interval(
    interval: Optional[Sequence[float]], key: str = "guidance.interval"
) -> Optional[tuple[float, float]]:
    """``interval`` as ``(lo, hi)`` with ``0 <= lo < hi`` (``hi`` may be ``inf``), or None (every noise level)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (0.0 <= lo < hi):  # also refuses NaN
        raise ValueError(
            f"{key}={interval!r} must be two numbers [lo, hi] with 0 <= lo < hi, bounds of EDM's sigma = sigma / alpha "
            f"within which guidance acts (e.g. [0, 20]; inf for no upper bound), or null for every noise level"
        )
    return lo, hi


def in_interval(t: Tensor, schedule: Schedule, interval: Optional[tuple[float, float]]) -> Optional[Tensor]:
    """Which samples' noise level ``sigma(t) / alpha(t)`` lies in ``interval`` (``[B]`` bool; None: all do)."""
    if interval is None:
        return None
    alpha, sigma = schedule.alpha_sigma(t, dtype=torch.float64)  # [B]
    level = torch.where(alpha > 0, sigma / alpha.clamp(min=1e-300), torch.full_like(alpha, math.inf))
    return ((level >= interval[0]) & (level <= interval[1])).to(t.device)


def _interval_with(interval: Optional[Sequence[float]], schedule: Optional[Schedule]) -> Optional[tuple[float, float]]:
    """A checked interval, which needs the schedule to read noise levels."""
    checked = check_interval(interval)
    if checked is not None and schedule is None:
        raise ValueError("guidance.interval needs the schedule to read each step's noise level sigma / alpha")
    return checked


def _check_rescale(rescale: float, schedule: Optional[Schedule]) -> None:
    """Guidance rescale is a fraction and needs the schedule."""
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance.rescale must be in [0, 1], got {rescale}")
    if rescale > 0 and schedule is None:
        raise ValueError("guidance rescale needs the schedule to keep eps consistent with the rescaled x0")


def _guided(
    pair: PairFn,
    scale: float,
    space: Space,
    schedule: Optional[Schedule],
    rescale: float,
    interval: Optional[tuple[float, float]] = None,
    cond_only: Optional[DenoiserFn] = None,
) -> DenoiserFn:
    """The guided denoiser mixing the two predictions of ``pair`` at the noise levels of ``interval``; elsewhere the
    conditional prediction (from ``cond_only`` alone when no sample of a call is inside)."""

    def guided(x: Tensor, t: Tensor) -> Prediction:
        inside = in_interval(t, schedule, interval)  # [B] or None
        if inside is not None and cond_only is not None and not bool(inside.any()):
            return cond_only(x, t)
        c, u = pair(x, t)
        x0 = u.x0 + scale * (c.x0 - u.x0)
        eps = u.eps + scale * (c.eps - u.eps)
        if rescale > 0:
            factor = space.expand(space.std(c.x0) / space.std(x0).clamp(min=1e-12))  # 0 for an empty sample
            x0 = rescale * (x0 * factor) + (1 - rescale) * x0
            alpha, sigma = schedule.alpha_sigma(t, dtype=x.dtype)
            eps = (x - space.expand(alpha) * x0) / space.expand(sigma)
        if inside is not None and not bool(inside.all()):
            keep = space.expand(inside)  # [like x]: guided inside the interval, conditional outside
            x0, eps = torch.where(keep, x0, c.x0), torch.where(keep, eps, c.eps)
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
    interval: Optional[Sequence[float]] = CLASSIFIER_INTERVAL,
) -> DenoiserFn:
    """Classifier guidance in eps form (Dhariwal & Nichol 2021, eq. 14 and Alg. 2):
    ``eps <- eps - sigma(t) scale grad_x log p(y | x_t)``, and ``x0`` moved to match, at the noise levels of
    ``interval`` (``[lo, hi]`` of ``sigma / alpha``; None: all).

    ``log_prob(x_t, t[B]) -> [B]`` is differentiated with respect to ``x_t`` (projected onto the space, so a
    zero-mean subspace stays one); it wraps any denoiser, a classifier-free guided one too."""
    scale = check_classifier_scale(scale)
    interval = check_interval(interval, "guidance.classifier_interval")
    if scale == 0.0:
        return denoiser

    checked: list[bool] = []  # whether the first call looked at its steepness

    def guided(x: Tensor, t: Tensor) -> Prediction:
        pred = denoiser(x, t)
        inside = in_interval(t, schedule, interval)  # [B] or None
        if inside is not None and not bool(inside.any()):
            return pred  # no gradient to take: every sample is outside the interval
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_prob(xg, t).sum(), xg)
        grad = space.project(grad.to(x.dtype))
        alpha, sigma = schedule.alpha_sigma(t, dtype=x.dtype)  # [B]
        weight = sigma * scale if inside is None else sigma * scale * inside.to(x.dtype)  # [B]: 0 outside
        shift = space.expand(weight) * grad  # [like x]
        # x0 = (x - sigma eps) / alpha moves by sigma^2 / alpha * scale * grad; left as it is where alpha = 0.
        to_x0 = torch.where(alpha > 0, sigma / alpha.clamp(min=1e-30), torch.zeros_like(alpha))
        steep = to_x0 if inside is None else to_x0 * inside.to(x.dtype)
        if not checked and float(steep.max()) > STEEP:  # the first call: a sampler's noisiest step
            log.warning(
                "classifier guidance at t=%.4g moves x0 by %.3g times the classifier's gradient (scale sigma^2 / alpha "
                "at nearly pure noise, where a classifier's gradient is least reliable): if samples diverge, bound "
                "guidance.classifier_interval (e.g. [0, 20]), start the grid below pure noise with "
                "sampler.spacing=leading, or lower guidance.classifier_scale",
                float(t.max()),
                float((steep * sigma).max()) * scale,
            )
        checked.append(True)
        return Prediction(pred.x0 + space.expand(to_x0) * shift, pred.eps - shift, pred.v)

    return guided
