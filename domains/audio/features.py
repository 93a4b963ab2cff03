"""Log-mel features and a small digit classifier on them, for the SC09 metric protocol.

DiffWave (Kong et al. 2021) and SaShiMi (Goel et al. 2022) score generated digits with a
classifier trained on the real training split; FID uses its penultimate features and IS,
mIS and AM its class probabilities. This classifier is a compact CNN on log-mel
spectrograms, small enough to fit on a CPU in well under a minute.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor, nn

__all__ = ["LogMel", "mel_settings", "DigitClassifier", "WaveClassifier", "augment_waves"]


def mel_settings(sample_rate: int) -> dict[str, int]:
    """Window ~32 ms, hop ~10 ms and a mel count that suits the bandwidth ``sample_rate / 2``."""
    n_fft = 1 << max(6, round(torch.log2(torch.tensor(0.032 * sample_rate)).item()))
    hop = max(1, round(0.010 * sample_rate))
    n_mels = int(min(64, max(20, sample_rate // 100)))
    return {"n_fft": n_fft, "hop_length": hop, "n_mels": min(n_mels, n_fft // 2)}


class LogMel(nn.Module):
    """``[B, C, L]`` waveform -> ``[B, C, n_mels, frames]`` log-mel spectrogram (natural log, floor 1e-5)."""

    def __init__(self, sample_rate: int) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, **mel_settings(sample_rate))

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(self.mel(x.float()) + 1e-5)


class DigitClassifier(nn.Module):
    """Log-mel time-convolution network (mel bins as channels) returning ``(features [B, D], logits [B, K])``."""

    def __init__(
        self, sample_rate: int, in_channels: int, num_classes: int, width: int = 64, feature_dim: int = 128
    ) -> None:
        super().__init__()
        self.logmel = LogMel(sample_rate)
        bins = in_channels * mel_settings(sample_rate)["n_mels"]
        self.norm = nn.BatchNorm1d(bins)  # log-mel levels vary with the rate and loudness

        def block(cin: int, cout: int, k: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv1d(cin, cout, k, padding=k // 2), nn.BatchNorm1d(cout), nn.ReLU(), nn.MaxPool1d(2)
            )

        # 1-D convolutions over frames are far cheaper on a CPU than 2-D ones over the spectrogram.
        self.body = nn.Sequential(block(bins, width, 5), block(width, 2 * width, 3), block(2 * width, 2 * width, 3))
        self.features = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x [B, C, L]
        spec = self.logmel(x).flatten(1, 2)  # [B, C * mels, frames]
        h = self.body(self.norm(spec))  # [B, 2w, frames / 8]
        pooled = torch.cat([h.mean(-1), h.amax(-1)], dim=1)  # [B, 4w]
        f = self.features(pooled)  # [B, feature_dim]
        return f, self.head(self.dropout(f))


def augment_waves(x: Tensor, g: torch.Generator, max_shift: float = 0.1) -> Tensor:
    """Random circular shift (up to ``max_shift`` of the length), gain and faint noise per clip: ``[B, C, L]``."""
    b, _, n = x.shape
    shifts = ((torch.rand(b, generator=g) * 2 - 1) * max_shift * n).long()
    out = torch.stack([torch.roll(xi, int(s), dims=-1) for xi, s in zip(x, shifts)])
    gain = 10 ** ((torch.rand(b, 1, 1, generator=g) * 2 - 1) * 0.3)  # +-6 dB
    noise = torch.randn(out.shape, generator=g) * (torch.rand(b, 1, 1, generator=g) * 0.01)
    return out * gain.to(x.device) + noise.to(x.device)  # draws on the CPU generator, applied on x's device


class WaveClassifier(nn.Module):
    """A second front end for the metrics: strided convolutions on the raw waveform (M5, Dai et al. 2017), so that a
    stage working on mel spectrograms is not scored only by a classifier that reads mel spectrograms. Returns
    ``(features [B, D], logits [B, K])``."""

    def __init__(
        self, sample_rate: int, in_channels: int, num_classes: int, width: int = 48, feature_dim: int = 128
    ) -> None:
        super().__init__()
        kernel, stride = max(8, sample_rate // 200), max(1, sample_rate // 4000)  # 5 ms windows, 4,000 per second

        def block(cin: int, cout: int, k: int, s: int = 1, pool: int = 4) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv1d(cin, cout, k, stride=s, padding=k // 2), nn.BatchNorm1d(cout), nn.ReLU(), nn.MaxPool1d(pool)
            )

        self.body = nn.Sequential(
            block(in_channels, width, kernel, stride),  # [B, w, L / (4 s)]
            block(width, width, 3),
            block(width, 2 * width, 3),
            block(2 * width, 4 * width, 3, pool=2),
        )
        self.features = nn.Sequential(nn.Linear(8 * width, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x [B, C, L]
        x = x.float()
        x = x / x.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-3)  # the level of a clip says nothing of the word
        h = self.body(x)  # [B, 4w, frames]
        f = self.features(torch.cat([h.mean(-1), h.amax(-1)], dim=1))  # [B, feature_dim]
        return f, self.head(self.dropout(f))
