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


def test_non_finite_features_give_nan_and_too_few_samples_are_named():
    """Diverged samples give NaN FID (as IS/mIS/AM) rather than numpy's LinAlgError; NaN rows are label misses."""
    feats = torch.randn(10, 4)
    bad = feats.clone()
    bad[3, 1] = float("nan")
    assert np.isnan(frechet_distance(bad, feats)) and np.isnan(frechet_distance(feats, bad * float("inf")))
    with pytest.raises(ValueError, match="got 1 and 10: score 2 or more samples"):
        frechet_distance(feats[:1], feats)
    probs = torch.eye(3)[[0, 1, 2, 0]]
    probs[3] = float("nan")  # argmax would read the NaN row as class 0, a hit
    out = classifier_metrics(
        feats[:4], probs, feats, torch.eye(3)[torch.arange(10) % 3], labels=torch.tensor([0, 1, 2, 0])
    )
    assert out["label_acc"] == pytest.approx(0.75)


def test_scorer_fit_is_seeded_and_leaves_the_global_rng_alone():
    """The same data gives the same classifier whatever the global RNG held, and the caller's RNG is untouched."""
    from torch import nn

    from domains.classifier import ClassifierScorer

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.drop, self.head = nn.Linear(4, 6), nn.Dropout(0.3), nn.Linear(6, 3)

        def forward(self, x):
            f = self.body(x).tanh()
            return f, self.head(self.drop(f))

    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    data = (torch.eye(3, 4)[y] * 3 + torch.randn(90, 4, generator=g), y)
    feats = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        scorer = ClassifierScorer(Net, data, data, fit_kwargs={"epochs": 2})
        assert torch.equal(torch.get_rng_state(), before)
        feats.append(scorer.train_feats)
    assert torch.equal(feats[0], feats[1])


def test_classifier_cache_key_bytes_are_pinned(caplog):
    """The key names cached classifier files: its bytes must not change, or every cache is refitted."""
    from domains.classifier import cache_key, enough_to_score

    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # [4, 3], not contiguous: hashed in C order
    y = torch.tensor([0, 1, 2, 1])
    assert cache_key("settings", x, y) == cache_key("settings", x.contiguous(), y) == "210d5669518b9c72"
    assert cache_key("other", x, y) != "210d5669518b9c72"
    assert enough_to_score(2, "image", "images") and not enough_to_score(1, "image", "images")
    assert "image metrics need at least 2 images (FID fits a covariance), got 1" in caplog.text


def test_inception_scores_match_their_definitions_on_ordinary_probabilities():
    """IS, modified IS and AM against brute-force forms of their definitions on non-degenerate probabilities."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5) * 0.7, size=40)  # [N, K]
    ref = rng.dirichlet(np.ones(5), size=30)
    marginal = p.mean(0)
    kl = lambda a, b: float((a * (np.log(a) - np.log(b))).sum())
    assert inception_score(p) == pytest.approx(np.exp(np.mean([kl(row, marginal) for row in p])), rel=1e-9)
    pairs = [kl(a, b) for a in p for b in p]  # Gurumurthy et al. 2017: every ordered pair
    assert modified_inception_score(p) == pytest.approx(np.exp(np.mean(pairs)), rel=1e-9)
    entropy = float(np.mean([-(row * np.log(row)).sum() for row in p]))
    assert am_score(p, ref) == pytest.approx(kl(ref.mean(0), marginal) + entropy, rel=1e-9)
