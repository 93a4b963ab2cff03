"""The audio domain: diffusion on raw waveforms ``[B, C, L]`` with a 1-D U-Net (DiffWave-style unconditional/class-conditional generation)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from polydiff.conditioning import NULL_LABEL
from polydiff.domain import Batch, Domain
from polydiff.samplers import Known
from polydiff.space import DenseSpace, Space

from domains.classifier import enough_to_score

from .data import (
    DIGITS, SC09_DELETE_NOTE, SPOKEN_DIGITS_DIR, ClipSet, folder_index, load_clips, normalise_split, sample_index,
    sc09_index, spoken_digits_index,
)
from .io import Conversions, load_clip
from .features import mel_settings
from .outputs import save_wavs, spectrogram_sheet

__all__ = ["AudioDomain", "DATASETS"]

log = logging.getLogger(__name__)

DATASETS = ("spoken_digits", "folder", "sc09")


class AudioDomain(Domain):
    """Waveforms from the shipped spoken digits, a folder of WAV/FLAC files, or Speech Commands SC09.

    Args (the recipe's ``domain:`` section):
        dataset: ``spoken_digits`` (shipped, no download), ``folder`` or ``sc09``.
        root: the data folder; ``None`` means the shipped set for ``spoken_digits`` (required otherwise).
        sample_rate: rate in Hz the clips are resampled to on load.
        duration: clip length in seconds; longer clips are cropped, shorter zero-padded (both logged).
        channels: output channel count; multi-channel files are mixed to mono when 1 (logged).
        conditional: train a class-conditional model on the labels (sub-folder names).
        crop: keep the ``start`` or the ``center`` of clips longer than ``duration``.
        test_fraction: share of a flat folder held out as the test split (fixed by a hash of each path).
        limit: keep at most this many clips per split (an evenly strided subset), for quick runs.
        metrics: score samples with the SC09 classifier protocol (needs labelled data).
        classifier_epochs: training epochs of the metric classifier.
        reference_split: the held-out split scored as the reference row (FID statistics come from "train").
    """

    def __init__(
        self,
        dataset: str = "spoken_digits",
        root: Optional[str] = None,
        sample_rate: int = 16000,
        duration: float = 1.0,
        channels: int = 1,
        conditional: bool = True,
        crop: str = "start",
        test_fraction: float = 0.1,
        limit: Optional[int] = None,
        metrics: bool = True,
        classifier_epochs: int = 10,
        reference_split: str = "test",
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown domain.dataset {dataset!r}; choose one of {list(DATASETS)}")
        if root is None and dataset != "spoken_digits":
            raise ValueError(f"domain.dataset={dataset!r} needs domain.root (the folder holding the audio)")
        if int(sample_rate) < 100:
            raise ValueError(f"domain.sample_rate={sample_rate} must be a rate in Hz (>= 100)")
        if not duration > 0:
            raise ValueError(f"domain.duration={duration} must be a positive number of seconds")
        if limit is not None and limit < 1:
            raise ValueError(f"domain.limit={limit} must be at least 1 clip per split (or null for all)")
        if int(channels) < 1:
            raise ValueError(f"domain.channels={channels} must be >= 1")
        if crop not in ("start", "center"):
            raise ValueError(f"domain.crop={crop!r} must be 'start' or 'center'")
        if not 0 < test_fraction < 1:
            raise ValueError(f"domain.test_fraction={test_fraction} must be in (0, 1)")
        self.dataset_name = dataset
        self.root = Path(root).expanduser() if root is not None else SPOKEN_DIGITS_DIR
        self.sample_rate = int(sample_rate)
        self.duration = float(duration)
        self.channels = int(channels)
        self.conditional = bool(conditional)
        self.crop = crop
        self.test_fraction = float(test_fraction)
        self.limit = limit
        self.metrics = bool(metrics)
        if int(classifier_epochs) < 1:
            raise ValueError(f"domain.classifier_epochs must be at least 1 (epochs of the metric classifier's fit), got {classifier_epochs}")
        self.classifier_epochs = int(classifier_epochs)
        self.reference_split = normalise_split(reference_split)
        self.length = self._checked_length(self.duration, "domain.duration")
        self.sample_shape = (self.channels, self.length)
        # Label names of the data (also for metrics of unconditional models); class_names only when conditional.
        self.label_names: list[str] = list(DIGITS) if dataset in ("spoken_digits", "sc09") else []
        self.class_names = list(self.label_names) if self.conditional else []
        self._splits: dict[str, ClipSet] = {}
        self._scorer: Any = None

    def _checked_length(self, seconds: float, key: str) -> int:
        """Samples in ``seconds``; an error naming ``key`` below one spectrogram window (~32 ms)."""
        length = round(self.sample_rate * seconds)
        shortest = mel_settings(self.sample_rate)["n_fft"]
        if length < shortest:
            raise ValueError(f"{key}={seconds} gives {length} samples at {self.sample_rate} Hz; clips need at least "
                             f"{shortest} ({shortest / self.sample_rate:.3f} s) for their spectrograms and metrics")
        return length

    # ------------------------------------------------------------------ data
    def data_config(self) -> dict[str, Any]:
        """The settings that shape the decoded clips (the metric classifier's cache key, beside a hash of the
        training clips and labels themselves; no data location, so a moved copy of the same data reuses the weights)."""
        return {
            "dataset": self.dataset_name, "sample_rate": self.sample_rate,
            "length": self.length, "channels": self.channels, "crop": self.crop,
            "test_fraction": self.test_fraction, "limit": self.limit,
        }

    def dataset(self, split: str) -> ClipSet:
        split = normalise_split(split)
        if split not in self._splits:
            if self.dataset_name == "spoken_digits":
                index = spoken_digits_index(self.root, split)
            elif self.dataset_name == "sc09":
                index = sc09_index(self.root, split)
            else:
                index = folder_index(self.root, split, self.test_fraction)
            if split != "train" and not self.label_names:
                self.dataset("train")  # the train split fixes the label names and their order
            names = self.label_names or None
            clips = load_clips(
                index, self.sample_rate, self.channels, self.length, names, self.crop, self.limit,
                what=f"{self.dataset_name} {split} ({self.root})",
                note=SC09_DELETE_NOTE if self.dataset_name == "sc09" else "",
            )
            log.info("%s %s: %d clips of %s at %d Hz", self.dataset_name, split, len(clips), tuple(clips.waves.shape[1:]), self.sample_rate)
            if self.conditional and not clips.class_names:
                raise ValueError(
                    f"domain.conditional=true but the {split} clips under {self.root} have no labels; "
                    "put them in one sub-folder per label or set domain.conditional=false"
                )
            self._splits[split] = clips
            if split == "train" and not self.label_names:
                self.label_names = list(clips.class_names)
                self.class_names = list(self.label_names) if self.conditional else []
        return self._splits[split]

    def setup(self, train_set: ClipSet) -> None:
        self.sample_shape = tuple(train_set.waves.shape[1:])
        if not self.label_names:
            self.label_names = list(train_set.class_names)
            self.class_names = list(self.label_names) if self.conditional else []
        if self.metrics and self.label_names:  # metrics score the held-out split after training: check it now
            try:
                self.dataset(self.reference_split)
            except (ValueError, FileNotFoundError) as err:
                raise ValueError(f"{err} (the metrics need this split; domain.metrics=false trains without them)") from err

    def collate(self, items: Sequence[tuple[Tensor, int]]) -> Batch:
        """Waves ``[B, C, L]`` stacked as :meth:`Domain.collate` does; labels ``[B]`` only when conditional."""
        batch = super().collate(items)
        if not self.conditional:
            batch.cond.pop("label")
        return batch

    # --------------------------------------------------------------- network
    def build_network(self, **model: Any) -> nn.Module:
        """A 1-D :class:`domains.unet.UNet`; ``in_channels`` and ``num_classes`` come from the data."""
        from domains.unet import build_unet

        if self.conditional and not self.class_names:
            raise RuntimeError("the audio domain's labels are unknown: call setup(train_set) or load_state_dict first")
        return build_unet(1, self.channels, len(self.class_names), model, "audio")

    # -------------------------------------------------------------- sampling
    def prior(
        self,
        n: int,
        labels: Optional[Tensor] = None,
        device: torch.device | str = "cpu",
        generator: Optional[torch.Generator] = None,
        duration: Optional[float] = None,
    ) -> tuple[Space, dict[str, Tensor]]:
        """``n`` clips of the trained length, or of ``duration`` seconds (``prior.duration=2.0``)."""
        length = self.length if duration is None else self._checked_length(float(duration), "prior.duration")
        space = DenseSpace((n, self.channels, length), device_=torch.device(device))
        cond: dict[str, Tensor] = {}
        if self.class_names:
            if labels is None:
                labels = torch.full((n,), NULL_LABEL, dtype=torch.long)
            cond["label"] = labels.to(device=device, dtype=torch.long)
        return space, cond

    # --------------------------------------------------------------- outputs
    def _names(self, batch: Batch) -> Optional[list[str]]:
        labels = batch.cond.get("label")
        if labels is None or not self.class_names:
            return None
        return [self.class_names[int(y)] if int(y) >= 0 else "uncond" for y in labels.cpu()]

    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        """One 16-bit WAV per clip (named by label when conditional) and a PNG sheet of spectrograms."""
        waves = batch.x.detach().float().cpu()  # [B, C, L]
        names = self._names(batch)
        paths = save_wavs(waves, self.sample_rate, Path(out_dir), prefix, names)
        titles = [p.stem for p in paths]
        paths.append(spectrogram_sheet(waves.clamp(-1, 1), self.sample_rate, Path(out_dir) / f"{prefix}_spectrograms.png", titles))
        return paths

    def read_samples(self, path: Path) -> Batch:
        """Clips generated elsewhere (a WAV/FLAC file or a folder), converted like training data
        (resampled, channels, cropped or padded to the trained length; each conversion logged).
        Labels come from file or folder names (see :func:`~domains.audio.data.sample_index`)."""
        index = sample_index(Path(path), self.label_names)
        conv = Conversions()
        waves = torch.stack([load_clip(f, self.sample_rate, self.channels, self.length, conv, self.crop) for f, _ in index])
        conv.report(f"samples ({path})", self.sample_rate, self.channels, self.length)
        named = [label for _, label in index if label is not None]
        cond: dict[str, Tensor] = {}
        if named:
            cond["label"] = torch.tensor([self.label_names.index(lab) if lab else NULL_LABEL for _, lab in index])
            if len(named) < len(index):
                log.info("samples (%s): %d of %d files have no known label in their name; label accuracy scores "
                         "the %d that do", path, len(index) - len(named), len(index), len(named))
        return Batch(waves, DenseSpace(tuple(waves.shape)), cond)

    def known_values(self, path: Path, n: int, start: float = 0.0, end: Optional[float] = None) -> Known:
        """Inpainting or continuation of a recording: the clip at ``path`` (converted like training data) is
        kept outside ``[start, end)`` seconds, which is generated; ``end`` defaults to the clip's end."""
        batch = self.read_samples(Path(path))
        if batch.num_samples != 1:
            raise ValueError(f"--known {path} holds {batch.num_samples} clips: give one WAV/FLAC file")
        seconds = self.length / self.sample_rate
        if float(start) == 0.0 and end is None:
            raise ValueError(f"--known {path} needs known.start=S and/or known.end=E (seconds, within {seconds:g}): "
                             "the part to generate; the rest of the clip is kept")
        lo, hi = round(float(start) * self.sample_rate), self.length if end is None else round(float(end) * self.sample_rate)
        if not 0 <= lo < hi <= self.length:
            raise ValueError(f"known.start={start} and known.end={end} must satisfy 0 <= start < end <= {seconds:g} "
                             f"(the trained clip length, seconds): they mark the part to generate")
        mask = torch.ones(1, self.channels, self.length, dtype=torch.bool)  # [1, C, L], broadcast over the n samples
        mask[..., lo:hi] = False
        return Known(batch.x[:1], mask)

    def _get_scorer(self) -> Any:
        if self._scorer is None:
            from .metrics import make_scorer

            train = self.dataset("train")
            self._scorer = make_scorer(
                train, self.dataset(self.reference_split), self.sample_rate, self.data_config(), self.classifier_epochs
            )
        return self._scorer

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """FID, IS, mIS and AM from the digit classifier; label accuracy for conditional samples.

        Scores the clips clipped to [-1, 1], as :meth:`save_samples` writes them; the reference row scores the
        real clips as loaded (PCM files, as Speech Commands and the shipped set are, lie within [-1, 1])."""
        if not self.metrics or not self.label_names:
            return {}
        if not enough_to_score(batch.num_samples, "audio", "clips"):  # before the classifier is fitted
            return {}
        x = batch.x.detach().float().cpu().clamp(-1.0, 1.0)  # [B, C, L] as save_wavs writes it
        if x.shape[1:] != (self.channels, self.length):
            return {}  # other lengths (prior.duration) have no reference statistics
        # An unconditional model's rows, like its reference row, have no label accuracy (files may still be named by label).
        labels = batch.cond.get("label") if self.conditional else None
        return self._get_scorer().score(x, labels.cpu() if labels is not None else None)

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same metrics for ``n`` held-out real clips (at most the split's size): the reference row."""
        if not self.metrics or not self.label_names:
            return {}
        return self._get_scorer().reference_row(n, labelled=self.conditional)

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "label_names": list(self.label_names), "sample_rate": self.sample_rate}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.label_names = list(state.get("label_names", self.class_names))
        rate = int(state.get("sample_rate", self.sample_rate))
        if rate != self.sample_rate:
            raise ValueError(f"checkpoint was trained at {rate} Hz but domain.sample_rate={self.sample_rate}")
        self.channels, self.length = int(self.sample_shape[0]), int(self.sample_shape[1])
