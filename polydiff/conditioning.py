"""Null conditions for classifier-free guidance (Ho & Salimans 2022).

A condition is a per-sample tensor in the ``cond`` dict passed to a network. Its *null*
value marks "no condition": ``-1`` for integer labels and ``NaN`` for float properties.
Networks map null entries to a learned null embedding, so label dropout in training and
the unconditional branch of guidance need no domain code.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["NULL_LABEL", "null_like", "is_null", "null_condition", "drop_condition"]

NULL_LABEL = -1


def null_like(value: Tensor) -> Tensor:
    """The null condition with ``value``'s shape and dtype."""
    if value.is_floating_point():
        return torch.full_like(value, float("nan"))
    return torch.full_like(value, NULL_LABEL)


def is_null(value: Tensor) -> Tensor:
    """Per-sample boolean ``[B]``: which entries hold the null condition."""
    flat = value.reshape(value.shape[0], -1)
    if value.is_floating_point():
        return torch.isnan(flat).all(dim=1)
    return (flat == NULL_LABEL).all(dim=1)


def null_condition(cond: Mapping[str, Tensor], keys: Iterable[str]) -> dict[str, Tensor]:
    """A copy of ``cond`` with every guidance key in ``keys`` set to null."""
    out = dict(cond)
    for k in keys:
        if k in out and out[k] is not None:
            out[k] = null_like(out[k])
    return out


def drop_condition(
    cond: Mapping[str, Tensor], keys: Iterable[str], p: float, generator: Optional[torch.Generator] = None
) -> dict[str, Tensor]:
    """Replace each sample's guidance keys by null with probability ``p`` (label dropout)."""
    out = dict(cond)
    present = [k for k in keys if k in out and out[k] is not None]
    if p <= 0 or not present:
        return out
    b = out[present[0]].shape[0]
    device = out[present[0]].device
    drop = torch.rand(b, generator=generator, device=generator.device if generator is not None else device) < p
    drop = drop.to(device)
    for k in present:
        v = out[k]
        mask = drop.reshape(b, *([1] * (v.dim() - 1)))
        out[k] = torch.where(mask, null_like(v), v)
    return out
