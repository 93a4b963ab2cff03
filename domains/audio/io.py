"""Audio file I/O: soundfile for reading and writing, torchaudio for resampling.

Every conversion a loader makes (resampling, channel mixing, cropping, padding) is counted
in a :class:`Conversions` record and logged once per data set, so nothing changes silently.
Files that cannot be decoded raise a :class:`AudioFileError` naming the file.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import Tensor

__all__ = [
    "AUDIO_SUFFIXES",
    "AudioFileError",
    "Conversions",
    "read_audio",
    "to_channels",
    "resample",
    "fit_length",
    "load_clip",
    "write_audio",
]

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")


class AudioFileError(ValueError):
    """A file that is missing, empty, not audio, or holds no usable samples."""


@dataclass
class Conversions:
    """Counts of the conversions applied while loading a data set (logged by :meth:`report`)."""

    resampled: Counter = field(default_factory=Counter)  # source rate -> number of files
    mixed: Counter = field(default_factory=Counter)  # source channel count -> files mixed down
    duplicated: int = 0  # mono files copied to every output channel
    cropped: int = 0
    cropped_loud: int = 0  # cropped clips whose dropped part held sound above -40 dB of the clip's peak
    padded: int = 0
    longest: float = 0.0  # seconds, of the longest cropped file
    stubs: list = field(default_factory=list)  # (file, seconds) of clips under a tenth of the target length

    def report(self, what: str, sample_rate: int, channels: int, length: int) -> list[str]:
        """Log one line per kind of conversion; returns the lines."""
        lines = []
        for rate, n in sorted(self.resampled.items()):
            lines.append(f"{what}: resampled {n} file(s) from {rate} Hz to {sample_rate} Hz")
        for ch, n in sorted(self.mixed.items()):
            lines.append(f"{what}: mixed {n} file(s) with {ch} channels down to mono (channel mean)")
        if self.duplicated:
            lines.append(f"{what}: copied {self.duplicated} mono file(s) to {channels} channels")
        seconds = length / sample_rate
        if self.cropped:
            lines.append(
                f"{what}: cropped {self.cropped} clip(s) longer than {seconds:g} s (longest {self.longest:.2f} s); "
                f"{self.cropped_loud} of them lost sound above -40 dB (raise domain.duration to keep it)"
            )
        if self.padded:
            lines.append(f"{what}: zero-padded {self.padded} clip(s) shorter than {seconds:g} s")
        for line in lines:
            log.info(line)
        if self.stubs:
            named = ", ".join(f"{Path(p).name} ({s:.3f} s)" for p, s in self.stubs[:5])
            line = (
                f"{what}: {len(self.stubs)} file(s) hold under a tenth of {seconds:g} s and train as near-silence "
                f"(truncated recordings?): {named}{', ...' if len(self.stubs) > 5 else ''}"
            )
            log.warning(line)
            lines.append(line)
        return lines


def read_audio(path: Path) -> tuple[Tensor, int]:
    """Decode ``path`` with soundfile: a float waveform ``[C, L]`` and its sample rate."""
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file {path} does not exist")
    if path.stat().st_size == 0:
        raise AudioFileError(f"audio file {path} is empty (0 bytes); delete or replace it")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)  # [L, C]
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioFileError(f"could not decode {path} as audio ({err}); is it a valid WAV/FLAC file?") from err
    if data.shape[0] == 0:
        raise AudioFileError(f"audio file {path} holds no samples; delete or replace it")
    if not np.isfinite(data).all():
        raise AudioFileError(f"audio file {path} holds NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def to_channels(x: Tensor, channels: int, path: Path, conv: Conversions) -> Tensor:
    """Mix ``[C, L]`` down to mono or copy mono up to ``channels``; other mismatches are errors."""
    c = x.shape[0]
    if c == channels:
        return x
    if channels == 1:
        conv.mixed[c] += 1
        return x.mean(dim=0, keepdim=True)  # [1, L]
    if c == 1:
        conv.duplicated += 1
        return x.expand(channels, -1).clone()  # [channels, L]
    raise AudioFileError(
        f"{path} has {c} channels but domain.channels={channels}; only mono <-> {channels}-channel "
        "conversion is supported: set domain.channels to 1 (mix down) or to the files' channel count"
    )


def resample(x: Tensor, rate: int, sample_rate: int) -> Tensor:
    """Band-limited resampling ``[..., L] -> [..., L * sample_rate / rate]`` (torchaudio, sinc interpolation)."""
    if rate == sample_rate:
        return x
    return AF.resample(x, rate, sample_rate)


def fit_length(x: Tensor, length: int, conv: Conversions, sample_rate: int, crop: str = "start") -> Tensor:
    """Crop or zero-pad ``[C, L]`` to ``[C, length]``: keep the start (``crop="start"``) or the middle."""
    n = x.shape[-1]
    if n > length:
        conv.cropped += 1
        conv.longest = max(conv.longest, n / sample_rate)
        start = 0 if crop == "start" else (n - length) // 2
        kept = x[..., start : start + length]
        dropped = torch.cat([x[..., :start], x[..., start + length :]], dim=-1)
        if dropped.abs().max() > 0.01 * x.abs().max():
            conv.cropped_loud += 1
        return kept
    if n < length:
        conv.padded += 1
        return torch.nn.functional.pad(x, (0, length - n))
    return x


def load_clip(
    path: Path, sample_rate: int, channels: int, length: int, conv: Conversions, crop: str = "start"
) -> Tensor:
    """Read one file and convert it to ``[channels, length]`` at ``sample_rate``."""
    x, rate = read_audio(path)
    x = to_channels(x, channels, path, conv)
    if rate != sample_rate:
        conv.resampled[rate] += 1
        x = resample(x, rate, sample_rate)
    if x.shape[-1] * 10 < length:
        conv.stubs.append((str(path), x.shape[-1] / sample_rate))
    return fit_length(x, length, conv, sample_rate, crop)


def write_audio(path: Path, x: Tensor, sample_rate: int) -> Path:
    """Write ``[C, L]`` (values in [-1, 1]) as 16-bit PCM; the format follows the suffix (.wav/.flac)."""
    x = x.detach().float().cpu()
    if x.dim() != 2:
        raise ValueError(f"write_audio needs a [channels, samples] tensor, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"refusing to write {path}: the waveform holds NaN or infinite values")
    if x.abs().max() > 1.0:
        raise ValueError(f"refusing to write {path}: peak {float(x.abs().max()):.3f} is outside [-1, 1]")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.T.numpy(), sample_rate, subtype="PCM_16")
    return path
