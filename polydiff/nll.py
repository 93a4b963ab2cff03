"""``polydiff eval --nll``: a trained run's negative log-likelihood on held-out data, in nats and bits per dimension.

The maths is :mod:`polydiff.likelihood`'s; here a run's parts meet its domain's held-out split. Figures are means over
samples (``nll_nats`` per sample, ``nll_bpd`` of each sample's nats over its degrees of freedom), each with its
standard error (``*_sem``) over the samples, which includes the Monte Carlo noise of the estimators.

Two optional domain hooks complete the likelihood of data with discrete parts, as EDM's protocol for molecules does
(Hoogeboom et al. 2022, sec. 3.2 and App. B: ``-log p(x, h, N)`` in nats per molecule):

* ``discrete_features() -> DiscreteFeatures``: columns the bounds decode as categorical or integer values
  (:mod:`polydiff.decoders`), reported as ``decoder_categorical_nats`` and ``decoder_integer_nats``; the ODE then
  scores a state drawn near the data with the same decoders (:func:`ode_with_decoders`);
* ``log_prob_layout(batch) -> Tensor [B]``: the log-probability of each sample's layout under the prior the domain
  draws layouts from (a molecule's atom count ``N`` under the training histogram), added to every kind's total as
  ``layout_nats`` (``-log p(N)``).

Domains without them are scored as before.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from .build import Parts
from .decoders import DiscreteFeatures, continuous_keep, discrete_nll
from .latent import LatentDomain
from .likelihood import LOG_2PI, dimensions, ode_nll, variational_bound
from .state import Batch, DenoiserFn

__all__ = ["KINDS", "check_likelihood", "data_bins", "discrete_features", "ode_with_decoders", "evaluate_nll"]

log = logging.getLogger(__name__)

#: ``--nll`` kinds: the variational bound (discrete time where the model has trained steps), the continuous-time
#: bound on any schedule, and the probability-flow ODE.
KINDS = ("bound", "vdm", "ode")


def check_likelihood(parts: Parts) -> None:
    """Refuse a model whose likelihood of the data is not defined here, saying why."""
    if getattr(parts.objective, "likelihood_undefined", None):
        raise ValueError(parts.objective.likelihood_undefined)
    if isinstance(parts.domain, LatentDomain):
        raise ValueError(
            "--nll is not defined for a latent diffusion model (latent.autoencoder is set): its diffusion models "
            "the autoencoder's latents, and the autoencoder has no likelihood of the data; score a model trained on "
            "the data itself"
        )


def data_bins(data: Any) -> Optional[int]:
    """The number of evenly spaced levels over [-1, 1] of quantised data (an image set's ``arrays.max_value + 1``),
    or None for continuous data."""
    top = getattr(getattr(data, "arrays", None), "max_value", None)
    return int(top) + 1 if isinstance(top, int) and top > 0 else None


def discrete_features(domain: Any) -> Optional[DiscreteFeatures]:
    """The domain's ``discrete_features()`` (checked), or None where it declares none."""
    hook = getattr(domain, "discrete_features", None)
    spec = hook() if callable(hook) else None
    if spec is not None and not isinstance(spec, DiscreteFeatures):
        raise TypeError(
            f"{type(domain).__name__}.discrete_features() returned {type(spec).__name__}; return a "
            "polydiff.decoders.DiscreteFeatures (or None)"
        )
    return spec


def _layout_nll(domain: Any, batch: Any) -> Optional[torch.Tensor]:
    """``-log p(layout)`` ``[B]`` (float64, CPU) from the domain's ``log_prob_layout(batch)``, or None without it."""
    hook = getattr(domain, "log_prob_layout", None)
    if not callable(hook):
        return None
    logp = torch.as_tensor(hook(batch)).detach().to("cpu", torch.float64)
    if logp.shape != (batch.num_samples,):
        raise ValueError(
            f"{type(domain).__name__}.log_prob_layout returned shape {tuple(logp.shape)}; expected "
            f"[{batch.num_samples}], one log-probability per sample"
        )
    return -logp


@torch.no_grad()
def ode_with_decoders(
    denoiser: DenoiserFn,
    batch: Batch,
    schedule: Any,
    spec: DiscreteFeatures,
    steps: int = 64,
    generator: Optional[torch.Generator] = None,
    sigma_min: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """``-log p(x, h) <= E_q[-log p_ode(z) - log p(x, h | z) + log q(z | x, h)]`` per sample ``[B]``: the ODE's density
    of the state ``z ~ q = N(a x, s^2)`` at noise-to-signal ratio ``sigma_min`` (variational dequantisation, Ho et al.
    2019, sec. 3.1), EDM's decoders from it (Hoogeboom et al. 2022, App. B; positions: variance ``sigma_min^2``)."""
    space, x0, n = batch.space, batch.x.to(torch.float64), batch.num_samples
    ab = torch.full((n,), 1 / (1 + sigma_min**2), dtype=torch.float64, device=x0.device)  # [B]
    eps = space.randn(generator=generator, dtype=torch.float64).to(x0.device)  # like x0, in the space
    z = space.expand(ab.sqrt()) * x0 + space.expand((1 - ab).sqrt()) * eps
    terms = ode_nll(
        denoiser, Batch(z.to(batch.x.dtype), space, batch.cond), schedule, steps, None, sigma_min, generator=generator
    )
    t = schedule.t_at_sigma(torch.full((n,), sigma_min, dtype=torch.float64)).to(x0.device)
    x0_hat = denoiser(z.to(batch.x.dtype), t.to(batch.x.dtype)).x0.to(torch.float64)
    keep = continuous_keep(x0, space, spec).expand_as(x0)  # 1 on the columns the Gaussian decodes
    resid = space.project(x0 - x0_hat) * keep
    logvar = 2 * math.log(sigma_min)
    continuous = 0.5 * (
        space.sum(resid**2) / sigma_min**2 + (dimensions(space) - space.sum(1 - keep)) * (LOG_2PI + logvar)
    )
    discrete = discrete_nll(x0, z, ab, space, spec)
    dims = dimensions(space)
    log_q = -0.5 * space.sum(eps**2) - dims * (0.5 * torch.log1p(-ab) + 0.5 * LOG_2PI)  # log N(z; a x, s^2) [B]
    out = {**terms, "decoder_continuous": continuous, **{f"decoder_{k}": v for k, v in discrete.items()}}
    out["dequantisation"] = log_q
    out["nll"] = terms["nll"] + continuous + sum(discrete.values()) + log_q
    return out


def evaluate_nll(
    parts: Parts,
    kind: str = "bound",
    n: int = 256,
    batch_size: int = 64,
    steps: Optional[int] = None,
    bins: Optional[int] | str = "auto",
    split: str = "test",
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """``{"nll_nats", "nll_bpd", ...}`` of the first ``n`` items of ``split`` under the run's EMA network.

    ``steps``: strata of the bound's denoising terms (None: every trained step) or the ODE's RK4 steps (None: 64).
    ``bins``: ``"auto"`` (see :func:`data_bins`), a number of levels (a discretised decoder, or dequantisation for
    the ODE) or None (continuous)."""
    if kind not in KINDS:
        raise KeyError(f"unknown --nll {kind!r}; choose one of {list(KINDS)}")
    check_likelihood(parts)
    domain, net = parts.domain, parts.net
    spec = discrete_features(domain)
    data = domain.dataset(split)
    if bins == "auto":
        bins = data_bins(data)
    if kind == "ode" and spec is not None and bins is not None:
        raise ValueError(f"--bins {bins} with discrete feature columns: the ODE decodes those itself; use --bins none")
    if bins is not None and int(bins) < 2:
        raise ValueError(f"--bins {bins}: quantised data need at least 2 levels (256 for 8-bit images)")
    n = min(int(n), len(data))
    if n < 1:
        raise ValueError(f"the {split} split is empty: no data to score")
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = net.training
    net.eval()
    rows: dict[str, list[torch.Tensor]] = {}
    try:
        for start in range(0, n, batch_size):
            batch = domain.collate([data[i] for i in range(start, min(n, start + batch_size))]).to(device)
            den = parts.objective.denoiser(net, parts.schedule, batch.space, batch.cond)
            if kind == "ode" and spec is not None:
                terms = ode_with_decoders(den, batch, parts.schedule, spec, steps or 64, gen)
            elif kind == "ode":
                terms = ode_nll(den, batch, parts.schedule, steps=steps or 64, bins=bins, generator=gen)
            else:
                time = "continuous" if kind == "vdm" else "auto"
                terms = variational_bound(
                    den, batch, parts.schedule, steps, bins, time=time, generator=gen, discrete=spec
                )
            layout = _layout_nll(domain, batch)
            if layout is not None:  # -log p(layout), e.g. EDM's -log p(N)
                terms["layout"] = layout.to(terms["nll"].device)
                terms["nll"] = terms["nll"] + terms["layout"]
            terms["dims"] = dimensions(batch.space)
            for key, value in terms.items():
                rows.setdefault(key, []).append(value.detach().cpu())
    finally:
        net.train(was_training)
    per = {k: torch.cat(v) for k, v in rows.items()}
    nats, dims = per.pop("nll"), per.pop("dims")
    bpd = nats / (dims.clamp(min=1) * math.log(2))
    record: dict[str, Any] = {
        "kind": kind,
        "n": n,
        "split": split,
        "nll_nats": float(nats.mean()),
        "nll_nats_sem": _sem(nats),
        "nll_bpd": float(bpd.mean()),
        "nll_bpd_sem": _sem(bpd),
        "nll_nats_per_dim": float((nats / dims.clamp(min=1)).mean()),
        "nll_nats_per_dim_sem": _sem(nats / dims.clamp(min=1)),
        "dims_mean": float(dims.mean()),
        "decoder": _decoder_words(bins, spec),
    }
    if "layout" in per:
        unseen = int((per["layout"] >= LAYOUT_UNSEEN).sum())
        record["layout_unseen"] = unseen
        if unseen:
            log.warning(
                "%d of %d %s samples have a layout (atom count) the domain's prior gives no mass (%.0f nats each)",
                unseen,
                n,
                split,
                LAYOUT_UNSEEN,
            )
    if kind == "ode":
        record["ode_steps"] = steps or 64
        record["ode_solver"] = "RK4 in log(sigma), Hutchinson trace (one Gaussian probe per sample)"
    else:
        discrete = kind == "bound" and parts.schedule.num_steps is not None
        record["time"] = "discrete" if discrete else "continuous"
        total = parts.schedule.num_steps - 1 if discrete else None
        record["steps"] = (total if steps is None else min(steps, total)) if discrete else (steps or 100)
        if discrete and getattr(parts.objective, "variance", None) == "learned":
            record["variance"] = "learned (Improved DDPM)"  # the reverse steps' variance the bound reads
    record.update({f"{k}_nats": float(v.mean()) for k, v in per.items()})
    return record


#: ``-log p`` at or above which a layout counts as unseen: EDM's ``log(p + 1e-30)`` of a zero probability is -69.1.
LAYOUT_UNSEEN = 69.0


def _decoder_words(bins: Optional[int], spec: Optional[DiscreteFeatures]) -> str:
    """The decoder in words: Gaussian (continuous or discretised), and the discrete columns' decoders."""
    words = "continuous Gaussian" if bins is None else f"discretised Gaussian, {bins} levels"
    if spec is not None and spec.categorical:
        words += f"; categorical over columns {list(spec.categorical)} (scale {spec.categorical_scale:g})"
    if spec is not None and spec.integer:
        words += f"; integer over columns {list(spec.integer)} (scale {spec.integer_scale:g})"
    return words


def _sem(values: torch.Tensor) -> float:
    """Standard error of the mean (0 for a single value)."""
    return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
