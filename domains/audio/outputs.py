"""Sample outputs: one WAV per generated clip and a PNG sheet of their spectrograms."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .data import label_slug
from .features import LogMel
from .io import write_audio

__all__ = ["label_slug", "save_wavs", "spectrogram_sheet"]

log = logging.getLogger(__name__)


def save_wavs(
    waves: Tensor, sample_rate: int, out_dir: Path, prefix: str, names: Optional[Sequence[str]] = None
) -> list[Path]:
    """Write ``waves [B, C, L]`` as ``{prefix}_{i:03d}[_{name}].wav``; peaks above 1 are clipped and logged."""
    if not torch.isfinite(waves).all():
        bad = (~torch.isfinite(waves)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"samples {bad} hold NaN or infinite values: the model or sampler diverged")
    peak = waves.abs().amax(dim=(1, 2))  # [B]
    over = (peak > 1).nonzero().flatten().tolist()
    if over:
        n = int((waves.abs() > 1).sum())
        log.warning(
            "clipped %d sample value(s) outside [-1, 1] in clip(s) %s (largest peak %.3f) before writing WAVs",
            n, over, float(peak.max()),
        )
        waves = waves.clamp(-1.0, 1.0)
    out_dir = Path(out_dir)
    paths = []
    for i, wave in enumerate(waves):
        suffix = f"_{label_slug(names[i])}" if names is not None else ""
        paths.append(write_audio(out_dir / f"{prefix}_{i:03d}{suffix}.wav", wave, sample_rate))
    return paths


def spectrogram_sheet(
    waves: Tensor, sample_rate: int, path: Path, titles: Optional[Sequence[str]] = None, cols: int = 4, max_clips: int = 32
) -> Path:
    """A grid of log-mel spectrograms of ``waves [B, C, L]`` (first channel) saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    waves = waves[:max_clips].detach().float().cpu()
    spec = LogMel(sample_rate)(waves[:, :1])[:, 0]  # [B, mels, frames]
    lo, hi = float(spec.max()) - 80 / 4.343, float(spec.max())  # an 80 dB range in natural-log units
    b = spec.shape[0]
    cols = min(cols, b)
    rows = math.ceil(b / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    seconds = waves.shape[-1] / sample_rate
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= b:
            continue
        ax.imshow(spec[i].numpy(), origin="lower", aspect="auto", vmin=lo, vmax=hi, cmap="magma", extent=(0, seconds, 0, spec.shape[1]))
        ax.set_title(titles[i] if titles is not None else f"#{i}", fontsize=9)
    fig.suptitle(f"log-mel spectrograms ({sample_rate} Hz, {seconds:g} s)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
