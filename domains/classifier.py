"""A small classifier fitted on a domain's training split, for feature-based sample metrics.

Any labelled domain (audio digits, image digits, ...) supplies a network that returns
``(features [B, D], logits [B, K])``; :class:`ClassifierScorer` fits it once, caches the
weights, and scores generated samples against held-out real ones with
:func:`polydiff.metrics.classifier_metrics`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from polydiff.checkpoint import atomic_save
from polydiff.metrics import classifier_metrics

__all__ = ["fit_classifier", "ClassifierScorer"]


def fit_classifier(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
    augment: Optional[Callable[[Tensor, torch.Generator], Tensor]] = None,
    seed: int = 0,
) -> nn.Module:
    """Fit ``net`` (returning ``(features, logits)``) on ``x [N, ...]`` with labels ``y [N]``.

    ``augment(xb, generator)`` gets a CPU generator and must return its batch on ``xb.device``.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * max(1, -(-len(x) // batch_size)))
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x[idx], y[idx]
            if augment is not None:
                xb = augment(xb, g)
            _, logits = net(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return net


class ClassifierScorer:
    """Fits (or loads from ``cache``) a classifier and computes FID/IS/mIS/AM/accuracy."""

    def __init__(
        self,
        make_net: Callable[[], nn.Module],
        train: tuple[Tensor, Tensor],
        reference: tuple[Tensor, Tensor],
        cache: Optional[Path] = None,
        fit_kwargs: Optional[dict] = None,
        batch_size: int = 256,
    ) -> None:
        self.net = make_net()
        self.batch_size = batch_size
        if cache is not None and Path(cache).exists():
            self.net.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
            self.net.eval()
        else:
            with torch.enable_grad():  # scorers are often built lazily inside no_grad evaluation
                fit_classifier(self.net, *train, **(fit_kwargs or {}))
            if cache is not None:
                Path(cache).parent.mkdir(parents=True, exist_ok=True)
                atomic_save(self.net.state_dict(), Path(cache))
        self.reference_x, self.reference_y = reference
        self.ref_feats, self.ref_probs = self.features(self.reference_x)
        self.test_accuracy = float((self.ref_probs.argmax(1) == self.reference_y).float().mean())

    @torch.no_grad()
    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[N, D]`` and class probabilities ``[N, K]`` of ``x``."""
        self.net.eval()
        device = next(self.net.parameters()).device
        feats, probs = [], []
        for i in range(0, len(x), self.batch_size):
            f, logits = self.net(x[i : i + self.batch_size].to(device))
            feats.append(f.float().cpu())
            probs.append(logits.float().softmax(-1).cpu())
        return torch.cat(feats), torch.cat(probs)

    def score(self, x: Tensor, labels: Optional[Tensor] = None) -> dict[str, float]:
        """Metrics of ``x`` against the reference set; accuracy against ``labels`` when given."""
        feats, probs = self.features(x)
        return classifier_metrics(feats, probs, self.ref_feats, self.ref_probs, labels)

    def reference_row(self, n: Optional[int] = None, seed: int = 0) -> dict[str, float]:
        """Metrics of up to ``n`` real samples from one half of the reference set, scored against the
        other half: the reference row (scoring clips against a set that contains them flatters FID)."""
        perm = torch.randperm(len(self.reference_x), generator=torch.Generator().manual_seed(seed))
        half = len(perm) // 2
        scored, against = perm[:half], perm[half:]
        if n is not None:
            scored = scored[:n]
        feats, probs = self.features(self.reference_x[scored])
        return classifier_metrics(feats, probs, self.ref_feats[against], self.ref_probs[against], self.reference_y[scored])


def default_cache_dir() -> Path:
    """Where fitted metric classifiers are cached (``$POLYDIFF_CACHE`` or ``~/.cache/polydiff``)."""
    return Path(os.environ.get("POLYDIFF_CACHE", Path.home() / ".cache" / "polydiff"))
