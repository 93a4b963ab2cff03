"""Likelihood against closed forms: Gaussian data with its exact denoiser, whose NLL is known."""

import math

import pytest
import torch

import polydiff
from polydiff.likelihood import (
    dimensions,
    discretised_gaussian_log_prob,
    ode_nll,
    pf_ode_drift,
    variational_bound,
)
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
