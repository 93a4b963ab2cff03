"""Generation: a domain's prior, its denoiser (with optional guidance) and a sampler, end to end."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from .conditioning import is_null, null_condition
from .config import check_call
from .domain import Batch, Domain
from .guidance import classifier_free_guidance
from .objectives import Objective
from .samplers import Known, check_options, sample, timesteps
from .schedules import NoiseSchedule

__all__ = ["generate", "check_sampler"]

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    domain: Domain,
    net: nn.Module,
    schedule: NoiseSchedule,
    objective: Objective,
    n: int,
    sampler: Mapping[str, Any],
    guidance: Optional[Mapping[str, Any]] = None,
    labels: Optional[Tensor] = None,
    device: torch.device | str = "cpu",
    generator: Optional[torch.Generator] = None,
    prior: Optional[Mapping[str, Any]] = None,
    callback=None,
    known: Optional[Known] = None,
) -> Batch:
    """Draw ``n`` samples: ``sampler`` = {name, steps, eta, ..., batch_size, precision}, ``guidance`` = {scale, rescale}.

    More than ``sampler["batch_size"]`` samples are drawn in chunks of that size (labels,
    per-sample prior options and the rows of ``known`` are split with them) and joined by
    :meth:`Domain.concat`. ``known`` holds part of every sample fixed (see :class:`Known`): its
    values and mask are laid out like the whole draw's state (rows: samples, or atoms of a
    ragged layout, which then needs a fixed layout such as ``prior.num_atoms``), or broadcast.
    """
    sampler = dict(sampler)
    chunk = sampler.pop("batch_size", None)
    chunk = n if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"sampler.batch_size must be a positive number of samples, got {chunk}")
    prior = dict(prior or {})
    check_call(domain.prior, prior, "prior", given=("n", "labels", "device", "generator"))
    if n <= chunk:
        return _generate(domain, net, schedule, objective, n, sampler, guidance, labels, device, generator, prior,
                         callback, known)
    for key, value in prior.items():
        if _per_sample(value) and len(value) != n:
            raise ValueError(f"prior.{key} has {len(value)} values for {n} samples: give one value or {n}")
    parts, row = [], 0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part_prior = {k: (v[start:stop] if _per_sample(v) else v) for k, v in prior.items()}
        part_labels = None if labels is None else labels[start:stop]
        part = _generate(domain, net, schedule, objective, stop - start, sampler, guidance, part_labels, device,
                         generator, part_prior, callback, known, row)
        row += part.x.shape[0]
        parts.append(part)
    return domain.concat(parts)


PRECISIONS = ("fp32", "bf16")


def check_sampler(sampler: Mapping[str, Any], schedule: NoiseSchedule) -> None:
    """Raise naming a ``sampler`` value (name, option, steps, spacing, precision, batch_size) before any
    work: a recipe's typo would otherwise surface only when samples are drawn, after training."""
    options = dict(sampler)
    name, steps = options.pop("name"), options.pop("steps")
    precision, chunk = options.pop("precision", "fp32"), options.pop("batch_size", None)
    check_options(name, options)
    timesteps(int(steps), schedule.num_steps, options.get("spacing", "trailing"))
    if precision not in PRECISIONS:
        raise ValueError(f"sampler.precision={precision!r}: choose one of {list(PRECISIONS)}")
    if chunk is not None and int(chunk) < 1:
        raise ValueError(f"sampler.batch_size must be a positive number of samples, got {chunk}")


def in_precision(net: Callable[..., Tensor], precision: str, device: torch.device | str) -> Callable[..., Tensor]:
    """``net`` under bf16 autocast (``precision="bf16"``; the sampler's arithmetic stays in the state's dtype), or as it is."""
    if precision == "fp32":
        return net
    if precision != "bf16":
        raise ValueError(f"sampler.precision={precision!r}: choose one of {list(PRECISIONS)}")
    kind = torch.device(device).type

    def run(*args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(kind, dtype=torch.bfloat16):
            return net(*args, **kwargs)

    return run


def _rows(t: Tensor, start: int, count: int) -> Tensor:
    """Rows ``start .. start + count`` of a tensor laid out like the whole draw (a first dimension of 1 broadcasts)."""
    return t if t.dim() == 0 or t.shape[0] == 1 else t[start : start + count]


def _per_sample(value: Any) -> bool:
    """A prior option with one value per sample (a list or a tensor) rather than one for all."""
    return isinstance(value, (list, tuple, Tensor)) and not (isinstance(value, Tensor) and value.dim() == 0)


def _generate(domain, net, schedule, objective, n, sampler, guidance, labels, device, generator, prior, callback,
              known=None, row=0) -> Batch:
    """One chunk of :func:`generate`; its state starts at row ``row`` of the whole draw's."""
    sampler = dict(sampler)
    name, steps = sampler.pop("name"), sampler.pop("steps")
    run = in_precision(net, sampler.pop("precision", "fp32"), device)
    guidance = dict(guidance or {})
    was_training = net.training
    net.eval()
    try:
        space, cond = domain.prior(n, labels=labels, device=device, generator=generator, **prior)
        noise = space.randn(generator=generator)
        den = objective.denoiser(run, schedule, space, cond)
        keys = [k for k in domain.guidance_keys if k in cond and cond[k] is not None]
        scale = float(guidance.get("scale", 1.0))
        rescale = float(guidance.get("rescale", 0.0))
        conditioned = any(not bool(is_null(cond[k]).all()) for k in keys)
        if conditioned and (scale != 1.0 or rescale > 0):
            uncond = objective.denoiser(run, schedule, space, null_condition(cond, keys))
            den = classifier_free_guidance(den, uncond, scale, space, schedule, rescale)
        elif (scale != 1.0 or rescale > 0) and row == 0:
            log.warning("guidance (scale %g, rescale %g) has no effect: these samples have no condition to guide "
                        "towards (an unconditional model, or no label or property given)", scale, rescale)
        if known is not None:
            known = known._replace(values=_rows(known.values, row, noise.shape[0]), mask=_rows(known.mask, row, noise.shape[0]))
        x = sample(name, den, noise, schedule, steps, space=space, generator=generator, callback=callback, known=known,
                   **sampler)
    finally:
        net.train(was_training)
    return Batch(x, space, cond)
