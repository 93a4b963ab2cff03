"""The machinery every sampler shares: time grids, the step loop, the known part, the registry of samplers.

A sampler (see :mod:`polydiff.samplers`) computes its coefficients once on a time grid and hands
:func:`run_steps` an ``update(i, x, x0, eps)``; the loop predicts, updates, imposes the known part, projects onto
the space and reports. The registry checks that a function keeps the shared signature before it is registered.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .noise import NoiseSource
from .plugins import register
from .schedules import Schedule
from .space import DenseSpace, Space
from .state import DenoiserFn, Known, Prediction

__all__ = [
    "timesteps",
    "prepare",
    "run_steps",
    "SAMPLERS",
    "register_sampler",
    "check_contract",
    "predict",
    "fresh_noise",
    "check_values",
    "CONTRACT",
    "RUNTIME",
    "POSITIONAL",
    "ENTRY_POINT_GROUP",
]

Callback = Callable[[dict[str, Any]], None]
#: What every sampler takes by keyword (the contract); of these, RUNTIME are passed by the caller, not the config.
CONTRACT = ("space", "generator", "callback", "clip_x0", "spacing", "known")
RUNTIME = ("space", "generator", "callback", "known")
# Positional arguments: steps is the section's sampler.steps, passed by position.
POSITIONAL = ("denoiser", "noise", "schedule", "steps")
ENTRY_POINT_GROUP = "polydiff.samplers"

SPACINGS = ("trailing", "leading", "linspace")


def timesteps(steps: int, num_train_steps: Optional[int], spacing: str = "trailing") -> Tensor:
    """Times ``[steps + 1]`` (float64), descending to ``0``, on the trained grid ``i / T``.

    ``trailing`` starts at the last trained step ``T`` (Lin et al. 2024, Table 2); ``leading``
    and ``linspace`` reproduce the other spacings in common use (diffusers' ``leading``
    starts ``T/steps - 1`` steps short of pure noise). A continuous schedule (``num_train_steps=None``) has no
    trained grid: every spacing is ``steps`` equal steps from ``t = 1``.
    """
    if spacing not in SPACINGS:
        raise KeyError(f"unknown sampler.spacing {spacing!r}; choose one of {list(SPACINGS)}")
    if num_train_steps is None:
        if isinstance(steps, bool) or not int(steps) >= 1:
            raise ValueError(f"sampler.steps must be a whole number >= 1, got {steps}")
        return torch.linspace(1, 0, int(steps) + 1, dtype=torch.float64)
    T = num_train_steps
    if not 1 <= steps <= T:
        raise ValueError(f"sampler.steps must be in 1..{T} (the schedule's trained steps), got {steps}")
    if spacing == "trailing":
        idx = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64))[:steps]
    elif spacing == "leading":
        idx = (torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (T // steps)) + 1
    else:
        idx = torch.round(torch.linspace(T - 1, 0, steps, dtype=torch.float64)) + 1
    return torch.cat([idx / T, torch.zeros(1, dtype=torch.float64)])


def _grid(steps: int | Tensor, schedule: Schedule, spacing: str, batch: int, device: torch.device) -> Tensor:
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
    noise: Tensor, space: Optional[Space], steps: int | Tensor, schedule: Schedule, spacing: str
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


def predict(denoiser: DenoiserFn, x: Tensor, t: Tensor, clip_x0: Optional[float], a: Tensor, s: Tensor) -> Prediction:
    """The denoiser's ``(x0, eps)`` at ``(x, t)``, ``x0`` clipped to ``[-clip_x0, clip_x0]`` when asked."""
    pred = denoiser(x, t)
    if clip_x0 is None:
        return pred
    # Clipping is opt-in: non-image data is not bounded. eps is made consistent with the clipped x0.
    x0 = pred.x0.clamp(-clip_x0, clip_x0)
    return Prediction(x0, (x - a * x0) / s, pred.v)


def fresh_noise(space: Space, generator: Optional[torch.Generator | NoiseSource], like: Tensor) -> Tensor:
    """Fresh noise of ``like``'s dtype from a generator or a chunk-invariant :class:`NoiseSource`."""
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
        noisy = (values * space.expand(a)).addcmul_(fresh_noise(space, generator, x), space.expand(s))
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
    check_values(clip_x0=clip_x0)
    dt = noise.dtype
    a_, s_, t_ = ab.sqrt().to(dt), (1 - ab).sqrt().to(dt), grid.to(dt)  # [n + 1, B]
    impose = _imposer(known, space, generator, noise)
    x = impose(noise, a_[0], s_[0])
    for i in range(grid.shape[0] - 1):
        x0, eps = predict(denoiser, x, t_[i], clip_x0, space.expand(a_[i]), space.expand(s_[i]))
        x = space.project(impose(update(i, x, x0, eps), a_[i + 1], s_[i + 1]))
        if callback is not None:
            callback({"i": i, "t": grid[i], "x": x, "x0": x0})
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {}


def check_contract(name: str, fn: Any) -> None:
    """Refuse a sampler that does not take the shared signature (its options would reach it as errors later)."""
    if not callable(fn):
        raise TypeError(f"sampler {name!r} must be a function, got {fn!r}")
    params = inspect.signature(fn).parameters
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    lacking = [] if takes_any else [k for k in CONTRACT if k not in params]
    if len(positional) < len(POSITIONAL) or lacking:
        raise TypeError(
            f"sampler {name!r} ({getattr(fn, '__qualname__', fn)}) must take (denoiser, noise, schedule, "
            f"steps, *, {', '.join(CONTRACT)}, ...)" + (f"; it lacks {lacking}" if lacking else "")
        )


def register_sampler(name: str, fn: Optional[Callable[..., Tensor]] = None, *, overwrite: bool = False) -> Any:
    """Register a sampler function under ``name`` (``sampler.name=NAME``); usable as a decorator."""

    def _register(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        return register(SAMPLERS, "sampler", name, f, check_contract, overwrite)

    return _register(fn) if fn is not None else _register


def check_values(eta: float = 0.0, clip_x0: Optional[float] = None) -> None:
    """Refuse a DDIM ``eta`` outside [0, 1] and a non-positive ``clip_x0`` (both silently ruin samples)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"sampler.eta={eta} is outside [0, 1]: 0 is deterministic DDIM, 1 ancestral (DDPM-like)")
    if clip_x0 is not None and not float(clip_x0) > 0:
        raise ValueError(f"sampler.clip_x0={clip_x0} must be positive (the bound on |x0|), or null to not clip")
