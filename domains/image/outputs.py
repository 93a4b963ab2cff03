"""Image outputs: a PNG grid of samples, one row per label when conditional."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_uint8", "grid_layout", "make_grid", "save_grid"]


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
