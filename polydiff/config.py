"""Structured recipe configs (Hydra ConfigStore) and checked construction from them.

Each section mirrors a constructor or function signature. A recipe lists the schema
``polydiff_recipe`` first in its defaults, so a misspelled key in ``trainer``, ``sampler``,
``guidance``, ``schedule`` or ``objective`` fails at composition; :func:`check_keys` names it
with the likely fix, also for keys added with Hydra's ``+`` (which the schema would otherwise
carry along unused). The free-form ``domain`` and ``model`` sections are checked against the
domain's constructor and ``build_network`` signatures by :func:`call_checked`.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "ScheduleConfig",
    "ObjectiveConfig",
    "TrainerConfig",
    "SamplerConfig",
    "GuidanceConfig",
    "RecipeConfig",
    "register_configs",
    "call_checked",
    "check_call",
    "check_keys",
    "check_overrides",
    "unknown_key",
    "check_trainer",
]


@dataclass
class ScheduleConfig:
    """Arguments of :func:`polydiff.schedules.make_schedule` (``None`` = the schedule's default)."""

    name: str = "cosine"
    steps: int = 1000
    zero_terminal_snr: bool = False
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    offset: Optional[float] = None
    power: Optional[float] = None
    precision: Optional[float] = None
    betas: Optional[List[float]] = None


@dataclass
class ObjectiveConfig:
    """Arguments of :class:`polydiff.objectives.Objective`."""

    prediction: str = "eps"  # eps | v | x0
    weighting: str = "uniform"  # uniform | min_snr
    gamma: float = 5.0  # min-SNR-gamma (Hang et al. 2023)


@dataclass
class TrainerConfig:
    """Arguments of :class:`polydiff.trainer.Trainer`."""

    max_steps: int = 10_000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 500
    lr_decay: str = "constant"  # constant | cosine
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    ema_decay: float = 0.999
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    ckpt_every: int = 1000  # checkpoints/last.pt, replaced each time
    keep_every: int = 0  # also keep checkpoints/step_NNNNNNN.pt every this many steps (0: last.pt only)
    sample_every: int = 0  # 0: sample only at the end
    num_samples: int = 16
    eval: bool = True  # compute the domain's metrics when sampling
    log_every: int = 50
    label_dropout: float = 0.1  # classifier-free guidance training (conditional domains)
    # auto (the run dir's last.pt if any) | never | PATH (start there; the run's own last.pt, once written, wins)
    resume: str = "auto"
    progress: bool = True


@dataclass
class SamplerConfig:
    """Arguments of :func:`polydiff.samplers.sample`."""

    name: str = "ddim"  # ddpm | ddim | dpmpp_2m
    steps: int = 50
    eta: float = 0.0  # ddim
    spacing: str = "trailing"  # trailing | leading | linspace
    variance: str = "small"  # ddpm: small | large
    clip_x0: Optional[float] = None  # off: non-image data is not in [-1, 1]
    batch_size: Optional[int] = 64  # samples per chunk of a draw (null: all at once)
    precision: str = "fp32"  # fp32 | bf16 (the network under bf16 autocast, e.g. on a GPU; the sampler's arithmetic stays fp32)


@dataclass
class GuidanceConfig:
    """Guidance of :func:`polydiff.generate.generate`: ``scale`` and ``rescale`` of
    :func:`polydiff.guidance.stacked_guidance` or ``classifier_free_guidance``, ``batched`` which of the two."""

    scale: float = 1.0  # 1 = conditional model, 0 = unconditional model
    rescale: float = 0.0  # guidance rescale phi (Lin et al. 2024)
    # true: one network call per step on the conditional and unconditional rows stacked (twice the activations);
    # false: two calls; null: stacked on CUDA, two calls elsewhere (faster on the CPU: bench_audio_sampling.py)
    batched: Optional[bool] = None


@dataclass
class RecipeConfig:
    """A recipe: a domain (by registry name) with its network, diffusion and training settings."""

    domain: Dict[str, Any] = field(default_factory=dict)  # {name: ..., **domain constructor args}
    model: Dict[str, Any] = field(default_factory=dict)  # build_network(**model)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    seed: int = 0


_REGISTERED = False


def register_configs() -> None:
    """Put the recipe schema in Hydra's ConfigStore as ``polydiff_recipe``."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="polydiff_recipe", node=RecipeConfig)
    _REGISTERED = True


SECTIONS: Dict[str, type] = {
    "schedule": ScheduleConfig,
    "objective": ObjectiveConfig,
    "trainer": TrainerConfig,
    "sampler": SamplerConfig,
    "guidance": GuidanceConfig,
}


def unknown_key(where: str, key: str, known: List[str], owner: str = "") -> KeyError:
    """``KeyError`` naming ``where.key``, the closest known key and the known keys."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{where}.{close[0]}'?" if close else ""
    return KeyError(f"unknown key '{where}.{key}'{f' for {owner}' if owner else ''}.{hint} Known keys: {known}")


def check_keys(cfg: Mapping[str, Any]) -> None:
    """Raise :func:`unknown_key` for any key of a recipe outside :class:`RecipeConfig` and its typed sections."""
    top = list(RecipeConfig.__dataclass_fields__)
    for key in cfg:
        if key not in top:
            raise unknown_key("recipe", str(key), top)
    for section, schema in SECTIONS.items():
        known = list(schema.__dataclass_fields__)
        for key in cfg.get(section) or {}:
            if key not in known:
                raise unknown_key(section, str(key), known, schema.__name__)


def check_overrides(overrides: Sequence[str]) -> None:
    """Check ``[+|++]section.key=value`` command-line overrides of the typed sections before Hydra sees them."""
    for item in overrides:
        path = item.split("=", 1)[0].lstrip("+")
        parts = path.split(".")
        if "=" in item and len(parts) >= 2 and parts[0] in SECTIONS:
            known = list(SECTIONS[parts[0]].__dataclass_fields__)
            if parts[1] not in known:
                raise unknown_key(parts[0], parts[1], known, SECTIONS[parts[0]].__name__)


def call_checked(fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> Any:
    """Call ``fn(**kwargs)``, rejecting unknown keys with a message naming ``where`` and the fix."""
    check_call(fn, kwargs, where)
    return fn(**kwargs)


def check_call(fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str, given: Sequence[str] = ()) -> None:
    """Raise ``KeyError`` naming ``where.KEY`` for keys ``fn`` does not take or required keys missing, and
    ``TypeError`` for a value whose type contradicts a plain annotation (int, float, bool, str, optional).

    ``given`` names parameters the caller passes itself: they are neither config keys nor missing.
    """
    sig = inspect.signature(fn)
    params = sig.parameters
    owner = getattr(fn, "__qualname__", str(fn))
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        known = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and n != "self" and n not in given]
        for key in kwargs:
            if key not in known:
                raise unknown_key(where, key, known, owner)
        missing = [
            n
            for n, p in params.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and n != "self"
            and n not in kwargs
            and n not in given
        ]
        if missing:
            raise KeyError(f"missing key(s) {[f'{where}.{m}' for m in missing]} for {owner}")
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # annotations that do not evaluate here: nothing to check
        return
    for key, value in kwargs.items():
        if key in hints and _accepts(value, hints[key]) is False:
            raise TypeError(f"{where}.{key}={value!r} has the wrong type: it must be {_describe(hints[key])}")


_PLAIN = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _accepts(value: Any, tp: Any) -> Optional[bool]:
    """Whether ``value`` fits the annotation ``tp``; ``None`` where the annotation is not a plain one."""
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp in (bool, str, type(None)):
        return isinstance(value, tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        verdicts = [_accepts(value, arg) for arg in typing.get_args(tp)]
        return True if True in verdicts else (None if None in verdicts else False)
    return None


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(tp))
    return _PLAIN.get(tp, getattr(tp, "__name__", str(tp)))


# trainer.KEY -> (lowest allowed value, highest or None): checked before anything is built.
_LIMITS = {
    "max_steps": (1, None), "batch_size": (1, None), "grad_accum": (1, None), "log_every": (1, None),
    "ckpt_every": (1, None), "keep_every": (0, None), "num_samples": (1, None), "warmup_steps": (0, None),
    "sample_every": (0, None), "num_workers": (0, None), "grad_clip": (0, None), "weight_decay": (0, None), "label_dropout": (0, 1),
    "lr": (0, None), "ema_decay": (0, 1),
}


# trainer.KEY -> its allowed values: checked before anything is built (or a previous run moved aside).
_CHOICES = {"precision": ("auto", "fp32", "bf16"), "lr_decay": ("constant", "cosine")}


def check_trainer(tc: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming any ``trainer`` value outside its range or choices."""
    for key, choices in _CHOICES.items():
        if key in tc and tc[key] not in choices:
            raise ValueError(f"unknown trainer.{key} {tc[key]!r}; choose one of {list(choices)}")
    betas = tc.get("betas")
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        raise ValueError(f"trainer.betas={list(betas)} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    for key, (low, high) in _LIMITS.items():
        value = tc.get(key)
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"trainer.{key}={value} is out of range: it must be {span}")
