"""A new domain in a few dozen lines: 2-D points from a mixture of Gaussians, with an MLP denoiser.

Dense ``[B, 2]`` states need no space, noise or loss code: the template's defaults serve them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import polydiff

CENTRES = torch.tensor([[math.cos(a), math.sin(a)] for a in torch.arange(8) * (2 * math.pi / 8)]) * 2.0
SPREAD = 0.15


def mixture(n: int, seed: int) -> torch.Tensor:
    """``n`` points ``[n, 2]`` from eight Gaussians on a circle of radius 2."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(CENTRES), (n,), generator=g)
    return CENTRES[idx] + SPREAD * torch.randn(n, 2, generator=g)


class MLP(nn.Module):
    """``net(x_t, t)``, predicting what ``objective.prediction`` names: an MLP on the point and ``t``'s embedding."""

    def __init__(self, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        layers, d = [], 2 + 16
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        self.body = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.arange(8, device=x.device) * -math.log(1000.0) / 8)
        angles = (t * 1000)[:, None] * freqs  # [B, 8]
        return self.body(torch.cat([x, angles.sin(), angles.cos()], dim=-1))


@polydiff.register_domain("points")
class PointsDomain(polydiff.Domain):
    def __init__(self, size: int = 4096) -> None:
        super().__init__()
        self.size = size

    def dataset(self, split: str):
        return mixture(self.size, seed=0 if split == "train" else 1)  # rows are items

    def build_network(self, width: int = 128, depth: int = 3) -> nn.Module:
        return MLP(width, depth)

    def evaluate(self, batch: polydiff.Batch) -> dict[str, float]:
        """Distance to the true distribution: mean distance to the nearest centre, and mode coverage."""
        d = torch.cdist(batch.x.float().cpu(), CENTRES)  # [n, 8]
        nearest = d.min(dim=1)
        modes = torch.bincount(nearest.indices, minlength=len(CENTRES))
        return {"dist_to_centre": float(nearest.values.mean()), "modes_covered": int((modes > 0).sum())}
