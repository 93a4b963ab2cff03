"""Generation: a domain's prior, its denoiser (with optional guidance) and a sampler, end to end."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import fields
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from .classifier_guide import load_classifier_guide
from .conditioning import NULL_LABEL, is_null, null_condition
from .config import GuidanceConfig, SamplerConfig, check_call, check_section, sampler_section
from .domain import Domain
from .guidance import check_interval, classifier_free_guidance, stacked_guidance
from .noise import NoiseSource, block_seeds
from .objectives import BaseObjective
from .samplers import get_sampler, timesteps
from .schedules import Schedule
from .state import Batch, Known, Prediction

__all__ = ["generate", "check_sampler", "sampler_settings", "in_precision"]

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    domain: Domain,
    net: nn.Module,
    schedule: Schedule,
    objective: BaseObjective,
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
    """Draw ``n`` samples: ``sampler`` = {name, steps, batch_size, precision, **the sampler's options}, ``guidance`` =
    {scale, rescale, batched, classifier, classifier_scale, target} (:class:`polydiff.config.GuidanceConfig`).

    ``sampler`` keys left out take :class:`polydiff.config.SamplerConfig`'s defaults (DDIM, 50 steps),
    except ``batch_size``: without it the ``n`` samples are drawn at once. ``batch_size`` and
    ``precision`` are generation settings; the other keys but ``name`` and ``steps`` are the sampler's
    keyword arguments, and one it does not take is refused. ``labels`` are ``n``
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
        known_keys = [f.name for f in fields(GuidanceConfig)]
        raise KeyError(f"unknown guidance option(s) {sorted(unknown)}; known: {known_keys}")
    scale = float((guidance or {}).get("scale", 1.0))
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(
            f"guidance.scale={scale} must be a number >= 0: 0 is the unconditional model, 1 the "
            "conditional one, above 1 guides further towards the condition (e.g. 3)"
        )
    check_interval((guidance or {}).get("interval"))  # a bad interval named before anything is drawn
    sampler = sampler_settings(sampler)
    check_sampler(sampler, schedule)
    chunk = n if sampler["batch_size"] is None else int(sampler["batch_size"])
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
        raise TypeError(
            f"{type(domain).__name__} overrides concat() but not take(), its inverse, which splits a draw "
            f"of {n} samples into chunks of sampler.batch_size={chunk}: override take() too, or set "
            "sampler.batch_size=null"
        )
    space, cond = domain.prior(n, labels=labels, device=device, generator=generator, **prior)
    whole = Batch(space.randn(generator=generator), space, cond)
    seeds = block_seeds(n, generator)
    guide = load_classifier_guide(guidance or {}, domain, device)
    where = generator.device if generator is not None else torch.device(device)
    parts = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = whole if chunk >= n else domain.take(whole, start, stop)
        rows = slice(None) if chunk >= n or known is None else space.take(start, stop)[1]  # known's rows
        fresh = NoiseSource(space, start, stop, seeds, where)
        parts.append(
            _generate(
                domain,
                net,
                schedule,
                objective,
                part,
                sampler,
                guidance,
                device,
                fresh,
                callback,
                known,
                rows,
                first=start == 0,
                guide=guide,
            )
        )
    del whole, part  # the starting noise: not held through the join
    return parts[0] if len(parts) == 1 else domain.concat(parts)


PRECISIONS = ("fp32", "bf16")


def sampler_settings(sampler: Mapping[str, Any]) -> dict[str, Any]:
    """``sampler`` with :class:`SamplerConfig`'s defaults for the keys it leaves out (but ``batch_size``: none, one
    chunk of the whole draw); an old checkpoint's defaults of options its sampler does not take are left out."""
    defaults = {f.name: f.default for f in fields(SamplerConfig)}
    return {**defaults, "batch_size": None, **sampler_section(sampler)}


def _split(sampler: Mapping[str, Any]) -> tuple[str, Any, Optional[int], str, dict[str, Any]]:
    """``(name, steps, batch_size, precision, options)`` of a full sampler mapping: the options reach the sampler,
    the generation settings never do."""
    options = dict(sampler)
    name, steps = options.pop("name"), options.pop("steps")
    return name, steps, options.pop("batch_size", None), options.pop("precision", "fp32"), options


def _check_labels(domain: Domain, labels: Any, n: int) -> Optional[Tensor]:
    """``labels`` as a long tensor ``[n]`` of class indices (or the null label), or a clear error."""
    if labels is None:
        return None
    if domain.num_classes == 0:
        raise ValueError(f"domain {domain.name!r} is unconditional (no class_names), but labels were given")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dim() != 1 or len(labels) != n:
        raise ValueError(
            f"labels must be {n} class indices (one per sample), got {labels.dtype} of shape "
            f"{tuple(labels.shape)}; polydiff.Domain.parse_label turns a class name into its index"
        )
    labels = labels.long()
    bad = labels[((labels < 0) | (labels >= domain.num_classes)) & (labels != NULL_LABEL)]
    if len(bad):
        raise ValueError(
            f"label {int(bad[0])} is out of range for domain {domain.name!r}: expected "
            f"0..{domain.num_classes - 1} ({domain.class_names}) or {NULL_LABEL} (no label)"
        )
    return labels


def check_sampler(sampler: Mapping[str, Any], schedule: Schedule) -> None:
    """Raise naming a ``sampler`` value (name, option, steps, spacing, precision, batch_size) before any
    work: a recipe's typo would otherwise surface only when samples are drawn, after training.

    Options are checked by name and type against the sampler's signature, and their values by the sampler itself,
    in a dry run on one element with a zero denoiser (tens of microseconds a step)."""
    sampler = sampler_settings(sampler)
    name, steps, chunk, precision, options = _split(sampler)
    check_section("sampler", sampler)
    if not isinstance(steps, Tensor):  # an explicit time grid is checked by the sampler
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise ValueError(f"sampler.steps={steps!r} must be a whole number of steps (or a tensor time grid)")
        timesteps(int(steps), schedule.num_steps, options.get("spacing", "trailing"))
    if precision not in PRECISIONS:
        raise ValueError(f"sampler.precision={precision!r}: choose one of {list(PRECISIONS)}")
    if chunk is not None and int(chunk) < 1:
        raise ValueError(f"sampler.batch_size must be a positive number of samples, got {chunk}")
    if isinstance(steps, Tensor):  # one sample's grid: the dry run draws one sample
        steps = steps.detach().cpu()[:, :1] if steps.dim() == 2 else steps.detach().cpu()
    zero = lambda x, t: Prediction(torch.zeros_like(x), torch.zeros_like(x))  # noqa: E731
    get_sampler(name)(
        zero,
        torch.zeros(1, 1, dtype=torch.float64),
        schedule,
        steps,
        generator=torch.Generator().manual_seed(0),
        **options,
    )


def in_precision(net: Callable[..., Tensor], precision: str, device: torch.device | str) -> Callable[..., Tensor]:
    """``net`` under bf16 autocast (``precision="bf16"``; the sampler's arithmetic stays in the state's dtype), or as
    it is."""
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


def _generate(
    domain,
    net,
    schedule,
    objective,
    part: Batch,
    sampler,
    guidance,
    device,
    fresh,
    callback,
    known=None,
    rows=slice(None),
    first=True,
    guide=None,
) -> Batch:
    """One chunk of :func:`generate`: its layout, conditions and starting noise ``part``, its fresh noise ``fresh``
    (a :class:`NoiseSource`); its state is the whole draw's ``rows``, ``first`` for the first chunk."""
    name, steps, _, precision, options = _split(sampler)
    run = in_precision(net, precision, device)
    guidance = dict(guidance or {})
    space, cond, noise = part.space, part.cond, part.x
    was_training = net.training
    net.eval()
    try:
        den = objective.denoiser(run, schedule, space, cond)
        keys = [k for k in domain.guidance_keys if k in cond and cond[k] is not None]
        scale = float(guidance.get("scale", 1.0))
        rescale = float(guidance.get("rescale", 0.0))
        interval = guidance.get("interval")
        conditioned = any(not bool(is_null(cond[k]).all()) for k in keys)
        if conditioned and (scale != 1.0 or rescale > 0):
            null = null_condition(cond, keys)
            batched = guidance.get("batched")
            if batched is None:  # stacked where fewer, larger calls pay (a GPU); two calls ran faster on the CPU
                batched = torch.device(device).type == "cuda"
            if batched and (scale != 0.0 or rescale > 0):
                both = domain.concat([Batch(noise, space, cond), Batch(noise, space, null)])  # layout of [x; x]
                den = stacked_guidance(
                    objective.denoiser(run, schedule, both.space, both.cond), scale, space, schedule, rescale, interval
                )
            else:
                uncond = objective.denoiser(run, schedule, space, null)
                den = classifier_free_guidance(den, uncond, scale, space, schedule, rescale, interval)
        elif (scale != 1.0 or rescale > 0) and first:
            log.warning(
                "guidance (scale %g, rescale %g) has no effect: these samples have no condition to guide "
                "towards (an unconditional model, or no label or property given)",
                scale,
                rescale,
            )
        if guide is not None:  # classifier guidance over whatever the model's denoiser is
            den = guide.wrap(den, schedule, space, cond)
        if known is not None:
            rank = noise.dim()
            known = known._replace(values=_rows(known.values, rows, rank), mask=_rows(known.mask, rows, rank))
        x = get_sampler(name)(
            den, noise, schedule, steps, space=space, generator=fresh, callback=callback, known=known, **options
        )
    finally:
        net.train(was_training)
    return Batch(x, space, cond)
