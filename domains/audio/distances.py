"""Distances between clips and their reconstructions, for a first stage's row and a learned stage's loss: SI-SDR
(Le Roux et al. 2019) and a multi-resolution STFT distance (Yamamoto et al. 2020)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["si_sdr", "mrstft_distance", "stft_sizes", "reconstruction_distances"]

SILENCE = 1e-3  # the spectral convergence's floor, as an RMS STFT magnitude (speech windows lie far above it)


def stft_sizes(sample_rate: int) -> tuple[int, ...]:
    """Windows of about 32, 64 and 128 ms rounded to powers of two: (512, 1024, 2048) at 16 kHz."""
    return tuple(2 ** max(4, round(math.log2(sample_rate * ms / 1000))) for ms in (32, 64, 128))


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
    windows of ``ffts`` samples with a quarter-window hop (Yamamoto et al. 2020, Eqs. 4-6); differentiable, so the
    same function is a learned first stage's training loss."""
    b = len(x)
    x, x_hat = x.flatten(0, 1).float(), x_hat.flatten(0, 1).float()  # [B * C, L]
    total = x.new_zeros(len(x))  # [B * C]
    length = x.shape[-1]
    fits = [n for n in ffts if n // 2 < length] or [2 ** max(1, (length - 1).bit_length() - 1)]  # windows a clip fits
    for n_fft in fits:
        window = torch.hann_window(n_fft, device=x.device)
        spec = [torch.stft(w, n_fft, n_fft // 4, window=window, return_complex=True).abs() for w in (x, x_hat)]
        s, s_hat = spec  # [B * C, bins, frames]
        # Spectral convergence over the larger of the two norms (and a floor: an RMS magnitude of SILENCE), so a
        # silent window of the target does not blow up; it equals the usual ||S - S^|| / ||S|| wherever ||S^|| <= ||S||.
        norms = torch.stack([torch.linalg.norm(v.flatten(1), dim=1) for v in (s, s_hat)]).amax(0)  # [B * C]
        sc = torch.linalg.norm((s - s_hat).flatten(1), dim=1) / norms.clamp_min(SILENCE * s[0].numel() ** 0.5)
        mag = (torch.log(s.clamp_min(1e-7)) - torch.log(s_hat.clamp_min(1e-7))).abs().flatten(1).mean(1)
        total = total + sc + mag
    return (total / len(fits)).reshape(b, -1).mean(1)  # channels averaged: [B]


def reconstruction_distances(x: Tensor, x_hat: Tensor) -> dict[str, float]:
    """Mean SI-SDR (dB) and multi-resolution STFT distance of reconstructions ``x_hat`` of ``x`` ``[B, C, L]``."""
    sdr = si_sdr(x, x_hat)
    sdr = sdr[torch.isfinite(sdr)]
    return {
        "si_sdr": float(sdr.mean()) if len(sdr) else math.nan,
        "mrstft": float(mrstft_distance(x, x_hat).mean()),
    }
