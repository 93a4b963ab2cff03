"""The types that travel between layers: a batch of states, the part of a state held fixed, a denoiser's estimate.

They sit beside :mod:`polydiff.space`, which describes their layout, and import nothing else of polydiff, so
domains, objectives, samplers and generation can all name them without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .space import Space

__all__ = ["Batch", "Known", "Prediction", "DenoiserFn"]


@dataclass
class Batch:
    """A batch of states ``x`` with their layout ``space`` and the network's keyword args ``cond``."""

    x: Tensor
    space: Space
    cond: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        cond = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.cond.items()}
        return Batch(self.x.to(device), self.space.to(device), cond)

    @property
    def num_samples(self) -> int:
        return self.space.num_samples


class Known(NamedTuple):
    """Part of the state held fixed while sampling, by replacement (Song et al. 2021, App. I.2; RePaint,
    Lugmayr et al. 2022, eq. 8, without its resampling): after every step the known elements are set to
    ``values`` noised to the next time, and to ``values`` themselves at the end. The rest is generated
    to fit them, as well as an unconditional model can (an approximation of the true conditional).
    """

    values: Tensor  # like the state; only read where mask is 1
    mask: Tensor  # broadcastable to the state, 1 (True) = known


class _Estimate(NamedTuple):
    x0: Tensor
    eps: Tensor


class Prediction(_Estimate):
    """A denoiser's estimate of the clean state ``x0`` and of the noise ``eps``; optionally ``v`` (like ``x0``, in
    [0, 1]), a learned reverse variance's interpolation (Nichol & Dhariwal 2021, eq. 15), which DDPM reads.

    ``v`` is an attribute, not a third item, so that ``x0, eps = prediction`` still unpacks; it is ``None`` for a
    fixed-variance model, and after ``_replace`` / ``_make`` (build a new ``Prediction(x0, eps, v)`` to keep it)."""

    v: Optional[Tensor] = None  # the class default: an instance sets it only when given

    def __new__(cls, x0: Tensor, eps: Tensor, v: Optional[Tensor] = None) -> "Prediction":
        pred = super().__new__(cls, x0, eps)
        if v is not None:
            pred.v = v
        return pred


#: What samplers call: ``denoiser(x_t, t[B]) -> Prediction``.
DenoiserFn = Callable[[Tensor, Tensor], Prediction]
