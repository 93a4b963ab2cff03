"""The domain adapter template: data, network and state layout of one modality, and its outputs object.

A domain overrides only what differs from dense tensors. For a data set of ``[...]``-shaped
tensors (or ``(tensor, label)`` pairs) a domain needs just :meth:`Domain.dataset` and
:meth:`Domain.build_network`; everything else has a dense default. Files and metrics belong to
the domain's :class:`polydiff.outputs.Outputs` (:meth:`Domain.make_outputs`).

The network contract used by every sampler and objective::

    net(x_t: Tensor, t: Tensor, **batch.cond) -> Tensor   # same shape as x_t

where ``t`` is a per-sample float tensor ``[B]`` in ``[0, 1]`` (``0`` = clean data) and
``cond`` holds the domain's keyword arguments (class labels, a graph batch index, ...).
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .conditioning import NULL_LABEL
from .outputs import Outputs
from .plugins import check_call
from .space import DenseSpace, RaggedSpace, Space
from .state import Batch, Known  # Batch stays importable from here

__all__ = ["Batch", "Domain"]

log = logging.getLogger(__name__)


def cond_layout(key: str, value: Any, batch: Batch) -> str:
    """How a condition follows a batch's samples when it is split or joined: ``"index"`` (the ragged layout's row
    index, renumbered), ``"sample"`` (a row per sample), ``"row"`` (a row per state row) or ``"whole"`` (one value
    for every sample, kept as it is). A ragged layout with as many rows as samples, not one row per sample in
    order, makes ``"sample"`` and ``"row"`` differ: that is refused by name rather than guessed."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return "whole"
    space, n = batch.space, value.shape[0]
    if isinstance(space, RaggedSpace) and value.shape == space.batch.shape and torch.equal(value, space.batch):
        return "index"
    if (
        n == batch.num_samples == batch.x.shape[0]
        and isinstance(space, RaggedSpace)
        and not torch.equal(space.batch, torch.arange(n, device=space.batch.device))
    ):
        raise ValueError(
            f"cond[{key!r}] has {n} entries, as many as the samples and as the state's rows, which "
            "are laid out differently: override the domain's take() and concat() to say which it is, "
            "or set sampler.batch_size=null"
        )
    if n == batch.num_samples:
        return "sample"
    return "row" if n == batch.x.shape[0] else "whole"


class Domain:
    """Template base class for a data domain: what training and sampling need, and an outputs object for the rest.

    Training and sampling (defaults serve dense ``[B, ...]`` tensors):

    * :meth:`dataset` -- the data set of a split (``"train"``, ``"test"``, ...). Required.
    * :meth:`build_network` -- the denoiser for the recipe's ``model`` section. Required.
    * :meth:`collate` -- items -> :class:`Batch` (dense stacking by default).
    * :meth:`setup` -- what sampling needs from the training set (sample shape, class names).
    * :meth:`prior` -- the layout and conditions of ``n`` new samples; :meth:`can_guide` says whether
      they carry a condition for guidance (:attr:`guidance_keys`), :meth:`parse_label` reads a class
      name and :meth:`default_labels` picks the labels of a draw.
    * :meth:`concat` / :meth:`take` -- one batch from the chunks of a large draw, and a chunk of it
      (override both when ``cond`` holds indices into the state other than a graph batch vector).
    * :meth:`state_dict` / :meth:`load_state_dict` -- what sampling needs from the data
      (sample shape, class names, ...), saved in checkpoints so sampling needs no data.

    Outputs and scoring belong to :attr:`outputs`, a :class:`polydiff.outputs.Outputs` made by
    :meth:`make_outputs` (override it to give the domain its own): :meth:`save_samples`,
    :meth:`read_samples` (``polydiff eval``), :meth:`known_values` (``polydiff sample --known``),
    :meth:`evaluate` and :meth:`reference_metrics` (the same metrics of real held-out data). A ``.pt``
    file and no metrics by default. Callers reach them through the domain (``domain.evaluate(batch)``),
    so a subclass that overrides them itself, as before the outputs object, still works.
    """

    #: Registry name, set by :func:`polydiff.register_domain`.
    name: ClassVar[str] = ""
    #: Keys of ``Batch.cond`` that classifier-free guidance drops and nulls.
    guidance_keys: ClassVar[tuple[str, ...]] = ("label",)

    def __init__(self) -> None:
        self.sample_shape: Optional[tuple[int, ...]] = None
        self.class_names: list[str] = []

    # ------------------------------------------------------------------ data
    def dataset(self, split: str) -> Dataset:
        """The data set of ``split``; items are what :meth:`collate` takes."""
        raise NotImplementedError(f"{type(self).__name__} must implement dataset(split)")

    def collate(self, items: Sequence[Any]) -> Batch:
        """Stack tensors, or ``(tensor, label)`` pairs, into a dense :class:`Batch`."""
        if isinstance(items[0], (tuple, list)):
            x = torch.stack([torch.as_tensor(it[0]) for it in items]).float()
            labels = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
            cond = {"label": labels}
        else:
            x = torch.stack([torch.as_tensor(it) for it in items]).float()
            cond = {}
        return Batch(x, DenseSpace(tuple(x.shape)), cond)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def default_labels(self, n: int, device: torch.device | str = "cpu") -> Optional[Tensor]:
        """Labels ``[n]`` cycling through the classes (``None`` when unconditional): a draw with every class alike."""
        return torch.arange(n, device=device) % self.num_classes if self.num_classes else None

    def can_guide(self) -> bool:
        """Whether samples carry a condition that classifier-free guidance steers towards (default: class labels)."""
        return self.num_classes > 0

    def setup(self, train_set: Dataset) -> None:
        """Read what sampling needs from the training set (called once before training).

        The default takes the sample shape from the first item and, when items carry labels and
        ``class_names`` is still empty, names the classes ``"0" .. str(max label)`` after one pass
        over the labels (set ``self.class_names`` first to give them names and skip the pass).
        """
        if len(train_set) == 0:
            return
        first = self.collate([train_set[0]])
        if self.sample_shape is None:
            self.sample_shape = tuple(first.x.shape[1:])
        if "label" in first.cond and not self.class_names:
            labels = torch.cat([self.collate([train_set[i]]).cond["label"].reshape(-1) for i in range(len(train_set))])
            low, high = int(labels.min()), int(labels.max())
            if low < 0:
                raise ValueError(f"domain {self.name!r}: training labels must be class indices 0, 1, ..., got {low}")
            self.class_names = [str(i) for i in range(high + 1)]
            log.info("domain %r: %d classes named '0'..'%d' from the training labels", self.name, high + 1, high)

    # --------------------------------------------------------------- network
    def build_network(self, **model: Any) -> nn.Module:
        """The denoiser network, built from the recipe's ``model`` section."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_network(**model)")

    # -------------------------------------------------------------- sampling
    def parse_label(self, value: Any) -> int:
        """A class index from a class name or, unless the names are themselves numbers, an index."""
        if self.num_classes == 0:
            raise ValueError(f"domain {self.name!r} is unconditional: it has no labels, got label={value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"label={value!r} is neither a class name nor an index; known labels: {self.class_names}")
        name = str(value)
        if name in self.class_names:
            return self.class_names.index(name)
        if not name.lstrip("-").isdigit():
            raise ValueError(f"unknown label {value!r} for domain {self.name!r}; known labels: {self.class_names}")
        if any(c.lstrip("-").isdigit() for c in self.class_names):
            raise ValueError(
                f"label {value!r} is not a class name, and indices are ambiguous where class names are "
                f"numbers: give one of {self.class_names}"
            )
        index = int(name)
        if not 0 <= index < self.num_classes:
            raise ValueError(
                f"label {index} out of range for domain {self.name!r}: expected 0..{self.num_classes - 1} "
                f"or one of {self.class_names}"
            )
        return index

    def prior(
        self,
        n: int,
        labels: Optional[Tensor] = None,
        device: torch.device | str = "cpu",
        generator: Optional[torch.Generator] = None,
        **options: Any,
    ) -> tuple[Space, dict[str, Tensor]]:
        """Layout and conditions of ``n`` new samples (labels ``[n]``, or null when ``None``).

        ``options`` are the ``prior.KEY=V`` settings of ``polydiff sample``; dense domains take none.
        """
        if options:
            raise KeyError(f"unknown prior option(s) {sorted(options)} for domain {self.name!r}: it takes none")
        if self.sample_shape is None:
            raise RuntimeError(f"domain {self.name!r} has no sample_shape: call setup(train_set) or load_state_dict")
        space = DenseSpace((n, *self.sample_shape), device_=torch.device(device))
        cond: dict[str, Tensor] = {}
        if self.num_classes:
            cond["label"] = (
                labels.to(device)
                if labels is not None
                else torch.full((n,), NULL_LABEL, dtype=torch.long, device=device)
            )
        return space, cond

    def concat(self, batches: Sequence[Batch]) -> Batch:
        """One batch from several (sampling in chunks, stacked guidance): states, layouts and conditions in order.

        Conditions follow :func:`cond_layout`: a chunk's own ragged row index becomes the joined layout's,
        rows per sample or per state row are concatenated, a value for every sample is kept whole.
        """
        first = batches[0]
        space = type(first.space).cat([b.space for b in batches])
        cond: dict[str, Any] = {}
        for k, v in first.cond.items():
            kinds = {cond_layout(k, b.cond[k], b) for b in batches}
            if kinds == {"whole"} or ("whole" in kinds and all(torch.equal(b.cond[k], v) for b in batches)):
                cond[k] = v  # one value for every sample (a last chunk of one sample reads it as its own row)
            elif kinds == {"index"}:
                cond[k] = space.batch
            else:
                cond[k] = torch.cat([b.cond[k] for b in batches])
        return Batch(torch.cat([b.x for b in batches]), space, cond)

    def take(self, batch: Batch, start: int, stop: int) -> Batch:
        """Samples ``start .. stop`` of a batch, the inverse of :meth:`concat` (a large draw is sampled in chunks).

        The layout comes from ``space.take``; conditions follow :func:`cond_layout`.
        """
        space, rows = batch.space.take(start, stop)
        cond: dict[str, Any] = {}
        for k, v in batch.cond.items():
            kind = cond_layout(k, v, batch)
            if kind == "index":
                cond[k] = space.batch
            elif kind == "sample":
                cond[k] = v[start:stop]
            else:
                cond[k] = v[rows] if kind == "row" else v
        return Batch(batch.x[rows], space, cond)

    # --------------------------------------------------------------- outputs
    def make_outputs(self) -> Outputs:
        """The outputs object of this domain: files, known values and metrics (dense defaults)."""
        return Outputs(self)

    @cached_property
    def outputs(self) -> Outputs:
        """The domain's :class:`~polydiff.outputs.Outputs`, made by :meth:`make_outputs` on first use and kept."""
        return self.make_outputs()

    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        """Write samples to ``out_dir``; returns the written paths (:meth:`Outputs.save_samples`)."""
        return self.outputs.save_samples(batch, out_dir, prefix)

    def read_samples(self, path: Path) -> Batch:
        """Samples made elsewhere, read back from ``path`` for :meth:`evaluate` (:meth:`Outputs.read_samples`)."""
        return self.outputs.read_samples(path)

    def known_values(self, path: Path, n: int, **options: Any) -> Known:
        """What ``n`` new samples keep of the sample file at ``path`` (:meth:`Outputs.known_values`)."""
        check_call(self.outputs.known_values, options, "known", given=("path", "n"))  # names a mistyped known.KEY
        return self.outputs.known_values(path, n, **options)

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """Quality metrics of generated samples (:meth:`Outputs.evaluate`)."""
        return self.outputs.evaluate(batch)

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same metrics on ``n`` held-out real samples: the reference row (:meth:`Outputs.reference_metrics`)."""
        return self.outputs.reference_metrics(n)

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "sample_shape": list(self.sample_shape) if self.sample_shape else None,
            "class_names": list(self.class_names),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shape = state.get("sample_shape")
        self.sample_shape = tuple(shape) if shape else None
        self.class_names = list(state.get("class_names", []))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
