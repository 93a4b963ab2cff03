"""What a report page and TensorBoard show of samples: :class:`ReportItem` (a clip, a picture, a molecule, a text), the
encodings it is shown in (PNG, WAV) and the default plot of dense samples (:func:`dense_plot`)."""

from __future__ import annotations

import io
import math
import wave as wavefile
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ReportItem", "KINDS", "new_figure", "figure_png", "array_png", "png_array", "wav_bytes", "dense_plot"]

KINDS = ("audio", "image", "molecule", "text")
PLAYABLE_RATE = 8000  # browsers refuse WAV below about 3 kHz (Chromium's floor) or 8 kHz (others): clips are upsampled


@dataclass
class ReportItem:
    """One thing a report shows of samples; ``kind`` is ``audio``, ``image``, ``molecule`` or ``text``.

    ``png`` is its picture (an image, a clip's spectrogram, a molecule's 2-D depiction); ``group`` the label the page
    groups it under; ``real`` marks real data shown beside the samples.
    """

    kind: str
    title: str = ""
    group: str = ""
    png: Optional[bytes] = None
    wave: Optional[np.ndarray] = None  # audio [C, L], values in [-1, 1]
    sample_rate: int = 0
    atoms: Sequence[str] = ()  # molecule: element symbols [n]
    positions: Optional[np.ndarray] = None  # molecule [n, 3], Angstrom
    bonds: Sequence[tuple[int, int, int]] = ()  # molecule: (atom i, atom j, bond order)
    text: str = ""
    real: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ReportItem kind {self.kind!r} is unknown; choose one of {KINDS}")
        if self.kind == "audio" and (self.wave is None or self.sample_rate <= 0):
            raise ValueError(f"audio ReportItem {self.title!r} needs wave [C, L] and a sample_rate > 0")
        if self.kind == "molecule" and (self.positions is None or len(self.atoms) != len(self.positions)):
            raise ValueError(f"molecule ReportItem {self.title!r} needs one position [3] per atom symbol")


def new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, np.ndarray]:
    """A matplotlib figure and its axes ``[nrows, ncols]``, made without pyplot (no global state, no backend switch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def figure_png(fig: Any, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def array_png(pixels: np.ndarray) -> bytes:
    """uint8 pixels ``[H, W]`` or ``[H, W, C]`` (C = 1, 3 or 4) as PNG bytes."""
    from PIL import Image

    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def png_array(png: bytes) -> np.ndarray:
    """PNG bytes as uint8 RGB pixels ``[H, W, 3]`` (for TensorBoard's ``add_image``)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def wav_bytes(wave: np.ndarray, sample_rate: int) -> tuple[bytes, int]:
    """A clip ``[C, L]`` in [-1, 1] as a 16-bit PCM WAV file's bytes, and the rate it plays at (the clip's, raised
    by an integer factor with linear interpolation below :data:`PLAYABLE_RATE`, which browsers will not play)."""
    x = np.clip(np.asarray(wave, dtype=np.float64).reshape(-1, np.shape(wave)[-1]), -1.0, 1.0)  # [C, L]
    rate = int(sample_rate)
    if rate < PLAYABLE_RATE:
        factor = math.ceil(PLAYABLE_RATE / rate)
        t = np.arange(x.shape[1] * factor) / factor
        x = np.stack([np.interp(t, np.arange(x.shape[1]), ch) for ch in x])
        rate *= factor
    pcm = np.round(x.T * 32767).astype("<i2")  # [L, C], interleaved
    buf = io.BytesIO()
    with wavefile.open(buf, "wb") as w:
        w.setnchannels(x.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue(), rate


def dense_plot(x: Tensor, max_panels: int = 8) -> Optional[bytes]:
    """A PNG plot of dense samples ``x [B, ...]``, or ``None`` for shapes it cannot draw.

    Vectors ``[B, 1]``: a histogram; ``[B, 2]``: a scatter of every sample; longer vectors ``[B, D]`` and signals
    ``[B, C, L]`` of a few channels: a line panel per sample; ``[B, C, L]`` of many channels and ``[B, C, H, W]``:
    a heat map per sample (first channel), with a colour bar.
    """
    x = x.detach().float().cpu()
    if x.dim() < 2 or x.shape[0] == 0 or not torch.isfinite(x).all():
        return None
    b = x.shape[0]
    if x.dim() == 2 and x.shape[1] <= 2:
        fig, axes = new_figure(4.2, 3.6)
        ax = axes[0, 0]
        if x.shape[1] == 1:
            ax.hist(x[:, 0].numpy(), bins=min(60, max(10, b // 10)), color="#3b6ea8")
            ax.set_xlabel("value")
            ax.set_ylabel("samples")
        else:
            ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=4 if b > 200 else 12, alpha=0.6, color="#3b6ea8")
            ax.set_xlabel("x[0]")
            ax.set_ylabel("x[1]")
            ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"{b} samples", fontsize=9)
        fig.tight_layout()
        return figure_png(fig)
    if x.dim() > 4:
        return None
    n = min(b, max_panels)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = new_figure(3.0 * cols, 2.2 * rows, cols, rows)
    lines = x.dim() == 2 or (x.dim() == 3 and x.shape[1] <= 4)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        sample = x[i].reshape(1, -1) if x.dim() == 2 else x[i]  # [C, L] or [C, H, W]
        if lines:
            for c, channel in enumerate(sample):
                ax.plot(channel.numpy(), lw=0.8, label=f"channel {c}" if len(sample) > 1 else None)
            ax.set_xlabel("index", fontsize=7)
            if len(sample) > 1 and i == 0:
                ax.legend(fontsize=6)
        else:
            image = ax.imshow(sample[0].numpy() if sample.dim() == 3 else sample.numpy(), aspect="auto", cmap="viridis")
            fig.colorbar(image, ax=ax)
        ax.tick_params(labelsize=6)
        ax.set_title(f"#{i}", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)
