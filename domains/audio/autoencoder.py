"""A learned first stage for latent audio diffusion (``objective.name=autoencoder``, recipes/audio_autoencoder.yaml).

A 1-D convolutional encoder and decoder in the style of SoundStream (Zeghidour et al. 2021) and Stable Audio's VAE
(Evans et al. 2024): residual units of dilated convolutions (dilations 1, 3, 9), strided convolutions down and
transposed convolutions up by ``strides`` (their product: how many times fewer time steps the latent has), and a
diagonal Gaussian posterior of ``latent_channels`` channels. Trained with L1 on the waveform plus a multi-resolution
STFT distance (Yamamoto et al. 2020) at windows of about 32, 64 and 128 ms.

:class:`MelVAE` is AudioLDM's design (Liu et al. 2023) with Griffin-Lim for a vocoder: it encodes the fixed mel
stage's log-mel spectrogram (:class:`.mel_stage.MelAutoencoder`, the bands as channels) into fewer frames and
channels, is trained by L1 on the log-mel, and renders its decoded log-mel by the mel stage's Griffin-Lim. It trains
in minutes on a CPU, where a waveform autoencoder needs hours.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from polydiff.first_stage import FirstStage

from .distances import mrstft_distance, stft_sizes
from .mel_stage import MelAutoencoder

__all__ = ["WaveAutoencoder", "MelVAE"]


class ResidualUnit(nn.Module):
    """``x + conv1x1(act(conv7_dilated(act(x))))``: one unit of the SoundStream encoder and decoder blocks."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ELU(),
            nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            nn.ELU(),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, T]
        return x + self.body(x)


def _units(channels: int, dilations: Sequence[int]) -> list[nn.Module]:
    return [ResidualUnit(channels, d) for d in dilations]


def _check_stride(stride: int) -> int:
    if stride < 2 or stride % 2:
        raise ValueError(f"model.strides: {stride} must be an even number >= 2 (each halves the length exactly)")
    return stride


class WaveAutoencoder(FirstStage):
    """Waves ``[B, C, L]`` <-> latents ``[B, latent_channels, L / prod(strides)]``.

    Args (the recipe's ``model`` section): ``channels`` at the first level, ``channel_mults`` per downsampling
    level (one per stride; default doubling: 1, 2, 4, ...), ``strides``, ``latent_channels``, ``dilations`` of
    each level's residual units, and the loss weights ``l1_weight`` and ``stft_weight``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        sample_rate: int = 16000,
        channels: int = 32,
        channel_mults: Optional[Sequence[int]] = None,
        strides: Sequence[int] = (4, 4, 4),
        latent_channels: int = 16,
        dilations: Sequence[int] = (1, 3, 9),
        l1_weight: float = 1.0,
        stft_weight: float = 1.0,
        variational: bool = True,
    ) -> None:
        super().__init__(variational)
        channel_mults = [2**i for i in range(len(strides))] if channel_mults is None else channel_mults
        if len(channel_mults) != len(strides):
            raise ValueError(
                f"model.channel_mults {list(channel_mults)} needs one entry per model.strides {list(strides)}"
            )
        if latent_channels < 1 or channels < 1:
            raise ValueError(f"model.channels={channels} and model.latent_channels={latent_channels} must be >= 1")
        strides = [_check_stride(int(s)) for s in strides]
        self.downsampling = math.prod(strides)
        self.latent_channels = int(latent_channels)
        self.ffts = stft_sizes(sample_rate)
        self.l1_weight, self.stft_weight = float(l1_weight), float(stft_weight)
        widths = [channels * m for m in channel_mults]  # the width after each downsampling
        down: list[nn.Module] = [nn.Conv1d(in_channels, channels, 7, padding=3)]
        width = channels
        for stride, out in zip(strides, widths):
            down += _units(width, dilations)
            down += [nn.ELU(), nn.Conv1d(width, out, 2 * stride, stride=stride, padding=stride // 2)]
            width = out
        down += [nn.ELU(), nn.Conv1d(width, (2 if self.variational else 1) * latent_channels, 3, padding=1)]
        self.down = nn.Sequential(*down)
        up: list[nn.Module] = [nn.Conv1d(latent_channels, width, 7, padding=3)]
        for stride, out in zip(reversed(strides), [*reversed(widths[:-1]), channels]):
            up += [nn.ELU(), nn.ConvTranspose1d(width, out, 2 * stride, stride=stride, padding=stride // 2)]
            up += _units(out, dilations)
            width = out
        up += [nn.ELU(), nn.Conv1d(width, in_channels, 7, padding=3)]
        self.up = nn.Sequential(*up)

    def encoder(self, x: Tensor) -> Tensor:  # [B, C, L] -> [B, k * C', L / prod(strides)]
        return self.down(x)

    def decoder(self, z: Tensor) -> Tensor:  # [B, C', T'] -> [B, C, T' * prod(strides)]
        return self.up(z)

    def reconstruction(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """``l1_weight`` x mean |x - x_hat| + ``stft_weight`` x the multi-resolution STFT distance, per clip ``[B]``."""
        l1 = (x - x_hat).abs().flatten(1).mean(1)  # [B]
        if not self.stft_weight:
            return self.l1_weight * l1
        return self.l1_weight * l1 + self.stft_weight * mrstft_distance(x, x_hat, self.ffts)


#: Log-mel features are fed to the network as (log-mel - MEL_CENTRE) / MEL_SCALE: about [-1.6, 2] for speech, the
#: log's floor (ln 1e-5 = -11.5) at -1.6.
MEL_CENTRE, MEL_SCALE = -5.0, 4.0


class MelVAE(FirstStage):
    """Waves ``[B, C, L]`` -> log-mels ``[B, C * n_mels, F]`` (fixed) <-> latents ``[B, latent_channels,
    F / prod(strides)]``; decoded log-mels are rendered by the mel stage's Griffin-Lim.

    Args (the recipe's ``model`` section, with ``front: mel``): ``channels`` (the width throughout), ``strides`` over
    frames, ``latent_channels``, ``dilations`` of the residual units, ``n_mels`` and ``griffin_lim_iters`` of the
    mel stage.
    """

    def __init__(
        self,
        in_channels: int = 1,
        sample_rate: int = 16000,
        length: int = 16000,
        channels: int = 128,
        strides: Sequence[int] = (2,),
        latent_channels: int = 16,
        dilations: Sequence[int] = (1, 3),
        n_mels: int = 64,
        griffin_lim_iters: int = 64,
        variational: bool = True,
    ) -> None:
        super().__init__(variational)
        if latent_channels < 1 or channels < 1:
            raise ValueError(f"model.channels={channels} and model.latent_channels={latent_channels} must be >= 1")
        strides = [_check_stride(int(s)) for s in strides]
        self.mel = MelAutoencoder(sample_rate, in_channels, length, n_mels, griffin_lim_iters)  # fixed, no weights
        self.version = self.mel.identity  # a changed mel front end is another first stage
        self.downsampling = math.prod(strides)
        self.latent_channels = int(latent_channels)
        bands = in_channels * n_mels
        down: list[nn.Module] = [nn.Conv1d(bands, channels, 3, padding=1), *_units(channels, dilations)]
        for stride in strides:
            down += [nn.ELU(), nn.Conv1d(channels, channels, 2 * stride, stride=stride, padding=stride // 2)]
            down += _units(channels, dilations)
        down += [nn.ELU(), nn.Conv1d(channels, (2 if self.variational else 1) * latent_channels, 3, padding=1)]
        self.down = nn.Sequential(*down)
        up: list[nn.Module] = [nn.Conv1d(latent_channels, channels, 3, padding=1), *_units(channels, dilations)]
        for stride in strides:
            up += [nn.ELU(), nn.ConvTranspose1d(channels, channels, 2 * stride, stride=stride, padding=stride // 2)]
            up += _units(channels, dilations)
        up += [nn.ELU(), nn.Conv1d(channels, bands, 3, padding=1)]
        self.up = nn.Sequential(*up)

    def features(self, x: Tensor) -> Tensor:  # [B, C, L] -> [B, C * n_mels, F], scaled
        with torch.no_grad():
            return (self.mel.encode(x) - MEL_CENTRE) / MEL_SCALE

    def render(self, f: Tensor, shape: Optional[Sequence[int]]) -> Tensor:  # [B, C * n_mels, F'] -> [B, C, L]
        frames = self.mel.length // self.mel.settings["hop_length"] + 1  # the clip's frames (centred windows)
        wave = self.mel.decode(f[..., :frames].float() * MEL_SCALE + MEL_CENTRE)  # [B, C, length]
        return super().render(wave, shape)

    def encoder(self, f: Tensor) -> Tensor:  # [B, C * n_mels, F] -> [B, k * C', F / prod(strides)]
        return self.down(f)

    def decoder(self, z: Tensor) -> Tensor:  # [B, C', F'] -> [B, C * n_mels, F' * prod(strides)]
        return self.up(z)

    def reconstruction(self, f: Tensor, f_hat: Tensor) -> Tensor:
        """Mean absolute error of the scaled log-mel per clip ``[B]``."""
        return (f - f_hat).abs().flatten(1).mean(1)
