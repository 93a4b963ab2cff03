"""Improved DDPM's learned variance (Nichol & Dhariwal 2021) as ``objective.variance=learned`` of ``vp``: the default
path unchanged, the wrapped network on dense, 1-D and ragged states, DDPM's step variance at the interpolation's ends,
the bound's terms against closed forms, a tiny run end to end, and bad inputs."""

import json
import math

import pytest
import torch
from common import TINY_POINTS, cli
from torch import nn

import polydiff
from polydiff.likelihood import variational_bound
from polydiff.objectives import VPObjective, build_objective_from
from polydiff.paths import EDMSchedule, FlowSchedule
from polydiff.samplers import sample_ddim, sample_ddpm
from polydiff.space import DenseSpace, RaggedSpace
from polydiff.state import Batch, Prediction
from polydiff.variance import (
    LearnedVariance,
    VarianceOutput,
    interpolated_logvar,
    interpolated_std,
    vlb_terms,
)


class Dense(nn.Module):
    """A channel-mixing 1x1 convolution over a state of any rank ``[B, C, ...]``, shifted by ``t``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Linear(channels, channels)

    def forward(self, x, t):
        out = self.mix(x.movedim(1, -1)).movedim(-1, 1)
        return out + t.reshape(-1, *([1] * (x.dim() - 1)))


class Rows(nn.Module):
    """A ragged ``[N, F]`` network that reads the batch index from its condition (as the molecule EGNN does)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.mix = nn.Linear(features, features)

    def forward(self, x, t, batch):
        return self.mix(x) * (1 + t[batch, None])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ (1) the default path is unchanged


def test_the_default_objective_is_fixed_and_computes_what_it_did():
    schedule = polydiff.make_schedule("linear", 50)
    objective = build_objective_from({})
    assert objective == VPObjective() and objective.variance == "fixed"
    net = Dense(3)
    assert objective.wrap_network(net) is net  # no head: the same weights, the same checkpoint keys
    x0 = torch.randn(6, 3, 4, generator=_gen(1))
    batch = Batch(x0, DenseSpace((6, 3, 4)))
    got = objective.losses(net, batch, schedule, _gen(2))
    # By hand: Ho et al. 2020, Algorithm 1, drawn in the same order from the same generator.
    g = _gen(2)
    t = torch.randint(1, 51, (6,), generator=g).double() / 50
    eps = torch.randn(6, 3, 4, generator=g)
    a, s = (u.float()[:, None, None] for u in schedule.alpha_sigma(t, dtype=torch.float64))
    x_t = a * x0 + s * eps
    want = ((net(x_t, t.float()) - eps) ** 2).reshape(6, -1).mean(1)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    den = objective.denoiser(net, schedule, batch.space)
    assert den(x_t, t.float()).v is None


def test_ddpm_without_a_learned_v_is_the_ancestral_step_of_ho_et_al():
    schedule = polydiff.make_schedule("cosine", 20)
    noise = torch.randn(5, 2, generator=_gen(3))

    def den(x, t):
        return Prediction(0.5 * x, 0.3 * x)

    got = sample_ddpm(den, noise, schedule, 20, generator=_gen(4))
    ab = schedule.alpha_bar_table
    g, x = _gen(4), noise.clone()
    for i in range(20, 0, -1):
        beta = 1 - ab[i] / ab[i - 1]
        x0 = 0.5 * x
        mean = (ab[i - 1].sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab[i - 1]) * x) / (1 - ab[i])
        z = torch.randn(5, 2, generator=g)
        x = (mean + (beta * (1 - ab[i - 1]) / (1 - ab[i])).sqrt() * z).float() if i > 1 else mean.float()
    assert torch.allclose(got, x, atol=1e-5)


# ------------------------------------------------------------------ (2) the wrapped network


def _shapes():
    ragged = RaggedSpace(torch.tensor([0, 0, 0, 1, 1, 2]), 3, 5, centered=(0, 1, 2))
    return [
        ("image", Dense(3), DenseSpace((2, 3, 4, 4)), {}),
        ("audio", Dense(1), DenseSpace((2, 1, 16)), {}),
        ("molecule", Rows(5), ragged, {"batch": ragged.batch}),
    ]


@pytest.mark.parametrize("name, inner, space, cond", _shapes(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_head_adds_v_of_the_states_shape_and_leaves_the_domains_network_alone(name, inner, space, cond):
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    objective = VPObjective(variance="learned")
    net = objective.wrap_network(inner)
    assert isinstance(net, LearnedVariance) and net.net is inner
    assert {k[len("net.") :] for k in net.state_dict() if k.startswith("net.")} == set(before)
    x = space.randn(generator=_gen(5))
    t = torch.tensor([0.2, 0.7, 0.9])[: space.num_samples]
    result = net(x, t, t_elements=space.expand(t), **cond)
    assert isinstance(result, VarianceOutput)
    assert torch.equal(result.out, inner(x, t, **cond))  # the denoiser's output, untouched
    assert result.v.shape == x.shape and bool(((result.v >= 0) & (result.v <= 1)).all())
    # The loss reaches every parameter (DDP needs each trained one used), the domain's and the head's.
    schedule = polydiff.make_schedule("linear", 40)
    objective.losses(net, Batch(space.project(x), space, cond), schedule, _gen(6)).mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    pred = objective.denoiser(net, schedule, space, cond)(x, t)
    assert pred.v.shape == x.shape and pred.x0.shape == x.shape
    assert all(torch.equal(before[k], v) for k, v in inner.state_dict().items())


# ------------------------------------------------------------------ (3) DDPM's variance at the ends of v


@pytest.mark.parametrize("v, fixed", [(1.0, "large"), (0.0, "small")])
def test_ddpm_with_v_at_an_end_takes_that_fixed_variance_exactly(v, fixed):
    schedule = polydiff.make_schedule("linear", 30)
    noise = torch.randn(4, 3, generator=_gen(7))

    def plain(x, t):
        return Prediction(0.8 * x, 0.2 * x)

    def learned(x, t):
        return Prediction(0.8 * x, 0.2 * x, torch.full_like(x, v))

    for steps in (30, 7):  # every step, and a respaced grid (its own beta and beta~)
        want = sample_ddpm(plain, noise, schedule, steps, variance=fixed, generator=_gen(8))
        got = sample_ddpm(learned, noise, schedule, steps, variance="small", generator=_gen(8))
        assert torch.equal(got, want)
    # Other samplers ignore v.
    assert torch.equal(sample_ddim(learned, noise, schedule, 5), sample_ddim(plain, noise, schedule, 5))


def test_the_interpolated_std_is_the_root_of_the_interpolated_variance():
    beta, post = torch.tensor([0.02, 0.3]), torch.tensor([0.01, 0.25])
    v = torch.tensor([0.0, 0.25, 0.5, 1.0])[:, None]
    std = interpolated_std(v, post.sqrt(), beta.sqrt())
    assert torch.allclose(std**2, interpolated_logvar(v, beta.log(), post.log()).exp(), rtol=1e-6)
    assert torch.equal(std[0], post.sqrt()) and torch.equal(std[-1], beta.sqrt())


# ------------------------------------------------------------------ (4) the bound's terms


def test_the_vlb_term_is_the_gaussian_kl_and_the_decoder_nll_by_hand():
    schedule = polydiff.make_schedule("linear", 10)
    ab = schedule.alpha_bar_table  # float64, ab[0] = 1
    space = DenseSpace((2, 1))
    x0 = torch.tensor([[0.4], [-0.3]], dtype=torch.float64)
    x0_hat = torch.tensor([[0.1], [-0.2]], dtype=torch.float64)
    v = torch.tensor([[0.3], [0.6]], dtype=torch.float64)
    t = torch.tensor([3 / 10, 1 / 10], dtype=torch.float64)
    got = vlb_terms(x0, x0_hat, v, t, schedule, space)
    # Step 3: q(x_2 | x_3, x_0) = N(mu~, beta~_3); p = N(mu_theta, beta_3^v beta~_3^(1 - v)).
    beta3 = 1 - ab[3] / ab[2]
    post3 = beta3 * (1 - ab[2]) / (1 - ab[3])
    diff = ab[2].sqrt() * beta3 / (1 - ab[3]) * (0.4 - 0.1)  # mu~ - mu_theta: x_3's weight cancels
    var = beta3**0.3 * post3**0.7
    kl = 0.5 * math.log(var / post3) + (post3 + diff**2) / (2 * var) - 0.5
    # Step 1: -log N(x_0; x0_hat, beta_1^v beta~_2^(1 - v)), beta~_1 = 0 clipped to beta~_2.
    beta1, beta2 = 1 - ab[1], 1 - ab[2] / ab[1]
    var1 = beta1**0.6 * (beta2 * (1 - ab[1]) / (1 - ab[2])) ** 0.4
    nll = 0.5 * math.log(2 * math.pi * var1) + (-0.3 + 0.2) ** 2 / (2 * var1)
    assert torch.allclose(got, torch.tensor([float(kl), float(nll)], dtype=torch.float64), rtol=1e-10)


def test_the_vlb_term_trains_v_and_not_the_mean():
    """The hybrid loss's gradient on the network output is L_simple's alone; L_vlb's reaches v (sec. 3.1)."""
    schedule = polydiff.make_schedule("linear", 20)
    batch = Batch(torch.randn(4, 3, generator=_gen(9)), DenseSpace((4, 3)))
    base = torch.randn(4, 3, generator=_gen(10))

    def run(objective):
        out = base.clone().requires_grad_(True)
        v = torch.full((4, 3), 0.4, requires_grad=True)

        def net(x_t, t, t_elements=None):
            return out * 1.0 if t_elements is None else VarianceOutput(out * 1.0, v * 1.0)

        objective.losses(net, batch, schedule, _gen(11)).sum().backward()
        return out.grad, v.grad

    g_hybrid, g_v = run(VPObjective(prediction="v", variance="learned", vlb_weight=0.5))
    g_simple, unused = run(VPObjective(prediction="v"))
    assert torch.equal(g_hybrid, g_simple) and unused is None
    assert g_v is not None and float(g_v.abs().sum()) > 0


def test_the_hybrid_loss_is_l_simple_plus_lambda_times_the_one_term_estimate():
    schedule = polydiff.make_schedule("cosine", 25)
    space = DenseSpace((5, 2))
    batch = Batch(torch.randn(5, 2, generator=_gen(12)), space)
    objective = VPObjective(variance="learned", vlb_weight=0.01)
    net = objective.wrap_network(Dense(2))
    t = torch.tensor([1.0, 2, 9, 17, 25]) / 25
    got = objective.losses(net, batch, schedule, _gen(13), t=t)
    eps = space.randn(generator=_gen(13))
    a, s = (space.expand(u) for u in schedule.alpha_sigma(t))
    x_t = a * batch.x + s * eps
    out, v = net(x_t, t, t_elements=space.expand(t))
    simple = ((out - eps) ** 2).mean(1)
    vlb = vlb_terms(batch.x, (x_t - s * out) / a, v, t, schedule, space)
    assert torch.allclose(got, simple + 0.01 * 25 * vlb / math.log(2), rtol=1e-5)
    with pytest.raises(ValueError, match="trained times i / 25"):
        objective.losses(net, batch, schedule, _gen(13), t=torch.full((5,), 0.011))


# ------------------------------------------------------------------ the bound with a learned variance

MU, VAR = 0.7, 0.25


def _gaussian(schedule, v_of=None):
    """The exact denoiser of x0 ~ N(MU, VAR); with ``v_of(t)`` its predictions carry that ``v``."""

    def den(x, t):
        ab = schedule.alpha_bar(t.double())[:, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = MU + a * VAR * (x.double() - a * MU) / (a * a * VAR + s * s)
        eps = (x.double() - a * x0) / s
        v = None if v_of is None else v_of(t.double())[:, None].expand_as(x).to(x.dtype)
        return Prediction(x0.to(x.dtype), eps.to(x.dtype), v)

    return den


def test_the_bound_reads_v_and_an_optimal_v_beats_both_fixed_variances():
    schedule = polydiff.make_schedule("linear", 20)
    x = MU + math.sqrt(VAR) * torch.randn(128, 2, generator=_gen(14), dtype=torch.float64)
    batch = Batch(x, DenseSpace((128, 2)))

    def bound(den, variance="small"):
        return variational_bound(den, batch, schedule, variance=variance, generator=_gen(15))["nll"]

    small, large = bound(_gaussian(schedule)), bound(_gaussian(schedule), "large")
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    assert torch.allclose(bound(_gaussian(schedule, lambda t: torch.zeros_like(t))), small, rtol=1e-9)
    assert torch.allclose(bound(_gaussian(schedule, ones), "small"), large, rtol=1e-9)
    ab = schedule.alpha_bar_table

    def optimal(t):  # the true reverse variance beta~ + c0^2 Var(x0 | x_t), as a v between the two ends
        i = (t * 20).round().long()
        ab_t, ab_s = ab[i], ab[(i - 1).clamp(min=0)]
        beta = 1 - ab_t / ab_s
        post = beta * (1 - ab_s) / (1 - ab_t)
        post = torch.where(i == 1, (1 - ab[2] / ab[1]) * (1 - ab[1]) / (1 - ab[2]), post)
        c0 = ab_s.sqrt() * beta / (1 - ab_t)
        var = post + c0**2 * VAR * (1 - ab_t) / (ab_t * VAR + 1 - ab_t)
        return ((var.log() - post.log()) / (beta.log() - post.log())).clamp(0, 1)

    learned = bound(_gaussian(schedule, optimal))
    assert float(learned.mean()) < float(small.mean()) and float(learned.mean()) < float(large.mean())


# ------------------------------------------------------------------ (5) end to end


def test_a_learned_variance_run_trains_resumes_samples_and_scores(tmp_path):
    run = tmp_path / "run"
    common = [*TINY_POINTS, "objective.variance=learned", "schedule.steps=50", f"hydra.run.dir={run}"]
    assert cli("train", "examples/points.yaml", "trainer.max_steps=4", *common) == ""
    assert cli("train", "examples/points.yaml", "trainer.max_steps=6", *common) == ""  # resumes from step 4
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert ckpt["config"]["objective"]["variance"] == "learned"
    assert any(k.startswith("head.") for k in ckpt["model"]) and any(k.startswith("net.") for k in ckpt["model"])
    out = tmp_path / "samples"
    assert cli("sample", str(run), "--n", "8", "--out", str(out), "sampler.name=ddpm", "sampler.steps=10") == ""
    x = torch.load(out / "samples.pt", weights_only=True)["x"]
    assert x.shape == (8, 2) and torch.isfinite(x).all()
    report = tmp_path / "nll.json"
    assert cli("eval", "--nll", "bound", str(run), "--n", "16", "--steps", "5", "--json", str(report)) == ""
    record = json.loads(report.read_text())
    assert math.isfinite(record["nll_nats"]) and math.isfinite(record["nll_bpd"])
    # A fixed-variance recipe does not resume the learned run: the networks differ.
    fixed = [o for o in common if o != "objective.variance=learned"]
    message = cli("train", "examples/points.yaml", "trainer.max_steps=8", *fixed)
    assert "objective.variance: checkpoint 'learned' vs recipe 'fixed'" in message
    # trainer.init crosses the head: a fixed run starts from the learned run's denoiser, and a learned one from that.
    plain, again = tmp_path / "plain", tmp_path / "again"
    steps = ["trainer.max_steps=2", *TINY_POINTS, "schedule.steps=50"]
    assert cli("train", "examples/points.yaml", *steps, f"trainer.init={run}", f"hydra.run.dir={plain}") == ""
    learned = ["objective.variance=learned", f"trainer.init={plain}", f"hydra.run.dir={again}"]
    assert cli("train", "examples/points.yaml", *steps, *learned) == ""
    assert any(k.startswith("head.") for k in torch.load(again / "checkpoints" / "last.pt", weights_only=True)["model"])


# ------------------------------------------------------------------ (6) bad inputs


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"variance": "learnt"}, KeyError, "unknown objective.variance 'learnt'"),
        ({"variance": "learned", "vlb_weight": -0.1}, ValueError, "vlb_weight=-0.1 must be a finite number > 0"),
        ({"variance": "learned", "vlb_weight": math.nan}, ValueError, "vlb_weight=nan must be a finite number"),
        ({"variance": "learned", "vlb_weight": math.inf}, ValueError, "vlb_weight=inf must be a finite number"),
        ({"variance": "learned", "vlb_weight": 0.0}, ValueError, "vlb_weight=0.0 must be a finite number > 0"),
        ({"vlb_weight": 0.1}, ValueError, "set objective.variance=learned"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options, error, message):
    with pytest.raises(error, match=message):
        VPObjective(**options)


@pytest.mark.parametrize("schedule", [FlowSchedule(), EDMSchedule()], ids=repr)
def test_a_schedule_without_trained_steps_is_refused(schedule):
    objective = VPObjective(prediction="v", variance="learned")
    with pytest.raises(ValueError, match="objective.variance=learned needs a schedule of trained steps"):
        objective.check_schedule(schedule)
    with pytest.raises(ValueError, match="objective.variance=fixed"):
        objective.denoiser(objective.wrap_network(Dense(2)), schedule, DenseSpace((1, 2)))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_every_parameterisation_trains_a_learned_variance(prediction):
    objective = VPObjective(prediction=prediction, variance="learned")
    net = objective.wrap_network(Dense(2))
    loss = objective.losses(net, Batch(torch.randn(8, 2), DenseSpace((8, 2))), polydiff.make_schedule("cosine", 20))
    assert torch.isfinite(loss).all()


def test_a_network_without_the_head_is_refused_with_the_fix():
    objective = VPObjective(variance="learned")
    batch = Batch(torch.randn(3, 2), DenseSpace((3, 2)))
    with pytest.raises(ValueError, match="needs a network that returns \\(out, v\\)"):
        objective.losses(lambda x, t, **k: x, batch, polydiff.make_schedule("linear", 10))


def test_a_bad_vlb_weight_on_the_command_line_is_one_line(tmp_path):
    message = cli(
        "train",
        "examples/points.yaml",
        *TINY_POINTS,
        "objective.variance=learned",
        "objective.vlb_weight=-1.0",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "objective.vlb_weight=-1.0 must be a finite number > 0" in message and "\n" not in message


def test_guidance_keeps_the_conditional_v_and_bf16_autocast_trains():
    from polydiff.guidance import classifier_free_guidance, stacked_guidance

    space, x, t = DenseSpace((2, 3)), torch.randn(2, 3), torch.tensor([0.5, 0.5])

    def cond(x, t):
        return Prediction(x, x, torch.full_like(x, 0.25))

    def uncond(x, t):
        return Prediction(-x, -x, torch.full_like(x, 0.75))

    assert float(classifier_free_guidance(cond, uncond, 3.0, space)(x, t).v.mean()) == 0.25

    def joint(xx, tt):  # the conditional rows first, as Domain.concat lays them out
        v = torch.cat([torch.full_like(x, 0.25), torch.full_like(x, 0.75)])
        return Prediction(xx, xx, v)

    assert float(stacked_guidance(joint, 3.0, space)(x, t).v.mean()) == 0.25
    objective = VPObjective(variance="learned")
    net = objective.wrap_network(Dense(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective.losses(net, Batch(torch.randn(4, 3), DenseSpace((4, 3))), polydiff.make_schedule("linear", 10))
    loss.mean().backward()
    assert torch.isfinite(loss).all() and all(p.grad is not None for p in net.parameters())
