"""Learned reverse-step variance (Nichol & Dhariwal 2021, Improved DDPM, sec. 3.1), for any domain's network.

:class:`LearnedVariance` wraps a domain's denoiser ``net(x_t, t[B], **cond) -> Tensor`` (unchanged) and adds a small
head that reads, for every element of the state, the element's ``x_t``, the network's output there (detached: the
mean is trained by the simple loss alone) and ``t``; it returns :class:`VarianceOutput` ``(out, v)`` with ``v`` in
``[0, 1]`` of ``x_t``'s shape. The reverse step's variance is then ``exp(v log beta_t + (1 - v) log beta~_t)``
(eq. 15). Being per element, the head serves dense tensors of any rank and ragged ``[N, F]`` rows alike, so a
domain's network gets the extra output without the domain's code changing.

A per-sample time ``t[B]`` does not broadcast onto a ragged state by itself: the caller (the ``vp`` objective, which
knows the space) passes ``t_elements``, ``t`` already broadcast onto the state (``space.expand(t)``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .objective_base import checked_output

__all__ = ["VarianceOutput", "LearnedVariance", "split_output", "interpolated_logvar", "interpolated_std"]


class VarianceOutput(NamedTuple):
    """What a :class:`LearnedVariance` network returns: the denoiser's output and the interpolation ``v``."""

    out: Tensor  # like x_t
    v: Tensor  # like x_t, in [0, 1]


class LearnedVariance(nn.Module):
    """A domain's denoiser plus a per-element head for Improved DDPM's ``v`` (Nichol & Dhariwal 2021, eq. 15)."""

    def __init__(self, net: nn.Module, hidden: int = 32, frequencies: int = 4) -> None:
        super().__init__()
        self.net = net
        self.frequencies = frequencies
        features = 3 + 2 * frequencies  # x_t, out, t and t's Fourier features
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # Starts at v = 1/2 (a log-variance halfway between beta~ and beta) for every element and time.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x_t: Tensor, t: Tensor, *, t_elements: Tensor, **cond: Any) -> VarianceOutput:
        """``(net(x_t, t, **cond), v)``; ``t_elements`` is ``t[B]`` broadcast onto ``x_t`` by the state's space."""
        out = checked_output(self.net(x_t, t, **cond), x_t)
        dt = x_t.dtype
        te = torch.broadcast_to(t_elements.to(dt), x_t.shape)  # like x_t
        angles = te.unsqueeze(-1) * (math.pi * 2.0 ** torch.arange(self.frequencies, device=x_t.device, dtype=dt))
        feats = torch.cat(
            [torch.stack([x_t, out.detach().to(dt), te], dim=-1), angles.sin(), angles.cos()], dim=-1
        )  # [*x_t.shape, 3 + 2 * frequencies]
        v = torch.sigmoid(self.head(feats)).squeeze(-1)  # like x_t
        return VarianceOutput(out, v)


def split_output(result: Any, x_t: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, v)`` of a :class:`LearnedVariance` network's result, each checked to have ``x_t``'s shape."""
    if not (isinstance(result, tuple) and len(result) == 2):
        got = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        raise ValueError(
            f"objective.variance=learned needs a network that returns (out, v) (polydiff.variance.LearnedVariance, "
            f"which objective.wrap_network adds), got {got}: build the network through the recipe, or set "
            "objective.variance=fixed"
        )
    out, v = result
    return checked_output(out, x_t), checked_output(v, x_t)


def interpolated_logvar(v: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """``v log beta + (1 - v) log beta~`` (Nichol & Dhariwal 2021, eq. 15); the logs broadcast onto ``v``."""
    return v * log_beta + (1 - v) * log_beta_tilde


def interpolated_std(v: Tensor, std_small: Tensor, std_large: Tensor) -> Tensor:
    """``exp(eq. 15 / 2)`` as ``sqrt(beta~)^(1 - v) sqrt(beta)^v``: exactly ``sqrt(beta)`` at ``v = 1`` and
    ``sqrt(beta~)`` at ``v = 0`` (powers 0 and 1 are exact), and finite where ``beta~ = 0``."""
    return std_small.pow(1 - v) * std_large.pow(v)


def step_variances(schedule: Any, t: Tensor, check: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """At trained times ``t = i / T`` ``[B]``: ``(c0, log beta_i, log beta~_i clipped, first)`` in float64, ``c0`` the
    posterior mean's weight of ``x_0`` (Ho et al. 2020, eq. 7), ``beta~_1`` (zero) replaced by ``beta~_2`` as
    Improved DDPM does, and ``first`` where ``i = 1`` (the decoder's term)."""
    T = int(schedule.num_steps)
    i = (t.to(torch.float64) * T).round()  # [B]
    if check and (((i / T - t.to(torch.float64)).abs() > 1e-6).any() or (i < 1).any() or (i > T).any()):
        raise ValueError(f"a learned variance's bound is read at the trained times i / {T}, i = 1..{T}; got t={t}")
    ab = schedule.alpha_bar(torch.arange(T + 1, dtype=torch.float64) / T).to(t.device)  # [T + 1], ab[0] = 1
    beta = 1 - ab[1:] / ab[:-1]  # [T], beta[i - 1] = beta_i
    post = beta * (1 - ab[:-1]) / (1 - ab[1:]).clamp(min=1e-300)  # beta~_i; 0 at i = 1
    post = torch.cat([post[1:2], post[1:]])  # clipped: beta~_2 at i = 1
    k = i.long() - 1  # [B]
    c0 = ab[k].sqrt() * beta[k] / (1 - ab[k + 1])
    return c0, torch.log(beta[k]), torch.log(post[k]), k == 0


def vlb_terms(
    x0: Tensor, x0_hat: Tensor, v: Tensor, t: Tensor, schedule: Any, space: Any, check: bool = True
) -> Tensor:
    """Per-sample term ``L_{i-1}`` ``[B]`` of the bound, nats per valid element (Nichol & Dhariwal 2021, sec. 3.1):
    ``KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i))`` with the learned variance, or at ``i = 1`` the continuous Gaussian
    decoder's ``-log p(x_0 | x_1)``. Pass ``x0_hat`` detached for the stop-gradient on the mean: only ``v`` learns.
    ``check``: refuse times off the trained grid (skipped for the objective's own draws: a device sync)."""
    c0, log_beta, log_post, first = step_variances(schedule, t, check)
    c0, log_beta, log_post = (u.to(v.dtype) for u in (c0, log_beta, log_post))  # [B] each
    logvar = interpolated_logvar(v, space.expand(log_beta), space.expand(log_post))  # like x0
    resid = space.project(x0 - x0_hat)  # like x0
    true_logvar = space.expand(log_post)
    # KL of N(mu~, beta~) from N(mu_theta, Sigma): mu~ - mu_theta = c0 (x_0 - x0_hat) (both read the same x_i).
    mean_term = (space.expand(c0) * resid) ** 2 * torch.exp(-logvar)
    kl = 0.5 * (logvar - true_logvar + torch.exp(true_logvar - logvar) + mean_term - 1)
    decoder = 0.5 * (math.log(2 * math.pi) + logvar + resid**2 * torch.exp(-logvar))  # at i = 1: mu_theta = x0_hat
    return space.mean(torch.where(space.expand(first), decoder, kl))
