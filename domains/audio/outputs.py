"""The audio domain's outputs: one WAV per generated clip and a PNG sheet of their spectrograms, clips read back,
known parts of a recording (inpainting, continuation), and the classifier metrics of :mod:`.metrics`."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import Tensor

from domains.classifier import enough_to_score
from polydiff import NULL_LABEL, Batch, DenseSpace, Known
from polydiff.outputs import Outputs
from polydiff.report_items import ReportItem, figure_png, new_figure

from .data import label_slug, sample_index
from .features import LogMel, mel_settings
from .io import Conversions, load_clip, write_audio

if TYPE_CHECKING:
    from .domain import AudioDomain

__all__ = ["AudioOutputs", "label_slug", "save_wavs", "spectrogram_sheet", "spectrogram_pngs"]

log = logging.getLogger(__name__)


class AudioOutputs(Outputs):
    """WAV files and a spectrogram sheet; clips read back converted like training data; inpainting of a recording;
    FID, IS, mIS, AM and label accuracy from the log-mel digit classifier, and from a raw-waveform one beside it
    (``wave_*``) with ``domain.wave_metrics``."""

    domain: AudioDomain

    def __init__(self, domain: AudioDomain) -> None:
        super().__init__(domain)
        self._scorer: Any = None
        self._scorers: dict[str, Any] = {}  # the other front ends' (domain.wave_metrics)

    def _names(self, batch: Batch) -> Optional[list[str]]:
        labels = batch.cond.get("label")
        names = self.domain.class_names
        if labels is None or not names:
            return None
        return [names[int(y)] if int(y) >= 0 else "uncond" for y in labels.cpu()]

    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        """One 16-bit WAV per clip (named by label when conditional) and a PNG sheet of spectrograms."""
        rate = self.domain.sample_rate
        waves = batch.x.detach().float().cpu()  # [B, C, L]
        paths = save_wavs(waves, rate, Path(out_dir), prefix, self._names(batch))
        titles = [p.stem for p in paths]
        paths.append(spectrogram_sheet(waves.clamp(-1, 1), rate, Path(out_dir) / f"{prefix}_spectrograms.png", titles))
        return paths

    def read_samples(self, path: Path) -> Batch:
        """Clips generated elsewhere (a WAV/FLAC file or a folder), converted like training data
        (resampled, channels, cropped or padded to the trained length; each conversion logged).
        Labels come from file or folder names (see :func:`~domains.audio.data.sample_index`)."""
        dom = self.domain
        index = sample_index(Path(path), dom.label_names)
        conv = Conversions()
        waves = torch.stack([load_clip(f, dom.sample_rate, dom.channels, dom.length, conv, dom.crop) for f, _ in index])
        conv.report(f"samples ({path})", dom.sample_rate, dom.channels, dom.length)
        named = [label for _, label in index if label is not None]
        cond: dict[str, Tensor] = {}
        if named:
            cond["label"] = torch.tensor([dom.label_names.index(lab) if lab else NULL_LABEL for _, lab in index])
            if len(named) < len(index):
                log.info(
                    "samples (%s): %d of %d files have no known label in their name; label accuracy scores "
                    "the %d that do",
                    path,
                    len(index) - len(named),
                    len(index),
                    len(named),
                )
        return Batch(waves, DenseSpace(tuple(waves.shape)), cond)

    def known_values(self, path: Path, n: int, start: float = 0.0, end: Optional[float] = None) -> Known:
        """Inpainting or continuation of a recording: the clip at ``path`` (converted like training data) is
        kept outside ``[start, end)`` seconds, which is generated; ``end`` defaults to the clip's end."""
        dom = self.domain
        batch = self.read_samples(Path(path))
        if batch.num_samples != 1:
            raise ValueError(f"--known {path} holds {batch.num_samples} clips: give one WAV/FLAC file")
        seconds = dom.length / dom.sample_rate
        if float(start) == 0.0 and end is None:
            raise ValueError(
                f"--known {path} needs known.start=S and/or known.end=E (seconds, within {seconds:g}): "
                "the part to generate; the rest of the clip is kept"
            )
        lo = round(float(start) * dom.sample_rate)
        hi = dom.length if end is None else round(float(end) * dom.sample_rate)
        if not 0 <= lo < hi <= dom.length:
            raise ValueError(
                f"known.start={start} and known.end={end} must satisfy 0 <= start < end <= {seconds:g} "
                f"(the trained clip length, seconds): they mark the part to generate"
            )
        mask = torch.ones(1, dom.channels, dom.length, dtype=torch.bool)  # [1, C, L], broadcast over the n samples
        mask[..., lo:hi] = False
        return Known(batch.x[:1], mask)

    def scorer(self, front_end: str = "logmel") -> Any:
        """The digit classifier's scorer of ``front_end`` (``logmel``, or ``wave``), fitted (or read from its cache)
        on first use."""
        if front_end == "logmel" and self._scorer is not None:
            return self._scorer
        if front_end != "logmel" and front_end in self._scorers:
            return self._scorers[front_end]
        from .metrics import make_scorer

        dom = self.domain
        scorer = make_scorer(
            dom.dataset("train"),
            dom.dataset(dom.reference_split),
            dom.sample_rate,
            dom.data_config(),
            dom.classifier_epochs,
            front_end=front_end,
        )
        if front_end == "logmel":
            self._scorer = scorer
        else:
            self._scorers[front_end] = scorer
        return scorer

    def _wave_row(self, row: dict[str, float], scores: dict[str, float]) -> dict[str, float]:
        """``row`` with the raw-waveform classifier's ``scores`` beside it, named ``wave_*``."""
        return {**row, **{f"wave_{k}": v for k, v in scores.items() if k != "num_samples"}}

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """FID, IS, mIS and AM from the digit classifier; label accuracy for conditional samples.

        Scores the clips clipped to [-1, 1], as :meth:`save_samples` writes them; the reference row scores the
        real clips as loaded (PCM files, as Speech Commands and the shipped set are, lie within [-1, 1])."""
        dom = self.domain
        if not dom.metrics or not dom.label_names:
            return {}
        if not enough_to_score(batch.num_samples, "audio", "clips"):  # before the classifier is fitted
            return {}
        x = batch.x.detach().float().cpu().clamp(-1.0, 1.0)  # [B, C, L] as save_wavs writes it
        if x.shape[1:] != (dom.channels, dom.length):
            return {}  # other lengths (prior.duration) have no reference statistics
        # An unconditional model's rows, like its reference row, have no label accuracy (files may still be
        # named by label).
        labels = batch.cond.get("label") if dom.conditional else None
        labels = labels.cpu() if labels is not None else None
        row = self.scorer().score(x, labels)
        return self._wave_row(row, self.scorer("wave").score(x, labels)) if dom.wave_metrics else row

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same metrics for ``n`` held-out real clips (at most the split's size): the reference row."""
        dom = self.domain
        if not dom.metrics or not dom.label_names:
            return {}
        row = self.scorer().reference_row(n, labelled=dom.conditional)
        if dom.wave_metrics:
            row = self._wave_row(row, self.scorer("wave").reference_row(n, labelled=dom.conditional))
        return row

    def reconstruction_distances(self, x: Tensor, x_hat: Tensor) -> dict[str, float]:
        """SI-SDR and multi-resolution STFT distance of a first stage's reconstructions ``x_hat`` of clips ``x``."""
        from .distances import reconstruction_distances

        return reconstruction_distances(x, x_hat)

    def report_items(self, samples: Batch | Sequence[Path], limit: Optional[int] = None) -> list[ReportItem]:
        """Every clip with a player and its log-mel spectrogram (axes, colour bar), grouped by label."""
        batch = self._batch_of(samples, (".wav", ".flac"), limit)
        if batch is None:
            return []
        rate, names = self.domain.sample_rate, self.domain.label_names
        waves = batch.x.detach().float().cpu().clamp(-1.0, 1.0)  # [B, C, L] as save_wavs writes them
        labels = batch.cond.get("label")
        groups = (
            [names[int(y)] if 0 <= int(y) < len(names) else "" for y in labels.cpu()]
            if labels is not None
            else [""] * len(waves)
        )
        titles = [f"{g or 'clip'} #{i}" for i, g in enumerate(groups)]
        pngs = spectrogram_pngs(waves, rate, titles)
        return [
            ReportItem("audio", title=t, group=g, png=png, wave=w.numpy(), sample_rate=rate)
            for t, g, png, w in zip(titles, groups, pngs, waves)
        ]


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
            n,
            over,
            float(peak.max()),
        )
        waves = waves.clamp(-1.0, 1.0)
    out_dir = Path(out_dir)
    paths = []
    for i, wave in enumerate(waves):
        suffix = f"_{label_slug(names[i])}" if names is not None else ""
        paths.append(write_audio(out_dir / f"{prefix}_{i:03d}{suffix}.wav", wave, sample_rate))
    return paths


def spectrogram_sheet(
    waves: Tensor,
    sample_rate: int,
    path: Path,
    titles: Optional[Sequence[str]] = None,
    cols: int = 4,
    max_clips: int = 32,
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
        ax.imshow(
            spec[i].numpy(),
            origin="lower",
            aspect="auto",
            vmin=lo,
            vmax=hi,
            cmap="magma",
            extent=(0, seconds, 0, spec.shape[1]),
        )
        ax.set_title(titles[i] if titles is not None else f"#{i}", fontsize=9)
    fig.suptitle(f"log-mel spectrograms ({sample_rate} Hz, {seconds:g} s)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def spectrogram_pngs(waves: Tensor, sample_rate: int, titles: Sequence[str]) -> list[bytes]:
    """One PNG per clip of ``waves [B, C, L]`` (first channel): its log-mel spectrogram against seconds and the mel
    bands' centre frequencies, with a colour bar in dB on a scale shared by the batch (80 dB below its peak)."""
    settings = mel_settings(sample_rate)
    spec = LogMel(sample_rate)(waves[:, :1].float())[:, 0] * (10 / math.log(10))  # [B, mels, frames], dB
    hi = float(spec.max())
    seconds = waves.shape[-1] / sample_rate
    mels = settings["n_mels"]
    fig, axes = new_figure(3.4, 2.3)
    ax = axes[0, 0]
    image = ax.imshow(
        spec[0].numpy(),
        origin="lower",
        aspect="auto",
        vmin=hi - 80,
        vmax=hi,
        cmap="magma",
        extent=(0, seconds, 0, mels),
    )
    fig.colorbar(image, ax=ax, label="dB")
    # The mel bands' centres (torchaudio's HTK scale), labelled in Hz at a few bands.
    top = 2595 * math.log10(1 + sample_rate / 2 / 700)
    ticks = [0, mels // 3, 2 * mels // 3, mels - 1]
    ax.set_yticks([t + 0.5 for t in ticks])
    ax.set_yticklabels([f"{700 * (10 ** (top * (t + 1) / (mels + 1) / 2595) - 1):.0f}" for t in ticks])
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_ylabel("Hz (mel bands)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(titles[0] if titles else "", fontsize=8)  # before the layout, which leaves room for it
    fig.tight_layout()
    pngs = []
    for i, title in enumerate(titles):  # one figure redrawn per clip: far faster than a figure each
        image.set_data(spec[i].numpy())
        ax.set_title(title, fontsize=8)
        pngs.append(figure_png(fig))
    return pngs
