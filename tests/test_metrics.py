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


def test_scorer_reference_row_uses_training_statistics(tmp_path):
    """Samples and the held-out reference row are both scored against the training split (SC09 protocol)."""
    from torch import nn

    from domains.classifier import ClassifierScorer

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            f = self.body(x).tanh()
            return f, self.head(f)

    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 4) * 4
    def blobs(n):
        y = torch.arange(n) % 3
        return centres[y] + torch.randn(n, 4, generator=g), y
    train, heldout = blobs(300), blobs(60)
    torch.manual_seed(0)
    scorer = ClassifierScorer(Net, train, heldout, cache=tmp_path / "c.pt", fit_kwargs={"epochs": 20, "lr": 1e-2})
    assert scorer.test_accuracy > 0.9
    row = scorer.reference_row(1000)
    assert row["num_samples"] == 60  # capped at the held-out size
    assert row == pytest.approx({**scorer.score(*heldout), "num_samples": 60})  # the same statistics
    row20 = scorer.reference_row(20, labelled=False)
    assert row20["num_samples"] == 20 and "label_acc" not in row20
    # The training split scored against itself: FID ~0 (up to float error), far below noise's.
    assert scorer.score(train[0])["fid"] < 1e-6 < scorer.score(torch.randn(60, 4) * 4)["fid"]
    # Cached weights give the same figures.
    again = ClassifierScorer(Net, train, heldout, cache=tmp_path / "c.pt")
    assert again.reference_row(1000) == pytest.approx(row)
