"""The domain adapter template: data, network, state layout, outputs and metrics of one modality.

A domain overrides only what differs from dense tensors. For a data set of ``[...]``-shaped
tensors (or ``(tensor, label)`` pairs) a domain needs just :meth:`Domain.dataset` and
:meth:`Domain.build_network`; everything else has a dense default.

The network contract used by every sampler and objective::

    net(x_t: Tensor, t: Tensor, **batch.cond) -> Tensor   # same shape as x_t

where ``t`` is a per-sample float tensor ``[B]`` in ``[0, 1]`` (``0`` = clean data) and
``cond`` holds the domain's keyword arguments (class labels, a graph batch index, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .conditioning import NULL_LABEL
from .space import DenseSpace, RaggedSpace, Space

if TYPE_CHECKING:
    from .samplers import Known

__all__ = ["Batch", "Domain"]

log = logging.getLogger(__name__)


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
    if n == batch.num_samples == batch.x.shape[0] and isinstance(space, RaggedSpace) and not torch.equal(
            space.batch, torch.arange(n, device=space.batch.device)):
        raise ValueError(f"cond[{key!r}] has {n} entries, as many as the samples and as the state's rows, which "
                         "are laid out differently: override the domain's take() and concat() to say which it is, "
                         "or set sampler.batch_size=null")
    if n == batch.num_samples:
        return "sample"
    return "row" if n == batch.x.shape[0] else "whole"


class Domain:
    """Template base class for a data domain.

    Hooks (defaults serve dense ``[B, ...]`` tensors):

    * :meth:`dataset` -- the data set of a split (``"train"``, ``"test"``, ...). Required.
    * :meth:`build_network` -- the denoiser for the recipe's ``model`` section. Required.
    * :meth:`collate` -- items -> :class:`Batch` (dense stacking by default).
    * :meth:`setup` -- what sampling needs from the training set (sample shape, class names).
    * :meth:`prior` -- the layout and conditions of ``n`` new samples; :meth:`can_guide` says whether
      they carry a condition for guidance, :meth:`parse_label` reads a class name.
    * :meth:`save_samples` / :meth:`evaluate` / :meth:`reference_metrics` -- outputs, metrics and the
      same metrics of real held-out data (a ``.pt`` file and no metrics by default);
      :meth:`read_samples` reads sample files back (``polydiff eval``) and :meth:`known_values`
      says what ``polydiff sample --known FILE`` keeps of one.
    * :meth:`concat` / :meth:`take` -- one batch from the chunks of a large draw, and a chunk of it
      (override both when ``cond`` holds indices into the state other than a graph batch vector).
    * :meth:`state_dict` / :meth:`load_state_dict` -- what sampling needs from the data
      (sample shape, class names, ...), saved in checkpoints so sampling needs no data.
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
            raise ValueError(f"label {value!r} is not a class name, and indices are ambiguous where class names are "
                             f"numbers: give one of {self.class_names}")
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
                labels.to(device) if labels is not None else torch.full((n,), NULL_LABEL, dtype=torch.long, device=device)
            )
        return space, cond

    # --------------------------------------------------------------- outputs
    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        """Write samples to ``out_dir``; returns the written paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{prefix}.pt"
        cond = {k: v.detach().cpu() for k, v in batch.cond.items() if isinstance(v, Tensor)}
        torch.save({"x": batch.x.detach().cpu(), **cond, "layout": _layout(batch.space)}, path)
        return [path]

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

    def read_samples(self, path: Path) -> Batch:
        """Samples made elsewhere, read back from ``path`` for :meth:`evaluate` (``polydiff eval``).

        The default reads the ``.pt`` files that the default :meth:`save_samples` writes (a file,
        or every ``.pt`` under a folder): ``x [B, ...]`` and tensor conditions such as ``label``.
        """
        path = Path(path)
        files = sorted(path.rglob("*.pt")) if path.is_dir() else [path]  # --seeds K writes a folder per seed
        if not files or not files[0].is_file():
            raise FileNotFoundError(f"no samples at {path}: give a .pt file written by save_samples, or a folder of them")
        batches = []
        for f in files:
            try:
                saved = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 -- any unreadable file gets the same message
                raise ValueError(f"cannot read samples from {f} ({err}); expected a .pt file written by save_samples") from err
            if not isinstance(saved, Mapping) or not isinstance(saved.get("x"), Tensor):
                raise ValueError(f"{f} holds no sample tensor 'x'; expected a .pt file written by save_samples")
            x = saved["x"].float()
            space = _space_of(saved.get("layout"), x, f)
            if isinstance(space, DenseSpace) and self.sample_shape is not None and tuple(x.shape[1:]) != tuple(self.sample_shape):
                raise ValueError(f"samples in {f} have shape {tuple(x.shape[1:])}, the domain's are {tuple(self.sample_shape)}")
            sizes = {len(x), space.num_samples}  # per-row (a ragged batch vector) or per-sample (labels) conditions
            cond = {k: v for k, v in saved.items()
                    if k not in ("x", "layout") and isinstance(v, Tensor) and v.dim() and len(v) in sizes}
            batches.append(Batch(x, space, cond))
        return self.concat(batches)

    def known_values(self, path: Path, n: int, **options: Any) -> Known:
        """What ``n`` new samples keep of the sample file at ``path`` (``polydiff sample --known PATH known.KEY=V``):
        inpainting or continuation. Domains that support it say which part is generated (the options)."""
        raise NotImplementedError(
            f"domain {self.name!r} cannot take known values from a file; from Python, pass "
            "known=polydiff.samplers.Known(values, mask) to polydiff.generate.generate"
        )

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """Quality metrics of generated samples (none by default)."""
        return {}

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same metrics on ``n`` held-out real samples: the reference row."""
        return {}

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"sample_shape": list(self.sample_shape) if self.sample_shape else None, "class_names": list(self.class_names)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shape = state.get("sample_shape")
        self.sample_shape = tuple(shape) if shape else None
        self.class_names = list(state.get("class_names", []))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _layout(space: Space) -> Optional[dict[str, Any]]:
    """What :meth:`Domain.read_samples` needs to rebuild a saved batch's space (``None``: a plain dense batch)."""
    if isinstance(space, RaggedSpace):
        return {"kind": "ragged", "batch": space.batch.cpu(), "num_samples": space.num_samples,
                "centered": list(space.centered)}
    if isinstance(space, DenseSpace) and space.mask is not None:
        return {"kind": "dense", "mask": space.mask.cpu()}
    return None


def _space_of(layout: Optional[Mapping[str, Any]], x: Tensor, path: Path) -> Space:
    """The space a saved batch was drawn in, from the layout :meth:`Domain.save_samples` stored beside it."""
    if layout is None:
        return DenseSpace(tuple(x.shape))
    if layout.get("kind") == "dense":
        return DenseSpace(tuple(x.shape), mask=layout["mask"])
    if layout.get("kind") == "ragged":
        return RaggedSpace(layout["batch"], int(layout["num_samples"]), x.shape[1], centered=tuple(layout["centered"]))
    raise ValueError(f"{path} holds an unknown sample layout {layout.get('kind')!r}; expected a file of save_samples")
