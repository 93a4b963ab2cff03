"""Reflow (``objective.name=reflow``): a straighter flow trained on the noise-sample pairs of a trained model.

Rectified flow (Liu et al. 2023, Alg. 1): the teacher's probability-flow ODE couples each noise draw ``z`` with the
sample it maps to, ``x = ODE(z)``; flow matching on these pairs learns paths that cross less, so few Euler steps
suffice. Pairs are drawn afresh for every batch, in the batch's own layout and conditions (labels dropped for
classifier-free guidance give unconditional pairs), so every domain, ragged molecules included, works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .flow import FlowObjective
from .objective_base import register_objective
from .schedules import Schedule
from .state import Batch
from .teacher import DETERMINISTIC, Teacher

__all__ = ["ReflowObjective"]


@register_objective("reflow")
@dataclass
class ReflowObjective(FlowObjective):
    """Flow matching on pairs ``(teacher's sample, its noise)``: ``teacher`` is the trained run, ``sampler`` and
    ``steps`` the deterministic sampler that draws its samples; ``time`` as for ``flow``."""

    teacher: str = ""
    sampler: str = "heun"
    steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.coupling != "independent":
            raise ValueError("objective.coupling does not apply to reflow: the teacher's ODE pairs noise and data")
        if self.sampler not in DETERMINISTIC:
            raise ValueError(
                f"objective.sampler={self.sampler!r} is not deterministic: reflow pairs each noise draw with the "
                f"sample the teacher's ODE maps it to; choose one of {list(DETERMINISTIC)}"
            )
        if int(self.steps) < 1:
            raise ValueError(f"objective.steps={self.steps} must be at least 1")
        self._teacher: Optional[Teacher] = None  # loaded for training only: a student samples without it

    @property
    def teacher_run(self) -> Teacher:
        if self._teacher is None:
            self._teacher = Teacher(self.teacher)
        return self._teacher

    def check_domain(self, domain: Any) -> None:
        self.teacher_run.check_domain(domain)

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-sample squared velocity errors ``[B]`` on fresh teacher pairs in the batch's layout."""
        space = batch.space
        z = space.randn(generator=generator, dtype=batch.x.dtype)
        x = self.teacher_run.sample(z, space, batch.cond, self.sampler, int(self.steps)).to(batch.x.dtype)
        return self.pair_losses(net, Batch(x, space, batch.cond), z, generator, t)
