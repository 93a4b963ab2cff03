"""Variance-preserving noise schedules, tabulated in float64 and read at any continuous time.

A schedule of ``T`` trained steps is the table ``alpha_bar[i]`` for ``i = 1..T``; time
``t = i / T`` in ``[0, 1]`` addresses it, and ``t = 0`` is clean data (``alpha_bar = 1``).
Between grid points ``alpha_bar`` is interpolated linearly, which keeps it monotone, so a
sampler may use any number of steps and the log-SNR stays strictly decreasing.

``x_t = alpha(t) * x_0 + sigma(t) * eps`` with ``alpha^2 + sigma^2 = 1``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "NoiseSchedule",
    "linear_betas",
    "cosine_betas",
    "sigmoid_betas",
    "polynomial_alpha_bar",
    "rescale_zero_terminal_snr",
    "make_schedule",
    "check_legacy_range",
    "SCHEDULES",
]


def linear_betas(steps: int, beta_start: Optional[float] = None, beta_end: Optional[float] = None) -> Tensor:
    """Linear betas of DDPM (Ho et al. 2020).

    DDPM's range 1e-4..0.02 is set for 1,000 steps; the defaults scale it by ``1000 / steps`` so that
    shorter schedules still end near noise (alpha_bar_T is 4e-5 at 1,000 steps, smaller below: the
    scaled sum of betas is the same, their product not), capped at 0.999 for very short ones.
    Explicit ``beta_start`` / ``beta_end`` are used as given (diffusers' ``linear`` with the same range).
    """
    scale = 1000.0 / steps
    for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if value is not None and not 0 < value < 1:
            raise ValueError(f"schedule.{key}={value} must lie in (0, 1): a beta is the variance added by one step")
    start = 1e-4 * scale if beta_start is None else beta_start
    end = 0.02 * scale if beta_end is None else beta_end
    betas = torch.linspace(start, end, steps, dtype=torch.float64)
    if beta_start is None or beta_end is None:
        betas = betas.clamp(max=0.999)  # a scaled default passes beta = 1 below 20 steps
    return betas


def cosine_betas(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule ``alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2)`` (Nichol & Dhariwal 2021, eq. 17)."""
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    f = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def sigmoid_betas(steps: int, beta_start: Optional[float] = None, beta_end: Optional[float] = None) -> Tensor:
    """Sigmoid betas over ``[-6, 6]`` as in GeoDiff (Xu et al. 2022, their QM9 config).

    GeoDiff's range 1e-7..2e-3 is set for 5,000 steps; the defaults scale it by ``5000 / steps``
    so that shorter schedules still end near noise (alpha_bar 7e-3 at 1,000 steps and 5,000, smaller
    at a few steps, where the sum of betas is capped): unscaled, 1,000 steps would
    end at alpha_bar 0.37 (SNR 0.58) and samplers would start far from their N(0, I) prior.
    Explicit ``beta_start`` / ``beta_end`` are used as given.
    """
    scale = 5000.0 / steps
    beta_start = 1e-7 * scale if beta_start is None else beta_start
    beta_end = min(2e-3 * scale, 0.999) if beta_end is None else beta_end  # below 10 steps it would pass 1
    x = torch.linspace(-6, 6, steps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def polynomial_alpha_bar(steps: int, power: float = 2.0, precision: float = 1e-5, clip: float = 1e-3) -> Tensor:
    """EDM's polynomial schedule ``alpha_bar = (1 - 2s)(1 - t^p)^2 + s`` (Hoogeboom et al. 2022, App. B).

    The step ratios ``alpha_bar_i / alpha_bar_{i-1}`` are clipped from below at ``clip`` for
    stability at the noisy end, and ``s = precision`` keeps ``alpha_bar`` away from 0 and 1.
    Returns ``alpha_bar[1..steps]``.
    """
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    alpha_bar = (1 - t**power) ** 2
    ratios = (alpha_bar[1:] / alpha_bar[:-1]).clamp(min=clip, max=1.0)
    alpha_bar = torch.cat([alpha_bar[:1], torch.cumprod(ratios, 0)])
    alpha_bar = (1 - 2 * precision) * alpha_bar + precision
    return alpha_bar[1:]


def rescale_zero_terminal_snr(alpha_bar: Tensor) -> Tensor:
    """Shift and scale ``sqrt(alpha_bar)`` so the last step has SNR 0 (Lin et al. 2024, Alg. 1)."""
    root = alpha_bar.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


class Schedule:
    """What samplers read of a schedule: ``alpha_bar(t)`` in float64 at any ``t`` in [0, 1] (decreasing from 1 at
    ``t = 0``) in variance-preserving coordinates, and ``num_steps``: the trained grid ``i / T``, or ``None`` where
    time is continuous. Every other reading follows from ``alpha_bar``."""

    name: str = "custom"
    num_steps: Optional[int] = None
    grid: str = "karras"  # the grid sigma-space samplers step on by default (polydiff.sigma_samplers.sigma_grid)

    def alpha_bar(self, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement alpha_bar(t)")

    def alpha_sigma(self, t: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Signal and noise scales ``alpha(t)``, ``sigma(t)`` (computed in float64, cast on use)."""
        ab = self.alpha_bar(t)  # in [0, 1]: both roots are real
        return ab.sqrt().to(dtype), (1 - ab).sqrt().to(dtype)

    def log_snr(self, t: Tensor) -> Tensor:
        """``log(alpha^2 / sigma^2)`` in float64 (``+inf`` at t = 0, ``-inf`` at zero terminal SNR)."""
        ab = self.alpha_bar(t)
        return torch.log(ab) - torch.log1p(-ab)

    def snr(self, t: Tensor) -> Tensor:
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def t_at_sigma(self, sigma: Tensor, iterations: int = 64) -> Tensor:
        """The time whose noise-to-signal ratio ``sigma(t) / alpha(t)`` is ``sigma`` (float64; ``inf`` gives 1),
        by bisection on the monotone ``alpha_bar``: the map from EDM's sigma-space grids to this schedule's time."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        target = 1 / (1 + sigma**2)  # alpha_bar at that ratio
        lo, hi = torch.zeros_like(sigma), torch.ones_like(sigma)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            above = self.alpha_bar(mid) > target  # still too clean: the time lies later
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return torch.where(sigma == 0, torch.zeros_like(sigma), hi)


class NoiseSchedule(Schedule):
    """A tabulated VP schedule: ``alpha_bar[1..T]`` in float64, read at continuous ``t`` in [0, 1]."""

    def __init__(self, alpha_bar: Tensor, name: str = "custom") -> None:
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).flatten()
        if alpha_bar.numel() < 1:
            raise ValueError("a noise schedule needs at least one step")
        if not torch.isfinite(alpha_bar).all() or (alpha_bar < 0).any() or (alpha_bar >= 1).any():
            raise ValueError("alpha_bar must be finite and in [0, 1) at every trained step")
        if (alpha_bar[1:] >= alpha_bar[:-1]).any():
            raise ValueError("alpha_bar must be strictly decreasing (every beta in (0, 1])")
        self.name = name
        self.num_steps = alpha_bar.numel()
        # Grid [0, 1/T, ..., 1] with alpha_bar = 1 at t = 0 (clean data).
        self.alpha_bar_table = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar])
        self._cache: dict[torch.device, Tensor] = {}

    @classmethod
    def from_betas(cls, betas: Sequence[float] | Tensor, name: str = "custom") -> "NoiseSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if (betas <= 0).any() or (betas > 1).any():
            raise ValueError("every beta must be in (0, 1]")
        return cls(torch.cumprod(1 - betas, 0), name=name)

    @property
    def betas(self) -> Tensor:
        ab = self.alpha_bar_table
        return 1 - ab[1:] / ab[:-1]

    def _table(self, device: torch.device) -> Tensor:
        if device not in self._cache:
            self._cache[device] = self.alpha_bar_table.to(device)
        return self._cache[device]

    def alpha_bar(self, t: Tensor) -> Tensor:
        """``alpha_bar(t)`` in float64, linear between grid points ``i / T``."""
        t = torch.as_tensor(t).to(torch.float64)
        table = self._table(t.device)
        pos = t.clamp(0, 1) * self.num_steps
        lo = pos.long().clamp_(max=self.num_steps - 1)  # floor, as pos >= 0
        return torch.lerp(table[lo], table[lo + 1], pos - lo)

    def timestep_to_t(self, index: Tensor) -> Tensor:
        """Trained step ``i`` in ``1..T`` to continuous time ``i / T``."""
        return index.to(torch.float64) / self.num_steps

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, steps={self.num_steps})"


def _drop_none(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": lambda steps, beta_start=None, beta_end=None: torch.cumprod(
        1 - linear_betas(steps, **_drop_none(dict(beta_start=beta_start, beta_end=beta_end))), 0
    ),
    "cosine": lambda steps, offset=None: torch.cumprod(1 - cosine_betas(steps, **_drop_none(dict(offset=offset))), 0),
    "sigmoid": lambda steps, beta_start=None, beta_end=None: torch.cumprod(
        1 - sigmoid_betas(steps, **_drop_none(dict(beta_start=beta_start, beta_end=beta_end))), 0
    ),
    "polynomial": lambda steps, power=None, precision=None: polynomial_alpha_bar(
        steps, **_drop_none(dict(power=power, precision=precision))
    ),
}


def make_schedule(
    name: str,
    steps: int = 1000,
    zero_terminal_snr: bool = False,
    betas: Optional[Sequence[float]] = None,
    **kwargs: Optional[float],
) -> NoiseSchedule:
    """Build a schedule by name (``linear``, ``cosine``, ``sigmoid``, ``polynomial``, ``custom``)."""
    if name == "custom" or betas is not None:
        if betas is None:
            raise ValueError("schedule 'custom' needs schedule.betas: a list of betas in (0, 1]")
        if name != "custom":
            raise ValueError(
                f"schedule.betas is given with schedule.name={name!r}: set schedule.name=custom to use "
                f"those betas, or remove schedule.betas"
            )
        extra = {k: v for k, v in kwargs.items() if v is not None}
        if extra:
            raise KeyError(f"schedule 'custom' takes only schedule.betas (and zero_terminal_snr), not {sorted(extra)}")
        alpha_bar = NoiseSchedule.from_betas(list(betas)).alpha_bar_table[1:]  # betas checked to lie in (0, 1]
    else:
        if name not in SCHEDULES:
            close = difflib.get_close_matches(name, SCHEDULES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown schedule {name!r}. Known schedules: {sorted(SCHEDULES) + ['custom']}.{hint}")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
            raise ValueError(
                f"schedule.steps must be a whole number >= 2, got {steps!r} (one step cannot run from "
                "data to noise: linear and sigmoid betas would start and end at their first value)"
            )
        fn = SCHEDULES[name]
        allowed = set(inspect.signature(fn).parameters) - {"steps"}
        extra = {k: v for k, v in kwargs.items() if v is not None and k not in allowed}
        if extra:
            raise KeyError(f"schedule {name!r} does not take {sorted(extra)}; it takes {sorted(allowed)}")
        alpha_bar = fn(steps, **{k: v for k, v in kwargs.items() if k in allowed})
    if zero_terminal_snr:
        alpha_bar = rescale_zero_terminal_snr(alpha_bar)
        # alpha_bar[-1] == 0 exactly: allowed (the table only forbids values >= 1).
    return NoiseSchedule(alpha_bar, name=name)


def check_legacy_range(cfg: Mapping[str, Any], where: str) -> None:
    """Refuse a config written before explicit linear ``beta_start`` / ``beta_end`` were used as given (its
    ``objective`` has no ``name``) that would now build another schedule: such a range was scaled by 1000 / steps."""
    schedule, objective = cfg.get("schedule") or {}, cfg.get("objective") or {}
    explicit = [k for k in ("beta_start", "beta_end") if schedule.get(k) is not None]
    if "name" in objective or schedule.get("name") != "linear" or not explicit or schedule.get("steps") == 1000:
        return
    raise ValueError(
        f"{where} was trained with schedule.{' and '.join(explicit)} on a linear schedule of {schedule['steps']} "
        "steps, which older polydiff scaled by 1000 / steps and now uses as given. Convert it once (the scaled values, "
        f"marked as read): python -c \"import torch; p='{where}'; c=torch.load(p, weights_only=True); "
        "s=c['config']['schedule']; k=1000/s['steps']; [s.update({n: s[n]*k}) for n in ('beta_start','beta_end') "
        "if s.get(n) is not None]; c['config']['objective']['name']='vp'; torch.save(c, p)\""
    )
