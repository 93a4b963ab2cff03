"""A trained run used inside another run's training: reflow and distillation learn from its samples and steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .objective_base import BaseObjective
from .schedules import Schedule
from .space import Space
from .state import DenoiserFn

__all__ = ["Teacher", "DETERMINISTIC"]

#: Samplers whose output is a function of their starting noise (the probability-flow ODE and its solvers).
DETERMINISTIC = ("euler", "heun", "ddim", "dpmpp_2m", "ode")


class Teacher:
    """The EMA network of the run ``path`` (frozen, in eval mode), with its objective, schedule and domain, moved to
    the device of the first batch it sees."""

    def __init__(self, path: str | Path, key: str = "objective.teacher") -> None:
        from .build import load_run

        if not path:
            raise ValueError(f"{key} is not set: give the folder of the trained run to learn from")
        if not Path(path).exists():
            raise FileNotFoundError(f"{key}={path}: no such run folder or checkpoint")
        parts, ckpt = load_run(path, weights="ema")
        self.path, self.key, self.parts, self.config = str(path), key, parts, dict(ckpt["config"])
        self.step = int(ckpt["step"])
        for p in parts.net.parameters():
            p.requires_grad_(False)

    @property
    def objective(self) -> BaseObjective:
        return self.parts.objective

    @property
    def schedule(self) -> Schedule:
        return self.parts.schedule

    def check_domain(self, domain: Any) -> None:
        """Refuse a student whose domain is not the teacher's (another class or another data layout)."""
        mine = type(self.parts.domain)
        if type(domain) is not mine:
            raise ValueError(
                f"{self.key}={self.path} is a run of domain {mine.__qualname__}, not of this recipe's "
                f"{type(domain).__qualname__}: learn from a run of the same domain"
            )

    def denoiser(self, space: Space, cond: Mapping[str, Any], device: torch.device) -> DenoiserFn:
        """The teacher's denoiser ``(x_t, t) -> (x0, eps)`` on the VP state of its own schedule."""
        net = self.parts.net
        if next(net.parameters()).device != device:
            net.to(device)
        return self.objective.denoiser(net, self.schedule, space, dict(cond))

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        space: Space,
        cond: Mapping[str, Any],
        sampler: str = "heun",
        steps: int = 10,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """The teacher's sample from ``noise`` (its prior's N(0, I) draw) with ``sampler`` at ``steps``."""
        from .samplers import sample

        den = self.denoiser(space, cond, noise.device)
        return sample(sampler, den, noise, self.schedule, steps, space=space, generator=generator)
