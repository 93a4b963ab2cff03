"""``polydiff eval --nll``: a trained run's negative log-likelihood on held-out data, in nats and bits per dimension.

The maths is :mod:`polydiff.likelihood`'s; here a run's parts meet its domain's held-out split. Figures are means over
samples (``nll_nats`` per sample, ``nll_bpd`` of each sample's nats over its degrees of freedom), each with its
standard error (``*_sem``) over the samples, which includes the Monte Carlo noise of the estimators.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .build import Parts
from .latent import LatentDomain
from .likelihood import dimensions, ode_nll, variational_bound

__all__ = ["KINDS", "check_likelihood", "data_bins", "evaluate_nll"]

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
    data = domain.dataset(split)
    if bins == "auto":
        bins = data_bins(data)
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
            if kind == "ode":
                terms = ode_nll(den, batch, parts.schedule, steps=steps or 64, bins=bins, generator=gen)
            else:
                time = "continuous" if kind == "vdm" else "auto"
                terms = variational_bound(den, batch, parts.schedule, steps, bins, time=time, generator=gen)
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
        "dims_mean": float(dims.mean()),
        "decoder": "continuous Gaussian" if bins is None else f"discretised Gaussian, {bins} levels",
    }
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


def _sem(values: torch.Tensor) -> float:
    """Standard error of the mean (0 for a single value)."""
    return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
