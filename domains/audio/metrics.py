"""SC09-protocol metrics for audio: a log-mel digit classifier scored through :class:`ClassifierScorer`, and a
raw-waveform one beside it (``domain.wave_metrics``).

The classifier is fitted once per data configuration and cached under
:func:`domains.classifier.default_cache_dir`, keyed by a hash of that configuration, of the fitting
settings (epochs) and of the training clips themselves, so a changed data set never reuses stale weights.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from domains.classifier import ClassifierScorer, cache_key, cached_scorer, default_cache_dir

from .data import ClipSet
from .features import DigitClassifier, WaveClassifier, augment_waves

__all__ = ["CLASSIFIER_VERSION", "classifier_cache_path", "make_scorer"]

log = logging.getLogger(__name__)

# Bump when DigitClassifier or its training changes, so cached weights are refitted.
CLASSIFIER_VERSION = 1
# The metric classifiers by front end: the network, its cache file's prefix and its version.
FRONT_ENDS = {
    "logmel": (DigitClassifier, "digit_classifier", CLASSIFIER_VERSION),
    "wave": (WaveClassifier, "wave_classifier", 1),
}


def classifier_cache_path(
    config: Mapping[str, Any],
    train: ClipSet,
    cache_dir: Optional[Path] = None,
    fit: Optional[Mapping[str, Any]] = None,
    front_end: str = "logmel",
) -> Path:
    """Cache file of the classifier for a data ``config``, its training clips and the ``fit`` settings (epochs, ...)."""
    _, prefix, version = FRONT_ENDS[front_end]
    settings = json.dumps({**config, "version": version, "fit": dict(fit or {})}, sort_keys=True, default=str)
    return (
        Path(cache_dir or default_cache_dir())
        / "audio"
        / f"{prefix}_{cache_key(settings, train.waves, train.labels)}.pt"
    )


def make_scorer(
    train: ClipSet,
    heldout: ClipSet,
    sample_rate: int,
    config: Mapping[str, Any],
    epochs: int = 10,
    cache_dir: Optional[Path] = None,
    front_end: str = "logmel",
) -> ClassifierScorer:
    """Fit (or load) the digit classifier of ``front_end`` (``logmel`` or ``wave``) on ``train``; ``heldout`` real
    clips give the reference row."""
    if not train.class_names:
        raise ValueError("audio metrics need labelled training clips (one sub-folder per label)")
    channels, k = train.waves.shape[1], len(train.class_names)
    fit = {"epochs": int(epochs), "batch_size": 64, "lr": 3e-3}
    cache = classifier_cache_path(config, train, cache_dir, fit, front_end)
    cached = cache.exists()
    start = time.perf_counter()
    net = FRONT_ENDS[front_end][0]
    scorer = cached_scorer(  # on a GPU when there is one (SC09 has ~31,000 training clips); seeded on a forked RNG
        lambda: net(sample_rate, channels, k),
        (train.waves, train.labels),
        (heldout.waves, heldout.labels),
        cache,
        {**fit, "augment": augment_waves},
    )
    log.info(
        "audio %s metric classifier %s in %.1f s (%s); held-out accuracy %.3f on %d clips",
        front_end,
        "loaded" if cached else "fitted",
        time.perf_counter() - start,
        cache,
        scorer.test_accuracy,
        len(heldout),
    )
    return scorer
