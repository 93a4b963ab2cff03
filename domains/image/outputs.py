"""The image domain's outputs: a PNG grid of samples (one row per label when conditional) beside their tensors,
images read back, inpainting of an image, and the classifier metrics of :mod:`.metrics`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from domains.classifier import enough_to_score
from polydiff import Batch, DenseSpace, Known
from polydiff.outputs import Outputs
from polydiff.report_items import ReportItem, array_png

from .data import list_images, read_sample_images

if TYPE_CHECKING:
    from .domain import ImageDomain

__all__ = ["ImageOutputs", "to_uint8", "grid_layout", "make_grid", "save_grid"]

log = logging.getLogger(__name__)


class ImageOutputs(Outputs):
    """A PNG grid and the raw tensors of each draw; images or tensors read back; inpainting inside a box;
    FID, IS, mIS, AM and label accuracy from the metric classifier."""

    domain: ImageDomain

    def __init__(self, domain: ImageDomain) -> None:
        super().__init__(domain)
        self._scorer: Any = None

    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        """``prefix.png`` (a grid, one row per label when conditional) and ``prefix.pt`` (raw tensors)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        x = batch.x.detach().float().cpu()  # [B, C, H, W]
        rows = grid_layout(batch.cond.get("label"), len(x))
        up = self.domain.grid_upscale or max(1, 32 // max(x.shape[-2:]))
        png = save_grid(make_grid(x, rows, upscale=up), out_dir / f"{prefix}.png")
        pt = out_dir / f"{prefix}.pt"
        cond = {k: v.detach().cpu() for k, v in batch.cond.items()}
        torch.save({"x": x, **cond, "class_names": list(self.domain.class_names)}, pt)
        return [png, pt]

    def read_samples(self, path: Path) -> Batch:
        """Images generated elsewhere (a file or a folder of PNG/JPEG, resized and centre-cropped to the
        trained size; labels from the first sub-folder level when it is a class name), or the ``.pt`` that
        :meth:`save_samples` writes (a folder holding such ``NAME.pt`` beside its grid ``NAME.png`` is read as
        those; other ``.pt`` files in a folder of images are ignored)."""
        dom = self.domain
        path = Path(path)
        if path.suffix == ".pt":
            return super().read_samples(path)
        own = _own_sample_files(path) if path.is_dir() else []
        if own:  # polydiff's sample files: the tensors, not their grid PNGs
            other = [p for p in list_images(path, recursive=True) if p.with_suffix(".pt") not in own]
            if other:
                log.warning(
                    "%s: scored polydiff's sample files (%s); ignored %d other image(s), e.g. %s: give their "
                    "folder on its own to score them",
                    path,
                    ", ".join(f.name for f in own[:3]),
                    len(other),
                    other[0],
                )
            read = super().read_samples
            return dom.concat([read(f) for f in own])
        if path.is_dir() and not list_images(path, recursive=True) and any(path.rglob("*.pt")):  # only .pt files
            return super().read_samples(path)
        if dom.sample_shape is None:
            raise RuntimeError(
                "the image domain's sample shape is unknown: call setup(train_set) or load_state_dict first"
            )
        channels, size = dom.sample_shape[0], dom.sample_shape[-1]
        x, labels = read_sample_images(path, size, "rgb" if channels == 3 else "grayscale", dom.class_names)
        return Batch(x, DenseSpace(tuple(x.shape)), {} if labels is None else {"label": labels})

    def known_values(self, path: Path, n: int, box: Optional[Sequence[int]] = None) -> Known:
        """Inpainting: the image at ``path`` (resized and cropped to the trained size) is kept outside
        ``box = [left, top, right, bottom]`` (pixels of the trained size, right and bottom excluded),
        which is generated."""
        batch = self.read_samples(Path(path))
        if batch.num_samples != 1:
            raise ValueError(f"--known {path} holds {batch.num_samples} images: give one image file")
        _, height, width = self.domain.sample_shape
        if box is None or len(box) != 4 or not all(isinstance(v, int) for v in box):
            raise ValueError(
                f"known.box=[left,top,right,bottom] (integer pixels of the {width}x{height} images) "
                "must mark the part to generate"
            )
        left, top, right, bottom = box
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise ValueError(f"known.box={list(box)} lies outside the {width}x{height} images or is empty")
        mask = torch.ones(1, 1, height, width, dtype=torch.bool)  # [1, 1, H, W], broadcast over samples and channels
        mask[..., top:bottom, left:right] = False
        return Known(batch.x[:1], mask)

    def scorer(self) -> Any:
        """The metric classifier's scorer, fitted (or read from its cache) on first use; ``None`` without labels."""
        if self._scorer is None:
            from .metrics import build_scorer

            dom = self.domain
            train = dom.arrays("train")
            if train.labels is None:
                return None
            test = dom.arrays("test")
            heldout = (test.to_tensor(), torch.from_numpy(test.labels))
            train_xy = (train.to_tensor(), torch.from_numpy(train.labels))
            self._scorer = build_scorer(train_xy, heldout, len(train.class_names), dom.metric_epochs)
        return self._scorer

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """FID / IS / mIS / AM (and label accuracy when conditional) from the metric classifier."""
        scorer = self.scorer()
        if scorer is None:
            return {}
        if not enough_to_score(batch.num_samples, "image", "images"):
            return {}
        labels = batch.cond.get("label")
        return scorer.score(batch.x.detach().float().cpu(), None if labels is None else labels.cpu())

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same metrics on ``n`` held-out real images (the test split, at most its size)."""
        scorer = self.scorer()
        return {} if scorer is None else scorer.reference_row(n, labelled=self.domain.conditional)

    def report_items(self, samples: Batch | Sequence[Path], limit: Optional[int] = None) -> list[ReportItem]:
        """A grid of images per label (one grid when unlabelled), enlarged as :meth:`save_samples` draws it."""
        batch = self._batch_of(samples, (".pt",), limit)
        if batch is None:
            return []
        x = batch.x.detach().float().cpu()  # [B, C, H, W]
        labels = batch.cond.get("label")
        names = self.domain.class_names
        up = max(self.domain.grid_upscale or 1, 64 // max(x.shape[-2:]))  # tiles of 64 px or more on the page
        values = sorted(set(labels.cpu().tolist())) if labels is not None else [None]
        items = []
        for value in values:
            rows = torch.arange(len(x)) if value is None else (labels.cpu() == value).nonzero().flatten()
            group = names[value] if value is not None and 0 <= value < len(names) else ""
            grid = make_grid(x[rows], grid_layout(None, len(rows), ncol=min(8, len(rows))), upscale=up)
            items.append(
                ReportItem("image", title=f"{group or 'images'} ({len(rows)})", group=group, png=array_png(grid))
            )
        return items


def _own_sample_files(folder: Path) -> list[Path]:
    """The sample files :meth:`ImageOutputs.save_samples` wrote under ``folder``: each ``NAME.pt`` beside its grid
    ``NAME.png``."""
    return sorted(p for p in folder.rglob("*.pt") if p.with_suffix(".png").is_file())


def to_uint8(x: Tensor) -> np.ndarray:
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` -> uint8 ``[B, H, W, C]``.

    Values outside ``[-1, 1]`` saturate in the picture only; the saved tensors keep them.
    """
    if x.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
    pixels = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def grid_layout(labels: Optional[Tensor], n: int, ncol: Optional[int] = None) -> list[list[int]]:
    """Rows of sample indices: one row per distinct label (sorted; null -1 first).

    Without labels, or when all samples share one label, a square-ish grid instead of one long strip.
    """
    if labels is not None:
        labels = labels.detach().cpu().reshape(-1)
        values = torch.unique(labels).tolist()
        if len(values) > 1:
            return [torch.nonzero(labels == v).flatten().tolist() for v in values]
    ncol = ncol or max(1, int(np.ceil(np.sqrt(n))))
    return [list(range(i, min(i + ncol, n))) for i in range(0, n, ncol)]


def make_grid(x: Tensor, rows: Sequence[Sequence[int]], upscale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile images ``x [B, C, H, W]`` into uint8 ``[rows*(H*up+pad)+pad, cols*(W*up+pad)+pad, C]``.

    Empty cells (rows shorter than the longest one) and the padding are black.
    """
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    tiles = to_uint8(x)  # [B, H, W, C]
    if upscale > 1:  # nearest neighbour keeps single pixels of tiny images crisp
        tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    _, h, w, c = tiles.shape
    ncol = max((len(r) for r in rows), default=0)
    grid = np.zeros((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for r, row in enumerate(rows):
        for col, i in enumerate(row):
            top, left = pad + r * (h + pad), pad + col * (w + pad)
            grid[top : top + h, left : left + w] = tiles[i]
    return grid


def save_grid(grid: np.ndarray, path: Path) -> Path:
    """Write a uint8 ``[H, W, C]`` grid (C = 1 or 3) as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid, mode=None)
    img.save(path, format="PNG")
    return path
