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
loop only does the elementwise update.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from .noise import NoiseSource
from .plugins import check_options, lookup, option_params, register
from .schedules import NoiseSchedule
from .space import DenseSpace, Space
from .state import DenoiserFn, Known, Prediction

__all__ = [
    "Known",
    "timesteps",
    "sample_ddpm",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample",
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

Callback = Callable[[dict[str, Any]], None]
#: What every sampler takes by keyword (the contract); of these, RUNTIME are passed by the caller, not the config.
CONTRACT = ("space", "generator", "callback", "clip_x0", "spacing", "known")
RUNTIME = ("space", "generator", "callback", "known")
# Positional arguments: steps is the section's sampler.steps, passed by position.
_POSITIONAL = ("denoiser", "noise", "schedule", "steps")
ENTRY_POINT_GROUP = "polydiff.samplers"

SPACINGS = ("trailing", "leading", "linspace")


def timesteps(steps: int, num_train_steps: int, spacing: str = "trailing") -> Tensor:
    """Times ``[steps + 1]`` (float64), descending to ``0``, on the trained grid ``i / T``.

    ``trailing`` starts at the last trained step ``T`` (Lin et al. 2024, Table 2); ``leading``
    and ``linspace`` reproduce the other spacings in common use (diffusers' ``leading``
    starts ``T/steps - 1`` steps short of pure noise).
    """
    T = num_train_steps
    if not 1 <= steps <= T:
        raise ValueError(f"sampler.steps must be in 1..{T} (the schedule's trained steps), got {steps}")
    if spacing == "trailing":
        idx = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64))[:steps]
    elif spacing == "leading":
        idx = (torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (T // steps)) + 1
    elif spacing == "linspace":
        idx = torch.round(torch.linspace(T - 1, 0, steps, dtype=torch.float64)) + 1
    else:
        raise KeyError(f"unknown sampler.spacing {spacing!r}; choose one of {list(SPACINGS)}")
    return torch.cat([idx / T, torch.zeros(1, dtype=torch.float64)])


def _grid(steps: int | Tensor, schedule: NoiseSchedule, spacing: str, batch: int, device: torch.device) -> Tensor:
    """The time grid ``[n + 1, B]`` in float64 from a step count or an explicit grid."""
    if isinstance(steps, Tensor):
        grid = steps.to(device=device, dtype=torch.float64)
        if grid.dim() == 1:
            grid = grid[:, None].expand(-1, batch)
        if grid.dim() != 2 or grid.shape[1] != batch or grid.shape[0] < 2:
            raise ValueError(f"a time grid must be [n + 1] or [n + 1, {batch}], got {tuple(steps.shape)}")
        if not torch.isfinite(grid).all() or (grid[1:] >= grid[:-1]).any() or (grid < 0).any() or (grid > 1).any():
            raise ValueError("a time grid must decrease strictly within [0, 1]")
        return grid
    return timesteps(int(steps), schedule.num_steps, spacing).to(device)[:, None].expand(-1, batch)


def prepare(
    noise: Tensor, space: Optional[Space], steps: int | Tensor, schedule: NoiseSchedule, spacing: str
) -> tuple[Space, Tensor, Tensor]:
    """The space (dense by default), the time grid ``[n + 1, B]`` and ``alpha_bar`` on it ``[n + 1, B]``, in float64."""
    space = space if space is not None else DenseSpace(tuple(noise.shape), device_=noise.device)
    shape = getattr(space, "shape", None)
    if shape is not None and tuple(noise.shape) != tuple(shape):  # broadcasting would silently return another shape
        raise ValueError(
            f"the starting noise has shape {tuple(noise.shape)} but the space describes states of shape "
            f"{tuple(shape)}: draw it with space.randn()"
        )
    grid = _grid(steps, schedule, spacing, space.num_samples, noise.device)  # [n + 1, B]
    ab = schedule.alpha_bar(grid)  # [n + 1, B] float64
    if isinstance(steps, Tensor) and (ab[1:] <= ab[:-1]).any():
        raise ValueError(
            "two times of the grid fall on the same noise level of the schedule (alpha_bar must rise "
            "strictly along the grid): space them further apart"
        )
    return space, grid, ab


def _predict(denoiser: DenoiserFn, x: Tensor, t: Tensor, clip_x0: Optional[float], a: Tensor, s: Tensor) -> Prediction:
    pred = denoiser(x, t)
    if clip_x0 is None:
        return pred
    # Clipping is opt-in: non-image data is not bounded. eps is made consistent with the clipped x0.
    x0 = pred.x0.clamp(-clip_x0, clip_x0)
    return Prediction(x0, (x - a * x0) / s)


def _noise(space: Space, generator: Optional[torch.Generator | NoiseSource], like: Tensor) -> Tensor:
    if isinstance(generator, NoiseSource):
        return generator.randn(like.dtype)
    return space.randn(generator=generator, dtype=like.dtype)


Update = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def _imposer(
    known: Optional[Known], space: Space, generator: Optional[torch.Generator | NoiseSource], like: Tensor
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``impose(x, alpha[B], sigma[B])``: ``x`` with its known elements drawn from q(x_t | values)."""
    if known is None:
        return lambda x, a, s: x
    values = known.values.to(device=like.device, dtype=like.dtype)
    mask = known.mask.to(like.device).bool()
    try:
        if torch.broadcast_shapes(tuple(mask.shape), tuple(like.shape)) != like.shape:
            raise RuntimeError("the mask would enlarge the state")
        values = torch.broadcast_to(values, like.shape)
    except RuntimeError as err:
        raise ValueError(
            f"known values {tuple(known.values.shape)} and mask {tuple(known.mask.shape)} do not fit "
            f"the state {tuple(like.shape)}: the kept sample must have the new samples' layout (the "
            "trained length or size; no prior option that changes it)"
        ) from err

    def impose(x: Tensor, a: Tensor, s: Tensor) -> Tensor:
        noisy = (values * space.expand(a)).addcmul_(_noise(space, generator, x), space.expand(s))
        return torch.where(mask, noisy, x)

    return impose


def run_steps(
    denoiser: DenoiserFn,
    noise: Tensor,
    grid: Tensor,
    ab: Tensor,
    space: Space,
    clip_x0: Optional[float],
    callback: Optional[Callback],
    update: Update,
    known: Optional[Known] = None,
    generator: Optional[torch.Generator | NoiseSource] = None,
) -> Tensor:
    """The loop every sampler shares: predict, ``update(i, x, x0, eps)``, impose the known part, project, report."""
    _check_values(clip_x0=clip_x0)
    dt = noise.dtype
    a_, s_, t_ = ab.sqrt().to(dt), (1 - ab).sqrt().to(dt), grid.to(dt)  # [n + 1, B]
    impose = _imposer(known, space, generator, noise)
    x = impose(noise, a_[0], s_[0])
    for i in range(grid.shape[0] - 1):
        x0, eps = _predict(denoiser, x, t_[i], clip_x0, space.expand(a_[i]), space.expand(s_[i]))
        x = space.project(impose(update(i, x, x0, eps), a_[i + 1], s_[i + 1]))
        if callback is not None:
            callback({"i": i, "t": grid[i], "x": x, "x0": x0})
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {}


def _check_contract(name: str, fn: Any) -> None:
    """Refuse a sampler that does not take the shared signature (its options would reach it as errors later)."""
    if not callable(fn):
        raise TypeError(f"sampler {name!r} must be a function, got {fn!r}")
    params = inspect.signature(fn).parameters
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    lacking = [] if takes_any else [k for k in CONTRACT if k not in params]
    if len(positional) < len(_POSITIONAL) or lacking:
        raise TypeError(
            f"sampler {name!r} ({getattr(fn, '__qualname__', fn)}) must take (denoiser, noise, schedule, "
            f"steps, *, {', '.join(CONTRACT)}, ...)" + (f"; it lacks {lacking}" if lacking else "")
        )


def register_sampler(name: str, fn: Optional[Callable[..., Tensor]] = None, *, overwrite: bool = False) -> Any:
    """Register a sampler function under ``name`` (``sampler.name=NAME``); usable as a decorator."""

    def _register(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        return register(SAMPLERS, "sampler", name, f, _check_contract, overwrite)

    return _register(fn) if fn is not None else _register


@register_sampler("ddim")
@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: NoiseSchedule,
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
    _check_values(eta=eta)
    space, grid, ab = prepare(noise, space, steps, schedule, spacing)
    s = (1 - ab).sqrt()  # [n + 1, B]
    # c: std of the fresh noise; sqrt(s_next^2 - c^2): weight of the predicted eps.
    c = eta * ((s[1:] ** 2 / s[:-1] ** 2) * (1 - ab[:-1] / ab[1:])).clamp(min=0).sqrt()
    eps_w = (s[1:] ** 2 - c**2).clamp(min=0).sqrt()
    a_next, c_, eps_w_ = (v.to(noise.dtype) for v in (ab[1:].sqrt(), c, eps_w))  # [n, B]

    def update(i: int, x: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        x = (x0 * space.expand(a_next[i])).addcmul_(eps, space.expand(eps_w_[i]))
        if eta > 0:
            x = x.addcmul_(_noise(space, generator, x), space.expand(c_[i]))
        return x

    return run_steps(denoiser, noise, grid, ab, space, clip_x0, callback, update, known, generator)


@register_sampler("ddpm")
@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: NoiseSchedule,
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
    """Ancestral DDPM (Ho et al. 2020, eq. 6-7) with the posterior (``small``) or ``large`` (beta) variance."""
    if variance not in ("small", "large"):
        raise KeyError(f"unknown sampler.variance {variance!r}; choose 'small' or 'large'")
    space, grid, ab = prepare(noise, space, steps, schedule, spacing)
    ab_t, ab_s = ab[:-1], ab[1:]  # [n, B]
    alpha_ts2 = ab_t / ab_s
    beta_ts = 1 - alpha_ts2
    one_m_ab_t = (1 - ab_t).clamp(min=1e-20)
    w_x0 = ab_s.sqrt() * beta_ts / one_m_ab_t
    w_xt = alpha_ts2.sqrt() * (1 - ab_s) / one_m_ab_t
    var = beta_ts * (1 - ab_s) / one_m_ab_t if variance == "small" else beta_ts
    # No noise on the final step to clean data (a mask, not an index: no device sync).
    var = var.masked_fill(grid[1:] == 0, 0.0)
    w_x0_, w_xt_, std_ = (v.to(noise.dtype) for v in (w_x0, w_xt, var.clamp(min=0).sqrt()))  # [n, B]

    def update(i: int, x: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        x = (x0 * space.expand(w_x0_[i])).addcmul_(x, space.expand(w_xt_[i]))
        return x.addcmul_(_noise(space, generator, x), space.expand(std_[i]))

    return run_steps(denoiser, noise, grid, ab, space, clip_x0, callback, update, known, generator)


@register_sampler("dpmpp_2m")
@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: NoiseSchedule,
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


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler registered as ``name``, at the ``"module:function"`` path ``name``, or an entry point's."""
    return lookup(SAMPLERS, "sampler", name, ENTRY_POINT_GROUP, _check_contract)


def sampler_options(name: str) -> dict[str, Any]:
    """The options of sampler ``name`` (its keyword arguments but the runtime ones) with their defaults."""
    return {k: p.default for k, p in option_params(get_sampler(name), (*_POSITIONAL, *RUNTIME)).items()}


def check_sampler_options(name: str, options: Mapping[str, Any], settings: tuple[str, ...] = ()) -> None:
    """Refuse an option sampler ``name`` does not take (naming the samplers that do) or of the wrong type.

    ``settings`` are the other keys of the ``sampler`` section (listed in the message for a misspelled key).
    """
    fn = get_sampler(name)
    check_options("sampler", name, fn, options, SAMPLERS, (*_POSITIONAL, *RUNTIME), settings)


def sample(
    name: str,
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: NoiseSchedule,
    steps: int | Tensor,
    **options: Any,
) -> Tensor:
    """Run the sampler ``name`` (see :func:`get_sampler`); an option it does not take is refused, not dropped."""
    check_sampler_options(name, {k: v for k, v in options.items() if k not in RUNTIME})
    return get_sampler(name)(denoiser, noise, schedule, steps, **options)


def _check_values(eta: float = 0.0, clip_x0: Optional[float] = None) -> None:
    """Refuse a DDIM ``eta`` outside [0, 1] and a non-positive ``clip_x0`` (both silently ruin samples)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"sampler.eta={eta} is outside [0, 1]: 0 is deterministic DDIM, 1 ancestral (DDPM-like)")
    if clip_x0 is not None and not float(clip_x0) > 0:
        raise ValueError(f"sampler.clip_x0={clip_x0} must be positive (the bound on |x0|), or null to not clip")
