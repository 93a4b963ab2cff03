"""The sinusoidal embedding of a per-sample scalar (diffusion time) shared by the domains' networks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sinusoidal_embedding"]


def sinusoidal_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, shift: int = 0, sin_first: bool = False
) -> Tensor:
    """Transformer position encoding of ``t`` (Vaswani et al. 2017, section 3.5): ``[B] -> [B, dim]``.

    Frequencies ``max_period ** (-k / (dim // 2 - shift))``, ``k < dim // 2``; cosines then sines (or
    sines first), a zero column where ``dim`` is odd. Computed in ``t``'s float dtype.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / max(half - shift, 1))
    args = t[:, None] * freqs[None]  # [B, half]
    waves = [torch.sin(args), torch.cos(args)] if sin_first else [torch.cos(args), torch.sin(args)]
    emb = torch.cat(waves, dim=1)  # [B, 2 * half]
    return F.pad(emb, (0, 1)) if dim % 2 else emb
