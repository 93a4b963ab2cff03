"""A small classifier fitted on a domain's training split, for feature-based sample metrics.

Any labelled domain (audio digits, image digits, ...) supplies a network that returns
``(features [B, D], logits [B, K])``; :class:`ClassifierScorer` fits it once, caches the
weights, and scores generated samples against the training split's statistics with
:func:`polydiff.metrics.classifier_metrics`; held-out real samples give the reference row.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from polydiff.checkpoint import atomic_save
from polydiff.metrics import classifier_metrics

__all__ = [
    "fit_classifier",
    "seeded",
    "ClassifierScorer",
    "cache_key",
    "cached_scorer",
    "enough_to_score",
    "default_cache_dir",
]

log = logging.getLogger(__name__)


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


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the CPU and current CUDA device generators for the block only (a forked RNG); others are left alone."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []  # where make_net puts "cuda"
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)  # the current device only; manual_seed_all would reseed every GPU for good
        yield


class ClassifierScorer:
    """Fits (or loads from ``cache``) a classifier; scores samples by FID/IS/mIS/AM/label accuracy.

    The fit is seeded by ``seed`` on a forked RNG, so it is reproducible and leaves the global RNG as it was.

    As in the SC09 protocol (DiffWave, Kong et al. 2021; SaShiMi, Goel et al. 2022, Table 4), the
    FID statistics and the AM score's class marginal come from the classifier's training split;
    the reference row scores held-out real samples against those same statistics, so samples and
    reference are comparable when they are equally many (FID's bias depends on the count).
    """

    def __init__(
        self,
        make_net: Callable[[], nn.Module],
        train: tuple[Tensor, Tensor],
        heldout: tuple[Tensor, Tensor],
        cache: Optional[Path] = None,
        fit_kwargs: Optional[dict] = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.batch_size = batch_size
        # The initial weights and dropout come from ``seed`` alone, on a forked RNG: the same data gives the
        # same classifier whatever ran before, and the caller's (the trainer's) random streams are untouched.
        with seeded(seed):
            self.net = make_net()
            if cache is not None and Path(cache).exists():
                self.net.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
                self.net.eval()
            else:
                with torch.enable_grad():  # scorers are often built lazily inside no_grad evaluation
                    fit_classifier(self.net, *train, **{"seed": seed, **(fit_kwargs or {})})
                if cache is not None:
                    Path(cache).parent.mkdir(parents=True, exist_ok=True)
                    atomic_save(self.net.state_dict(), Path(cache))
        self.train_feats, self.train_probs = self.features(train[0])  # [N_train, D], [N_train, K]
        self.heldout_x, self.heldout_y = heldout
        self.heldout_feats, self.heldout_probs = self.features(self.heldout_x)
        hits = (self.heldout_probs.argmax(1) == self.heldout_y.cpu()).float()
        self.test_accuracy = float(hits.mean()) if len(hits) else float("nan")

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
        """Metrics of ``x`` against the training statistics; accuracy against ``labels`` when given."""
        feats, probs = self.features(x)
        return classifier_metrics(feats, probs, self.train_feats, self.train_probs, labels)

    def reference_row(self, n: Optional[int] = None, labelled: bool = True, seed: int = 0) -> dict[str, float]:
        """The same metrics for ``min(n, held-out size)`` held-out real samples (a fixed random
        subset): the reference row. ``num_samples`` says how many were scored."""
        if len(self.heldout_x) < 2:
            return {}  # no held-out split (e.g. a folder with test_fraction=0): no reference row
        count = len(self.heldout_x) if n is None else max(2, min(int(n), len(self.heldout_x)))
        idx = torch.randperm(len(self.heldout_x), generator=torch.Generator().manual_seed(seed))[:count]
        labels = self.heldout_y.cpu()[idx] if labelled else None
        row = classifier_metrics(
            self.heldout_feats[idx], self.heldout_probs[idx], self.train_feats, self.train_probs, labels
        )
        return {**row, "num_samples": count}


def default_cache_dir() -> Path:
    """Where fitted metric classifiers are cached (``$POLYDIFF_CACHE`` or ``~/.cache/polydiff``)."""
    return Path(os.environ.get("POLYDIFF_CACHE", Path.home() / ".cache" / "polydiff"))


def cache_key(settings: str, x: Tensor, y: Tensor) -> str:
    """16 hex digits of a SHA-1 over ``settings`` and the training data ``x [N, ...]``, ``y [N]`` (CPU tensors),
    so a changed data set or fit never reuses stale cached weights."""
    h = hashlib.sha1(settings.encode())
    h.update(x.numpy().tobytes())  # C order whatever the strides
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def cached_scorer(
    make_net: Callable[[], nn.Module],
    train: tuple[Tensor, Tensor],
    heldout: tuple[Tensor, Tensor],
    cache: Optional[Path],
    fit_kwargs: dict,
    device: Union[torch.device, str, None] = None,
) -> ClassifierScorer:
    """A :class:`ClassifierScorer` fitted (or loaded from ``cache``) on ``device`` (by default a GPU where there is
    one)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    x, y = train
    return ClassifierScorer(
        lambda: make_net().to(device), (x.to(device), y.to(device)), heldout, cache=cache, fit_kwargs=fit_kwargs
    )


def enough_to_score(n: int, domain: str, items: str) -> bool:
    """Whether ``n`` samples can be scored: FID fits a covariance, so at least 2 (a warning names ``items`` when
    not)."""
    if n >= 2:
        return True
    log.warning("%s metrics need at least 2 %s (FID fits a covariance), got %d: none computed", domain, items, n)
    return False
