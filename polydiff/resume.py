"""Resuming a run: which checkpoint a run starts from, and whether a recipe can go on from it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "IncompatibleCheckpointError",
    "check_compatible",
    "check_resumable",
    "resume_source",
    "move_previous_run",
    "start_from",
]

log = logging.getLogger("polydiff")


class IncompatibleCheckpointError(ValueError):
    """A checkpoint from another domain or with an incompatible network/diffusion config."""


# Config sections that must match for a checkpoint to be resumed or sampled.
_MUST_MATCH = (
    "domain.name",
    "model",
    "schedule",
    "objective.name",
    "objective.prediction",
    "objective.variance",
    "objective.precond",
    "objective.sigma_data",
)


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    if dotted.startswith("objective."):  # with the objective's defaults: a config may leave them out (or the name)
        from .objectives import objective_settings

        cfg = {**cfg, "objective": objective_settings(cfg.get("objective") or {})}
    for part in dotted.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, Mapping) else None
    return cfg


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`IncompatibleCheckpointError` naming every key that differs."""
    diffs = [key for key in _MUST_MATCH if _get(saved, key) != _get(current, key)]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {_get(saved, k)!r} vs recipe {_get(current, k)!r}" for k in diffs)
        raise IncompatibleCheckpointError(
            f"checkpoint {path} does not fit this recipe ({detail}). Use another hydra.run.dir, "
            f"or trainer.resume=never to start afresh (the old run's files move to a previous-TIME folder)."
        )


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """:func:`check_compatible`, and a checkpoint already past ``trainer.max_steps`` refused."""
    check_compatible(saved["config"], current, path)
    step, max_steps = int(saved["step"]), current["trainer"]["max_steps"]
    if step > max_steps:
        raise ValueError(
            f"checkpoint {path} is at step {step}, past trainer.max_steps={max_steps}: raise trainer.max_steps to "
            f"train on, or draw samples from it with polydiff sample"
        )


def resume_source(mode: str, own: Path) -> Path | None:
    """The checkpoint a run starts from under ``trainer.resume=mode``, ``None`` for a fresh start.

    The run's own ``last.pt`` wins over ``resume=PATH``: a run started from PATH and stopped goes on
    from its own progress when the same command runs again, rather than from PATH over it.
    """
    if mode == "never":
        return None
    if own.is_file():
        return own
    if mode == "auto":
        return None
    path = Path(mode)
    if path.is_dir():
        raise FileNotFoundError(
            f"trainer.resume={mode} is a folder: give a checkpoint file, e.g. "
            f"trainer.resume={path / 'checkpoints' / 'last.pt'}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={mode!r} is neither auto, never nor an existing checkpoint file")
    return path


def move_previous_run(run_dir: Path) -> Path:
    """``trainer.resume=never`` in a used run folder: move its results (and their report page) to ``previous-TIME/``
    rather than overwrite them; returns that folder."""
    run_dir = Path(run_dir)
    old = run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    old.mkdir(parents=True)
    for name in ("checkpoints", "samples", "metrics.jsonl", "tensorboard", "report.html"):
        if (run_dir / name).exists():
            (run_dir / name).rename(old / name)
    log.warning("trainer.resume=never: the previous run's checkpoints, samples, metrics and report moved to %s", old)
    return old


def start_from(path: str | Path, cfg: Mapping[str, Any], net: Any, ema: Any) -> None:
    """Load the EMA weights of the run or checkpoint ``path`` (``trainer.init``) into a fresh run's network and EMA;
    the two runs must share the domain and the network's config (the objective may differ: reflow, distillation)."""
    from .checkpoint import load_checkpoint, run_checkpoint

    ckpt_path = run_checkpoint(path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"trainer.init={path}: no checkpoint there (give a run folder or a checkpoint file)")
    saved = load_checkpoint(ckpt_path, map_location="cpu")
    diffs = [k for k in ("domain.name", "model") if _get(saved["config"], k) != _get(cfg, k)]
    if diffs:
        detail = "; ".join(f"{k}: {_get(saved['config'], k)!r} there vs {_get(cfg, k)!r} here" for k in diffs)
        raise IncompatibleCheckpointError(
            f"trainer.init={path} holds another network ({detail}): start from a run of the same domain and model"
        )
    state = {k[len("module.") :]: v for k, v in saved["ema"].items() if k.startswith("module.")}
    state = _across_variance_head(state, _get(saved["config"], "objective.variance") == "learned", net)
    net.load_state_dict(state)
    ema.module.load_state_dict(state)
    log.info("started from the EMA weights of %s (step %d)", ckpt_path, int(saved["step"]))


def _across_variance_head(state: dict[str, Any], saved_learned: bool, net: Any) -> dict[str, Any]:
    """Weights of a run with (without) Improved DDPM's learned-variance head for a network without (with) one: the
    denoiser's weights, the head dropped (or kept at its initial values, to be learned)."""
    from .variance import LearnedVariance

    if saved_learned and not isinstance(net, LearnedVariance):
        log.info("trainer.init: the run's learned-variance head is left out; its denoiser's weights are used")
        return {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    if isinstance(net, LearnedVariance) and not saved_learned:
        log.info("trainer.init: the learned-variance head starts afresh on the run's denoiser")
        head = {f"head.{k}": v for k, v in net.head.state_dict().items()}
        return {**{f"net.{k}": v for k, v in state.items()}, **head}
    return state
