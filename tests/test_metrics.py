"""Classifier-feature metrics against closed forms."""

import numpy as np
import pytest
import torch

from polydiff.metrics import am_score, classifier_metrics, frechet_distance, inception_score, modified_inception_score


def test_frechet_distance_closed_form():
    # Two Gaussians with diagonal covariances: FID = |mu_a - mu_b|^2 + sum (sqrt(va) - sqrt(vb))^2.
    rng = np.random.default_rng(0)
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    a = rng.normal(size=(200_000, 3)) * np.sqrt(va)
    b = rng.normal(size=(200_000, 3)) * np.sqrt(vb) + np.array([1.0, 0.0, -2.0])
    expected = 1.0 + 4.0 + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert abs(frechet_distance(a, a)) < 1e-6
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(a, b[:, :2])


def test_inception_scores_of_ideal_and_collapsed_classifiers():
    k = 10
    confident_diverse = torch.eye(k).repeat(5, 1)  # every class equally often, certain each time
    assert inception_score(confident_diverse) == pytest.approx(k, rel=1e-6)
    collapsed = torch.zeros(50, k)
    collapsed[:, 3] = 1
    assert inception_score(collapsed) == pytest.approx(1.0, rel=1e-6)
    uniform = torch.full((50, k), 1 / k)
    assert inception_score(uniform) == pytest.approx(1.0, rel=1e-6)
    assert modified_inception_score(uniform) == pytest.approx(1.0, rel=1e-6)
    assert modified_inception_score(confident_diverse) > 1e6  # certain and diverse: huge by definition
    # AM: zero for certain predictions whose class histogram matches the reference.
    assert am_score(confident_diverse, confident_diverse) == pytest.approx(0.0, abs=1e-6)
    assert am_score(collapsed, confident_diverse) > 1.0


def test_classifier_metrics_label_accuracy_ignores_null_labels():
    probs = torch.eye(4)
    feats = torch.randn(4, 3)
    out = classifier_metrics(feats, probs, feats, probs, labels=torch.tensor([0, 1, 3, -1]))
    assert out["label_acc"] == pytest.approx(2 / 3)
