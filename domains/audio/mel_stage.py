"""The fixed mel first stage of latent audio diffusion (``latent.autoencoder=mel``; the AudioLDM design, Liu et al.
2023, with Griffin-Lim in place of a vocoder): log-mel spectrogram in, inverse mel filter bank and Griffin-Lim
(Griffin & Lim 1984) out. No training; its identity is its settings. Also the reconstruction distances of the first
stage's row: SI-SDR (Le Roux et al. 2019) and a multi-resolution STFT distance (Yamamoto et al. 2020)."""

from __future__ import annotations

import hashlib
import json
import math

import torch
import torchaudio
from torch import Tensor

__all__ = ["MelAutoencoder", "mel_stage_settings", "si_sdr", "mrstft_distance", "reconstruction_distances"]

# Bump when the encoding or decoding changes, so cached latents and trained latent models are refused.
MEL_STAGE_VERSION = 1
FLOOR = 1e-5  # magnitudes below it are silence to the log


def mel_stage_settings(sample_rate: int, n_mels: int = 64, griffin_lim_iters: int = 64) -> dict[str, int]:
    """A hop of 1/62.5 s (256 samples at 16 kHz: a 1 s clip gives 63 frames), a window of four hops."""
    hop = max(1, round(sample_rate / 62.5))
    n_fft = 4 * hop
    if n_mels > n_fft // 2 + 1:
        raise ValueError(f"{n_mels} mel bands need a wider window than {n_fft} samples at {sample_rate} Hz")
    return {"sample_rate": sample_rate, "n_fft": n_fft, "hop_length": hop, "n_mels": n_mels, "iters": griffin_lim_iters}


class MelAutoencoder:
    """Waves ``[B, C, L]`` <-> log-mel magnitudes ``[B, C * n_mels, frames]`` (natural log, floor 1e-5)."""

    def __init__(self, sample_rate: int, channels: int, length: int, n_mels: int = 64, griffin_lim_iters: int = 64):
        self.settings = mel_stage_settings(sample_rate, n_mels, griffin_lim_iters)
        self.channels, self.length = int(channels), int(length)
        s = self.settings
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=s["n_fft"], hop_length=s["hop_length"], n_mels=n_mels, power=1.0
        )
        n_stft = s["n_fft"] // 2 + 1
        self.inverse_mel = torchaudio.transforms.InverseMelScale(n_stft, n_mels, sample_rate)
        self.griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=s["n_fft"],
            hop_length=s["hop_length"],
            n_iter=griffin_lim_iters,
            power=1.0,
            length=self.length,
            rand_init=False,  # a fixed start: decoding the same latent gives the same clip
        )
        key = json.dumps({"kind": "mel", "version": MEL_STAGE_VERSION, **s, "channels": self.channels}, sort_keys=True)
        self.identity = hashlib.sha1(key.encode()).hexdigest()[:16]

    def encode(self, x: Tensor) -> Tensor:
        """``[B, C, L]`` -> ``[B, C * n_mels, frames]``."""
        mel = self.mel.to(x.device)(x.float())  # [B, C, M, F]
        return torch.log(mel.clamp_min(FLOOR)).flatten(1, 2)

    def decode(self, z: Tensor) -> Tensor:
        """``[B, C * n_mels, frames]`` -> ``[B, C, L]``: the least-squares linear spectrogram, then Griffin-Lim."""
        b, frames = z.shape[0], z.shape[-1]
        mel = torch.exp(z.float()).reshape(b * self.channels, self.settings["n_mels"], frames)
        linear = self.inverse_mel.to(z.device)(mel)  # [B * C, n_fft / 2 + 1, F]
        wave = self.griffin_lim.to(z.device)(linear)  # [B * C, L]
        return wave.reshape(b, self.channels, -1)


def si_sdr(x: Tensor, x_hat: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant signal-to-distortion ratio in dB per clip ``[B]`` of ``x_hat`` against ``x``, both
    ``[B, C, L]`` (Le Roux et al. 2019, Eq. 1; channels joined)."""
    x, x_hat = x.flatten(1).double(), x_hat.flatten(1).double()
    x, x_hat = x - x.mean(1, keepdim=True), x_hat - x_hat.mean(1, keepdim=True)
    alpha = (x_hat * x).sum(1, keepdim=True) / ((x * x).sum(1, keepdim=True) + eps)
    target = alpha * x
    return 10 * torch.log10((target**2).sum(1) / (((x_hat - target) ** 2).sum(1) + eps) + eps)


def mrstft_distance(x: Tensor, x_hat: Tensor, ffts: tuple[int, ...] = (512, 1024, 2048)) -> Tensor:
    """Multi-resolution STFT distance per clip ``[B]``: spectral convergence plus log-magnitude L1, averaged over
    windows of ``ffts`` samples with a quarter-window hop (Yamamoto et al. 2020, Eqs. 4-6)."""
    x, x_hat = x.flatten(0, 1).float(), x_hat.flatten(0, 1).float()  # [B * C, L]
    total = torch.zeros(len(x))
    for n_fft in ffts:
        window = torch.hann_window(n_fft, device=x.device)
        spec = [torch.stft(w, n_fft, n_fft // 4, window=window, return_complex=True).abs() for w in (x, x_hat)]
        s, s_hat = spec  # [B * C, bins, frames]
        sc = torch.linalg.norm((s - s_hat).flatten(1), dim=1) / torch.linalg.norm(s.flatten(1), dim=1).clamp_min(1e-7)
        mag = (torch.log(s.clamp_min(1e-7)) - torch.log(s_hat.clamp_min(1e-7))).abs().flatten(1).mean(1)
        total += (sc + mag).cpu()
    return total / len(ffts)


def reconstruction_distances(x: Tensor, x_hat: Tensor) -> dict[str, float]:
    """Mean SI-SDR (dB) and multi-resolution STFT distance of reconstructions ``x_hat`` of ``x`` ``[B, C, L]``."""
    sdr = si_sdr(x, x_hat)
    sdr = sdr[torch.isfinite(sdr)]
    return {
        "si_sdr": float(sdr.mean()) if len(sdr) else math.nan,
        "mrstft": float(mrstft_distance(x, x_hat).mean()),
    }
