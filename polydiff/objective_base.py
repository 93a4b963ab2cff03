"""What every objective is: the :class:`BaseObjective` template and the registry objectives join by name.

Objective classes live beside it (:mod:`polydiff.objectives` for ``vp``, :mod:`polydiff.flow`,
:mod:`polydiff.edm`); :mod:`polydiff.objectives` imports them all and finds one by name.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .plugins import register
from .schedules import Schedule
from .space import Space
from .state import Batch, DenoiserFn

__all__ = [
    "BaseObjective",
    "OBJECTIVES",
    "WEIGHTINGS",
    "register_objective",
    "check_objective_class",
    "check_weighting",
    "checked_output",
    "min_snr_weight",
]

#: Loss weightings every objective of the core offers: its own, or min-SNR-gamma (Hang et al. 2023).
WEIGHTINGS = ("uniform", "min_snr")


def check_weighting(weighting: str, gamma: float) -> None:
    """Refuse an unknown ``objective.weighting`` or a ``gamma`` min-SNR weighting cannot clip at."""
    if weighting not in WEIGHTINGS:
        raise KeyError(f"unknown objective.weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
    if weighting == "min_snr" and not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(
            f"objective.gamma={gamma} must be positive and finite (min-SNR weighting clips the SNR at gamma)"
        )


def min_snr_weight(snr: Tensor, gamma: float) -> Tensor:
    """The min-SNR-gamma weight of an x0-space error, ``min(SNR, gamma)`` (Hang et al. 2023, eq. 9)."""
    return snr.clamp(max=gamma)


def checked_output(out: Tensor, x_t: Tensor) -> Tensor:
    """The network's output, which must have the state's shape (broadcasting would silently mix elements)."""
    if not isinstance(out, Tensor) or out.shape != x_t.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the network returned {got} for a state x_t of shape {tuple(x_t.shape)}: "
            "net(x_t, t, **cond) must return a tensor of x_t's shape"
        )
    return out


class BaseObjective:
    """What every objective provides; a new one overrides ``losses`` and ``denoiser`` (and ``check_schedule``
    where it needs something of the schedule) and registers itself with :func:`register_objective`."""

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-sample training losses ``[B]`` of ``net`` on ``batch`` (at times ``t[B]`` when given)."""
        raise NotImplementedError(f"{type(self).__name__} must implement losses(net, batch, schedule, generator, t)")

    def denoiser(
        self, net: Callable[..., Tensor], schedule: Schedule, space: Space, cond: Optional[dict] = None
    ) -> DenoiserFn:
        """The sampler-facing denoiser ``(x_t, t[B]) -> Prediction`` of ``net`` under this objective."""
        raise NotImplementedError(f"{type(self).__name__} must implement denoiser(net, schedule, space, cond)")

    def check_schedule(self, schedule: Schedule) -> None:
        """Refuse a schedule this objective cannot use (called before training and before sampling)."""

    def score(self, net: Callable[..., Tensor], domain: Any, schedule: Schedule, n: int, device: Any) -> Optional[dict]:
        """The metrics of a run whose objective draws no samples (a classifier), e.g. its accuracy against ``t`` on
        held-out data; ``None`` (every generative objective): the trainer samples and scores with the domain's."""
        return None

    def check_domain(self, domain: Any) -> None:
        """Refuse a domain this objective cannot train on (a teacher's objective: another domain than its teacher's)."""

    def network_builder(self, domain: Any) -> Callable[..., Any]:
        """What builds this objective's network from the recipe's ``model`` section: the domain's denoiser
        (``domain.build_network``), or another network the objective trains (an autoencoder's first stage)."""
        return domain.build_network

    def wrap_network(self, net: Any) -> Any:
        """The network this objective trains around the one built (e.g. with extra output heads); ``net`` itself."""
        return net

    def sampling_schedule(self, schedule: Schedule) -> Schedule:
        """The schedule samplers read for this objective's models: the recipe's, or a path the objective fixes
        (flow matching's, EDM's), in variance-preserving coordinates (see :mod:`polydiff.paths`)."""
        return schedule

    def loss(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Mean loss over the batch."""
        return self.losses(net, batch, schedule, generator).mean()


OBJECTIVES: dict[str, type[BaseObjective]] = {}


def check_objective_class(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, BaseObjective)):
        raise TypeError(f"objective {name!r} must be a polydiff.objectives.BaseObjective subclass, got {cls!r}")


def register_objective(name: str, cls: Optional[type[BaseObjective]] = None, *, overwrite: bool = False) -> Any:
    """Register an objective class under ``name`` (``objective.name=NAME``); usable as a decorator."""

    def _register(c: type[BaseObjective]) -> type[BaseObjective]:
        return register(OBJECTIVES, "objective", name, c, check_objective_class, overwrite)

    return _register(cls) if cls is not None else _register
