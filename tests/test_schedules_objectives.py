import pytest
import torch

from polydiff import DenseSpace, RaggedSpace
from polydiff.domain import Batch
from polydiff.objectives import Objective, loss_weight, target_of, to_prediction
from polydiff.schedules import NoiseSchedule, make_schedule

NAMES = ["linear", "cosine", "sigmoid", "polynomial"]
T_DENSE = torch.linspace(0, 1, 4001, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [10, 1000])
def test_schedule_invariants(name, steps):
    s = make_schedule(name, steps)
    a, sig = s.alpha_sigma(T_DENSE, dtype=torch.float64)
    torch.testing.assert_close(a**2 + sig**2, torch.ones_like(a))
    lam = s.log_snr(T_DENSE)
    assert lam[0] == float("inf")
    assert (lam[1:] < lam[:-1]).all(), "log-SNR must decrease strictly in t"
    assert s.alpha_bar_table.dtype == torch.float64
    assert s.alpha_sigma(torch.tensor([0.5]))[0].dtype == torch.float32  # cast on use


def test_schedules_match_their_published_formulas():
    """Tables against the papers' closed forms, computed here with plain floats."""
    import math

    cos = make_schedule("cosine", 1000).alpha_bar_table  # Nichol & Dhariwal 2021, eq. 17, s = 0.008
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (1, 10, 250, 500, 900, 990):
        assert cos[i].item() == pytest.approx(f(i / 1000) / f(0), rel=1e-9)
    # The README's figures: beta clipped at 0.999 leaves the last step at SNR ~2.4e-9, alpha ~4.9e-5.
    last = cos[-1].item()
    assert last / (1 - last) == pytest.approx(2.4e-9, rel=0.05) and math.sqrt(last) == pytest.approx(4.9e-5, rel=0.02)
    lin = make_schedule("linear", 1000).alpha_bar_table  # DDPM: beta from 1e-4 to 0.02 over 1000 steps
    prod = 1.0
    for j in range(1000):
        prod *= 1 - (1e-4 + j * (0.02 - 1e-4) / 999)
        if j + 1 in (1, 100, 500, 1000):
            assert lin[j + 1].item() == pytest.approx(prod, rel=1e-9)
    poly = make_schedule("polynomial", 1000, power=2, precision=1e-5).alpha_bar_table  # EDM, App. B
    for i in (1, 300, 500, 800):
        assert poly[i].item() == pytest.approx((1 - 2e-5) * (1 - (i / 1000) ** 2) ** 2 + 1e-5, rel=1e-9)


def test_sigmoid_default_reaches_geodiffs_noise_at_any_step_count():
    """GeoDiff's sigmoid betas 1e-7..2e-3 (Xu et al. 2022) are set for 5,000 steps; the default ends as noisy at any
    count."""
    import math

    geo = 1.0  # GeoDiff's QM9 table, with plain floats
    for j in range(5000):
        geo *= 1 - (1e-7 + (2e-3 - 1e-7) / (1 + math.exp(-(-6 + 12 * j / 4999))))
    assert make_schedule("sigmoid", 5000).alpha_bar_table[-1].item() == pytest.approx(geo, rel=1e-9)  # ~6.7e-3
    for steps in (100, 1000):  # unscaled, 1,000 steps would end at alpha_bar 0.37 (SNR 0.58), far from noise
        assert make_schedule("sigmoid", steps).alpha_bar_table[-1].item() == pytest.approx(geo, rel=0.25)
    # Explicit betas are the formula as written (diffusers' "sigmoid" with the same range).
    betas = make_schedule("sigmoid", 1000, beta_start=1e-7, beta_end=2e-3).betas
    x = torch.linspace(-6, 6, 1000, dtype=torch.float64)
    torch.testing.assert_close(betas, torch.sigmoid(x) * (2e-3 - 1e-7) + 1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_zero_terminal_snr(name):
    s = make_schedule(name, 1000, zero_terminal_snr=True)
    assert s.snr(torch.tensor([1.0])).item() == 0.0
    assert s.log_snr(torch.tensor([1.0])).item() == float("-inf")
    base = make_schedule(name, 1000)
    # The first step is unchanged by the rescale.
    assert s.alpha_bar_table[1].item() == pytest.approx(base.alpha_bar_table[1].item(), rel=1e-9)
    lam = s.log_snr(T_DENSE)
    assert (lam[1:] < lam[:-1]).all()
    # Lin et al. 2024, Alg. 1: sqrt(alpha_bar) shifted to end at 0 and scaled to keep its first value.
    r = base.alpha_bar_table[1:].sqrt()
    expected = ((r - r[-1]) * r[0] / (r[0] - r[-1])) ** 2
    torch.testing.assert_close(s.alpha_bar_table[1:], expected, rtol=1e-12, atol=1e-15)


def test_on_grid_values_and_interpolation():
    s = make_schedule("cosine", 1000)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(s.alpha_bar(t), s.alpha_bar_table[1:])
    mid = s.alpha_bar(torch.tensor([0.0005], dtype=torch.float64))
    assert mid.item() == pytest.approx((1 + s.alpha_bar_table[1].item()) / 2)


def test_custom_betas_and_bad_names():
    betas = [0.01, 0.02, 0.05]
    s = make_schedule("custom", betas=betas)
    torch.testing.assert_close(s.betas, torch.tensor(betas, dtype=torch.float64))
    assert s.num_steps == 3
    with pytest.raises(KeyError, match="Known schedules"):
        make_schedule("cosin")
    with pytest.raises(KeyError, match="power"):
        make_schedule("cosine", power=2.0)
    with pytest.raises(ValueError, match=r"every beta must be in \(0, 1\]"):
        NoiseSchedule.from_betas([0.1, 0.0])
    with pytest.raises(ValueError, match="set schedule.name=custom"):  # betas silently replacing 'linear'
        make_schedule("linear", betas=betas)
    with pytest.raises(KeyError, match=r"not \['beta_end'\]"):
        make_schedule("custom", betas=betas, beta_end=0.5)
    for name in NAMES:  # one step cannot span data to noise (linear would end at alpha_bar 0.9)
        with pytest.raises(ValueError, match="schedule.steps must be a whole number >= 2, got 1"):
            make_schedule(name, 1)


def test_network_output_of_another_shape_is_refused():
    """Broadcasting a [B, 1, L] output over a [B, 2, L] state would silently share one channel's prediction."""
    schedule, x = make_schedule("cosine", 100), torch.randn(4, 2, 8)
    net = lambda x_t, t: x_t[:, :1]
    with pytest.raises(ValueError, match=r"returned \(4, 1, 8\) for a state x_t of shape \(4, 2, 8\)"):
        Objective("v").loss(net, Batch(x, DenseSpace(x.shape)), schedule)
    with pytest.raises(ValueError, match="must return a tensor of x_t's shape"):
        Objective("eps").denoiser(net, schedule, DenseSpace(x.shape))(x, torch.full((4,), 0.5))


def test_a_sample_without_valid_elements_has_zero_loss_not_nan():
    """An all-masked row (or a 0-row ragged sample) must not make the batch loss NaN."""
    x, mask = torch.randn(2, 5), torch.ones(2, 5)
    mask[1] = 0
    losses = Objective("eps").losses(
        lambda x_t, t: torch.zeros_like(x_t), Batch(x, DenseSpace(x.shape, mask=mask)), make_schedule("cosine", 100)
    )
    assert torch.isfinite(losses).all() and losses[1] == 0
    assert RaggedSpace(torch.tensor([0, 0]), 2, 3).mean(torch.ones(2, 3)).tolist() == [1.0, 0.0]


def test_polynomial_is_edm_like():
    s = make_schedule("polynomial", 1000, power=2.0)
    ab = s.alpha_bar_table
    assert ab[1].item() > 0.999 and ab[-1].item() == pytest.approx(1e-5, rel=0.05)


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_prediction_conversions_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.98 + 0.01
    a, s = make_schedule("cosine").alpha_sigma(t, dtype=torch.float64)
    a, s = a[:, None], s[:, None]
    x_t = a * x0 + s * eps
    pred = to_prediction(kind, target_of(kind, x0, eps, a, s), x_t, a, s)
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, eps)


def test_v_prediction_defined_at_zero_snr():
    x_t, v = torch.randn(4, 3), torch.randn(4, 3)
    a, s = torch.zeros(4, 1), torch.ones(4, 1)
    pred = to_prediction("v", v, x_t, a, s)
    # v = a eps - s x0 with a = 0, s = 1: x0 = -v, and x_t = a x0 + s eps = eps.
    assert torch.equal(pred.x0, -v) and torch.equal(pred.eps, x_t)


def test_eps_denoiser_on_a_zero_terminal_schedule_is_refused():
    """At SNR 0 an eps-prediction gives x0 = (x_t - eps) / 0: refused loudly, not sampled as NaN."""
    from polydiff.samplers import sample_ddim

    zt = make_schedule("cosine", 100, zero_terminal_snr=True)
    space = DenseSpace((4, 3))
    zero = lambda x, t: torch.zeros_like(x)
    with pytest.raises(ValueError, match=r"zero-terminal-SNR schedule .*needs prediction 'v' or 'x0'"):
        Objective("eps").denoiser(zero, zt, space)
    from polydiff.build import build_objective

    with pytest.raises(ValueError, match=r"schedule.zero_terminal_snr=true\) needs prediction 'v' or 'x0'"):
        build_objective({"prediction": "eps"}, zt)  # a recipe: refused before training
    for kind in ("v", "x0"):  # both are defined at SNR 0
        x = sample_ddim(Objective(kind).denoiser(zero, zt, space), space.randn(), zt, 10, space=space)
        assert torch.isfinite(x).all()
    Objective("eps").denoiser(zero, make_schedule("cosine", 100), space)  # fine where alpha > 0


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.5, 5.0, 100.0])
    torch.testing.assert_close(loss_weight("eps", "min_snr", snr, 5.0), torch.tensor([1.0, 1.0, 1.0, 0.05]))
    torch.testing.assert_close(loss_weight("v", "min_snr", snr, 5.0), torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 101]))
    torch.testing.assert_close(loss_weight("x0", "min_snr", snr, 5.0), torch.tensor([0.0, 0.5, 5.0, 5.0]))
    assert torch.equal(loss_weight("eps", "uniform", snr), torch.ones(4))
    with pytest.raises(KeyError, match="weighting"):
        Objective(weighting="snr")
    with pytest.raises(KeyError, match="prediction"):
        Objective(prediction="score")


def test_loss_reduces_over_valid_elements_only():
    """A masked-out region, or padding rows of a ragged batch, never change a sample's loss."""
    schedule = make_schedule("linear", 100)
    obj = Objective()
    x = torch.randn(2, 1, 10)
    mask = torch.ones(2, 1, 10)
    mask[:, :, 6:] = 0
    net = lambda x_t, t: torch.where(mask.bool(), x_t * 0, torch.full_like(x_t, 1e6))
    t = torch.full((2,), 0.5)
    losses = obj.losses(net, Batch(x, DenseSpace(x.shape, mask=mask)), schedule, torch.Generator().manual_seed(0), t=t)
    assert losses.max() < 10  # the 1e6 outputs sit in masked elements
    eps = torch.randn(2, 1, 10, generator=torch.Generator().manual_seed(0))  # the draw the loss made
    torch.testing.assert_close(losses, (eps[:, :, :6] ** 2).mean(dim=(1, 2)))  # mean over the 6 valid elements
    # Ragged: the per-sample mean divides by that sample's own element count.
    batch = torch.tensor([0, 0, 0, 1])
    space = RaggedSpace(batch, 2, 2)
    vals = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [3.0, 3.0]])
    torch.testing.assert_close(space.mean(vals), torch.tensor([1.0, 3.0]))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_carries_the_objectives_weight(prediction):
    """min-SNR weighting multiplies each sample's loss by loss_weight (Hang et al. 2023, eq. 9) at its own time."""
    schedule, x = make_schedule("cosine", 1000), torch.randn(6, 2, 5)
    t = torch.linspace(0.05, 0.95, 6)
    net = lambda x_t, t: torch.zeros_like(x_t)
    batch = Batch(x, DenseSpace(x.shape))
    plain = Objective(prediction).losses(net, batch, schedule, torch.Generator().manual_seed(0), t=t)
    weighted = Objective(prediction, weighting="min_snr", gamma=5.0).losses(
        net, batch, schedule, torch.Generator().manual_seed(0), t=t
    )
    torch.testing.assert_close(weighted, plain * loss_weight(prediction, "min_snr", schedule.snr(t).float(), 5.0))
    assert not torch.allclose(weighted, plain)


def test_an_explicit_linear_range_is_used_as_given():
    """diffusers' ``linear`` with the same range; the default range still scales with 1000 / steps to reach noise."""
    betas = make_schedule("linear", 50, beta_start=1e-4, beta_end=0.02).betas
    torch.testing.assert_close(betas, torch.linspace(1e-4, 0.02, 50, dtype=torch.float64))
    torch.testing.assert_close(make_schedule("linear", 50).betas, torch.linspace(2e-3, 0.4, 50, dtype=torch.float64))
    one = make_schedule("linear", 50, beta_end=0.1).betas  # the other end keeps its scaled default
    torch.testing.assert_close(one, torch.linspace(2e-3, 0.1, 50, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"schedule.beta_end=1.5 must lie in \(0, 1\)"):
        make_schedule("linear", 50, beta_end=1.5)


def test_a_new_parameterisation_is_one_table_entry(monkeypatch):
    """x0 = -prediction, eps from it: the objective trains and denoises with it, no other code touched."""
    from polydiff import objectives

    neg = objectives.Parameterisation(
        target=lambda x0, eps, a, s: -x0,
        prediction=lambda out, x_t, a, s: objectives.Prediction(-out, (x_t + a * out) / s),
        min_snr=lambda snr, gamma: snr.clamp(max=gamma),
    )
    monkeypatch.setitem(objectives.PARAMETERISATIONS, "neg_x0", neg)
    schedule, x = make_schedule("cosine", 100), torch.randn(4, 3)
    objective = Objective("neg_x0", weighting="min_snr")
    losses = objective.losses(lambda x_t, t: -x, Batch(x, DenseSpace(x.shape)), schedule)
    assert torch.equal(losses, torch.zeros(4))  # the exact answer costs nothing
    pred = objective.denoiser(lambda x_t, t: -x, schedule, DenseSpace(x.shape))(x, torch.full((4,), 0.5))
    assert torch.equal(pred.x0, x)


def test_objectives_are_plug_ins_whose_options_are_their_constructors():
    from polydiff.build import build_objective
    from polydiff.objectives import OBJECTIVES, VPObjective, objective_settings
    from polydiff.resume import check_compatible

    schedule = make_schedule("cosine", 100)
    assert OBJECTIVES["vp"] is VPObjective and Objective is VPObjective
    assert build_objective({"name": "vp", "prediction": "v"}, schedule) == Objective("v")
    assert build_objective({}, schedule) == Objective()  # a config without a name (every one before) means vp
    with pytest.raises(KeyError, match="Did you mean 'objective.gamma'"):
        build_objective({"gama": 3.0}, schedule)
    with pytest.raises(TypeError, match="objective.gamma: Value 'x' has the wrong type"):
        build_objective({"gamma": "x"}, schedule)
    assert objective_settings({"prediction": "v"}) == {
        "name": "vp",
        "prediction": "v",
        "weighting": "uniform",
        "gamma": 5.0,
        "variance": "fixed",
        "vlb_weight": 0.001,
    }
    # A checkpoint whose config lists every option resumes under a recipe that leaves the defaults out.
    old = {"domain": {"name": "d"}, "model": {}, "schedule": {}, "objective": {"prediction": "eps", "gamma": 5.0}}
    check_compatible(old, {**old, "objective": {"name": "vp"}}, "ckpt")
    with pytest.raises(ValueError, match="objective.prediction: checkpoint 'eps' vs recipe 'v'"):
        check_compatible(old, {**old, "objective": {"prediction": "v"}}, "ckpt")
