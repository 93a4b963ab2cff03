"""A run's metrics log: ``metrics.jsonl`` (and TensorBoard where installed), trimmed to a checkpoint on resume."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["MetricsLog", "plain_metrics", "trim_metrics", "format_metrics"]

log = logging.getLogger("polydiff")


class MetricsLog:
    """Appends records to ``RUN/metrics.jsonl`` and their numbers to ``RUN/tensorboard`` (rank 0's job)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.tb = None
        else:
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (``kind``: train, eval or reference; ``step``; its figures)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record.get("step", 0))

    def media(self, step: int, items: Sequence[Any]) -> None:
        """Report items of a scored step's draw (:class:`polydiff.report_items.ReportItem`) to TensorBoard: clips
        with ``add_audio``, images, spectrograms and molecule depictions with ``add_image``, texts with ``add_text``."""
        if self.tb is None:
            return
        from .report_items import png_array

        for i, item in enumerate(items):
            tag = f"samples/{item.group or item.kind}/{i:03d}"
            if item.kind == "audio":
                wave = torch.as_tensor(item.wave, dtype=torch.float32).reshape(-1, item.wave.shape[-1])[:1]  # [1, L]
                self.tb.add_audio(tag, wave.clamp(-1, 1), step, sample_rate=item.sample_rate)
            if item.png is not None:
                picture = {"audio": "/spectrogram", "molecule": "/depiction"}.get(item.kind, "")
                self.tb.add_image(tag + picture, png_array(item.png), step, dataformats="HWC")
            if item.kind == "text":
                self.tb.add_text(tag, item.text, step)
        self.tb.flush()

    def close(self) -> None:
        """Flush TensorBoard's files."""
        if self.tb is not None:
            self.tb.close()


def _record_step(line: str, path: Path) -> tuple[float, str]:
    """The step and kind of one metrics.jsonl record; a torn line (a kill mid-write) counts as past every step."""
    try:
        record = json.loads(line)
        return float(record.get("step", 0)), str(record.get("kind", ""))
    except (ValueError, AttributeError):
        log.warning("%s: dropped a line that is not a JSON record (a kill during a write?): %r", path, line[:80])
        return math.inf, ""


def trim_metrics(path: Path, step: int, finished: bool) -> None:
    """Drop records logged after ``step`` (a run stopped between checkpoints logs them again), and where the run is
    ``finished``, its final evaluation, which running it again draws and scores anew."""
    path = Path(path)
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        at, kind = _record_step(line, path)
        return at < step or (at == step and not (finished and kind in ("eval", "reference")))

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and keep(line)]
    if len(kept) < len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        log.info(
            "metrics.jsonl: dropped %d record(s) %s",
            len(lines) - len(kept),
            f"of the final evaluation at step {step}, drawn again now"
            if finished
            else f"after step {step}, logged before the run stopped",
        )


def plain_metrics(metrics: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """``Domain.evaluate``'s figures as JSON values (one-element tensors and numpy scalars become numbers); a metric
    named like a field of the log record (``step``, ``kind``, ...) is logged as ``metric_NAME``."""
    plain = {}
    for key, value in metrics.items():
        if (isinstance(value, torch.Tensor) and value.numel() == 1) or isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (int, float, str, bool, type(None))):
            raise TypeError(
                f"Domain.evaluate returned {key!r}={value!r} ({type(value).__name__}): metrics must be "
                f"numbers (float(v)) or strings"
            )
        plain[f"metric_{key}" if key in record else key] = value
    return plain


def format_metrics(metrics: dict[str, Any], ranges: Optional[dict[str, list[float]]] = None) -> str:
    """``fid 192.3 [175–216], is 4.09 [...]``: floats to 4 significant digits, ranges where given."""
    parts = []
    for k, v in metrics.items():
        text = f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        if ranges and k in ranges:
            text += f" [{ranges[k][0]:.4g}–{ranges[k][1]:.4g}]"
        parts.append(text)
    return ", ".join(parts)
