"""Generation: a domain's prior, its denoiser (with optional guidance) and a sampler, end to end."""

from __future__ import annotations

import logging
import numbers
from dataclasses import fields
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from .conditioning import NULL_LABEL, is_null, null_condition
from .config import GuidanceConfig, SamplerConfig, check_call
from .domain import Batch, Domain
from .guidance import classifier_free_guidance, stacked_guidance
from .noise import NoiseSource, block_seeds
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
    """Draw ``n`` samples: ``sampler`` = {name, steps, eta, ..., batch_size, precision}, ``guidance`` = {scale, rescale,
    batched}.

    ``sampler`` keys left out take :class:`polydiff.config.SamplerConfig`'s defaults (DDIM, 50 steps),
    except ``batch_size``: without it the ``n`` samples are drawn at once. ``labels`` are ``n``
    class indices (``domain.parse_label`` turns a name into one).

    More than ``sampler["batch_size"]`` samples are drawn in chunks of that size: the whole draw's
    layout, conditions and starting noise are drawn first and split by :meth:`Domain.take` (the rows
    of ``known`` with them), the chunks joined by :meth:`Domain.concat`. Fresh noise comes from streams
    of fixed blocks of samples (:mod:`polydiff.noise`), so samples do not depend on the chunk size.

    ``known`` holds part of every sample fixed (see :class:`Known`): its values and mask are laid
    out like the whole draw's state (rows: samples, or atoms of a ragged layout, which then needs a
    fixed layout such as ``prior.num_atoms``), or broadcast.

    Guidance evaluates the conditional and unconditional predictions in one network call on twice
    the rows (``batched=True``, :func:`polydiff.guidance.stacked_guidance`) or in two calls
    (``batched=False``, half the activation memory); by default stacked on CUDA, two calls elsewhere.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n={n!r}: the number of samples must be a positive integer")
    n = int(n)
    unknown = set(guidance or {}) - {f.name for f in fields(GuidanceConfig)}
    if unknown:
        raise KeyError(f"unknown guidance option(s) {sorted(unknown)}; known: {[f.name for f in fields(GuidanceConfig)]}")
    sampler = {**_SAMPLER_DEFAULTS, **sampler}
    check_sampler(sampler, schedule)
    chunk = sampler.pop("batch_size", None)
    chunk = n if chunk is None else int(chunk)
    labels = _check_labels(domain, labels, n)
    prior = dict(prior or {})
    check_call(domain.prior, prior, "prior", given=("n", "labels", "device", "generator"))
    for key, value in prior.items():
        if _per_sample(value) and len(value) != n:
            raise ValueError(f"prior.{key} has {len(value)} values for {n} samples: give one value or {n}")
    # The whole draw's layout, conditions and starting noise first, at once; each chunk takes its samples' part,
    # and the sampler's fresh noise (DDPM, DDIM eta > 0, known values) comes from streams of fixed blocks of samples:
    # a sample does not depend on sampler.batch_size (up to the network's rounding on another number of rows).
    if chunk < n and type(domain).concat is not Domain.concat and type(domain).take is Domain.take:
        raise TypeError(f"{type(domain).__name__} overrides concat() but not take(), its inverse, which splits a draw "
                        f"of {n} samples into chunks of sampler.batch_size={chunk}: override take() too, or set "
                        "sampler.batch_size=null")
    space, cond = domain.prior(n, labels=labels, device=device, generator=generator, **prior)
    whole = Batch(space.randn(generator=generator), space, cond)
    seeds = block_seeds(n, generator)
    where = generator.device if generator is not None else torch.device(device)
    parts = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = whole if chunk >= n else domain.take(whole, start, stop)
        rows = slice(None) if chunk >= n or known is None else space.take(start, stop)[1]  # known's rows
        fresh = NoiseSource(space, start, stop, seeds, where)
        parts.append(_generate(domain, net, schedule, objective, part, sampler, guidance, device, fresh, callback,
                               known, rows, first=start == 0))
    del whole, part  # the starting noise: not held through the join
    return parts[0] if len(parts) == 1 else domain.concat(parts)


PRECISIONS = ("fp32", "bf16")
# What a sampler mapping may leave out: SamplerConfig's defaults, except batch_size (None: one chunk of n).
_SAMPLER_DEFAULTS = {f.name: f.default for f in fields(SamplerConfig) if f.name != "batch_size"}


def _check_labels(domain: Domain, labels: Any, n: int) -> Optional[Tensor]:
    """``labels`` as a long tensor ``[n]`` of class indices (or the null label), or a clear error."""
    if labels is None:
        return None
    if domain.num_classes == 0:
        raise ValueError(f"domain {domain.name!r} is unconditional (no class_names), but labels were given")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dim() != 1 or len(labels) != n:
        raise ValueError(f"labels must be {n} class indices (one per sample), got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}; polydiff.Domain.parse_label turns a class name into its index")
    labels = labels.long()
    bad = labels[((labels < 0) | (labels >= domain.num_classes)) & (labels != NULL_LABEL)]
    if len(bad):
        raise ValueError(f"label {int(bad[0])} is out of range for domain {domain.name!r}: expected "
                         f"0..{domain.num_classes - 1} ({domain.class_names}) or {NULL_LABEL} (no label)")
    return labels


def check_sampler(sampler: Mapping[str, Any], schedule: NoiseSchedule) -> None:
    """Raise naming a ``sampler`` value (name, option, steps, spacing, precision, batch_size) before any
    work: a recipe's typo would otherwise surface only when samples are drawn, after training."""
    options = dict(sampler)
    name, steps = options.pop("name"), options.pop("steps")
    precision, chunk = options.pop("precision", "fp32"), options.pop("batch_size", None)
    check_options(name, options)
    if not isinstance(steps, Tensor):  # an explicit time grid is checked by the sampler
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise ValueError(f"sampler.steps={steps!r} must be a whole number of steps (or a tensor time grid)")
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


def _rows(t: Tensor, rows: slice | Tensor, rank: int) -> Tensor:
    """A chunk's ``rows`` of a tensor laid out like the whole draw's state of ``rank`` dimensions; one of lower rank,
    or with a first dimension of 1, broadcasts over the rows and is kept whole."""
    if t.dim() < rank or t.shape[0] == 1:
        return t
    return t[rows] if isinstance(rows, slice) else t[rows.to(t.device)]


def _per_sample(value: Any) -> bool:
    """A prior option with one value per sample (a list or a tensor) rather than one for all."""
    return isinstance(value, (list, tuple, Tensor)) and not (isinstance(value, Tensor) and value.dim() == 0)


def _generate(domain, net, schedule, objective, part: Batch, sampler, guidance, device, fresh, callback,
              known=None, rows=slice(None), first=True) -> Batch:
    """One chunk of :func:`generate`: its layout, conditions and starting noise ``part``, its fresh noise ``fresh``
    (a :class:`NoiseSource`); its state is the whole draw's ``rows``, ``first`` for the first chunk."""
    sampler = dict(sampler)
    name, steps = sampler.pop("name"), sampler.pop("steps")
    run = in_precision(net, sampler.pop("precision", "fp32"), device)
    guidance = dict(guidance or {})
    space, cond, noise = part.space, part.cond, part.x
    was_training = net.training
    net.eval()
    try:
        den = objective.denoiser(run, schedule, space, cond)
        keys = [k for k in domain.guidance_keys if k in cond and cond[k] is not None]
        scale = float(guidance.get("scale", 1.0))
        rescale = float(guidance.get("rescale", 0.0))
        conditioned = any(not bool(is_null(cond[k]).all()) for k in keys)
        if conditioned and (scale != 1.0 or rescale > 0):
            null = null_condition(cond, keys)
            batched = guidance.get("batched")
            if batched is None:  # stacked where fewer, larger calls pay (a GPU); two calls ran faster on the CPU
                batched = torch.device(device).type == "cuda"
            if batched and (scale != 0.0 or rescale > 0):
                both = domain.concat([Batch(noise, space, cond), Batch(noise, space, null)])  # layout of [x; x]
                den = stacked_guidance(objective.denoiser(run, schedule, both.space, both.cond), scale, space,
                                       schedule, rescale)
            else:
                uncond = objective.denoiser(run, schedule, space, null)
                den = classifier_free_guidance(den, uncond, scale, space, schedule, rescale)
        elif (scale != 1.0 or rescale > 0) and first:
            log.warning("guidance (scale %g, rescale %g) has no effect: these samples have no condition to guide "
                        "towards (an unconditional model, or no label or property given)", scale, rescale)
        if known is not None:
            rank = noise.dim()
            known = known._replace(values=_rows(known.values, rows, rank), mask=_rows(known.mask, rows, rank))
        x = sample(name, den, noise, schedule, steps, space=space, generator=fresh, callback=callback, known=known,
                   **sampler)
    finally:
        net.train(was_training)
    return Batch(x, space, cond)
