"""What every ``polydiff`` command shares: one-line errors, user mistakes told apart from bugs, metrics, strict JSON."""

from __future__ import annotations

import json
import math
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

from .run_log import format_metrics as fmt_metrics

__all__ = ["USAGE", "fail", "user_message", "USER_ERRORS", "fmt_metrics", "fresh_dir", "check_writable", "json_text"]


USAGE = """usage: polydiff <command> [args]

commands:
  train RECIPE.yaml [hydra overrides]   train a recipe (a file, or a shipped recipe's name from any folder:
        audio_unet, audio_latent, image_unet, molecule_egnn), e.g.
        polydiff train recipes/audio_unet.yaml profile=cpu trainer.max_steps=500 hydra.run.dir=runs/audio
        (multirun: -m trainer.lr=1e-4,2e-4; every Hydra flag works)
  reflow RUN_DIR hydra.run.dir=NEW [overrides]   train a straighter flow on the noise-sample pairs of a trained
        run (rectified flow; starts from its weights), e.g. polydiff reflow runs/points hydra.run.dir=runs/points-2
        objective.steps=20 trainer.max_steps=500, then polydiff sample runs/points-2 sampler.name=euler sampler.steps=1
  distill RUN_DIR --method progressive|consistency hydra.run.dir=NEW [--steps N] [overrides]   a few-step student
        of a trained vp, flow or edm run (starts from its weights): progressive halves --teacher-steps (default
        64) down to --steps (default 4), a run per round (NEW/rounds/steps-M, the last in NEW); consistency learns a
        one-step map (objective.steps noise levels, default 18), e.g. polydiff distill runs/points --method consistency
        hydra.run.dir=runs/points-cd trainer.max_steps=1000, then polydiff sample runs/points-cd sampler.steps=2
        (--guidance S distils classifier-free guidance at scale S into it; default: the run's guidance.scale)
  sample RUN_DIR [--n N] [--eval] [--seeds K] [overrides]   write new samples from a run's last checkpoint, e.g.
        polydiff sample runs/audio --n 16 sampler.name=ddim sampler.steps=50 guidance.scale=3 label=seven
        polydiff sample runs/audio --n 4 --known take.wav known.start=0.4 known.end=0.6   (fill 0.4-0.6 s)
  eval RUN_DIR|RECIPE.yaml SAMPLES... [--json FILE] [domain.KEY=V]   score sample files (WAV/FLAC, SDF/XYZ,
        PNG/JPEG, .pt) made by any model with the domain's metrics, beside real held-out data, e.g.
        polydiff eval runs/audio other_model_wavs/ runs/audio/samples/sample-20261129-101500
  report RUN_DIR|SAMPLES_DIR [domain.KEY=V]   write RUN_DIR/report.html: one offline page of the recipe, curves,
        metrics beside real data, every sample (players, spectrograms, images, molecules in 3-D) and earlier steps
  bench [--suite quick|full] [--domains ...] [--recipe NAME=RECIPE.yaml]   benchmark the built-in domains and
        the example, plus any domain of your own given by its recipe
"""


def _finite(value: Any) -> Any:
    """``value`` with every float that JSON cannot hold (``inf``, ``-inf``, ``nan``) written as that string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_text(record: Any) -> str:
    """``record`` as strict JSON (RFC 8259) for the files a command writes: numbers a tensor or numpy holds become
    floats, and a bound with no end (``guidance.interval=[0,inf]``) or a metric that is not a number is written as
    the string ``"inf"`` or ``"nan"``, which every JSON reader takes (Python's own ``Infinity`` is not JSON)."""
    plain = json.loads(json.dumps(record, default=float))  # numpy and tensor scalars to floats first
    return json.dumps(_finite(plain), indent=1, allow_nan=False) + "\n"


def fail(msg: str) -> "SystemExit":
    return SystemExit(f"polydiff: error: {msg}")


USER_ERRORS = (KeyError, ValueError, FileNotFoundError, TypeError, ImportError, FloatingPointError, NotImplementedError)


def user_message(err: BaseException) -> str:
    """One line for the user: the error's message (its type where it has none) and, where it was raised in the
    user's own code (a domain of theirs), that place."""
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err) or type(err).__name__
    root = Path(__file__).resolve().parents[1]
    shipped = tuple(str(root / package) for package in ("polydiff", "domains", "benchmarks", "examples"))
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)  # the last is where it was raised, libraries aside
        if f.filename.startswith(shipped)
        or not any(part in f.filename for part in ("site-packages", "dist-packages", "<frozen"))
    ]
    if not frames or frames[-1].filename.startswith(shipped):
        return message
    return f"{message} (raised at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})"


def check_writable(folder: Path, inside: Sequence[str] = (), where: str = "") -> None:
    """Raise ``ValueError`` unless ``folder`` (and its sub-folders ``inside`` that exist) can be written, or created
    where it does not exist yet: a file is created and removed to find out (a read-only mount, permissions)."""
    label = f"{where}={folder}" if where.startswith("-") or "." in where else f"{where} {folder}"
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    for path in [probe, *(folder / name for name in inside if (folder / name).exists())]:
        if not path.is_dir():
            raise ValueError(f"{label}: {path} is a file, not a folder: choose another folder")
        try:
            tempfile.TemporaryFile(dir=path).close()
        except OSError as err:
            raise ValueError(
                f"{label}: {path} cannot be written ({err.strerror or err}): make it writable or choose another folder"
            ) from None


def fresh_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... where it exists (two draws within one second)."""
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    return candidate
