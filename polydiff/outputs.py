"""What a domain's samples become outside the model: files written and read back, known values and metrics.

Training and sampling never call these hooks; ``polydiff sample``, ``polydiff eval`` and the trainer's
evaluation do, through the domain (``domain.save_samples(...)``, ``domain.evaluate(...)``), which hands
them to its :class:`Outputs` (made by :meth:`polydiff.Domain.make_outputs`). The defaults serve dense
tensors: one ``.pt`` file per draw, read back with its layout, and no metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .report_items import ReportItem, dense_plot
from .space import DenseSpace, RaggedSpace, Space
from .state import Batch, Known

__all__ = ["Outputs"]


class Outputs:
    """Template for a domain's outputs and metrics; a subclass overrides only what differs from the dense defaults.

    Hooks: :meth:`save_samples` and :meth:`read_samples` (files), :meth:`known_values` (a file's part kept
    by ``polydiff sample --known``), :meth:`evaluate` and :meth:`reference_metrics` (metrics of samples, and
    the same metrics of real held-out data). ``self.domain`` is the domain served: its layout, data and state.
    """

    def __init__(self, domain: Any) -> None:
        self.domain = domain  # a polydiff.Domain (typed loosely: domain.py imports this module)

    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        """Write samples to ``out_dir/prefix.pt`` (states, tensor conditions and the layout); returns its path.

        Beside it, ``prefix.png`` plots 1-D and 2-D dense samples (:func:`polydiff.report_items.dense_plot`)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{prefix}.pt"
        cond = {k: v.detach().cpu() for k, v in batch.cond.items() if isinstance(v, Tensor)}
        torch.save({"x": batch.x.detach().cpu(), **cond, "layout": _layout(batch.space)}, path)
        png = dense_plot(batch.x) if isinstance(batch.space, DenseSpace) else None
        if png is not None:  # a look at the samples without code; the .pt alone is what read_samples reads
            (out_dir / f"{prefix}.png").write_bytes(png)
        return [path]

    def read_samples(self, path: Path) -> Batch:
        """Samples made elsewhere, read back from ``path`` for :meth:`evaluate` (``polydiff eval``).

        The default reads the ``.pt`` files that the default :meth:`save_samples` writes (a file,
        or every ``.pt`` under a folder): ``x [B, ...]`` and tensor conditions such as ``label``.
        """
        path = Path(path)
        files = sorted(path.rglob("*.pt")) if path.is_dir() else [path]  # --seeds K writes a folder per seed
        if not files or not files[0].is_file():
            raise FileNotFoundError(
                f"no samples at {path}: give a .pt file written by save_samples, or a folder of them"
            )
        shape = self.domain.sample_shape
        batches = []
        for f in files:
            try:
                saved = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 -- any unreadable file gets the same message
                raise ValueError(
                    f"cannot read samples from {f} ({err}); expected a .pt file written by save_samples"
                ) from err
            if not isinstance(saved, Mapping) or not isinstance(saved.get("x"), Tensor):
                raise ValueError(f"{f} holds no sample tensor 'x'; expected a .pt file written by save_samples")
            x = saved["x"].float()
            space = _space_of(saved.get("layout"), x, f)
            if isinstance(space, DenseSpace) and shape is not None and tuple(x.shape[1:]) != tuple(shape):
                raise ValueError(f"samples in {f} have shape {tuple(x.shape[1:])}, the domain's are {tuple(shape)}")
            sizes = {len(x), space.num_samples}  # per-row (a ragged batch vector) or per-sample (labels) conditions
            cond = {
                k: v
                for k, v in saved.items()
                if k not in ("x", "layout") and isinstance(v, Tensor) and v.dim() and len(v) in sizes
            }
            batches.append(Batch(x, space, cond))
        return self.domain.concat(batches)

    def known_values(self, path: Path, n: int, **options: Any) -> Known:
        """What ``n`` new samples keep of the sample file at ``path`` (``polydiff sample --known PATH known.KEY=V``):
        inpainting or continuation. Domains that support it say which part is generated (the options)."""
        raise NotImplementedError(
            f"domain {self.domain.name!r} cannot take known values from a file; from Python, pass "
            "known=polydiff.samplers.Known(values, mask) to polydiff.generate.generate"
        )

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """Quality metrics of generated samples (none by default)."""
        return {}

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same metrics on ``n`` held-out real samples: the reference row."""
        return {}

    def report_items(self, samples: Batch | Sequence[Path], limit: Optional[int] = None) -> list[ReportItem]:
        """What a report page (``polydiff report``) and TensorBoard show of samples: a batch, or the files of one
        draw that :meth:`save_samples` wrote; ``limit`` caps the samples shown where each costs an item. The default
        plots 1-D and 2-D dense samples in one picture (all of them: a scatter needs them) and describes others in a
        line of text."""
        batch = self._batch_of(samples, (".pt",))
        if batch is None:
            return []
        png = dense_plot(batch.x) if isinstance(batch.space, DenseSpace) else None
        if png is not None:
            return [ReportItem("image", title=f"{batch.num_samples} samples", png=png)]
        x = batch.x.detach().float()
        return [
            ReportItem(
                "text",
                title=f"{batch.num_samples} samples",
                text=f"states {tuple(x.shape)}, mean {float(x.mean()):.4g}, std {float(x.std()):.4g}",
            )
        ]

    def _batch_of(
        self, samples: Batch | Sequence[Path], suffixes: Sequence[str], limit: Optional[int] = None
    ) -> Optional[Batch]:
        """The samples of a batch, or read back (``domain.read_samples``) from those of ``samples``' files whose names
        end in ``suffixes``, in order until ``limit`` samples are read; ``None`` where no file fits."""
        if isinstance(samples, Batch):
            batch = samples
        else:
            batches, count = [], 0
            for path in sorted(Path(p) for p in samples):
                if path.suffix.lower() in suffixes and path.is_file() and (limit is None or count < limit):
                    batches.append(self.domain.read_samples(path))  # a domain's own override, as polydiff eval reads
                    count += batches[-1].num_samples
            if not batches:
                return None
            batch = self.domain.concat(batches) if len(batches) > 1 else batches[0]
        if limit is not None and batch.num_samples > limit:
            batch = self.domain.take(batch, 0, limit)
        return batch


def _layout(space: Space) -> Optional[dict[str, Any]]:
    """What :meth:`Outputs.read_samples` needs to rebuild a saved batch's space (``None``: a plain dense batch)."""
    if isinstance(space, RaggedSpace):
        return {
            "kind": "ragged",
            "batch": space.batch.cpu(),
            "num_samples": space.num_samples,
            "centered": list(space.centered),
        }
    if isinstance(space, DenseSpace) and space.mask is not None:
        return {"kind": "dense", "mask": space.mask.cpu()}
    return None


def _space_of(layout: Optional[Mapping[str, Any]], x: Tensor, path: Path) -> Space:
    """The space a saved batch was drawn in, from the layout :meth:`Outputs.save_samples` stored beside it."""
    if layout is None:
        return DenseSpace(tuple(x.shape))
    if layout.get("kind") == "dense":
        return DenseSpace(tuple(x.shape), mask=layout["mask"])
    if layout.get("kind") == "ragged":
        return RaggedSpace(layout["batch"], int(layout["num_samples"]), x.shape[1], centered=tuple(layout["centered"]))
    raise ValueError(f"{path} holds an unknown sample layout {layout.get('kind')!r}; expected a file of save_samples")
