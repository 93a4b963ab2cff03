"""Classifier guidance: the eps shift of Dhariwal & Nichol 2021 (eq. 14), its gradient, an equivariant property
gradient, and a classifier trained end to end steering a two-class toy model."""

import json
import math
import re
import sys

import pytest
import torch
from torch import nn

import polydiff
from polydiff.checkpoint import atomic_save, load_checkpoint
from polydiff.classifier import ClassifierObjective, pooled
from polydiff.classifier_guide import classifier_metrics
from polydiff.cli import main
from polydiff.guidance import classifier_guidance
from polydiff.space import DenseSpace, RaggedSpace
from polydiff.state import Prediction

LABELLED = '''
import math
import torch
from torch import nn
import polydiff


class LabelledMLP(nn.Module):
    """net(x_t, t, label): an MLP on the point, t's embedding and a label embedding (-1: no label)."""

    def __init__(self, width=64):
        super().__init__()
        self.embed = nn.Embedding(3, 8)
        self.body = nn.Sequential(nn.Linear(2 + 8 + 8, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, 2))

    def forward(self, x, t, label):
        freqs = torch.exp(torch.arange(4, device=x.device) * -math.log(1000.0) / 4)
        angles = (t * 1000)[:, None] * freqs
        lab = self.embed(torch.where(label < 0, torch.full_like(label, 2), label))
        return self.body(torch.cat([x, angles.sin(), angles.cos(), lab], dim=-1))


class TwoBlobs(polydiff.Domain):
    """Points around (-2, 0) (class 0) and (2, 0) (class 1), as (point, label) pairs."""

    def __init__(self, size=1024, names="left,right"):
        super().__init__()
        self.size, self.names = size, names

    def dataset(self, split):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        y = torch.randint(0, 2, (self.size,), generator=g)
        x = torch.stack([4.0 * y - 2, torch.zeros(self.size)], 1) + 0.3 * torch.randn(self.size, 2, generator=g)
        return list(zip(x, y.tolist()))

    def setup(self, train_set):
        self.class_names = self.names.split(",")
        super().setup(train_set)

    def build_network(self, width=64):
        return LabelledMLP(width)
'''

RECIPE = """
defaults: [polydiff_recipe, _self_]
domain: {name: "blobs_domain:TwoBlobs", size: 1024, names: "left,right"}
schedule: {name: cosine, steps: 100}
trainer: {max_steps: 150, batch_size: 128, lr: 3e-3, warmup_steps: 10, ema_decay: 0.9, device: cpu,
          ckpt_every: 1000, num_samples: 64, log_every: 50, progress: false, eval: false}
sampler: {name: ddim, steps: 20}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A classifier run and a generative run of the same two-class domain (a few seconds each)."""
    folder = tmp_path_factory.mktemp("blobs")
    (folder / "blobs_domain.py").write_text(LABELLED)
    (folder / "blobs.yaml").write_text(RECIPE)
    sys.path.insert(0, str(folder))
    try:
        recipe = str(folder / "blobs.yaml")
        main(["train", recipe, "objective.name=classifier", "trainer.max_steps=150", f"hydra.run.dir={folder / 'cls'}"])
        # Unconditional; v prediction, so that its trailing grid's first step at nearly pure noise is sane.
        gen = f"hydra.run.dir={folder / 'gen'}"
        main(["train", recipe, "trainer.label_dropout=1.0", "objective.prediction=v", gen])
        # The same classifier, as if trained on another label set.
        ckpt = load_checkpoint(folder / "cls" / "checkpoints" / "last.pt")
        ckpt["domain_state"]["class_names"] = ["a", "b"]
        atomic_save(ckpt, folder / "other_labels" / "checkpoints" / "last.pt")
        yield folder
    finally:
        sys.path.remove(str(folder))


def test_the_wrapper_shifts_eps_by_sigma_scale_grad_and_keeps_x0_consistent():
    schedule = polydiff.make_schedule("cosine", 100)
    space = DenseSpace((4, 3))
    centre = torch.tensor([1.0, -2.0, 0.5])
    base = lambda x, t: Prediction(0.3 * x, 0.7 * x)  # noqa: E731
    guided = classifier_guidance(base, lambda x, t: -0.5 * ((x - centre) ** 2).sum(1), 2.5, space, schedule)
    x, t = torch.randn(4, 3), torch.tensor([0.1, 0.4, 0.7, 0.95])
    out = guided(x, t)
    alpha, sigma = schedule.alpha_sigma(t)
    expected_eps = 0.7 * x - sigma[:, None] * 2.5 * (centre - x)  # grad log p = centre - x
    assert torch.allclose(out.eps, expected_eps, atol=1e-5)
    # x_t = alpha x0 + sigma eps holds for the guided pair as it did for the base one (0.3 alpha + 0.7 sigma != 1 here).
    base_gap = alpha[:, None] * 0.3 * x + sigma[:, None] * 0.7 * x - x
    assert torch.allclose(alpha[:, None] * out.x0 + sigma[:, None] * out.eps - x, base_gap, atol=1e-5)


def test_guidance_from_nearly_pure_noise_warns_once(caplog):
    """Without an interval, a grid starting at the trailing grid's first step (cosine, T = 1000: alpha_bar 2.4e-9)
    moves x0 by sigma^2 / alpha ~ 2e4 times the gradient: a warning names the remedies; a grid starting at the leading
    one's stays silent, and so does the default interval, which leaves that step unguided."""
    schedule = polydiff.make_schedule("cosine", 1000)
    base = lambda x, t: Prediction(0.3 * x, 0.7 * x)  # noqa: E731
    log_p = lambda x, t: -0.5 * (x**2).sum(1)  # noqa: E731
    space = DenseSpace((2, 3))
    with caplog.at_level("WARNING", logger="polydiff"):
        guided = classifier_guidance(base, log_p, 1.0, space, schedule, interval=None)
        guided(torch.randn(2, 3), torch.full((2,), 0.951))  # the leading grid's first step
        guided(torch.randn(2, 3), torch.ones(2))  # not a first call
        bounded = classifier_guidance(base, log_p, 1.0, space, schedule)  # the default interval
        bounded(torch.randn(2, 3), torch.ones(2))
        assert not caplog.records
        steep = classifier_guidance(base, log_p, 1.0, space, schedule, interval=None)
        steep(torch.randn(2, 3), torch.ones(2))
        steep(torch.randn(2, 3), torch.ones(2))
    message = caplog.records[0].getMessage()
    assert len(caplog.records) == 1 and "sampler.spacing=leading" in message and "classifier_interval" in message


def test_classifier_guidance_acts_only_inside_its_interval():
    """EDM's sigma = sigma / alpha decides (Kynkaenniemi et al. 2024): samples outside [lo, hi] keep the base
    prediction bit for bit, those inside get the full shift; the default interval leaves out nearly pure noise."""
    schedule = polydiff.make_schedule("cosine", 1000)
    base = lambda x, t: Prediction(0.3 * x, 0.7 * x)  # noqa: E731
    calls = []

    def log_p(x, t):
        calls.append(t)
        return -0.5 * (x**2).sum(1)

    t = torch.tensor([0.05, 0.5, 0.9, 0.97, 1.0])
    alpha, sigma = schedule.alpha_sigma(t, dtype=torch.float64)
    level = sigma / alpha  # about 0.08, 1.0, 6.4, 21, 2e4: inside [0.5, 10] are the second and third
    assert level[1] < 10 < 20 < level[3]
    x = torch.randn(5, 3)
    space = DenseSpace((5, 3))
    full = classifier_guidance(base, log_p, 2.0, space, schedule, interval=None)(x, t)
    part = classifier_guidance(base, log_p, 2.0, space, schedule, interval=[0.5, 10.0])(x, t)
    plain = base(x, t)
    inside = (level >= 0.5) & (level <= 10.0)
    assert inside.tolist() == [False, True, True, False, False]
    assert torch.equal(part.eps[~inside], plain.eps[~inside]) and torch.equal(part.x0[~inside], plain.x0[~inside])
    torch.testing.assert_close(part.eps[inside], full.eps[inside])
    torch.testing.assert_close(part.x0[inside], full.x0[inside])
    assert not torch.allclose(full.eps[inside], plain.eps[inside])
    calls.clear()
    out = classifier_guidance(base, log_p, 2.0, space, schedule)(x, torch.ones(5))  # default: [0, 20]
    assert not calls and torch.equal(out.eps, plain.eps)  # no gradient taken at pure noise
    assert polydiff.guidance.CLASSIFIER_INTERVAL == (0.0, 20.0)


@pytest.mark.parametrize("interval", [[20.0, 1.0], [math.nan, 1.0], [-1.0, 2.0], [1.0], "wide", [1.0, 1.0]])
def test_a_bad_guidance_interval_is_refused_by_name(interval):
    schedule = polydiff.make_schedule("cosine", 100)
    with pytest.raises(ValueError, match=r"guidance.classifier_interval=.* must be two numbers \[lo, hi\]"):
        classifier_guidance(lambda x, t: None, lambda x, t: x.sum(1), 1.0, DenseSpace((1, 2)), schedule, interval)


@pytest.mark.parametrize("scale", [-1.0, math.nan, math.inf])
def test_a_negative_or_non_finite_classifier_scale_is_refused(scale):
    with pytest.raises(ValueError, match="guidance.classifier_scale=.* must be a finite number >= 0"):
        classifier_guidance(lambda x, t: None, lambda x, t: x.sum(1), scale, DenseSpace((1, 2)), None)


def test_the_guidance_gradient_matches_finite_differences():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    embed = nn.Embedding(3, 1).double()

    def conditional(x, t, label):  # a class-dependent output of the state's shape
        return net(torch.cat([x, t[:, None]], 1)) * (1 + embed(label.clamp(min=0)))

    objective, space = ClassifierObjective(classes=3), DenseSpace((5, 2))
    x, t, y = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    f = lambda z: objective.log_prob(conditional, z, t, space, {"label": y}, y)  # noqa: E731
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(xg).sum(), xg)
    h, numeric = 1e-6, torch.zeros_like(x)
    for j in range(2):
        step = torch.zeros_like(x)
        step[:, j] = h
        numeric[:, j] = (f(x + step) - f(x - step)) / (2 * h)
    assert torch.allclose(grad, numeric, atol=1e-7)
    total = sum(objective.log_prob(conditional, x, t, space, {"label": y}, torch.full((5,), k)).exp() for k in range(3))
    assert torch.allclose(total, torch.ones(5, dtype=torch.float64))  # p(y | x_t) over the classes sums to 1


def _random_rotation(seed):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.det(q))


def test_the_property_gradient_of_an_egnn_regressor_is_equivariant():
    from domains.molecule.egnn import EGNN

    torch.manual_seed(0)
    net = EGNN(5, context_dim=1, hidden=32, layers=2).double()
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    space = RaggedSpace(batch, 2, 8, centered=(0, 1, 2))
    x = space.project(torch.randn(7, 8, dtype=torch.float64))
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    cond = {"batch": batch, "context": torch.zeros(2, 1, dtype=torch.float64)}
    objective, target = ClassifierObjective(), torch.tensor([0.5, -1.0], dtype=torch.float64)

    def grad_at(state):
        xg = state.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(objective.log_prob(net, xg, t, space, cond, target).sum(), xg)
        return space.project(g)

    rot = _random_rotation(3)
    rotated = x.clone()
    rotated[:, :3] = x[:, :3] @ rot.T
    g, g_rot = grad_at(x), grad_at(rotated)
    assert g[:, :3].abs().max() > 1e-4  # the positions do move the property
    assert torch.allclose(g_rot[:, :3], g[:, :3] @ rot.T, atol=1e-8)  # the gradient rotates with the molecule
    assert torch.allclose(g_rot[:, 3:], g[:, 3:], atol=1e-8)  # and is invariant on the atom features
    assert pooled(net(x, t, **cond), space).shape == (2,)


def test_a_trained_classifier_is_accurate_and_steers_an_unconditional_model(runs):
    cls, _ = polydiff.load_run(runs / "cls")
    scores = classifier_metrics(cls.objective, cls.net, cls.domain, cls.schedule, 256, "cpu")
    assert scores["accuracy_t0.1"] > 0.95 and scores["accuracy_t0.9"] < 0.8  # noise-aware: sure early, unsure late
    # The run logged the same figures as its evaluation, and drew no samples.
    records = [json.loads(line) for line in (runs / "cls" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert (
        final["step"] == 150 and final["accuracy_t0.1"] > 0.95 and set(final) >= {f"accuracy_t{t}" for t in (0.1, 0.9)}
    )
    assert not any((runs / "cls" / "samples").glob("*"))
    parts, _ = polydiff.load_run(runs / "gen")
    fractions, spread = {}, {}
    for scale, interval in ((0.0, None), (2.0, "default"), (2.0, None)):
        guidance = {"scale": 1.0, "classifier": str(runs / "cls"), "classifier_scale": scale}
        if interval != "default":
            guidance["classifier_interval"] = interval
        batch = polydiff.generate(
            parts.domain,
            parts.net,
            parts.schedule,
            parts.objective,
            128,
            {"name": "ddim", "steps": 20},
            guidance=guidance,
            labels=torch.ones(128, dtype=torch.long),
            generator=torch.Generator().manual_seed(0),
        )
        fractions[scale, interval] = float((batch.x[:, 0] > 0).float().mean())
        spread[scale, interval] = float(batch.x[:, 0].abs().median())
    assert 0.3 < fractions[0.0, None] < 0.7  # the unconditional model draws both blobs
    assert fractions[2.0, "default"] > 0.9 and spread[2.0, "default"] < 3  # guided to class 1, 'right', near x = 2
    # Guided from the trailing grid's first step (sigma / alpha ~ 2e3) as well, x0 is thrown by sigma^2 / alpha times
    # the gradient: the samples leave the data far behind. The default interval is what keeps them.
    assert spread[2.0, None] > 20


def test_sample_with_a_classifier_from_the_command_line(runs, tmp_path):
    out = tmp_path / "guided"
    main(
        [
            "sample",
            str(runs / "gen"),
            "--n",
            "8",
            "--out",
            str(out),
            "label=right",
            f"guidance.classifier={runs / 'cls'}",
            "guidance.classifier_scale=2",
            "guidance.classifier_interval=[0,inf]",
        ]
    )

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    # Strict JSON: the open interval's end is the string "inf", not Python's Infinity, which other readers refuse.
    record = json.loads((out / "sampling.json").read_text(), parse_constant=refuse)
    assert record["guidance"]["classifier"] == str(runs / "cls") and record["guidance"]["classifier_scale"] == 2
    assert record["guidance"]["classifier_interval"] == [0.0, "inf"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("guidance.classifier_scale=-1", "guidance.classifier_scale=-1.0 must be a finite number >= 0"),
        ("guidance.classifier={other}", "knows the labels \\['a', 'b'\\], this model \\['left', 'right'\\]"),
        ("guidance.classifier={gen}", "is a run of objective 'vp', not a classifier"),
    ],
)
def test_a_wrong_classifier_is_refused_with_the_fix(runs, tmp_path, override, message):
    override = override.format(other=runs / "other_labels", gen=runs / "gen")
    with pytest.raises(SystemExit) as err:
        main(
            [
                "sample",
                str(runs / "gen"),
                "--n",
                "2",
                "--out",
                str(tmp_path / "x"),
                "label=right",
                f"guidance.classifier={runs / 'cls'}" if "classifier=" not in override else override,
                override,
            ]
        )
    assert re.search(message, str(err.value)) and "\n" not in str(err.value)


def test_nll_of_a_classifier_run_is_refused_saying_why(runs):
    with pytest.raises(SystemExit) as err:
        main(["eval", "--nll", str(runs / "cls")])
    assert "not defined for a classifier run" in str(err.value)


def test_the_pooled_readout_leaves_out_zero_mean_columns():
    space = RaggedSpace(torch.tensor([0, 0, 1]), 2, 4, centered=(0, 1, 2))
    out = torch.tensor([[9.0, 9.0, 9.0, 1.0], [-9.0, 5.0, 2.0, 3.0], [4.0, 4.0, 4.0, 5.0]])
    assert pooled(out, space).tolist() == [2.0, 5.0]
    assert pooled(torch.ones(2, 3), DenseSpace((2, 3))).tolist() == [1.0, 1.0]


def test_a_classifier_of_another_domain_is_refused(runs):
    from examples.points import PointsDomain
    from polydiff.classifier_guide import load_classifier_guide

    with pytest.raises(ValueError, match="was trained on domain .*TwoBlobs.*this model on .*PointsDomain"):
        load_classifier_guide({"classifier": str(runs / "cls")}, PointsDomain(), "cpu")


def test_a_regressor_guides_an_unconditional_molecule_model_towards_the_target():
    from domains.molecule.egnn import EGNN
    from polydiff.classifier_guide import ClassifierGuide

    torch.manual_seed(1)
    net = EGNN(5, context_dim=1, hidden=16, layers=2)
    schedule = polydiff.make_schedule("cosine", 100)
    batch = torch.tensor([0, 0, 0, 1, 1])
    space = RaggedSpace(batch, 2, 8, centered=(0, 1, 2))
    guide = ClassifierGuide(ClassifierObjective(), net, schedule, "context", True, 2.0, torch.tensor([0.5]))
    base = lambda x, t: Prediction(torch.zeros_like(x), torch.zeros_like(x))  # noqa: E731
    x, t = space.project(torch.randn(5, 8)), torch.tensor([0.2, 0.7])
    got = guide.wrap(base, schedule, space, {"batch": batch})(x, t)  # the model's conditions hold no property
    xg = x.clone().requires_grad_(True)
    t_cls = schedule.t_at_sigma(((1 - schedule.alpha_bar(t)) / schedule.alpha_bar(t)).sqrt()).float()
    value = pooled(net(xg, t_cls, batch=batch, context=torch.full((2, 1), math.nan)), space)
    (grad,) = torch.autograd.grad(-((value - 0.5) ** 2).sum(), xg)
    sigma = schedule.alpha_sigma(t)[1]
    assert torch.allclose(got.eps, -space.expand(sigma * 2.0) * space.project(grad), atol=1e-5)
    assert torch.allclose(got.eps[:, :3].sum(0), torch.zeros(3), atol=1e-5)  # still zero centre of mass per batch
