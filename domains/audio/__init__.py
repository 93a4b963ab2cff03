"""Audio domain: diffusion on raw waveforms (spoken digits, folders of WAV/FLAC files, SC09)."""

from .domain import AudioDomain

__all__ = ["AudioDomain"]
