"""Training a first stage for latent diffusion with the same trainer (``objective.name=autoencoder``).

The network is the domain's :class:`polydiff.first_stage.FirstStage` (``domain.autoencoder_network(**model)``);
the loss is its reconstruction losses plus ``kl_weight`` times the posterior's KL (Rombach et al. 2022, sec. 3.1;
``kind=plain`` drops the posterior). EMA, resume, signals, DDP and ``metrics.jsonl`` are the trainer's; instead of
samples, a run logs its first stage's row (:func:`polydiff.latent.first_stage_row`: the domain's metrics on
reconstructed held-out items, SI-SDR and the STFT distance for audio) and the mean and standard deviation of its
training latents (what ``latent.autoencoder=RUN`` normalises by, Stable Diffusion's scale factor).
:class:`LearnedAutoencoder` is such a run loaded as a latent domain's first stage (``build.load_first_stage``).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .domain import Domain
from .first_stage import FirstStage
from .latent import LatentDomain, first_stage_row, stacked
from .latent_outputs import encode_rows, ragged_rows
from .objective_base import BaseObjective, register_objective
from .schedules import Schedule
from .space import DenseSpace, RaggedSpace, Space
from .state import Batch, DenoiserFn

__all__ = ["AutoencoderObjective", "LearnedAutoencoder"]

log = logging.getLogger(__name__)

KINDS = ("kl", "plain")


@register_objective("autoencoder")
@dataclass
class AutoencoderObjective(BaseObjective):
    """Reconstruction losses plus ``kl_weight`` x KL (nats per data value) of a ``kind`` (``kl``/``plain``) stage."""

    kind: str = "kl"
    kl_weight: float = 1e-4
    crop: int = 0  # train on random windows of this many values along the last axis (0: whole items)

    #: What ``polydiff eval --nll`` says of such a run.
    likelihood_undefined = (
        "--nll is not defined for an autoencoder run (objective.name=autoencoder): it is a first stage, not a "
        "generative model; give a run of a generative objective (vp, flow, edm)"
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"objective.kind={self.kind!r}: choose one of {list(KINDS)}")
        if not math.isfinite(float(self.kl_weight)) or self.kl_weight < 0:
            raise ValueError(f"objective.kl_weight={self.kl_weight} must be a finite number >= 0")
        if int(self.crop) < 0:
            raise ValueError(f"objective.crop={self.crop} must be >= 0 (0: train on whole items)")

    def cropped(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """One random window of ``crop`` values along the last axis of ``x [B, ..., L]`` (the same for the batch):
        a convolutional stage trains on windows and encodes whole items."""
        length = x.shape[-1]
        if not self.crop or self.crop >= length:
            return x
        where = generator.device if generator is not None else x.device
        start = int(torch.randint(0, length - self.crop + 1, (1,), generator=generator, device=where))
        return x[..., start : start + self.crop]

    def network_builder(self, domain: Any) -> Callable[..., Any]:
        """The domain's first stage ``autoencoder_network(variational, **model)``."""
        if isinstance(domain, LatentDomain):
            raise ValueError(
                "objective.name=autoencoder trains a first stage on the data: remove the recipe's latent section"
            )
        build = getattr(domain, "autoencoder_network", None)
        if build is None:
            raise ValueError(
                f"objective.name=autoencoder: domain {domain.name or type(domain).__name__!r} supplies no trainable "
                "first stage (an autoencoder_network(**model) method returning a polydiff.first_stage.FirstStage)"
            )
        return functools.partial(build, variational=self.kind == "kl")

    def losses(
        self,
        net: Callable[..., Any],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-sample reconstruction losses plus the weighted KL ``[B]``; a ragged state's rows (molecules) go to a
        :class:`polydiff.first_stage.RaggedFirstStage` with their batch index, whole."""
        if isinstance(batch.space, RaggedSpace) and not self.crop:
            out = net(batch.x, generator=generator, batch=batch.space.batch)
            return out["reconstruction"].float() + self.kl_weight * out["kl"].float()
        if not isinstance(batch.space, DenseSpace):
            raise ValueError(
                f"objective.name=autoencoder needs dense or ragged data (objective.crop=0 for ragged), and this "
                f"domain collates a {type(batch.space).__name__}"
            )
        out = net(self.cropped(batch.x, generator), generator=generator)
        return out["reconstruction"].float() + self.kl_weight * out["kl"].float()

    @torch.no_grad()
    def score(self, net: Callable[..., Any], domain: Any, schedule: Schedule, n: int, device: Any) -> dict:
        """The first stage's row on ``n`` held-out items and its training latents' ``latent_mean``/``latent_std``."""
        stage: FirstStage = net  # the EMA copy, unwrapped
        was_training = stage.training
        stage.eval()
        try:
            if getattr(stage, "ragged", False):
                row = first_stage_row(domain, lambda x, batch: stage.reconstruct(x.to(device), batch.to(device)), n)
                x, counts, _ = ragged_rows(domain, "train")
                z = encode_rows(lambda x, batch: stage.encode(x.to(device), batch.to(device)).float().cpu(), x, counts)
            else:
                row = first_stage_row(domain, lambda x: stage.reconstruct(x.to(device)), n)
                x, _ = stacked(domain, "train")
                z = torch.cat([stage.encode(x[i : i + 64].to(device)).float().cpu() for i in range(0, len(x), 64)])
        finally:
            stage.train(was_training)
        log.info("first stage: %s -> latents %s", tuple(x.shape[1:]), tuple(z.shape[1:]))
        return {**row, "latent_mean": float(z.mean()), "latent_std": float(z.std())}

    def denoiser(
        self, net: Callable[..., Tensor], schedule: Schedule, space: Space, cond: Optional[dict] = None
    ) -> DenoiserFn:
        raise ValueError(
            "an autoencoder run (objective.name=autoencoder) draws no samples: diffuse its latents with "
            "polydiff train RECIPE latent.autoencoder=THIS_RUN (e.g. recipes/audio_latent.yaml)"
        )


class LearnedAutoencoder:
    """A trained first stage (a :class:`polydiff.first_stage.FirstStage` run's EMA weights) as an
    :class:`Autoencoder`: latents are the posterior means; decoded data are cropped to the inner domain's shape.
    A ragged stage (:class:`polydiff.first_stage.RaggedFirstStage`) encodes and decodes rows with their ``batch``."""

    def __init__(self, net: nn.Module, identity: str, inner: Domain) -> None:
        self.net, self.identity, self.inner = net.eval().requires_grad_(False), identity, inner
        self.ragged = bool(getattr(net, "ragged", False))

    def encode(self, x: Tensor, **layout: Tensor) -> Tensor:  # [B, *data] -> [B, *latent]; rows [N, D] -> [N, D']
        return self.net.to(x.device).encode(x.float(), **layout)

    def decode(self, z: Tensor, **layout: Tensor) -> Tensor:  # [B, *latent] -> [B, *data]; rows [N, D'] -> [N, D]
        if layout:
            return self.net.to(z.device).decode(z.float(), **layout)
        shape = self.inner.sample_shape[1:] if self.inner.sample_shape else None
        return self.net.to(z.device).decode(z.float(), shape)
