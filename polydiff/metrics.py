"""Domain-agnostic sample-quality metrics from a classifier's features and class probabilities.

The SC09 protocol (DiffWave, Kong et al. 2021; SaShiMi, Goel et al. 2022) scores generated
audio with a digit classifier; the same figures serve any labelled domain (images too):

* FID -- Frechet distance between Gaussian fits of features (Heusel et al. 2017).
* IS -- ``exp E_x KL(p(y|x) || p(y))`` (Salimans et al. 2016).
* mIS -- ``exp E_{x,x'} KL(p(y|x) || p(y|x'))`` (Gurumurthy et al. 2017).
* AM -- ``KL(p_ref(y) || p(y)) + E_x H(p(y|x))`` (Zhou et al. 2018).
* label accuracy -- how often the classifier recovers the requested label.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from torch import Tensor

__all__ = [
    "frechet_distance",
    "inception_score",
    "modified_inception_score",
    "am_score",
    "label_accuracy",
    "classifier_metrics",
]

_EPS = 1e-12


def _np64(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` (Heusel et al. 2017).

    NaN when a feature is NaN or infinite (diverged samples), as IS, mIS and AM then are.
    """
    a, b = _np64(feats_a), _np64(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs two [N, D] arrays with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"frechet_distance needs at least 2 samples in each set to fit a covariance, got "
            f"{len(a)} and {len(b)}: score 2 or more samples"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")  # numpy's eigvals would raise deep inside
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr sqrt(A B) for PSD A, B is the sum of the square roots of the eigenvalues of A B, which
    # are real and >= 0 in exact arithmetic: no matrix square root (and none of its instability).
    eig = np.linalg.eigvals(cov_a @ cov_b)
    tr_covmean = np.sqrt(np.clip(eig.real, 0.0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)


def _probs64(probs: Tensor | np.ndarray) -> np.ndarray:
    p = _np64(probs)
    if p.ndim != 2:
        raise ValueError(f"class probabilities must be [N, K], got shape {p.shape}")
    return np.clip(p, _EPS, 1.0)


def inception_score(probs: Tensor | np.ndarray) -> float:
    """``exp E_x KL(p(y|x) || p(y))`` (Salimans et al. 2016)."""
    p = _probs64(probs)
    marginal = p.mean(0, keepdims=True)
    kl = (p * (np.log(p) - np.log(marginal))).sum(1)
    return float(np.exp(kl.mean()))


def modified_inception_score(probs: Tensor | np.ndarray) -> float:
    """``exp E_{x,x'} KL(p(y|x) || p(y|x'))`` over all pairs (Gurumurthy et al. 2017)."""
    p = _probs64(probs)
    logp = np.log(p)
    # E_{i,j} sum_k p_ik (log p_ik - log p_jk)
    self_term = (p * logp).sum(1).mean()
    cross_term = (p.mean(0) * logp.mean(0)).sum()
    return float(np.exp(self_term - cross_term))


def am_score(probs: Tensor | np.ndarray, reference_probs: Tensor | np.ndarray) -> float:
    """``KL(p_ref(y) || p(y)) + E_x H(p(y|x))`` (Zhou et al. 2018); lower is better."""
    p = _probs64(probs)
    ref = _probs64(reference_probs).mean(0)
    marginal = p.mean(0)
    kl = (ref * (np.log(ref) - np.log(marginal))).sum()
    entropy = -(p * np.log(p)).sum(1).mean()
    return float(kl + entropy)


def label_accuracy(probs: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
    """Fraction of samples whose most probable class is the requested label (rows holding NaN count as misses)."""
    p = _np64(probs)
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).reshape(-1)
    return float(((p.argmax(1) == y) & np.isfinite(p).all(1)).mean())  # argmax takes a NaN as the top class


def classifier_metrics(
    feats: Tensor,
    probs: Tensor,
    ref_feats: Tensor,
    ref_probs: Tensor,
    labels: Optional[Tensor] = None,
) -> dict[str, float]:
    """FID, IS, mIS and AM of samples against a reference set; label accuracy when ``labels`` given."""
    out = {
        "fid": frechet_distance(feats, ref_feats),
        "is": inception_score(probs),
        "mis": modified_inception_score(probs),
        "am": am_score(probs, ref_probs),
    }
    if labels is not None:
        keep = labels >= 0
        if bool(keep.any()):
            out["label_acc"] = label_accuracy(probs[keep.cpu()], labels[keep].cpu())
    return out
