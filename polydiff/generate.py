"""Generation: a domain's prior, its denoiser (with optional guidance) and a sampler, end to end."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .conditioning import is_null, null_condition
from .domain import Batch, Domain
from .guidance import classifier_free_guidance
from .objectives import Objective
from .samplers import sample
from .schedules import NoiseSchedule

__all__ = ["generate"]


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
) -> Batch:
    """Draw ``n`` samples: ``sampler`` = {name, steps, eta, ...}, ``guidance`` = {scale, rescale}."""
    sampler = dict(sampler)
    sampler.pop("batch_size", None)
    name, steps = sampler.pop("name"), sampler.pop("steps")
    guidance = dict(guidance or {})
    was_training = net.training
    net.eval()
    try:
        space, cond = domain.prior(n, labels=labels, device=device, generator=generator, **dict(prior or {}))
        noise = space.randn(generator=generator)
        den = objective.denoiser(net, schedule, space, cond)
        keys = [k for k in domain.guidance_keys if k in cond and cond[k] is not None]
        scale = float(guidance.get("scale", 1.0))
        rescale = float(guidance.get("rescale", 0.0))
        conditioned = any(not bool(is_null(cond[k]).all()) for k in keys)
        if conditioned and (scale != 1.0 or rescale > 0):
            uncond = objective.denoiser(net, schedule, space, null_condition(cond, keys))
            den = classifier_free_guidance(den, uncond, scale, space, schedule, rescale)
        x = sample(name, den, noise, schedule, steps, space=space, generator=generator, callback=callback, **sampler)
    finally:
        net.train(was_training)
    return Batch(x, space, cond)
