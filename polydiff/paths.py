"""Closed-form paths of the continuous-time family, read by every sampler in variance-preserving coordinates.

A path ``x_t = a(t) x_0 + b(t) eps`` that is not variance preserving is the VP path ``alpha_bar = a^2 / (a^2 + b^2)``
on the state scaled by ``1 / sqrt(a^2 + b^2)``. Samplers, guidance and inpainting work on that scaled state, and
an objective's denoiser scales it back (``scale(t)``) before its network sees it. Because ``(x0, eps)`` and the
noise-to-signal ratio ``b / a`` do not change under the scaling, DDIM on the scaled state is exactly Euler on the
original path (for rectified flow, ``x + (t' - t) v``), and every sampler reads every model alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["FlowSchedule", "EDMSchedule"]


class FlowSchedule(Schedule):
    """The straight path of flow matching and rectified flow, ``x_t = (1 - t) x_0 + t eps`` (Lipman et al. 2023;
    Liu et al. 2023), continuous in ``t``; its zero terminal SNR makes ``t = 1`` pure noise."""

    name = "flow"
    num_steps = None
    grid = "uniform"  # straight paths: equal steps in t (Euler is then x + dt v)

    def alpha_bar(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t).to(torch.float64).clamp(0, 1)
        return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)

    def scale(self, t: Tensor) -> Tensor:
        """``sqrt(a^2 + b^2)``: the factor from the VP state to the path's own state ``(1 - t) x_0 + t eps``."""
        t = torch.as_tensor(t).to(torch.float64).clamp(0, 1)
        return ((1 - t) ** 2 + t**2).sqrt()

    def __repr__(self) -> str:
        return "FlowSchedule()"


class EDMSchedule(Schedule):
    """EDM's variance-exploding path ``x = x_0 + sigma eps`` (Karras et al. 2022) with ``sigma(t) = (m + t (M - m))^rho
    - (1 - t) sigma_min``, ``m = sigma_min^(1/rho)``, ``M = sigma_max^(1/rho)``: a uniform grid in ``t`` is EDM's
    rho-spaced grid (eq. 5), shifted by at most ``sigma_min`` so that ``t = 0`` is clean data."""

    name = "edm"
    num_steps = None

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        finite = all(math.isfinite(v) for v in (sigma_min, sigma_max, rho))
        if not (finite and 0 < sigma_min < sigma_max and rho > 0):
            raise ValueError(
                f"objective.sigma_min={sigma_min}, sigma_max={sigma_max} and rho={rho} must be finite with "
                "0 < sigma_min < sigma_max and rho > 0 (EDM: 0.002, 80, 7)"
            )
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def sigma(self, t: Tensor) -> Tensor:
        """EDM's noise level ``sigma(t)`` (float64), 0 at ``t = 0`` and ``sigma_max`` at ``t = 1``."""
        t = torch.as_tensor(t).to(torch.float64).clamp(0, 1)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return ((lo + t * (hi - lo)) ** self.rho - (1 - t) * self.sigma_min).clamp(min=0)

    def t_at_sigma(self, sigma: Tensor, iterations: int = 64) -> Tensor:
        """The inverse of :meth:`sigma` by bisection (noise levels above ``sigma_max`` read as ``t = 1``)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        lo, hi = torch.zeros_like(sigma), torch.ones_like(sigma)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            below = self.sigma(mid) < sigma
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return torch.where(sigma <= 0, torch.zeros_like(sigma), hi)

    def alpha_bar(self, t: Tensor) -> Tensor:
        return 1 / (1 + self.sigma(t) ** 2)

    def scale(self, t: Tensor) -> Tensor:
        """``sqrt(1 + sigma^2)``: the factor from the VP state to EDM's ``x_0 + sigma eps``."""
        return (1 + self.sigma(t) ** 2).sqrt()

    def __repr__(self) -> str:
        return f"EDMSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"
