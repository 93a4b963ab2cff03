"""Spaces: how per-sample scalars, noise, reductions and projections act on a batch of states.

A diffusion *state* is always one tensor. What differs between domains is its layout:

* :class:`DenseSpace` -- a ``[B, ...]`` tensor of any rank, optionally with a mask of
  valid elements (padding in variable-length audio, say).
* :class:`RaggedSpace` -- rows of a ``[N, F]`` tensor grouped into ``B`` samples by a
  batch index (PyTorch Geometric's layout), optionally with columns whose per-sample
  mean is kept at zero (atom positions with zero centre of mass, EDM, Hoogeboom et al. 2022).

Samplers, objectives and guidance only talk to a state through these few methods, which
is what keeps ``polydiff`` free of image-shaped assumptions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Space", "DenseSpace", "RaggedSpace"]


class Space:
    """Base class: the layout of a batch of ``num_samples`` states."""

    num_samples: int

    def expand(self, s: Tensor) -> Tensor:
        """Broadcast a per-sample tensor ``[B]`` onto the state's shape."""
        raise _missing(self, "expand")

    def randn(self, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard Gaussian noise in the state's space (already projected)."""
        raise _missing(self, "randn")

    def project(self, x: Tensor) -> Tensor:
        """Project a state onto the space (identity for unconstrained spaces)."""
        return x

    def sum(self, values: Tensor) -> Tensor:
        """Per-sample sum ``[B]`` of an elementwise tensor over valid elements."""
        raise _missing(self, "sum")

    def count(self) -> Tensor:
        """Per-sample number ``[B]`` of valid elements."""
        raise _missing(self, "count")

    def mean(self, values: Tensor) -> Tensor:
        """Per-sample mean ``[B]`` of an elementwise tensor over valid elements."""
        return self.sum(values) / self.count().clamp(min=1).to(values.dtype)  # a sample with no valid element: 0

    def std(self, values: Tensor) -> Tensor:
        """Per-sample standard deviation ``[B]`` over valid elements."""
        mu = self.mean(values)
        return self.mean((values - self.expand(mu)) ** 2).sqrt()

    def to(self, device: torch.device | str) -> "Space":
        raise _missing(self, "to")

    @classmethod
    def cat(cls, spaces: Sequence["Space"]) -> "Space":
        """One space holding the samples of ``spaces`` in order (states concatenated along dim 0); the draws of
        :func:`polydiff.generate.generate` in chunks and stacked guidance (``guidance.batched``) need it."""
        raise _missing(
            cls,
            "cat",
            "to draw samples in chunks or with guidance.batched=true, or set "
            "sampler.batch_size=null and guidance.batched=false",
        )

    def take(self, start: int, stop: int) -> tuple["Space", slice | Tensor]:
        """Samples ``start .. stop`` as a space of their own, and the state's rows they hold (the inverse of
        :meth:`cat`; generation in chunks of ``sampler.batch_size`` needs it)."""
        raise _missing(self, "take", "to draw samples in chunks, or set sampler.batch_size=null")

    @property
    def device(self) -> torch.device:
        raise _missing(self, "device")


@dataclass
class DenseSpace(Space):
    """A ``[B, ...]`` tensor of any rank; ``mask`` (broadcastable, 1 = valid) is optional."""

    shape: tuple[int, ...]
    mask: Optional[Tensor] = None
    device_: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) < 1 or min(self.shape) < 0:
            raise ValueError(f"DenseSpace needs a batch dimension and sizes >= 0: got shape {self.shape}")
        if self.mask is not None:
            try:
                fits = torch.broadcast_shapes(tuple(self.mask.shape), self.shape) == self.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"DenseSpace mask of shape {tuple(self.mask.shape)} does not broadcast to the state's "
                    f"shape {self.shape}: give it the state's rank, with 1 for broadcast dimensions"
                )
            self.device_ = self.mask.device
        self.device_ = torch.device(self.device_)

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return self.device_

    def expand(self, s: Tensor) -> Tensor:
        # [B] -> [B, 1, ..., 1]
        return s.reshape(s.shape[0], *([1] * (len(self.shape) - 1)))

    def randn(self, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        noise = _randn(self.shape, generator, self.device, dtype)
        return noise if self.mask is None else noise * self.mask

    def sum(self, values: Tensor) -> Tensor:
        if self.mask is not None:
            values = values * self.mask
        return values.reshape(values.shape[0], -1).sum(dim=1)

    def count(self) -> Tensor:
        if self.mask is None:
            n = 1
            for s in self.shape[1:]:
                n *= s
            return torch.full((self.shape[0],), n, device=self.device)
        return torch.broadcast_to(self.mask, self.shape).reshape(self.shape[0], -1).sum(dim=1)

    def project(self, x: Tensor) -> Tensor:
        return x if self.mask is None else x * self.mask

    def to(self, device: torch.device | str) -> "DenseSpace":
        mask = None if self.mask is None else self.mask.to(device)
        return replace(self, mask=mask, device_=torch.device(device))

    @classmethod
    def cat(cls, spaces: Sequence["DenseSpace"]) -> "DenseSpace":
        rest = {s.shape[1:] for s in spaces}
        if len(rest) != 1:
            raise ValueError(f"cannot concatenate dense spaces of per-sample shapes {sorted(rest)}")
        shape = (sum(s.shape[0] for s in spaces), *spaces[0].shape[1:])
        mask = None
        if any(s.mask is not None for s in spaces):  # full [B, ...] masks; a missing one means all valid
            mask = torch.cat(
                [
                    torch.ones(s.shape, device=s.device)
                    if s.mask is None
                    else torch.broadcast_to(s.mask, s.shape).float()
                    for s in spaces
                ]
            )
        return replace(spaces[0], shape=shape, mask=mask)  # a subclass stays itself (its project, its randn)

    def take(self, start: int, stop: int) -> tuple["DenseSpace", slice]:
        mask = self.mask  # one of lower rank, or of one row, broadcasts over the samples: kept whole
        if mask is not None and mask.dim() == len(self.shape) and mask.shape[0] != 1:
            mask = mask[start:stop]
        return replace(self, shape=(stop - start, *self.shape[1:]), mask=mask), slice(start, stop)


@dataclass
class RaggedSpace(Space):
    """Rows ``[N, F]`` grouped into samples by ``batch`` ``[N]`` (sorted or not).

    ``centered`` lists the feature columns whose per-sample mean is kept at zero: noise is
    drawn in that linear subspace and :meth:`project` removes the mean after every step.
    """

    batch: Tensor
    num_samples: int  # type: ignore[assignment]
    num_features: int
    centered: Sequence[int] = ()

    def __post_init__(self) -> None:
        if self.batch.dim() != 1:
            raise ValueError(f"RaggedSpace.batch must be 1-D [N], got shape {tuple(self.batch.shape)}")
        F = self.num_features
        bad = [c for c in self.centered if not -F <= int(c) < F]
        if bad:
            raise ValueError(f"RaggedSpace.centered columns {bad} are outside the state's {F} features")
        self.centered = tuple(int(c) % F for c in self.centered)  # -1 -> F - 1: one form for the slice below
        self._counts = torch.bincount(self.batch, minlength=self.num_samples)
        if self.batch.numel() and int(self.batch.max()) >= self.num_samples:
            raise ValueError(f"batch index {int(self.batch.max())} >= num_samples {self.num_samples}")
        # The centred columns as a slice (or a device index), not a Python list: indexing a GPU tensor
        # with a list copies it to the device and waits for the copy, twice per project().
        c, lo = self.centered, self.centered[0] if self.centered else 0
        self._cols: slice | Tensor = (
            slice(lo, lo + len(c))
            if c == tuple(range(lo, lo + len(c)))
            else torch.tensor(c, dtype=torch.long, device=self.batch.device)
        )

    @property
    def device(self) -> torch.device:
        return self.batch.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.batch.shape[0], self.num_features)

    def expand(self, s: Tensor) -> Tensor:
        # [B] -> [N, 1]
        return s[self.batch].unsqueeze(-1)

    def randn(self, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        noise = _randn(self.shape, generator, self.device, dtype)
        return self.project(noise)

    def segment_sum(self, values: Tensor) -> Tensor:
        """Sum rows per sample: ``[N, ...] -> [B, ...]``."""
        out = values.new_zeros((self.num_samples, *values.shape[1:]))
        return out.index_add_(0, self.batch, values)

    def project(self, x: Tensor) -> Tensor:
        if not self.centered:
            return x
        cols = self._cols
        sub = x[:, cols]  # [N, c]
        mean = self.segment_sum(sub) / self._counts.clamp(min=1).unsqueeze(-1).to(x.dtype)  # [B, c]
        x = x.clone()
        x[:, cols] = sub - mean[self.batch]
        return x

    def sum(self, values: Tensor) -> Tensor:
        return self.segment_sum(values.reshape(values.shape[0], -1).sum(dim=1))

    def count(self) -> Tensor:
        return self._counts * self.num_features

    def to(self, device: torch.device | str) -> "RaggedSpace":
        # Checked where it was built: the counts move along rather than being recounted on the device
        # (bincount and the index check would each wait for the GPU, once per training batch).
        moved = copy.copy(self)
        moved.batch, moved._counts = self.batch.to(device), self._counts.to(device)
        if isinstance(self._cols, Tensor):
            moved._cols = self._cols.to(device)
        return moved

    @classmethod
    def cat(cls, spaces: Sequence["RaggedSpace"]) -> "RaggedSpace":
        layouts = {(s.num_features, tuple(s.centered)) for s in spaces}
        if len(layouts) != 1:
            raise ValueError(f"cannot concatenate ragged spaces of (num_features, centered) {sorted(layouts)}")
        offsets = [0]
        for s in spaces:
            offsets.append(offsets[-1] + s.num_samples)
        batch = torch.cat([s.batch + off for s, off in zip(spaces, offsets)])  # [N_total]
        return replace(spaces[0], batch=batch, num_samples=offsets[-1])  # a subclass stays itself

    def take(self, start: int, stop: int) -> tuple["RaggedSpace", Tensor]:
        rows = ((self.batch >= start) & (self.batch < stop)).nonzero().squeeze(1)  # [n_rows]
        return replace(self, batch=self.batch[rows] - start, num_samples=stop - start), rows


def _missing(space: "Space | type", method: str, use: str = "") -> NotImplementedError:
    """The error of a :class:`Space` subclass that lacks ``method``."""
    name = space.__name__ if isinstance(space, type) else type(space).__name__
    return NotImplementedError(f"{name} has no {method}(): implement it" + (f" {use}" if use else ""))


def _randn(
    shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``torch.randn`` on ``device``, drawn on the generator's own device (a CPU generator may seed GPU noise)."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)
