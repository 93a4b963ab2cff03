"""A small CNN image classifier whose features and class probabilities score generated images.

The metrics themselves (FID, IS, mIS, AM, label accuracy) are the shared ones of
:mod:`polydiff.metrics`, computed by :class:`domains.classifier.ClassifierScorer`. Because the
classifier is fitted on the domain's own training split, the figures compare models on the
same data set only; they are not the Inception-based numbers reported in papers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from domains.classifier import ClassifierScorer, cache_key, cached_scorer, default_cache_dir

__all__ = ["ImageClassifier", "build_scorer", "random_shift"]

#: Bump when the architecture or its fitting changes, so stale cached weights are not reused.
CLASSIFIER_VERSION = 2  # 2: fitted from a fixed seed (was the global RNG's state)


class ImageClassifier(nn.Module):
    """Three conv stages with batch norm, global average pooling, a linear head: ``x -> (features, logits)``.

    Pooling between stages stops at 4x4, so the same network serves 8x8 digits and 32x32 photos.
    """

    def __init__(self, in_channels: int, num_classes: int, size: int, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch, res = in_channels, size
        for mult in (1, 2, 4):
            out = width * mult
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            if res > 4:  # halve until 4x4
                layers.append(nn.MaxPool2d(2))
                res //= 2
            ch = out
        self.body = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Linear(ch, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x [B, C, H, W]
        h = self.body(x).mean(dim=(2, 3))  # [B, 4*width]
        feats = self.proj(h)  # [B, feature_dim]
        return feats, self.head(feats)  # [B, D], [B, K]


def random_shift(x: Tensor, g: torch.Generator, max_shift: int = 1) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero-padded to -1, the background)."""
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, [max_shift] * 4, value=-1.0)  # [B, C, H+2m, W+2m]
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def build_scorer(
    train: tuple[Tensor, Tensor],
    heldout: tuple[Tensor, Tensor],
    num_classes: int,
    epochs: int = 15,
    cache_dir: Optional[Path] = None,
    cache: bool = True,
    device: Union[torch.device, str, None] = None,
) -> ClassifierScorer:
    """Fit (or load cached) an :class:`ImageClassifier` on ``train``; ``heldout`` gives the reference row.

    ``train``/``heldout`` are ``(images [N, C, H, W] in [-1, 1], labels [N])``; weights are
    cached under ``cache_dir`` (default :func:`default_cache_dir`) unless ``cache`` is false.
    ``device`` is where it is fitted and run (``None``: a GPU when there is one).
    """
    x, y = train
    arch = {"in_channels": int(x.shape[1]), "num_classes": int(num_classes), "size": int(max(x.shape[2:]))}
    # Bigger batches for bigger sets: a 50,000-image set would otherwise take minutes per epoch.
    fit_kwargs = {"epochs": epochs, "batch_size": 64 if len(x) < 10_000 else 256, "lr": 3e-3}
    path = None
    if cache:  # keyed by the training data, the architecture and the fitting settings
        settings = repr((CLASSIFIER_VERSION, sorted(arch.items()), sorted(fit_kwargs.items())))
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = folder / f"image-classifier-{cache_key(settings, x, y)}.pt"
    return cached_scorer(
        lambda: ImageClassifier(**arch), train, heldout, path, {**fit_kwargs, "augment": random_shift}, device
    )
