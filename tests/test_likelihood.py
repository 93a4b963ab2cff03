"""Likelihood against closed forms: Gaussian data with its exact denoiser, whose NLL is known."""

import math

import pytest
import torch

import polydiff
from polydiff.decoders import DiscreteFeatures, categorical_log_prob, discrete_nll, integer_log_prob, log_interval_mass
from polydiff.likelihood import (
    dimensions,
    discretised_gaussian_log_prob,
    ode_nll,
    pf_ode_drift,
    variational_bound,
)
from polydiff.nll import ode_with_decoders
from polydiff.paths import EDMSchedule, FlowSchedule
from polydiff.space import DenseSpace, RaggedSpace
from polydiff.state import Batch, Prediction

MU = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64)
VAR = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)


def gaussian_denoiser(schedule):
    """The exact E[x0 | x_t] and E[eps | x_t] of x0 ~ N(MU, diag(VAR)) under the schedule's VP path."""

    def denoise(x, t):
        ab = schedule.alpha_bar(t.double())[:, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        total = a * a * VAR + s * s
        resid = x.double() - a * MU
        return Prediction((MU + a * VAR / total * resid).to(x.dtype), (s / total * resid).to(x.dtype))

    return denoise


def gaussian_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = MU + VAR.sqrt() * torch.randn(n, 3, generator=g, dtype=torch.float64)
    true = 0.5 * (math.log(2 * math.pi) + VAR.log() + (x - MU) ** 2 / VAR).sum(1)  # -log N(x; MU, VAR)
    return Batch(x.float(), DenseSpace((n, 3))), true


SCHEDULES = [polydiff.make_schedule("cosine", 1000), polydiff.make_schedule("linear", 500), FlowSchedule()]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_ode_nll_with_the_exact_trace_equals_the_analytic_nll(schedule):
    batch, true = gaussian_data(64)
    got = ode_nll(gaussian_denoiser(schedule), batch, schedule, steps=64, trace="exact")["nll"]
    # A tabulated schedule's alpha_bar is piecewise linear: its kinks cost RK4 some of its order.
    assert (got - true).abs().max() < 0.03
    assert abs(float((got - true).mean())) < 0.005


def test_ode_nll_with_hutchinson_is_unbiased_and_close():
    schedule = polydiff.make_schedule("cosine", 1000)
    batch, true = gaussian_data(512)
    got = ode_nll(gaussian_denoiser(schedule), batch, schedule, steps=48, generator=torch.Generator().manual_seed(0))
    err = got["nll"] - true
    assert abs(float(err.mean())) < 3 * float(err.std()) / math.sqrt(512) + 0.01
    assert float(err.abs().mean()) < 1.0  # one probe per sample: a noisy estimate of each sample's NLL


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_the_continuous_time_bound_is_at_least_the_nll_and_close(schedule):
    batch, true = gaussian_data(2048)
    got = variational_bound(
        gaussian_denoiser(schedule), batch, schedule, steps=40, time="continuous", generator=torch.Generator()
    )
    gap = got["nll"] - true
    sem = float(gap.std()) / math.sqrt(len(gap))
    assert -3 * sem < float(gap.mean()) < 0.1 + 3 * sem  # a bound, and tight for the exact denoiser


@pytest.mark.parametrize("variance", ["small", "large"])
def test_the_discrete_time_bound_sums_every_step_and_stays_above_the_nll(variance):
    schedule = polydiff.make_schedule("linear", 200)
    batch, true = gaussian_data(256)
    den = gaussian_denoiser(schedule)
    full = variational_bound(den, batch, schedule, variance=variance, generator=torch.Generator().manual_seed(0))
    gap = full["nll"] - true
    assert float(gap.mean()) > -3 * float(gap.std()) / math.sqrt(256)
    if variance == "small":
        assert float(gap.mean()) > 0.3  # the first steps' gap (about 0.3 nats a dimension)
    assert float(gap.mean()) < 3.0
    assert float(full["prior"].mean()) < 1e-2
    # Ten strata, each weighted by its size, estimate the same sum without bias.
    part = variational_bound(den, batch, schedule, steps=10, variance=variance, generator=torch.Generator())
    diff = part["diffusion"] - full["diffusion"]
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(256) + 0.05


def test_an_edm_schedule_reads_the_same_likelihood():
    schedule = EDMSchedule()
    batch, true = gaussian_data(32)
    got = ode_nll(gaussian_denoiser(schedule), batch, schedule, steps=64, trace="exact")["nll"]
    # The model's prior N(0, I) at sigma_max = 80 is not quite the data's marginal there (mean MU / 80).
    assert (got - true).abs().max() < 0.05
    assert abs(float((got - true).mean())) < 0.01


def test_the_drift_is_the_sigma_form_of_the_probability_flow():
    """dx/dt = (a'/a) x + (s' - s a'/a) eps equals a' y + a sigma' eps with y = x / a, sigma = s / a."""
    schedule = polydiff.make_schedule("cosine", 1000)
    x, eps, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.rand(5) * 0.9
    drift = pf_ode_drift(x, eps, schedule, t.double(), DenseSpace((5, 3)))
    h = 1e-6
    t64 = t.double()
    a = lambda u: schedule.alpha_bar(u).sqrt()  # noqa: E731
    sig = lambda u: (1 - schedule.alpha_bar(u)).sqrt() / a(u)  # noqa: E731
    da, dsig = (a(t64 + h) - a(t64 - h)) / (2 * h), (sig(t64 + h) - sig(t64 - h)) / (2 * h)
    expected = (da / a(t64))[:, None] * x + (a(t64) * dsig)[:, None] * eps
    assert torch.allclose(drift, expected, rtol=1e-4, atol=1e-6)


def test_ragged_zero_mean_positions_count_n_minus_one_dimensions_each():
    batch = torch.tensor([0, 0, 0, 1, 1])  # molecules of 3 and 2 atoms, 3 position columns + 2 features
    space = RaggedSpace(batch, 2, 5, centered=(0, 1, 2))
    assert dimensions(space).tolist() == [(3 - 1) * 3 + 3 * 2, (2 - 1) * 3 + 2 * 2]


def test_the_discretised_decoder_is_a_distribution_over_the_bins():
    bins = 5
    levels = torch.linspace(-1, 1, bins, dtype=torch.float64)
    mean = torch.full((bins,), 0.3, dtype=torch.float64)
    logvar = torch.full((bins,), math.log(0.2), dtype=torch.float64)
    probs = discretised_gaussian_log_prob(levels, mean, logvar, bins).exp()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    assert int(probs.argmax()) == 3  # the bin of 0.5, nearest the mean 0.3


# ------------------------------------------------ EDM's decoders of discrete features (Hoogeboom et al. 2022, App. B)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_the_categorical_decoder_is_the_normalised_gaussian_mass_around_one():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(6, 5, generator=g, dtype=torch.float64) * 0.4 - 0.05  # [n, K] scaled by 1/4: near 0 and 1/4
    sigma = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.02, 0.5], dtype=torch.float64)[:, None]  # [n, 1]
    logp = categorical_log_prob(z, sigma, 4.0)
    assert logp.shape == (6, 5)
    assert torch.allclose(logp.exp().sum(1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    for i in range(6):
        std = float(sigma[i]) * 4
        mass = [_phi((1.5 - 4 * float(v)) / std) - _phi((0.5 - 4 * float(v)) / std) for v in z[i]]
        expected = [m / sum(mass) for m in mass]
        assert logp[i].exp().tolist() == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_the_integer_decoder_is_a_distribution_over_whole_numbers():
    z, sigma = torch.tensor([[0.63]], dtype=torch.float64), torch.tensor([[0.04]], dtype=torch.float64)
    values = torch.arange(-20, 40, dtype=torch.float64).reshape(-1, 1)  # whole numbers around 6.3, unscaled
    probs = integer_log_prob(values, z.expand(60, 1), sigma, 10.0).exp()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    assert int(values[probs.argmax()]) == 6
    assert float(probs[26]) == pytest.approx(_phi((6.5 - 6.3) / 0.4) - _phi((5.5 - 6.3) / 0.4), rel=1e-12)


def test_the_interval_mass_is_accurate_in_both_tails():
    lo = torch.tensor([40.0, -41.0, -0.5, 8.0], dtype=torch.float64)
    hi = torch.tensor([41.0, -40.0, 0.5, 8.5], dtype=torch.float64)
    got = log_interval_mass(lo, hi)
    assert torch.isfinite(got).all()
    tail = float(torch.special.log_ndtr(torch.tensor(-40.0, dtype=torch.float64)))  # Phi(-41) is e^-42 times less
    assert float(got[0]) == pytest.approx(tail, abs=1e-9) and float(got[1]) == pytest.approx(tail, abs=1e-9)
    assert float(got[2]) == pytest.approx(math.log(_phi(0.5) - _phi(-0.5)), rel=1e-12)
    upper = 0.5 * (math.erfc(8 / math.sqrt(2)) - math.erfc(8.5 / math.sqrt(2)))  # [8, 8.5]: reflected, no cancelling
    assert float(got[3]) == pytest.approx(math.log(upper), rel=1e-12)


def _molecules():
    """Two molecules of 3 and 2 atoms: positions, a one-hot of 3 classes / 4, a whole number / 10."""
    g = torch.Generator().manual_seed(1)
    batch = torch.tensor([0, 0, 0, 1, 1])
    space = RaggedSpace(batch, 2, 7, centered=(0, 1, 2))
    types = torch.tensor([0, 2, 1, 1, 0])
    charge = torch.tensor([1.0, 8.0, 6.0, 6.0, 1.0])
    x = torch.cat(
        [torch.randn(5, 3, generator=g), torch.nn.functional.one_hot(types, 3) / 4.0, charge[:, None] / 10], 1
    )
    spec = DiscreteFeatures((3, 4, 5), 4.0, (6,), 10.0)
    return Batch(space.project(x.double()), space), spec, types, charge


def test_discrete_nll_sums_each_atoms_class_and_value_probability():
    batch, spec, types, charge = _molecules()
    ab = torch.tensor([0.99, 0.95], dtype=torch.float64)
    z = (ab.sqrt()[batch.space.batch, None] * batch.x + 0.3 * torch.randn(5, 7, dtype=torch.float64)).double()
    got = discrete_nll(batch.x, z, ab, batch.space, spec)
    a, sig = ab.sqrt()[batch.space.batch, None], ((1 - ab) / ab).sqrt()[batch.space.batch, None]  # [N, 1]
    y = z / a
    per_atom = categorical_log_prob(y[:, 3:6], sig, 4.0)[torch.arange(5), types]  # [N]
    per_atom = per_atom + integer_log_prob(charge[:, None].double(), y[:, 6:], sig, 10.0)[:, 0]
    total = -torch.zeros(2, dtype=torch.float64).index_add_(0, batch.space.batch, per_atom)
    assert torch.allclose(got["categorical"] + got["integer"], total, rtol=1e-12)
    bad = batch.x.clone()
    bad[0, 3] = 0.0  # atom 0 has no class
    with pytest.raises(ValueError, match="not one-hot"):
        discrete_nll(bad, z, ab, batch.space, spec)
    bad[0, 3:6] = torch.tensor([0.5, -0.25, 0.0], dtype=torch.float64)  # 2 and -1 at scale 4: whole, sum 1
    with pytest.raises(ValueError, match="not one-hot"):
        discrete_nll(bad, z, ab, batch.space, spec)
    bad[0, 3] = 0.2  # 0.8 at scale 4: not a one-hot entry
    with pytest.raises(ValueError, match="discrete_features.*categorical columns times their scale"):
        discrete_nll(bad, z, ab, batch.space, spec)
    with pytest.raises(ValueError, match="zero-mean"):
        DiscreteFeatures((2, 3), 4.0).discrete_mask(batch.x, batch.space)
    with pytest.raises(ValueError, match="at least 2 columns"):
        DiscreteFeatures((3,), 4.0)


def test_with_discrete_features_the_gaussian_decoder_counts_only_the_com_free_positions():
    """An exact x0 estimate leaves the Gaussian decoder only its constant, 1/2 D (log 2 pi + log var): with the
    features decoded as discrete, D is the (N - 1) 3 positions' degrees of freedom and var EDM's sigma_1^2 / alpha_1^2
    (Hoogeboom et al. 2022, App. B)."""
    batch, spec, _, _ = _molecules()
    schedule = polydiff.make_schedule("polynomial", 50)

    def exact(x, t):
        return Prediction(batch.x.to(x.dtype), torch.zeros_like(x))

    def bound(discrete):
        return variational_bound(exact, batch, schedule, steps=3, generator=torch.Generator(), discrete=discrete)

    plain, edm = bound(None), bound(spec)
    assert set(edm) - set(plain) == {"decoder_continuous", "decoder_categorical", "decoder_integer"}
    # all degrees of freedom: the CoM-free positions and 4 feature columns per atom
    assert dimensions(batch.space).tolist() == [(3 - 1) * 3 + 3 * 4, (2 - 1) * 3 + 2 * 4]
    ab1 = float(schedule.alpha_bar(torch.tensor(1 / 50, dtype=torch.float64)))
    constant = 0.5 * (math.log(2 * math.pi) + math.log((1 - ab1) / ab1))  # EDM's sigma_x^2 = sigma_1^2 / alpha_1^2
    assert edm["decoder_continuous"].tolist() == pytest.approx([(3 - 1) * 3 * constant, (2 - 1) * 3 * constant])
    parts = edm["decoder_continuous"] + edm["decoder_categorical"] + edm["decoder_integer"]
    assert torch.allclose(edm["decoder"], parts) and torch.allclose(edm["nll"], edm["prior"] + edm["diffusion"] + parts)
    assert (edm["decoder_categorical"] >= 0).all() and (edm["decoder_integer"] >= 0).all()
    vdm = variational_bound(
        exact, batch, schedule, steps=3, time="continuous", generator=torch.Generator(), discrete=spec
    )
    assert torch.isfinite(vdm["decoder_categorical"]).all() and torch.allclose(
        vdm["decoder"], vdm["decoder_continuous"] + vdm["decoder_categorical"] + vdm["decoder_integer"]
    )


def test_the_ode_with_decoders_is_a_tight_bound_on_gaussian_data():
    """Variational dequantisation of the ODE (Ho et al. 2019): with no discrete column it bounds -log p(x) of Gaussian
    data from above, and with its exact denoiser the gap is small."""
    schedule = polydiff.make_schedule("cosine", 1000)
    batch, true = gaussian_data(512)
    g = torch.Generator().manual_seed(0)
    got = ode_with_decoders(gaussian_denoiser(schedule), batch, schedule, DiscreteFeatures(), steps=48, generator=g)
    gap = got["nll"] - true
    sem = float(gap.std()) / math.sqrt(512)  # one Hutchinson probe and one dequantising draw per sample
    assert -3 * sem < float(gap.mean()) < 3 * sem + 0.01
    # The Gaussian decoder at sigma_min = 1e-3 and the draw's log q(z | x) nearly cancel: about 3 * 5.5 nats each.
    assert float(got["dequantisation"].mean()) == pytest.approx(-float(got["decoder_continuous"].mean()), abs=0.05)
    assert set(got) >= {"prior", "divergence", "decoder_continuous", "dequantisation"}


def test_a_domains_likelihood_hooks_are_checked_with_the_fix():
    from polydiff.nll import _layout_nll, discrete_features

    class Wrong:
        def discrete_features(self):
            return {"categorical": (3, 4)}

        def log_prob_layout(self, batch):
            return torch.zeros(batch.num_samples + 1)

    with pytest.raises(TypeError, match=r"Wrong.discrete_features\(\) returned dict; return a .*DiscreteFeatures"):
        discrete_features(Wrong())
    batch, _, _, _ = _molecules()
    with pytest.raises(ValueError, match=r"Wrong.log_prob_layout returned shape \(3,\); expected \[2\]"):
        _layout_nll(Wrong(), batch)
    assert discrete_features(object()) is None and _layout_nll(object(), batch) is None  # no hooks: as before
