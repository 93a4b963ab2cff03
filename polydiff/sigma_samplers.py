"""Samplers that step in EDM's sigma space (Karras et al. 2022): Euler, Heun, the reverse SDE, the probability-flow ODE.

Every model is read through its denoiser ``(x_t, t) -> (x0, eps)`` on the variance-preserving state (see
:mod:`polydiff.paths`), so these samplers take VP, flow-matching and EDM models alike. With
``sigma = s / a`` and ``y = x / a`` the probability-flow ODE is ``dy / dsigma = eps_hat`` (EDM eq. 4), the reverse
SDE ``dy = 2 eps_hat dsigma + sqrt(2 sigma |dsigma|) z`` (EDM eq. 6 with beta = sigma' / sigma); an Euler step of
the ODE is DDIM's ``x' = a' x0 + s' eps``. By default the grid is EDM's (eq. 5: rho = 7, sigma from
``sigma_max`` to ``sigma_min``, then 0) mapped to each schedule's time by ``Schedule.t_at_sigma``, and for flow
matching uniform in ``t`` (the schedule's ``grid``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .noise import NoiseSource
from .sampling import Callback, fresh_noise, predict, prepare, register_sampler, run_steps
from .schedules import Schedule
from .space import Space
from .state import DenoiserFn, Known

__all__ = ["karras_sigmas", "sigma_grid", "sample_euler", "sample_heun", "sample_sde", "sample_ode"]

GRIDS = ("karras", "uniform")
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0  # EDM's range (Karras et al. 2022, Table 1)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's noise levels ``[n + 1]`` (float64): ``n`` levels rho-spaced from ``sigma_max`` to ``sigma_min``, then 0
    (Karras et al. 2022, eq. 5)."""
    if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise ValueError(
            f"sampler.sigma_min={sigma_min} and sampler.sigma_max={sigma_max} must satisfy 0 < sigma_min < sigma_max"
        )
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"sampler.rho={rho} must be positive and finite (EDM uses 7)")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def _ratio(schedule: Schedule, t: Tensor) -> Tensor:
    """The noise-to-signal ratio ``s / a`` at ``t`` (float64; ``inf`` at zero SNR)."""
    ab = schedule.alpha_bar(torch.as_tensor(t, dtype=torch.float64))
    return ((1 - ab) / ab).sqrt()


def _sigma_range(schedule: Schedule, sigma_min: Optional[float], sigma_max: Optional[float]) -> tuple[float, float]:
    """The grid's end points: given, else the schedule's own range within EDM's (0.002, 80)."""
    first = 1.0 / schedule.num_steps if schedule.num_steps else 0.0
    lo = sigma_min if sigma_min is not None else max(EDM_SIGMA_MIN, float(_ratio(schedule, first)))
    hi = sigma_max if sigma_max is not None else min(EDM_SIGMA_MAX, float(_ratio(schedule, 1.0)))
    return float(lo), float(hi)


def sigma_grid(
    steps: int | Tensor,
    schedule: Schedule,
    grid: Optional[str] = None,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7.0,
    spacing: str = "trailing",
    finite_start: bool = True,
) -> int | Tensor:
    """The time grid ``[n + 1]`` a sigma-space sampler steps on: EDM's (``karras``) mapped to the schedule's time,
    or the schedule's own (``uniform``, as DDIM's); ``None``: the schedule's ``grid`` (uniform for flow matching,
    karras for the rest). With ``finite_start`` a uniform grid starts at ``sigma_max`` where ``t = 1`` is pure noise,
    which Heun and the SDE cannot step from; an explicit grid is checked for that and returned as given."""
    if isinstance(steps, Tensor):
        if finite_start and not math.isfinite(float(_ratio(schedule, steps.max()))):
            raise ValueError(
                "this time grid starts where the signal is exactly zero (sigma infinite), where Heun and the reverse "
                "SDE cannot step from: start it below t = 1, or use sampler.name=euler or ddim"
            )
        return steps
    grid = grid if grid is not None else getattr(schedule, "grid", "karras")
    if grid not in GRIDS:
        raise KeyError(f"unknown sampler.grid {grid!r}; choose one of {list(GRIDS)}")
    if isinstance(steps, bool) or int(steps) < 1:
        raise ValueError(f"sampler.steps must be a whole number >= 1, got {steps}")
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max)
    karras_sigmas(1, lo, hi, rho)  # the range and rho are checked whichever grid is used
    if grid == "karras":
        sigmas = karras_sigmas(int(steps), lo, hi, rho)
        t = schedule.t_at_sigma(sigmas)
        if (t[1:] >= t[:-1]).any():
            raise ValueError(
                f"sampler.steps={steps} is too many for the noise levels from {lo:g} to {hi:g} on this schedule: two "
                "grid points fall on the same time; use fewer steps or a wider sigma range"
            )
        return t
    from .sampling import timesteps

    t = timesteps(int(steps), schedule.num_steps, spacing)
    if finite_start and not math.isfinite(float(_ratio(schedule, t[0]))):  # equal steps from sigma_max instead
        t = t * schedule.t_at_sigma(torch.tensor(hi, dtype=torch.float64)) / t[0]
    return t


def _start(noise: Tensor, schedule: Schedule, t0: Tensor, space: Space) -> Tensor:
    """The starting state at ``t0[B]``: the noise scaled to ``s(t0)``, the data's share neglected as EDM does."""
    s0 = (1 - schedule.alpha_bar(t0)).sqrt().to(noise.dtype)  # [B]
    return noise * space.expand(s0)


@register_sampler("euler")
@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: Schedule,
    steps: int | Tensor = 20,
    *,
    grid: Optional[str] = None,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7.0,
    space: Optional[Space] = None,
    generator: Optional[torch.Generator | NoiseSource] = None,
    callback: Optional[Callback] = None,
    clip_x0: Optional[float] = None,
    spacing: str = "trailing",
    known: Optional[Known] = None,
) -> Tensor:
    """Euler on the probability-flow ODE in sigma (Karras et al. 2022, Alg. 1 without its correction): one call a
    step, DDIM's update; on the uniform grid of a flow model, ``x + (t' - t) v``."""
    times = sigma_grid(steps, schedule, grid, sigma_min, sigma_max, rho, spacing, finite_start=False)
    space, tgrid, ab = prepare(noise, space, times, schedule, spacing)
    a_next, s_next = (v.to(noise.dtype) for v in (ab[1:].sqrt(), (1 - ab[1:]).sqrt()))  # [n, B]

    def update(i: int, x: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        return (x0 * space.expand(a_next[i])).addcmul_(eps, space.expand(s_next[i]))

    start = _start(noise, schedule, tgrid[0], space)
    return run_steps(denoiser, start, tgrid, ab, space, clip_x0, callback, update, known, generator)


@register_sampler("heun")
@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: Schedule,
    steps: int | Tensor = 18,
    *,
    grid: Optional[str] = None,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    space: Optional[Space] = None,
    generator: Optional[torch.Generator | NoiseSource] = None,
    callback: Optional[Callback] = None,
    clip_x0: Optional[float] = None,
    spacing: str = "trailing",
    known: Optional[Known] = None,
) -> Tensor:
    """EDM's second-order Heun sampler (Karras et al. 2022, Alg. 2): ``2 steps - 1`` network calls (the last step is
    Euler's); ``s_churn > 0`` adds noise before each step whose sigma lies in ``[s_tmin, s_tmax]``, raising it by the
    factor ``1 + min(s_churn / steps, sqrt(2) - 1)``, with ``s_noise`` the extra noise's scale."""
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    times = sigma_grid(steps, schedule, grid, sigma_min, sigma_max, rho, spacing)
    space, tgrid, ab = prepare(noise, space, times, schedule, spacing)  # the grid without churn
    n = tgrid.shape[0] - 1
    sig = ((1 - ab) / ab).sqrt()  # [n + 1, B]
    gamma = torch.where((sig >= s_tmin) & (sig <= s_tmax) & (sig > 0), min(s_churn / n, math.sqrt(2) - 1), 0.0)
    sig_hat = (sig * (1 + gamma)).clamp(max=float(_ratio(schedule, 1.0)))  # where each step's call is made
    t_hat = torch.where(gamma > 0, schedule.t_at_sigma(sig_hat), tgrid)
    ab_hat = schedule.alpha_bar(t_hat)
    dt = noise.dtype
    a, s = (v.to(dt) for v in (ab.sqrt(), (1 - ab).sqrt()))  # [n + 1, B] without churn
    a_hat, s_hat = (v.to(dt) for v in (ab_hat.sqrt(), (1 - ab_hat).sqrt()))  # [n + 1, B] with churn
    # The churn's extra noise in the VP state: a_hat * sqrt(sig_hat^2 - sig^2) * s_noise.
    extra = (ab_hat.sqrt() * (sig_hat**2 - sig**2).clamp(min=0).sqrt() * s_noise).to(dt)
    churned = (gamma > 0).any(dim=1).tolist()
    second = (tgrid[1:] > 0).all(dim=1).tolist()  # a correction wherever the step does not end at clean data
    t_ = tgrid.to(dt)

    def update(i: int, x: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        e = space.expand
        nxt = (x0 * e(a[i + 1])).addcmul_(eps, e(s[i + 1]))  # Euler from sig_hat[i] to sig[i + 1]
        if second[i]:
            _, eps2 = predict(denoiser, nxt, t_[i + 1], clip_x0, e(a[i + 1]), e(s[i + 1]))
            d = (eps + eps2) / 2  # the trapezoid's slope dy / dsigma
            # y' = y + (sig' - sig_hat) d in y = x / a, written on the VP state.
            nxt = (x * e(a[i + 1] / a_hat[i])).addcmul_(d, e(s[i + 1] - a[i + 1] * s_hat[i] / a_hat[i]))
        if i + 1 < n and churned[i + 1]:  # raise the noise to where the next call is made
            nxt = (nxt * e(a_hat[i + 1] / a[i + 1])).addcmul_(fresh_noise(space, generator, nxt), e(extra[i + 1]))
        return nxt

    start = _start(noise, schedule, t_hat[0], space)
    return run_steps(denoiser, start, t_hat, ab_hat, space, clip_x0, callback, update, known, generator)


@register_sampler("sde")
@torch.no_grad()
def sample_sde(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: Schedule,
    steps: int | Tensor = 100,
    *,
    grid: Optional[str] = None,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7.0,
    space: Optional[Space] = None,
    generator: Optional[torch.Generator | NoiseSource] = None,
    callback: Optional[Callback] = None,
    clip_x0: Optional[float] = None,
    spacing: str = "trailing",
    known: Optional[Known] = None,
) -> Tensor:
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6) in sigma: ``y' = y + 2 (sigma' - sigma) eps_hat +
    sqrt(2 sigma (sigma - sigma')) z`` (Karras et al. 2022, eq. 6); the last step returns the denoised state."""
    times = sigma_grid(steps, schedule, grid, sigma_min, sigma_max, rho, spacing)
    space, tgrid, ab = prepare(noise, space, times, schedule, spacing)
    sig = ((1 - ab) / ab).sqrt()  # [n + 1, B]
    a = ab.sqrt()
    dt = noise.dtype
    # On the VP state: x' = (a'/a) x + a' (2 (sig' - sig) eps + sqrt(2 sig (sig - sig')) z); 0 on the final step.
    final = tgrid[1:] == 0
    w_x = (a[1:] / a[:-1]).masked_fill(final, 0.0).to(dt)
    w_eps = (a[1:] * 2 * (sig[1:] - sig[:-1])).masked_fill(final, 0.0).to(dt)
    w_z = (a[1:] * (2 * sig[:-1] * (sig[:-1] - sig[1:])).clamp(min=0).sqrt()).masked_fill(final, 0.0).to(dt)
    w_x0 = final.to(dt)  # the final step lands on the denoised state

    def update(i: int, x: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        e = space.expand
        out = (x * e(w_x[i])).addcmul_(eps, e(w_eps[i])).addcmul_(x0, e(w_x0[i]))
        return out.addcmul_(fresh_noise(space, generator, out), e(w_z[i]))

    start = _start(noise, schedule, tgrid[0], space)
    return run_steps(denoiser, start, tgrid, ab, space, clip_x0, callback, update, known, generator)


@register_sampler("ode")
@torch.no_grad()
def sample_ode(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: Schedule,
    steps: int | Tensor = 0,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    method: str = "RK45",
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    space: Optional[Space] = None,
    generator: Optional[torch.Generator | NoiseSource] = None,
    callback: Optional[Callback] = None,
    clip_x0: Optional[float] = None,
    spacing: str = "trailing",
    known: Optional[Known] = None,
) -> Tensor:
    """The probability-flow ODE (Song et al. 2021, eq. 13) solved adaptively by SciPy's ``solve_ivp`` (``method``:
    ``RK45``, ``RK23``, ``DOP853``) in ``log sigma`` from ``sigma_max`` to ``sigma_min``, then denoised once.
    ``steps`` is not used: the solver chooses its own (``callback`` receives ``nfe``, the network calls made)."""
    from scipy.integrate import solve_ivp

    if known is not None:
        raise ValueError("sampler 'ode' does not hold a known part fixed: use euler, heun or ddim for inpainting")
    if isinstance(steps, Tensor):
        raise ValueError("sampler 'ode' chooses its own steps: give sampler.rtol / sampler.atol, not a time grid")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"sampler.rtol={rtol} and sampler.atol={atol} must be positive")
    space, _, _ = prepare(noise, space, 1, schedule, spacing)
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max)
    karras_sigmas(1, lo, hi)  # checks the range
    shape, dtype, batch = noise.shape, noise.dtype, space.num_samples
    calls = [0]

    def at(sigma: float) -> tuple[Tensor, Tensor]:
        t = schedule.t_at_sigma(torch.tensor(sigma, dtype=torch.float64)).to(noise.device)
        ab = schedule.alpha_bar(t)
        return t.expand(batch), ab

    def slope(log_sigma: float, y_flat) -> "object":  # dy / dlog(sigma) = sigma * eps_hat, on y = x / a
        sigma = math.exp(log_sigma)
        t, ab = at(sigma)
        y = torch.as_tensor(y_flat, device=noise.device).view(shape).to(dtype)
        a = float(ab.sqrt())
        x = space.project(y * a)
        calls[0] += 1
        eps = predict(denoiser, x, t.to(dtype), clip_x0, a, float((1 - ab).sqrt())).eps
        return (eps * sigma).double().flatten().cpu().numpy()

    y0 = (noise * hi).double().flatten().cpu().numpy()
    sol = solve_ivp(slope, (math.log(hi), math.log(lo)), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the probability-flow ODE solver failed: {sol.message}")
    t, ab = at(lo)
    a, s = float(ab.sqrt()), float((1 - ab).sqrt())
    x = space.project(torch.as_tensor(sol.y[:, -1], device=noise.device).view(shape).to(dtype) * a)
    x0 = predict(denoiser, x, t.to(dtype), clip_x0, a, s).x0
    calls[0] += 1
    x0 = space.project(x0)
    if callback is not None:
        callback({"i": 0, "t": t, "x": x0, "x0": x0, "nfe": calls[0]})
    return x0


def _check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    """EDM's churn options: amounts that are not negative, a sigma range that is not empty."""
    if not (math.isfinite(s_churn) and s_churn >= 0):
        raise ValueError(f"sampler.s_churn={s_churn} must be >= 0 and finite (0: deterministic; EDM used 40-80)")
    if not (s_tmin >= 0 and s_tmax >= s_tmin):
        raise ValueError(f"sampler.s_tmin={s_tmin} and sampler.s_tmax={s_tmax} must satisfy 0 <= s_tmin <= s_tmax")
    if not (math.isfinite(s_noise) and s_noise > 0):
        raise ValueError(f"sampler.s_noise={s_noise} must be positive and finite (EDM used 1.0-1.007)")
