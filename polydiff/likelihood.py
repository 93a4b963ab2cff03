"""Likelihood of a diffusion model's denoiser: the variational bound and the probability-flow-ODE log-likelihood.

Both read a schedule only through ``alpha_bar(t)`` (with what the base :class:`~polydiff.schedules.Schedule` derives
from it: ``alpha_sigma``, ``snr``, ``log_snr``, ``t_at_sigma``) and ``num_steps``, and a model only through its
denoiser's estimates in variance-preserving coordinates, so they serve ``vp``, ``flow`` and ``edm`` models alike:

* :func:`variational_bound`: with ``T`` trained steps, Ho et al. 2020 (eq. 5): the prior term
  ``KL(q(x_T|x_0) || N(0, I))``, the ``T - 1`` denoising terms (all, or an unbiased stratified estimate over a subset)
  and a decoder ``-log p(x_0|x_1)``; in continuous time (``num_steps`` None) the bound of Kingma et al. 2021 (VDM,
  eq. 17) from ``t_0`` (noise-to-signal ratio ``sigma_min``) to 1.
* :func:`ode_nll`: the instantaneous change of variables along the probability-flow ODE (Song et al. 2021, eq. 13 and
  App. D.2), the divergence by the Hutchinson-Skilling estimator, integrated by fixed-step RK4 in ``log(sigma/alpha)``.

Dimensions are counted by the space: valid elements of a masked state; for a ragged state with zero-mean columns
(molecule positions) each sample loses one dimension per such column, so ``N`` atoms' positions have ``(N - 1) 3``
(Hoogeboom et al. 2022, sec. 3.2). Columns a domain declares discrete (``discrete``: a
:class:`~polydiff.decoders.DiscreteFeatures`, a molecule's atom types and charges) are scored by the bounds' decoder
as EDM does, by the probability of their categorical or integer value (:mod:`polydiff.decoders`); the rest by a
Gaussian density. :func:`ode_nll` scores every column by its density (``polydiff.nll.ode_with_decoders`` decodes
the discrete ones from a state it scores).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .decoders import DiscreteFeatures, continuous_keep, discrete_nll
from .schedules import Schedule
from .space import Space
from .state import Batch, DenoiserFn
from .variance import interpolated_logvar

__all__ = [
    "dimensions",
    "normal_kl",
    "gaussian_log_prob",
    "discretised_gaussian_log_prob",
    "variational_bound",
    "ode_nll",
    "pf_ode_drift",
    "vp_coefficients",
]

LOG_2PI = math.log(2 * math.pi)


def dimensions(space: Space) -> Tensor:
    """Per-sample number of degrees of freedom ``[B]`` (float64): valid elements, less one per zero-mean column."""
    count = space.count().to(torch.float64)
    centered = tuple(getattr(space, "centered", ()))
    if centered:
        present = (count > 0).to(torch.float64)
        count = count - len(centered) * present
    return count


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))``."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise continuous log-density of ``N(mean, e^logvar)`` at ``x``."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def discretised_gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor, bins: int) -> Tensor:
    """Elementwise log-probability of the bin of ``x`` (``bins`` levels evenly over [-1, 1], the end bins open)
    under ``N(mean, e^logvar)``: the discretised decoder of Ho et al. 2020 (eq. 13)."""
    half = 1.0 / (bins - 1)  # half a bin's width
    inv_std = torch.exp(-0.5 * logvar)
    upper = torch.special.ndtr((x - mean + half) * inv_std)
    lower = torch.special.ndtr((x - mean - half) * inv_std)
    tiny = torch.finfo(x.dtype).tiny
    log_cdf_upper = torch.log(upper.clamp(min=tiny))
    log_sf_lower = torch.log((1 - lower).clamp(min=tiny))
    log_mass = torch.log((upper - lower).clamp(min=tiny))
    return torch.where(x < -1 + half, log_cdf_upper, torch.where(x > 1 - half, log_sf_lower, log_mass))


def _decoder_nll(x0: Tensor, mean: Tensor, logvar: Tensor, space: Space, bins: Optional[int], keep=None) -> Tensor:
    """``-log p(x_0 | mean, e^logvar)`` per sample ``[B]``: discretised to ``bins`` levels, or continuous over the
    space's degrees of freedom (a zero-mean subspace: the residual projected onto it); only the columns where
    ``keep`` (broadcastable, 0 or 1) is 1, where given."""
    keep = torch.ones_like(x0) if keep is None else keep.expand_as(x0)  # like x0
    if bins is not None:
        if getattr(space, "centered", ()):
            raise ValueError("a discretised decoder (bins) needs a dense state; this one keeps zero-mean columns")
        return -space.sum(discretised_gaussian_log_prob(x0, mean, space.expand(logvar), bins) * keep)
    resid = space.project(x0 - mean) * keep
    dims = dimensions(space) - space.sum(1 - keep)  # degrees of freedom of the kept columns [B]
    return 0.5 * (space.sum(resid**2) * torch.exp(-logvar) + dims * (LOG_2PI + logvar))


def _learned_kl(x0, x0_hat, v, c0, true_logvar, log_beta, space) -> Tensor:
    """``KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i))`` per sample ``[B]`` with a per-element learned variance; a
    zero-mean subspace's variance term is scaled to its degrees of freedom (exact where ``v`` is uniform)."""
    true_lv = space.expand(true_logvar)  # [B] -> broadcast onto x0
    lv = interpolated_logvar(v.to(torch.float64), space.expand(log_beta), true_lv)  # like x0
    mean_term = space.sum(space.project(space.expand(c0) * (x0 - x0_hat)) ** 2 * torch.exp(-lv))
    var_term = space.sum(lv - true_lv + torch.exp(true_lv - lv) - 1)
    return 0.5 * (mean_term + var_term * dimensions(space) / space.count().clamp(min=1))


def _decoder_nll_elementwise(x0: Tensor, mean: Tensor, logvar: Tensor, space: Space, bins, keep=None) -> Tensor:
    """:func:`_decoder_nll` with a per-element ``logvar`` (like ``x0``): a learned variance's decoder ``[B]``."""
    keep = torch.ones_like(x0) if keep is None else keep.expand_as(x0)  # like x0
    if bins is not None:
        if getattr(space, "centered", ()):
            raise ValueError("a discretised decoder (bins) needs a dense state; this one keeps zero-mean columns")
        return -space.sum(discretised_gaussian_log_prob(x0, mean, logvar, bins) * keep)
    resid = space.project(x0 - mean) * keep
    dropped = space.sum(1 - keep)  # discrete elements per sample [B]
    per_dim = (dimensions(space) - dropped) / (space.count() - dropped).clamp(min=1)  # freedom per kept element
    return 0.5 * (space.sum(resid**2 * torch.exp(-logvar)) + space.sum((LOG_2PI + logvar) * keep) * per_dim)


def _prior_kl(x0: Tensor, space: Space, alpha_bar_end: Tensor) -> Tensor:
    """``KL(q(x_1 | x_0) || N(0, I))`` per sample ``[B]`` over the space's degrees of freedom."""
    ab = alpha_bar_end.clamp(max=1 - 1e-12)
    return 0.5 * (ab * space.sum(space.project(x0) ** 2) + dimensions(space) * (-ab - torch.log1p(-ab)))


def _strata(total: int, k: int, n: int, generator: Optional[torch.Generator]) -> list[tuple[Tensor, int]]:
    """``k`` contiguous strata of ``0..total-1``: per stratum, one uniform draw per sample ``[n]`` and its size.
    Weighting each draw by its stratum's size gives an unbiased estimate of the sum over all ``total`` terms."""
    if k >= total:
        return [(torch.full((n,), i, dtype=torch.long), 1) for i in range(total)]
    edges = torch.linspace(0, total, k + 1).round().long().tolist()
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        draw = lo + (_uniform((n,), generator, torch.device("cpu")) * (hi - lo)).long().clamp(max=hi - lo - 1)
        out.append((draw.long(), hi - lo))
    return out


def _uniform(shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """Uniform draws on [0, 1) (float64) on ``device``, drawn on the generator's device."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where, dtype=torch.float64).to(device)


def _x0_hat(denoiser: DenoiserFn, x_t: Tensor, t: Tensor) -> Tensor:
    return denoiser(x_t, t.to(x_t.dtype)).x0.to(torch.float64)


@torch.no_grad()
def variational_bound(
    denoiser: DenoiserFn,
    batch: Batch,
    schedule: Schedule,
    steps: Optional[int] = None,
    bins: Optional[int] = None,
    variance: str = "small",
    sigma_min: float = 1e-3,
    time: str = "auto",
    generator: Optional[torch.Generator] = None,
    discrete: Optional[DiscreteFeatures] = None,
) -> dict[str, Tensor]:
    """Per-sample terms ``[B]`` (nats, float64) of the negative variational bound: ``prior``, ``diffusion``,
    ``decoder`` and their sum ``nll``; with ``discrete`` columns also the decoder's parts ``decoder_continuous``,
    ``decoder_categorical`` and ``decoder_integer`` (:func:`~polydiff.decoders.discrete_nll`), the continuous
    columns' decoder then with EDM's variance ``sigma_1^2 / alpha_1^2`` (App. B). ``steps`` strata of
    the denoising terms (None: every trained step; continuous time: 100); ``variance`` of the fixed reverse steps:
    ``small`` (posterior) or ``large`` (beta), not read where the denoiser's predictions carry a learned ``v``
    (Nichol & Dhariwal 2021, eq. 15), which sets them. ``time``: ``discrete`` over the trained steps, ``continuous``
    (VDM, any schedule), ``auto`` (discrete where there are steps).

    In discrete time the first steps, where ``SNR_{i-1} / SNR_i`` is far from 1, keep the bound some way above the
    true NLL however many steps there are (about 0.3 nats a dimension on a linear schedule); the continuous-time
    bound closes that gap."""
    if variance not in ("small", "large"):
        raise KeyError(f"unknown variance {variance!r}; choose 'small' or 'large'")
    space, x0 = batch.space, batch.x.to(torch.float64)
    dev, n = x0.device, space.num_samples
    if time not in ("auto", "discrete", "continuous"):
        raise KeyError(f"unknown time {time!r}; choose 'auto', 'discrete' or 'continuous'")
    if time == "discrete" and schedule.num_steps is None:
        raise ValueError(f"{schedule!r} is continuous in time: it has no trained steps for a discrete-time bound")
    if time == "continuous" or schedule.num_steps is None:
        k = steps or 100
        return _continuous_bound(denoiser, x0, space, schedule, k, bins, sigma_min, generator, batch.x.dtype, discrete)
    T = int(schedule.num_steps)
    if T < 2:
        raise ValueError("the variational bound needs a schedule of at least 2 trained steps")
    ab = schedule.alpha_bar(torch.arange(T + 1, dtype=torch.float64) / T).to(dev)  # [T + 1], ab[0] = 1
    beta = 1 - ab[1:] / ab[:-1]  # beta[i - 1] = beta_i, i = 1..T
    post_var = beta * (1 - ab[:-1]) / (1 - ab[1:]).clamp(min=1e-300)  # beta~_i; 0 at i = 1

    def noised(i: Tensor) -> tuple[Tensor, Tensor]:  # x_i [like x0] and t [B]
        return _noised(x0, space, ab[i], generator), i.to(torch.float64) / T

    diffusion = torch.zeros(n, dtype=torch.float64, device=dev)
    for draw, weight in _strata(T - 1, T - 1 if steps is None else int(steps), n, generator):
        i = (draw + 2).to(dev)  # steps 2..T: the terms L_{i-1}
        x_i, t = noised(i)
        pred = denoiser(x_i.to(batch.x.dtype), t.to(batch.x.dtype))
        x0_hat = pred.x0.to(torch.float64)
        c0 = ab[i - 1].sqrt() * beta[i - 1] / (1 - ab[i])  # the posterior mean's weight of x_0
        true_logvar = torch.log(post_var[i - 1])
        if pred.v is not None:  # a learned variance (Nichol & Dhariwal 2021, eq. 15), per element
            diffusion += weight * _learned_kl(x0, x0_hat, pred.v, c0, true_logvar, torch.log(beta[i - 1]), space)
            continue
        model_logvar = true_logvar if variance == "small" else torch.log(beta[i - 1])
        mean_term = space.sum(space.project(space.expand(c0) * (x0 - x0_hat)) ** 2) * torch.exp(-model_logvar)
        var_term = dimensions(space) * (model_logvar - true_logvar + torch.exp(true_logvar - model_logvar) - 1)
        diffusion += weight * 0.5 * (mean_term + var_term)
    one = torch.ones(n, dtype=torch.long, device=dev)
    x_1, t1 = noised(one)
    # Improved DDPM's clipped log-variance at the first step: beta~_2 (beta~_1 = 0), or beta_1.
    dec_var = post_var[1] if variance == "small" else beta[0]
    if discrete is not None:  # EDM's decoder (its sigma_x = sigma_0 / alpha_0): the noise-to-signal ratio, squared
        dec_var = (1 - ab[1]) / ab[1]
    logvar = torch.log(dec_var).expand(n)
    pred = denoiser(x_1.to(batch.x.dtype), t1.to(batch.x.dtype))
    keep = continuous_keep(x0, space, discrete)
    if pred.v is not None:  # the learned interpolation of the same clipped ends
        lv = interpolated_logvar(pred.v.to(torch.float64), torch.log(beta[0]), torch.log(post_var[1]))  # like x0
        decoder = _decoder_nll_elementwise(x0, pred.x0.to(torch.float64), lv, space, bins, keep)
    else:
        decoder = _decoder_nll(x0, pred.x0.to(torch.float64), logvar, space, bins, keep)
    prior = _prior_kl(x0, space, ab[T].expand(n))
    return _terms(prior, diffusion, decoder, (x0, x_1, ab[1].expand(n), space), discrete)


def _terms(prior: Tensor, diffusion: Tensor, decoder: Tensor, first: tuple, discrete) -> dict[str, Tensor]:
    """The bound's terms ``[B]``; ``discrete`` columns add their ``-log p(h | z)`` given the first step's state
    ``first = (x0, z, alpha_bar [B], space)`` to the decoder (EDM's ``log p(x, h | z_0)``), each part reported."""
    out = {"prior": prior, "diffusion": diffusion, "decoder": decoder}
    if discrete is not None:
        parts = discrete_nll(*first, discrete)
        out.update(decoder_continuous=decoder, **{f"decoder_{k}": v for k, v in parts.items()})
        out["decoder"] = decoder + sum(parts.values())
    out["nll"] = prior + diffusion + out["decoder"]
    return out


def _randn(space: Space, generator: Optional[torch.Generator]) -> Tensor:
    """The space's noise in float64 on its device (drawn on the generator's)."""
    return space.randn(generator=generator, dtype=torch.float64)


def _alpha_bar_and_slope(schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """``alpha_bar(t)`` and ``d alpha_bar / dt`` (float64, by autograd through the schedule)."""
    with torch.enable_grad():
        tt = t.detach().to(torch.float64).requires_grad_(True)
        ab = schedule.alpha_bar(tt)
        (slope,) = torch.autograd.grad(ab.sum(), tt, allow_unused=True)
    return ab.detach(), torch.zeros_like(tt) if slope is None else slope


def vp_coefficients(schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, s, da/dt, ds/dt)`` of ``x_t = a x_0 + s eps`` at ``t`` (float64), ``a = sqrt(alpha_bar)``."""
    ab, slope = _alpha_bar_and_slope(schedule, t)
    a, s = ab.sqrt(), (1 - ab).clamp(min=0).sqrt()
    return a, s, slope / (2 * a), -slope / (2 * s)


def pf_ode_drift(x: Tensor, eps_hat: Tensor, schedule: Schedule, t: Tensor, space: Space) -> Tensor:
    """The probability-flow ODE's ``dx/dt = (a'/a) x + (s' - s a'/a) eps_hat`` (Song et al. 2021, eq. 13 for a VP
    path written with the denoiser's noise estimate) at per-sample times ``t [B]``."""
    a, s, da, ds = vp_coefficients(schedule, t)
    return space.expand((da / a).to(x.dtype)) * x + space.expand((ds - s * da / a).to(x.dtype)) * eps_hat


def _continuous_bound(denoiser, x0, space, schedule, k, bins, sigma_min, generator, dtype, discrete) -> dict:
    """Kingma et al. 2021, eq. 17 written in log-SNR ``lambda`` (their eq. 21 with ``d SNR = SNR d lambda``):
    ``1/2 int SNR ||x_0 - x0_hat(z_lambda)||^2 d lambda`` from the last time's log-SNR (at least -30) to
    ``log(1 / sigma_min^2)``, one uniform draw per sample in each of ``k`` strata; Gaussian decoder at ``sigma_min``."""
    dev, n = x0.device, space.num_samples
    one = torch.ones(n, dtype=torch.float64, device=dev)
    lam_max = -2 * math.log(sigma_min)
    lam_min = max(float(schedule.log_snr(one[:1])), -30.0)
    diffusion = torch.zeros(n, dtype=torch.float64, device=dev)
    edges = torch.linspace(lam_min, lam_max, k + 1, dtype=torch.float64).tolist()
    for lo, hi in zip(edges[:-1], edges[1:]):
        lam = lo + (hi - lo) * _uniform((n,), generator, dev)
        t = schedule.t_at_sigma(torch.exp(-lam / 2)).to(dev)
        x_t = _noised(x0, space, schedule.alpha_bar(t), generator)
        x0_hat = _x0_hat(denoiser, x_t.to(dtype), t)
        snr = schedule.snr(t)  # e^lam up to the bisection's tolerance
        diffusion += (hi - lo) * 0.5 * snr * space.sum(space.project(x0 - x0_hat) ** 2)
    t0 = schedule.t_at_sigma(torch.full((n,), sigma_min, dtype=torch.float64)).to(dev)
    ab0 = schedule.alpha_bar(t0)
    z0 = _noised(x0, space, ab0, generator)
    logvar = torch.log((1 - ab0) / ab0)  # the noise-to-signal ratio sigma_min, squared
    keep = continuous_keep(x0, space, discrete)
    decoder = _decoder_nll(x0, _x0_hat(denoiser, z0.to(dtype), t0), logvar, space, bins, keep)
    prior = _prior_kl(x0, space, schedule.alpha_bar(one))
    return _terms(prior, diffusion, decoder, (x0, z0, ab0, space), discrete)


def _noised(x0: Tensor, space: Space, alpha_bar: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps`` (float64) for per-sample ``alpha_bar [B]``."""
    eps = _randn(space, generator).to(x0.device)
    return space.expand(alpha_bar.sqrt()) * x0 + space.expand((1 - alpha_bar).sqrt()) * eps


def _eps_and_divergence(
    denoiser: DenoiserFn, x: Tensor, t: Tensor, sigma: Tensor, space: Space, probe: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """The noise estimate at ``x`` and ``tr(d eps_hat / dx)`` per sample ``[B]``: Hutchinson-Skilling with ``probe``
    (a draw of the space's noise) around the control variate ``sigma x`` (the noise estimate for standardised Gaussian
    data, ``sigma [B]`` the noise scale), or exact without one (a vector-Jacobian product per element: dense, tests)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        eps = denoiser(x, t.to(x.dtype)).eps
        if probe is not None:  # z^T (J - c I) z + c D, c = sigma: exact for unit-variance data, low variance near it
            (g,) = torch.autograd.grad((eps * probe).sum(), x)
            c = space.expand(sigma.to(x.dtype))
            trace = space.sum(g * probe - c * probe**2).to(torch.float64) + sigma * dimensions(space)
            return eps.detach(), trace
        flat = eps.reshape(eps.shape[0], -1)
        trace = torch.zeros(eps.shape[0], dtype=torch.float64, device=x.device)
        for j in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=True)
            trace += g.reshape(g.shape[0], -1)[:, j].to(torch.float64)
        return eps.detach(), trace


def ode_nll(
    denoiser: DenoiserFn,
    batch: Batch,
    schedule: Schedule,
    steps: int = 64,
    bins: Optional[int] = None,
    sigma_min: float = 1e-3,
    sigma_max: float = 1e4,
    trace: str = "hutchinson",
    generator: Optional[torch.Generator] = None,
) -> dict[str, Tensor]:
    """Per-sample ``-log p(x_0)`` ``[B]`` (nats, float64) through the probability-flow ODE (Song et al. 2021, App. D.2).

    With ``y = x / a`` and ``sigma = s / a`` the ODE reads ``dy/d(log sigma) = sigma eps_hat`` (Karras et al. 2022,
    eq. 4), integrated from ``sigma_min`` (where ``x_0`` stands) to the schedule's last noise-to-signal ratio (at most
    ``sigma_max``) by ``steps`` RK4 steps, uniform in ``log sigma``; the log-density changes by ``-div``, estimated
    with one Gaussian probe per sample held over the path (``trace="hutchinson"``) or exactly (``"exact"``, dense
    states of a few elements: tests). With ``bins`` the data are dequantised uniformly within their bin first.
    Returns ``nll``, ``prior`` (``-log N`` at the end) and ``divergence`` (the integral)."""
    if trace not in ("hutchinson", "exact"):
        raise KeyError(f"unknown trace {trace!r}; choose 'hutchinson' or 'exact'")
    space, x0 = batch.space, batch.x
    dtype, dev, n = x0.dtype, x0.device, space.num_samples
    dims = dimensions(space)
    if bins is not None:
        width = 2.0 / (bins - 1)
        u = _uniform(x0.shape, generator, dev) - 0.5
        x0 = space.project(x0 + (u * width).to(dtype))
    ab_end = float(schedule.alpha_bar(torch.tensor(1.0, dtype=torch.float64)))
    end = min(math.sqrt((1 - ab_end) / ab_end) if ab_end > 0 else math.inf, sigma_max)
    if not end > sigma_min:
        raise ValueError(f"the schedule ends at noise-to-signal ratio {end:.3g}, below sigma_min={sigma_min}")
    taus = torch.linspace(math.log(sigma_min), math.log(end), steps + 1, dtype=torch.float64)
    probe = None
    if trace == "hutchinson":
        probe = _randn(space, generator).to(dtype)

    def field(y: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:  # dy/dtau [like y], d(integral)/dtau [B]
        sigma = torch.exp(tau)
        a = 1 / torch.sqrt(1 + sigma**2)
        t = schedule.t_at_sigma(sigma.expand(n)).to(dev)
        noise_scale = (sigma * a).expand(n).to(dev)  # sqrt(1 - alpha_bar)
        eps, div = _eps_and_divergence(denoiser, (y * float(a)).to(dtype), t, noise_scale, space, probe)
        return float(sigma) * eps.to(torch.float64), float(sigma * a) * div

    a_start = 1 / math.sqrt(1 + sigma_min**2)
    y = x0.to(torch.float64) / a_start
    integral = torch.zeros(n, dtype=torch.float64, device=dev)
    for lo, hi in zip(taus[:-1], taus[1:]):  # classic RK4 on (y, integral)
        h = float(hi - lo)
        k1y, k1i = field(y, lo)
        k2y, k2i = field(y + 0.5 * h * k1y, lo + 0.5 * h)
        k3y, k3i = field(y + 0.5 * h * k2y, lo + 0.5 * h)
        k4y, k4i = field(y + h * k3y, hi)
        y = space.project(y + h / 6 * (k1y + 2 * k2y + 2 * k3y + k4y))
        integral += h / 6 * (k1i + 2 * k2i + 2 * k3i + k4i)
    a_end = 1 / math.sqrt(1 + end**2)
    x_end = y * a_end
    log_prior = -0.5 * (space.sum(x_end**2) + dims * LOG_2PI)
    # log p_x(x_0) = log p_y(y_0) - D log a_0 and log p_y(y_end) = log N(a_end y_end) + D log a_end.
    log_p = log_prior + dims * (math.log(a_end) - math.log(a_start)) + integral
    nll = -log_p
    if bins is not None:
        nll = nll - dims * math.log(2.0 / (bins - 1))  # -log P(bin) <= -log p(x + u) - D log(bin width)
    return {"nll": nll, "prior": -log_prior, "divergence": integral}
