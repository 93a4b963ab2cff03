"""A domain's trainable first stage for latent diffusion (``objective.name=autoencoder``).

Rombach et al. 2022 (sec. 3.1, appendix G): an encoder maps data to a diagonal Gaussian posterior over a smaller
latent (KL-regularised towards N(0, I) with a small weight), or to a point (a plain autoencoder); a decoder maps
latents back. :class:`FirstStage` is the template a domain's network subclasses: it supplies ``encoder``,
``decoder`` and ``reconstruction`` (its losses, e.g. L1 and a multi-resolution STFT for audio); the template pads
to a multiple of the downsampling, draws the posterior sample, computes the KL and crops back. A stage may also
work on fixed features of the data (``features``: a log-mel spectrogram, AudioLDM's design, Liu et al. 2023) and
render decoded features back to data (``render``: Griffin-Lim or a vocoder); it is then trained on the features.
:class:`RaggedFirstStage` is the template of a ragged domain's stage (rows grouped by a batch index: GeoLDM's
equivariant per-atom latents, Xu et al. 2023).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FirstStage", "RaggedFirstStage", "cropped", "gaussian_kl", "normal_like"]

LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clamped here, as latent-diffusion does


def cropped(x: Tensor, shape: Sequence[int]) -> Tensor:
    """``x [B, C, *S']`` cut to the spatial ``shape`` (the padding to a multiple of the downsampling undone)."""
    return x[(slice(None), slice(None), *(slice(0, int(s)) for s in shape))]


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` summed per sample ``[B]`` (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def normal_like(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal noise of ``x``'s shape and dtype on its device, drawn from ``generator`` (on any device)."""
    where = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)


class FirstStage(nn.Module):
    """Encoder, decoder and reconstruction losses of a first stage; ``variational`` adds the Gaussian posterior.

    Subclasses set ``downsampling`` (the spatial factor between data and latents) and ``latent_channels``, and
    implement :meth:`encoder` (``[B, C, *S]`` -> ``[B, k * latent_channels, *S / downsampling]``, ``k`` = 2 when
    variational: means then log-variances), :meth:`decoder` and :meth:`reconstruction`.
    """

    downsampling: int = 1
    latent_channels: int = 1
    #: What shapes the latents beside the weights (a fixed front end's settings): part of the stage's identity.
    version: str = ""

    def __init__(self, variational: bool = True) -> None:
        super().__init__()
        self.variational = bool(variational)

    # ----------------------------------------------------------------- hooks
    def encoder(self, x: Tensor) -> Tensor:  # [B, C, *S] -> [B, k * C', *S']
        raise NotImplementedError(f"{type(self).__name__} must implement encoder(x)")

    def decoder(self, z: Tensor) -> Tensor:  # [B, C', *S'] -> [B, C, *S]
        raise NotImplementedError(f"{type(self).__name__} must implement decoder(z)")

    def reconstruction(self, f: Tensor, f_hat: Tensor) -> Tensor:  # features and their reconstruction -> [B]
        raise NotImplementedError(f"{type(self).__name__} must implement reconstruction(f, f_hat)")

    def features(self, x: Tensor) -> Tensor:  # [B, C, *S] -> [B, C_f, *S_f]: what the stage encodes (x itself)
        return x

    def render(self, f: Tensor, shape: Optional[Sequence[int]]) -> Tensor:  # decoded features -> data [B, C, *S]
        """Data from decoded features (the features are the data by default), cropped to the spatial ``shape``."""
        return f if shape is None else cropped(f, shape)

    # -------------------------------------------------------------- template
    def padded(self, x: Tensor) -> Tensor:
        """``x`` zero-padded at the end of each spatial axis to a multiple of ``downsampling``."""
        f = self.downsampling
        pad: list[int] = []
        for size in reversed(x.shape[2:]):
            pad += [0, (-size) % f]
        return F.pad(x, pad) if any(pad) else x

    def posterior(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Mean ``[B, C', *S']`` and log-variance (``None`` for a plain autoencoder) of the latent of ``x``."""
        return self._posterior(self.features(x))

    def _posterior(self, f: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        h = self.encoder(self.padded(f))
        if not self.variational:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean: a deterministic latent ``[B, C', *S']`` (what latent diffusion trains on)."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor, shape: Optional[Sequence[int]] = None) -> Tensor:
        """Data ``[B, C, *S]`` decoded from ``z``, cropped to the spatial ``shape`` when given (padding undone)."""
        return self.render(self.decoder(z), shape)

    def reconstruct(self, x: Tensor) -> Tensor:
        """``decode(encode(x))`` at ``x``'s shape."""
        return self.decode(self.encode(x), x.shape[2:])

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """One training pass on the features: the decoded posterior sample ``f_hat``, the reconstruction losses
        and the KL per sample ``[B]`` (in nats per data value, so its weight does not depend on the item's size;
        zero for a plain autoencoder)."""
        f = self.features(x)  # [B, C_f, *S_f]
        mean, logvar = self._posterior(f)
        z, kl = mean, mean.new_zeros(len(x))
        if logvar is not None:
            z = mean + (0.5 * logvar).exp() * normal_like(mean, generator)  # the reparameterised sample
            kl = gaussian_kl(mean.float(), logvar.float()) / x[0].numel()
        f_hat = cropped(self.decoder(z), f.shape[2:])  # like f
        return {"f_hat": f_hat, "reconstruction": self.reconstruction(f, f_hat), "kl": kl}


def segment_mean(values: Tensor, batch: Tensor, num_samples: int) -> Tensor:
    """Mean of the rows of each sample: ``values [N, ...]``, ``batch [N]`` -> ``[B, ...]``."""
    sums = values.new_zeros((num_samples, *values.shape[1:])).index_add_(0, batch, values)
    counts = values.new_zeros(num_samples).index_add_(0, batch, values.new_ones(len(batch))).clamp(min=1)
    return sums / counts.view(-1, *([1] * (values.dim() - 1)))


class RaggedFirstStage(nn.Module):
    """A first stage of ragged rows ``x [N, D]`` grouped into samples by ``batch [N]`` whose latent rows are
    ``[c equivariant coordinates | k invariant features]`` (GeoLDM, Xu et al. 2023): the coordinates keep a zero mean
    per sample, the Gaussian posterior covers the invariant part (KL per data value, as :class:`FirstStage`), and a
    variational stage also noises the coordinates with a fixed ``coordinate_noise`` std (zero-mean noise), where a
    learned variance would have to be one scalar per row to stay equivariant.

    Subclasses set ``equivariant`` (c) and ``latent_features`` (k) and implement :meth:`encoder` (``[N, D]`` ->
    ``[N, c + k]``, or ``[N, c + 2k]`` when variational: means then log-variances of the invariant part),
    :meth:`decoder` (latents -> the decoder's outputs, e.g. positions and type logits), :meth:`reconstruction` and
    :meth:`render` (the decoder's outputs -> data rows ``[N, D]``).
    """

    ragged = True  # what the latent wrapper reads: per-row latents laid out by the data's batch index
    equivariant: int = 3
    latent_features: int = 1
    version: str = ""

    def __init__(self, variational: bool = True, coordinate_noise: float = 0.0) -> None:
        super().__init__()
        if not coordinate_noise >= 0:
            raise ValueError(f"model.coordinate_noise={coordinate_noise} must be >= 0")
        self.variational, self.coordinate_noise = bool(variational), float(coordinate_noise)

    # ----------------------------------------------------------------- hooks
    def encoder(self, x: Tensor, batch: Tensor) -> Tensor:  # [N, D] -> [N, c + k * (1 or 2)]
        raise NotImplementedError(f"{type(self).__name__} must implement encoder(x, batch)")

    def decoder(self, z: Tensor, batch: Tensor) -> Tensor:  # [N, c + k] -> the decoder's outputs [N, *]
        raise NotImplementedError(f"{type(self).__name__} must implement decoder(z, batch)")

    def reconstruction(self, x: Tensor, out: Tensor, batch: Tensor) -> Tensor:  # -> [B]
        raise NotImplementedError(f"{type(self).__name__} must implement reconstruction(x, out, batch)")

    def render(self, out: Tensor) -> Tensor:  # the decoder's outputs -> data rows [N, D]
        raise NotImplementedError(f"{type(self).__name__} must implement render(out)")

    # -------------------------------------------------------------- template
    def posterior(self, x: Tensor, batch: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Mean ``[N, c + k]`` and the invariant part's log-variance ``[N, k]`` (``None``: a plain autoencoder)."""
        h = self.encoder(x, batch)
        if not self.variational:
            return h, None
        cut = self.equivariant + self.latent_features
        return h[:, :cut], h[:, cut:].clamp(*LOGVAR_RANGE)

    def encode(self, x: Tensor, batch: Tensor) -> Tensor:
        """The posterior mean ``[N, c + k]``: the latent rows latent diffusion trains on."""
        return self.posterior(x, batch)[0]

    def decode(self, z: Tensor, batch: Tensor) -> Tensor:
        """Data rows ``[N, D]`` decoded from latent rows ``z [N, c + k]``."""
        return self.render(self.decoder(z, batch))

    def reconstruct(self, x: Tensor, batch: Tensor) -> Tensor:
        """``decode(encode(x))`` ``[N, D]``."""
        return self.decode(self.encode(x, batch), batch)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None, batch: Optional[Tensor] = None) -> dict:
        """One training pass: the decoder's outputs of the posterior sample, the reconstruction losses and the KL
        per sample ``[B]`` (nats per data value; zero for a plain autoencoder)."""
        if batch is None:
            raise ValueError(f"{type(self).__name__} needs the rows' batch index (a ragged state)")
        num_samples = int(batch.max()) + 1 if len(batch) else 0
        mean, logvar = self.posterior(x, batch)  # [N, c + k], [N, k]
        z, kl = mean, mean.new_zeros(num_samples)
        if logvar is not None:
            c = self.equivariant
            coords = mean[:, :c]  # [N, c]
            if self.coordinate_noise:
                noise = normal_like(coords, generator)  # [N, c], then zero mean per sample
                coords = coords + self.coordinate_noise * (noise - segment_mean(noise, batch, num_samples)[batch])
            features = mean[:, c:] + (0.5 * logvar).exp() * normal_like(logvar, generator)  # [N, k]
            z = torch.cat([coords, features], dim=1)
            rows = gaussian_kl(mean[:, c:].float(), logvar.float())  # [N]
            values = x.shape[1] * torch.bincount(batch, minlength=num_samples).clamp(min=1)  # [B] data values
            kl = rows.new_zeros(num_samples).index_add_(0, batch, rows) / values
        out = self.decoder(z, batch)
        return {"f_hat": out, "reconstruction": self.reconstruction(x, out, batch), "kl": kl}
