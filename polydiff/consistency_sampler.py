"""The consistency models' sampler (``sampler.name=consistency``): denoise in one step, re-noise, denoise again."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .noise import NoiseSource
from .sampling import Callback, fresh_noise, prepare, register_sampler, run_steps
from .schedules import Schedule
from .space import Space
from .state import DenoiserFn, Known

__all__ = ["sample_consistency"]


@register_sampler("consistency")
@torch.no_grad()
def sample_consistency(
    denoiser: DenoiserFn,
    noise: Tensor,
    schedule: Schedule,
    steps: int | Tensor = 1,
    *,
    space: Optional[Space] = None,
    generator: Optional[torch.Generator | NoiseSource] = None,
    callback: Optional[Callback] = None,
    clip_x0: Optional[float] = None,
    spacing: str = "trailing",
    known: Optional[Known] = None,
) -> Tensor:
    """Multistep consistency sampling (Song, Dhariwal, Chen & Sutskever 2023, Alg. 1): the denoiser's clean estimate
    at each time of the grid, noised afresh to the next time (``alpha x0 + sigma z``); one step is one network call."""
    space, grid, ab = prepare(noise, space, steps, schedule, spacing)
    a_next, s_next = (v.to(noise.dtype) for v in (ab[1:].sqrt(), (1 - ab[1:]).sqrt()))  # [n, B]

    def update(i: int, x: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        x = x0 * space.expand(a_next[i])
        if i < grid.shape[0] - 2:  # the last step returns the clean estimate itself
            x = x.addcmul_(fresh_noise(space, generator, x), space.expand(s_next[i]))
        return x

    return run_steps(denoiser, noise, grid, ab, space, clip_x0, callback, update, known, generator)
