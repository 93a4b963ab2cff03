"""Decoders of discrete feature columns for the likelihood: EDM's categorical and integer ``p(h | z_0)``.

A domain whose state holds discrete values in some columns (a molecule's one-hot atom types and atomic numbers,
scaled) declares them with :class:`DiscreteFeatures` (its ``discrete_features()``); the variational bound then scores
those columns by the probability of the discrete value rather than by a Gaussian density, as Hoogeboom et al. 2022
(EDM, App. B) do: the decoder reads the noisy state ``z`` of the first step directly (not the network), and

* a categorical block: class ``k``'s weight is the mass ``N(z_k s, (sigma s)^2)`` puts on ``[1/2, 3/2]`` (around the
  one-hot value 1 in the unscaled units, ``s`` the scale), normalised over the block's classes;
* an integer column: the mass ``N(z s, (sigma s)^2)`` puts on ``[v - 1/2, v + 1/2]`` around the value ``v``.

Here ``z`` and ``sigma`` are divided by ``alpha`` (the noise-to-signal ratio, the state's estimate of the data);
EDM's code uses them undivided, which differs by a factor ``alpha_0 = (1 - 10^-5)^(1/2)`` on its schedule. The masses
are computed exactly in log space (EDM adds 1e-10 to each). Columns are indices along the state's dim 1: a ragged
state's feature columns, a dense state's channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .space import Space

__all__ = [
    "DiscreteFeatures",
    "log_interval_mass",
    "categorical_log_prob",
    "integer_log_prob",
    "discrete_nll",
    "continuous_keep",
]


@dataclass(frozen=True)
class DiscreteFeatures:
    """Columns of a state holding discrete values, scaled (what a domain's ``discrete_features()`` returns).

    ``categorical``: the columns of one one-hot block (column ``j`` holds ``[class == j] / categorical_scale``);
    ``integer``: columns holding ``value / integer_scale`` for whole numbers ``value``."""

    categorical: tuple[int, ...] = ()
    categorical_scale: float = 1.0
    integer: tuple[int, ...] = ()
    integer_scale: float = 1.0

    def __post_init__(self) -> None:
        cols = self.columns()
        if len(set(cols)) != len(cols) or any(c < 0 for c in cols):
            raise ValueError(f"discrete_features: columns {list(cols)} must be distinct indices >= 0")
        if len(self.categorical) == 1:
            raise ValueError("discrete_features: a categorical block needs at least 2 columns (one per class)")
        if not (self.categorical_scale > 0 and self.integer_scale > 0):
            raise ValueError(
                f"discrete_features: scales must be > 0, got {self.categorical_scale} and {self.integer_scale}"
            )

    def columns(self) -> tuple[int, ...]:
        return (*self.categorical, *self.integer)

    def discrete_mask(self, x: Tensor, space: Space) -> Tensor:
        """1 on the discrete columns, 0 elsewhere, broadcastable to ``x`` (``[1, C, 1, ...]``); checked against it."""
        width = x.shape[1]
        if max(self.columns(), default=-1) >= width:
            raise ValueError(f"discrete_features: column {max(self.columns())} is outside the state's {width} columns")
        centered = set(getattr(space, "centered", ()))
        if centered & set(self.columns()):
            raise ValueError(f"discrete_features: columns {sorted(centered & set(self.columns()))} are zero-mean")
        mask = torch.zeros(width, dtype=x.dtype, device=x.device)
        mask[list(self.columns())] = 1
        return mask.reshape(1, width, *([1] * (x.dim() - 2)))


def log_interval_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """``log (Phi(hi) - Phi(lo))`` elementwise for ``lo < hi``, accurate in both tails (the far tail reflected)."""
    flip = (lo + hi) > 0  # mass of [lo, hi] = mass of [-hi, -lo]: keep both ends in the lower tail
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b).clamp(max=1 - 1e-16))


def categorical_log_prob(z: Tensor, sigma: Tensor, scale: float) -> Tensor:
    """EDM's categorical decoder (Hoogeboom et al. 2022, App. B): ``log p(k | z)`` ``[n, K, ...]`` over the classes on
    dim 1 of ``z [n, K, ...]`` (scaled units), each the mass ``N(z_k scale, (sigma scale)^2)`` puts on [1/2, 3/2],
    normalised over ``k``; ``sigma`` broadcasts onto ``z``."""
    std = sigma * scale
    centre = 1.0 - z * scale  # the one-hot value 1 relative to the mean, unscaled units
    log_mass = log_interval_mass((centre - 0.5) / std, (centre + 0.5) / std)  # [n, K, ...]
    return log_mass - torch.logsumexp(log_mass, dim=1, keepdim=True)


def integer_log_prob(value: Tensor, z: Tensor, sigma: Tensor, scale: float) -> Tensor:
    """EDM's integer decoder (Hoogeboom et al. 2022, App. B): ``log`` of the mass ``N(z scale, (sigma scale)^2)`` puts
    on ``[value - 1/2, value + 1/2]``, elementwise (``value`` whole numbers, unscaled; ``z`` scaled)."""
    std = sigma * scale
    centre = value - z * scale
    return log_interval_mass((centre - 0.5) / std, (centre + 0.5) / std)


def _whole(values: Tensor, what: str) -> Tensor:
    """``values`` rounded, refused where they are not whole numbers (data that do not match the declared scale)."""
    rounded = values.round()
    if values.numel() and float((values - rounded).abs().max()) > 1e-3:
        raise ValueError(
            f"discrete_features: the data's {what} columns times their scale are not whole numbers "
            f"(e.g. {float(values.flatten()[int((values - rounded).abs().argmax())]):.4g}); the domain's "
            "discrete_features() must name the columns and scales its data use"
        )
    return rounded


def discrete_nll(x0: Tensor, z: Tensor, alpha_bar: Tensor, space: Space, spec: DiscreteFeatures) -> dict[str, Tensor]:
    """``-log p(h | z)`` per sample ``[B]`` of the discrete columns of ``x0`` (like ``z``, float64) given the state
    ``z = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps`` (``alpha_bar [B]``): ``{"categorical", "integer"}``."""
    a = space.expand(alpha_bar.sqrt())  # [B] -> broadcast onto x0
    y = z / a  # the state's estimate of x0 [like x0]
    sigma = space.expand((1 - alpha_bar).sqrt()) / a  # noise-to-signal ratio, broadcast
    out: dict[str, Tensor] = {}
    if spec.categorical:
        cols = list(spec.categorical)
        onehot = _whole(x0[:, cols] * spec.categorical_scale, "categorical")  # [n, K, ...]
        elem = torch.zeros_like(x0)
        bad = (onehot.sum(1) != 1) | ((onehot != 0) & (onehot != 1)).any(1)  # [n, ...]: not exactly one class
        elem[:, cols[0]] = bad.to(x0.dtype)
        if float(space.sum(elem).sum()) > 0:
            raise ValueError("discrete_features: a valid element's categorical columns are not one-hot at their scale")
        elem[:, cols[0]] = (categorical_log_prob(y[:, cols], sigma, spec.categorical_scale) * onehot).sum(1)
        out["categorical"] = -space.sum(elem)
    if spec.integer:
        cols = list(spec.integer)
        value = _whole(x0[:, cols] * spec.integer_scale, "integer")  # [n, I, ...]
        elem = torch.zeros_like(x0)
        elem[:, cols] = integer_log_prob(value, y[:, cols], sigma, spec.integer_scale)
        out["integer"] = -space.sum(elem)
    return out


def continuous_keep(x0: Tensor, space: Space, spec: Optional[DiscreteFeatures]) -> Optional[Tensor]:
    """1 on the columns a Gaussian decoder scores (all but ``spec``'s), broadcastable to ``x0``; None without a spec."""
    return None if spec is None else 1 - spec.discrete_mask(x0, space)
