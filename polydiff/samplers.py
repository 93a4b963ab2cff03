"""Samplers: functions of (denoiser, initial noise, schedule, steps, ...) that return clean states.

Every sampler shares one signature (k-diffusion's discipline)::

    sample_x(denoiser, noise, schedule, steps, *, space=None, generator=None, callback=None,
             clip_x0=None, spacing="trailing", known=None, **its own options) -> Tensor

* ``denoiser(x_t, t[B]) -> Prediction(x0, eps)`` (see :meth:`polydiff.objectives.VPObjective.denoiser`);
* ``steps`` is a number of steps, or an explicit time grid ``[n + 1]`` or per-sample ``[n + 1, B]``
  running from noise (``t`` near 1) down to ``0``;
* ``space`` says how per-sample scalars broadcast and how states are projected (dense by default);
* ``generator``: a ``torch.Generator``, or a :class:`polydiff.noise.NoiseSource` (fresh noise that does not
  depend on how a draw is split into chunks);
* ``callback({"i", "t", "x", "x0"})`` is called after every step;
* ``known=Known(values, mask)`` holds part of the state fixed (imputation, inpainting, continuation).

A sampler's options (``sampler.KEY`` in a recipe) are exactly its keyword arguments other than the four the
caller passes (``space``, ``generator``, ``callback``, ``known``): ``clip_x0``, ``spacing`` and its own, such as
DDIM's ``eta``. :func:`register_sampler` adds one under a name; a ``"module:function"`` name is imported on demand.

Coefficients are computed once per call in float64 and cast to the state's dtype, so the
loop only does the elementwise update. DDPM, DDIM and DPM-Solver++ live here; Euler, Heun, the reverse SDE and the
probability-flow ODE, which step in EDM's sigma space, in :mod:`polydiff.sigma_samplers`; the loop and registry
they share in :mod:`polydiff.sampling`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from .consistency_sampler import sample_consistency  # noqa: F401 -- registers "consistency"
from .noise import NoiseSource
from .plugins import check_options, lookup, option_params
from .sampling import (
    ENTRY_POINT_GROUP,
    POSITIONAL,
    RUNTIME,
    SAMPLERS,
    Callback,
    check_contract,
    check_values,
    fresh_noise,
    prepare,
    register_sampler,
    run_steps,
    timesteps,
)
from .schedules import Schedule
from .sigma_samplers import sample_euler, sample_heun, sample_ode, sample_sde  # registered with the rest
from .space import Space
from .state import DenoiserFn, Known, Prediction
from .variance import interpolated_std

__all__ = [
    "Known",
    "timesteps",
    "sample_ddpm",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "sample_sde",
    "sample_ode",
    "sample",
    "network_calls",
    "SAMPLERS",
    "register_sampler",
    "get_sampler",
    "sampler_options",
    "check_sampler_options",
    "prepare",
    "run_steps",
    "RUNTIME",
    "ENTRY_POINT_GROUP",
]


@register_sampler("ddim")
@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: Schedule,
    steps: int | Tensor = 50,
    *,
    eta: float = 0.0,
    space: Optional[Space] = None,
    generator: Optional[torch.Generator | NoiseSource] = None,
    callback: Optional[Callback] = None,
    clip_x0: Optional[float] = None,
    spacing: str = "trailing",
    known: Optional[Known] = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); ``eta = 0`` is deterministic, ``eta = 1`` is ancestral DDPM."""
    check_values(eta=eta)
    space, grid, ab = prepare(noise, space, steps, schedule, spacing)
    s = (1 - ab).sqrt()  # [n + 1, B]
    # c: std of the fresh noise; sqrt(s_next^2 - c^2): weight of the predicted eps.
    c = eta * ((s[1:] ** 2 / s[:-1] ** 2) * (1 - ab[:-1] / ab[1:])).clamp(min=0).sqrt()
    eps_w = (s[1:] ** 2 - c**2).clamp(min=0).sqrt()
    a_next, c_, eps_w_ = (v.to(noise.dtype) for v in (ab[1:].sqrt(), c, eps_w))  # [n, B]

    def update(i: int, x: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        x = (x0 * space.expand(a_next[i])).addcmul_(eps, space.expand(eps_w_[i]))
        if eta > 0:
            x = x.addcmul_(fresh_noise(space, generator, x), space.expand(c_[i]))
        return x

    return run_steps(denoiser, noise, grid, ab, space, clip_x0, callback, update, known, generator)


@register_sampler("ddpm")
@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: Schedule,
    steps: int | Tensor = 1000,
    *,
    variance: str = "small",
    space: Optional[Space] = None,
    generator: Optional[torch.Generator | NoiseSource] = None,
    callback: Optional[Callback] = None,
    clip_x0: Optional[float] = None,
    spacing: str = "trailing",
    known: Optional[Known] = None,
) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020, eq. 6-7) with the posterior (``small``) or ``large`` (beta) variance; a
    prediction that carries a learned ``v`` sets each element's variance instead (Nichol & Dhariwal 2021, eq. 15,
    with the grid's own beta and beta~ when it skips steps), and ``variance`` is not read."""
    if variance not in ("small", "large"):
        raise KeyError(f"unknown sampler.variance {variance!r}; choose 'small' or 'large'")
    space, grid, ab = prepare(noise, space, steps, schedule, spacing)
    ab_t, ab_s = ab[:-1], ab[1:]  # [n, B]
    alpha_ts2 = ab_t / ab_s
    beta_ts = 1 - alpha_ts2
    one_m_ab_t = (1 - ab_t).clamp(min=1e-20)
    w_x0 = ab_s.sqrt() * beta_ts / one_m_ab_t
    w_xt = alpha_ts2.sqrt() * (1 - ab_s) / one_m_ab_t
    post_var = beta_ts * (1 - ab_s) / one_m_ab_t
    var = beta_ts * (1 - ab_s) / one_m_ab_t if variance == "small" else beta_ts
    # No noise on the final step to clean data (a mask, not an index: no device sync).
    var = var.masked_fill(grid[1:] == 0, 0.0)
    w_x0_, w_xt_, std_ = (v.to(noise.dtype) for v in (w_x0, w_xt, var.clamp(min=0).sqrt()))  # [n, B]
    # The two ends a learned v interpolates (no noise on the final step either way).
    last = grid[1:] == 0
    small_, large_ = ((u.masked_fill(last, 0.0).clamp(min=0).sqrt()).to(noise.dtype) for u in (post_var, beta_ts))
    learned: list[Optional[Tensor]] = [None]  # the v of the step's prediction, when the model has one

    def predict_v(x: Tensor, t: Tensor) -> Prediction:
        pred = denoiser(x, t)
        learned[0] = pred.v
        return pred

    def update(i: int, x: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        x = (x0 * space.expand(w_x0_[i])).addcmul_(x, space.expand(w_xt_[i]))
        if learned[0] is not None:  # [like x]
            std = interpolated_std(learned[0].to(x.dtype), space.expand(small_[i]), space.expand(large_[i]))
            return x.addcmul_(fresh_noise(space, generator, x), std)
        return x.addcmul_(fresh_noise(space, generator, x), space.expand(std_[i]))

    return run_steps(predict_v, noise, grid, ab, space, clip_x0, callback, update, known, generator)


@register_sampler("dpmpp_2m")
@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: Schedule,
    steps: int | Tensor = 20,
    *,
    space: Optional[Space] = None,
    generator: Optional[torch.Generator | NoiseSource] = None,
    callback: Optional[Callback] = None,
    clip_x0: Optional[float] = None,
    spacing: str = "trailing",
    known: Optional[Known] = None,
) -> Tensor:
    """DPM-Solver++(2M), multistep second order in log-SNR (Lu et al. 2022, Algorithm 2).

    The final step to clean data is first order, where it returns the last ``x0`` prediction.
    """
    space, grid, ab = prepare(noise, space, steps, schedule, spacing)
    a, s = ab.sqrt(), (1 - ab).sqrt()  # [n + 1, B]
    lam = torch.log(a) - torch.log(s)  # log(alpha / sigma), +inf at t = 0
    h = lam[1:] - lam[:-1]  # [n, B]
    ratio = s[1:] / s[:-1]  # sigma_next / sigma
    phi = -torch.expm1(-h)  # 1 - exp(-h), 1 at the final step
    w_x0 = a[1:] * phi
    # Second-order weights (1 + 1/(2r), -1/(2r)) with r = h_prev / h.
    r = torch.ones_like(h)
    r[1:] = h[:-1] / h[1:]
    final = grid[1:] == 0  # [n, B]
    # 1/(2r), zero where a sample takes its (first-order) final step.
    k = (0.5 / r).masked_fill(final, 0.0)
    first_order = (final.all(dim=1)).tolist()  # read once: no device sync inside the loop
    first_order[0] = True  # no previous x0 yet
    ratio_, w_x0_, lerp_w = (v.to(noise.dtype) for v in (ratio, w_x0, 1 + k))
    prev: list[Tensor] = []

    def update(i: int, x: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        # (1 + 1/2r) x0 - (1/2r) x0_prev
        d = x0 if first_order[i] else torch.lerp(prev[0], x0, space.expand(lerp_w[i]))
        prev[:] = [x0]
        return (x * space.expand(ratio_[i])).addcmul_(d, space.expand(w_x0_[i]))

    return run_steps(denoiser, noise, grid, ab, space, clip_x0, callback, update, known, generator)


#: Network calls of a sampler's run of ``steps`` where it is not one a step: Heun corrects every step but the last.
CALLS_PER_RUN: dict[str, Callable[[int], int]] = {"heun": lambda steps: 2 * steps - 1}


def network_calls(name: str, steps: int) -> int:
    """The denoiser calls (NFE) of sampler ``name`` at ``steps`` (the ODE solver's own: see its callback)."""
    return CALLS_PER_RUN.get(name, lambda n: n)(int(steps))


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler registered as ``name``, at the ``"module:function"`` path ``name``, or an entry point's."""
    return lookup(SAMPLERS, "sampler", name, ENTRY_POINT_GROUP, check_contract)


def sampler_options(name: str) -> dict[str, Any]:
    """The options of sampler ``name`` (its keyword arguments but the runtime ones) with their defaults."""
    return {k: p.default for k, p in option_params(get_sampler(name), (*POSITIONAL, *RUNTIME)).items()}


def check_sampler_options(name: str, options: Mapping[str, Any], settings: tuple[str, ...] = ()) -> None:
    """Refuse an option sampler ``name`` does not take (naming the samplers that do) or of the wrong type.

    ``settings`` are the other keys of the ``sampler`` section (listed in the message for a misspelled key).
    """
    fn = get_sampler(name)
    check_options("sampler", name, fn, options, SAMPLERS, (*POSITIONAL, *RUNTIME), settings)


def sample(
    name: str,
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: Schedule,
    steps: int | Tensor,
    **options: Any,
) -> Tensor:
    """Run the sampler ``name`` (see :func:`get_sampler`); an option it does not take is refused, not dropped."""
    check_sampler_options(name, {k: v for k, v in options.items() if k not in RUNTIME})
    return get_sampler(name)(denoiser, noise, schedule, steps, **options)
