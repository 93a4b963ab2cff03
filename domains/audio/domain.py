"""The audio domain: diffusion on raw waveforms ``[B, C, L]`` with a 1-D U-Net (DiffWave-style unconditional or
class-conditional generation). Data sets: :data:`.data.DATASETS`; files, inpainting and metrics: :mod:`.outputs`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from polydiff import NULL_LABEL, Batch, DenseSpace, Domain, Space

from .data import DATASETS, SPOKEN_DIGITS_DIR, ClipSet, dataset_of, load_clips, normalise_split
from .features import mel_settings
from .outputs import AudioOutputs

__all__ = ["AudioDomain", "DATASETS"]

log = logging.getLogger(__name__)


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
        wave_metrics: also score with a raw-waveform classifier (``wave_*`` metrics): a second front end, so that a
            mel-domain first stage (``latent.autoencoder=mel``) is not judged only by a classifier reading mels.
    """

    #: Settings a trained first stage must share with a latent recipe's domain (``latent.autoencoder=RUN``).
    first_stage_keys = ("sample_rate", "channels")

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
        wave_metrics: bool = False,
    ) -> None:
        super().__init__()
        source = dataset_of(dataset)
        if root is None and source.needs_root:
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
        self.wave_metrics = bool(wave_metrics)
        if int(classifier_epochs) < 1:
            raise ValueError(
                "domain.classifier_epochs must be at least 1 (epochs of the metric classifier's fit), "
                f"got {classifier_epochs}"
            )
        self.classifier_epochs = int(classifier_epochs)
        self.reference_split = normalise_split(reference_split)
        self.length = self._checked_length(self.duration, "domain.duration")
        self.sample_shape = (self.channels, self.length)
        # Label names of the data (also for metrics of unconditional models); class_names only when conditional.
        self.label_names: list[str] = list(source.labels)
        self.class_names = list(self.label_names) if self.conditional else []
        self._splits: dict[str, ClipSet] = {}

    def _checked_length(self, seconds: float, key: str) -> int:
        """Samples in ``seconds``; an error naming ``key`` below one spectrogram window (~32 ms)."""
        length = round(self.sample_rate * seconds)
        shortest = mel_settings(self.sample_rate)["n_fft"]
        if length < shortest:
            raise ValueError(
                f"{key}={seconds} gives {length} samples at {self.sample_rate} Hz; clips need at least "
                f"{shortest} ({shortest / self.sample_rate:.3f} s) for their spectrograms and metrics"
            )
        return length

    # ------------------------------------------------------------------ data
    def data_config(self) -> dict[str, Any]:
        """The settings that shape the decoded clips (the metric classifier's cache key, beside a hash of the
        training clips and labels themselves; no data location, so a moved copy of the same data reuses the
        weights)."""
        return {
            "dataset": self.dataset_name,
            "sample_rate": self.sample_rate,
            "length": self.length,
            "channels": self.channels,
            "crop": self.crop,
            "test_fraction": self.test_fraction,
            "limit": self.limit,
        }

    def dataset(self, split: str) -> ClipSet:
        split = normalise_split(split)
        if split not in self._splits:
            source = DATASETS[self.dataset_name]
            index = source.index(self.root, split, self.test_fraction)
            if split != "train" and not self.label_names:
                self.dataset("train")  # the train split fixes the label names and their order
            names = self.label_names or None
            clips = load_clips(
                index,
                self.sample_rate,
                self.channels,
                self.length,
                names,
                self.crop,
                self.limit,
                what=f"{self.dataset_name} {split} ({self.root})",
                note=source.note,
            )
            log.info(
                "%s %s: %d clips of %s at %d Hz",
                self.dataset_name,
                split,
                len(clips),
                tuple(clips.waves.shape[1:]),
                self.sample_rate,
            )
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
                raise ValueError(
                    f"{err} (the metrics need this split; domain.metrics=false trains without them)"
                ) from err

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

    def latent_network(self, shape: Sequence[int], **model: Any) -> nn.Module:
        """The U-Net for latents ``shape`` ``[C', T']`` (``latent.autoencoder``): 1-D over frames, ``C'`` channels."""
        from domains.unet import build_unet

        return build_unet(len(shape) - 1, int(shape[0]), len(self.class_names), model, "audio")

    def autoencoder(self, spec: str) -> Any:
        """The fixed first stage ``latent.autoencoder`` names: ``mel`` (64 log-mel bands in, Griffin-Lim out) or
        ``mel128`` (128 bands, 128 Griffin-Lim iterations: closer to the waveform, twice the latent). A trained one
        is a run folder of ``objective.name=autoencoder`` (:meth:`autoencoder_network`), loaded by the core."""
        from .mel_stage import FIXED_STAGES, MelAutoencoder

        if spec in FIXED_STAGES:
            return MelAutoencoder(self.sample_rate, self.channels, self.length, **FIXED_STAGES[spec])
        raise ValueError(
            f"latent.autoencoder={spec}: the audio domain's fixed first stages are {sorted(FIXED_STAGES)}; for a "
            "trained one give its run folder (polydiff train recipes/audio_autoencoder.yaml hydra.run.dir=RUN)"
        )

    def autoencoder_network(self, variational: bool = True, front: str = "wave", **model: Any) -> nn.Module:
        """The learned first stage (``objective.name=autoencoder``): on the waveform (``model.front=wave``,
        :class:`.autoencoder.WaveAutoencoder`) or on the mel stage's log-mels (``mel``, :class:`.MelVAE`)."""
        from polydiff.config import call_checked

        from .autoencoder import MelVAE, WaveAutoencoder

        fronts = {"wave": WaveAutoencoder, "mel": MelVAE}
        if front not in fronts:
            raise ValueError(f"model.front={front!r}: choose one of {sorted(fronts)}")
        given = {"in_channels": self.channels, "sample_rate": self.sample_rate, "variational": variational}
        if front == "mel":
            given["length"] = self.length
        taken = sorted(set(given) & set(model))
        if taken:
            raise KeyError(f"model.{taken[0]} is set from the data and the objective; remove it from the recipe")
        return call_checked(fronts[front], {**model, **given}, "model")

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
    def make_outputs(self) -> AudioOutputs:
        return AudioOutputs(self)

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
