"""Structured recipe configs (Hydra ConfigStore) and checked construction from them.

Each section mirrors a constructor or function signature. A recipe lists the schema
``polydiff_recipe`` first in its defaults, so a misspelled key in ``trainer``, ``sampler``,
``guidance``, ``schedule`` or ``objective`` fails at composition; :func:`check_keys` names it
with the likely fix, also for keys added with Hydra's ``+`` (which the schema would otherwise
carry along unused). The free-form ``domain`` and ``model`` sections are checked against the
domain's constructor and ``build_network`` signatures by :func:`call_checked`.

The ``sampler`` and ``objective`` sections name a plug-in (``name``): beside the schema's keys they
hold that plug-in's own options (``sampler.eta``, ``objective.prediction``), which Hydra lets a
command line set without ``+`` and which are checked against the plug-in's signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .guidance import CLASSIFIER_INTERVAL
from .plugins import call_checked, check_call, unknown_key  # noqa: F401  (re-exported: config mirrors constructors)

__all__ = [
    "ScheduleConfig",
    "ObjectiveConfig",
    "TrainerConfig",
    "SamplerConfig",
    "GuidanceConfig",
    "LatentConfig",
    "RecipeConfig",
    "register_configs",
    "call_checked",
    "check_call",
    "check_keys",
    "check_overrides",
    "check_section",
    "sampler_section",
    "merge_sampler",
    "retarget_plugins",
    "open_section",
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
    """The objective by its registry name (:func:`polydiff.objectives.get_objective`); the section's other keys are
    that class's constructor arguments, e.g. ``vp``'s ``prediction`` (eps | v | x0), ``weighting`` (uniform |
    min_snr) and ``gamma``."""

    name: str = "vp"  # a registered objective, or module:Class


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
    threads: int = 0  # CPU threads of torch's operations (0: torch's default; 1 on a CPU shared with other jobs)
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
    # null | a run folder or checkpoint whose EMA weights a fresh run starts from (fine-tuning, reflow, distillation)
    init: Optional[str] = None
    progress: bool = True


@dataclass
class SamplerConfig:
    """The sampler (:func:`polydiff.samplers.get_sampler`), its steps, the options every sampler takes and the
    generation settings of :func:`polydiff.generate.generate`; the section's other keys are the chosen sampler's own
    keyword arguments (``eta`` of ddim, ``variance`` of ddpm: small | large)."""

    name: str = "ddim"  # ddpm | ddim | dpmpp_2m, another registered sampler, or module:function
    steps: int = 50
    spacing: str = "trailing"  # trailing | leading | linspace
    clip_x0: Optional[float] = None  # off: non-image data is not in [-1, 1]
    # Generation settings, never passed to the sampler:
    batch_size: Optional[int] = 64  # samples per chunk of a draw (null: all at once)
    # fp32 | bf16: the network under bf16 autocast (e.g. on a GPU); the sampler's arithmetic stays fp32
    precision: str = "fp32"


@dataclass
class GuidanceConfig:
    """Guidance of :func:`polydiff.generate.generate`: ``scale`` and ``rescale`` of
    :func:`polydiff.guidance.stacked_guidance` or ``classifier_free_guidance``, ``batched`` which of the two;
    ``classifier``, ``classifier_scale`` and ``target`` of :func:`polydiff.guidance.classifier_guidance`;
    ``interval`` and ``classifier_interval`` the noise levels where each acts."""

    scale: float = 1.0  # 1 = conditional model, 0 = unconditional model
    rescale: float = 0.0  # guidance rescale phi (Lin et al. 2024)
    # true: one network call per step on the conditional and unconditional rows stacked (twice the activations);
    # false: two calls; null: stacked on CUDA, two calls elsewhere (faster on the CPU: bench_audio_sampling.py)
    batched: Optional[bool] = None
    # Classifier guidance (polydiff.classifier_guide): a classifier run's folder or checkpoint (objective.name=
    # classifier), its gradient's weight, and the value a property regressor steers to (units of prior.KEY; null: the
    # model's own condition).
    classifier: Optional[str] = None
    classifier_scale: float = 1.0
    target: Optional[float] = None
    # Guidance only at the noise levels sigma / alpha (EDM's sigma) in [lo, hi] (Kynkaenniemi et al. 2024), null: at
    # all; the classifier's default leaves out nearly pure noise, where its gradient is least reliable.
    interval: Optional[List[float]] = None
    classifier_interval: Optional[List[float]] = field(default_factory=lambda: list(CLASSIFIER_INTERVAL))


@dataclass
class LatentConfig:
    """Latent diffusion (:func:`polydiff.latent.latent_domain`): the first stage the domain is diffused through."""

    autoencoder: Optional[str] = (
        None  # null: diffuse the data itself | mel (audio) | a trained autoencoder's run folder
    )


@dataclass
class RecipeConfig:
    """A recipe: a domain (by registry name) with its network, diffusion and training settings."""

    domain: Dict[str, Any] = field(default_factory=dict)  # {name: ..., **domain constructor args}
    model: Dict[str, Any] = field(default_factory=dict)  # build_network(**model)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: open_section(ObjectiveConfig))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampler: SamplerConfig = field(default_factory=lambda: open_section(SamplerConfig))
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    seed: int = 0


def open_section(schema: type) -> Any:
    """``schema`` as a typed OmegaConf node that also takes keys of its own (a plug-in's options): its fields keep
    their types, and Hydra lets ``section.KEY=V`` add a key without ``+``."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(schema)
    OmegaConf.set_struct(node, False)  # set on the node itself: Hydra's struct flag on the root does not close it
    return node


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
    "latent": LatentConfig,
}
# The sections that name a plug-in: their keys beyond the schema's are the plug-in's options.
PLUGIN_SECTIONS = ("sampler", "objective")


def _plugins(section: str) -> tuple[Mapping[str, Any], Callable[[str], Mapping[str, Any]], Callable[..., None]]:
    """The registry of a plug-in section, the options of a plug-in by name, and the check of given options."""
    if section == "sampler":
        from .samplers import SAMPLERS, check_sampler_options, sampler_options

        return SAMPLERS, sampler_options, check_sampler_options
    from .objectives import LATER, OBJECTIVES, check_objective_options, get_objective, objective_options

    for name in LATER:  # the objectives that load runs join the table their options are listed from
        get_objective(name)
    return OBJECTIVES, objective_options, check_objective_options


def check_keys(cfg: Mapping[str, Any]) -> None:
    """Raise :func:`unknown_key` for any key of a recipe outside :class:`RecipeConfig` and its typed sections; a
    plug-in section's other keys are checked by :func:`check_section`."""
    top = list(RecipeConfig.__dataclass_fields__)
    for key in cfg:
        if key not in top:
            raise unknown_key("recipe", str(key), top)
    for section, schema in SECTIONS.items():
        if section in PLUGIN_SECTIONS:
            check_section(section, cfg.get(section) or {})
            continue
        known = list(schema.__dataclass_fields__)
        for key in cfg.get(section) or {}:
            if key not in known:
                raise unknown_key(section, str(key), known, schema.__name__)


def check_section(section: str, values: Mapping[str, Any]) -> None:
    """Refuse a key of the ``sampler`` or ``objective`` section that is neither the schema's nor an option of the
    plug-in it names, naming the plug-ins that take it; and an option of the wrong type."""
    fields = SECTIONS[section].__dataclass_fields__
    values = sampler_section(values) if section == "sampler" else dict(values)
    name = values.get("name") or fields["name"].default
    options = {k: v for k, v in values.items() if k not in fields}
    _plugins(section)[2](name, options, settings=tuple(fields))


def check_overrides(overrides: Sequence[str]) -> None:
    """Check ``[+|++]section.key=value`` command-line overrides of the typed sections before Hydra sees them.

    A plug-in section's key must be an option of the plug-in named by ``section.name=`` on the command line, or
    (the recipe names it) of a registered one; the composed recipe is checked again by :func:`check_keys`.
    """
    given = {item.split("=", 1)[0].lstrip("+"): item.split("=", 1)[1] for item in overrides if "=" in item}
    for path in given:
        parts = path.split(".")
        if len(parts) < 2 or parts[0] not in SECTIONS:
            continue
        section, key, schema = parts[0], parts[1], SECTIONS[parts[0]]
        known = list(schema.__dataclass_fields__)
        if key in known:
            continue
        if section not in PLUGIN_SECTIONS:
            raise unknown_key(section, key, known, schema.__name__)
        table, options_of, check = _plugins(section)
        named = given.get(f"{section}.name")
        if named is not None:
            if key not in options_of(named):
                check(named, {key: _value(given[path])}, settings=tuple(known))
            continue
        every = sorted({k for n in table for k in options_of(n)} - set(known))
        if key not in every:
            raise unknown_key(
                section,
                key,
                [*known, *every],
                f"any registered {section}; a {section} of your own: "
                f"name it on the command line too ({section}.name=module:attr)",
            )


def _value(text: str) -> Any:
    """A command-line value as Hydra reads it (YAML), for messages."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# The sampler section as written before samplers had a registry: every key, whatever the sampler, and the defaults
# of options only some samplers take, which that code dropped for the others.
_LEGACY_SAMPLER = {"name", "steps", "eta", "spacing", "variance", "clip_x0", "batch_size", "precision"}
_LEGACY_DEFAULTS = {"eta": 0.0, "variance": "small"}


def sampler_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """A ``sampler`` section as a dict; one written before the sampler registry (it holds every old key) leaves out
    the old defaults its sampler does not take (``eta: 0.0`` for ddpm), so old checkpoints sample as before."""
    out = dict(section)
    if _LEGACY_SAMPLER <= set(out):
        takes = _plugins("sampler")[1](out["name"])
        out = {k: v for k, v in out.items() if k in takes or k not in _LEGACY_DEFAULTS or v != _LEGACY_DEFAULTS[k]}
    return out


def retarget_plugins(cfg: Mapping[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``cfg`` with the recipe's options of a plug-in renamed on the command line (``objective.name=flow``,
    ``sampler.name=heun``) left out where the new plug-in does not take them, as :func:`merge_sampler` does for
    ``polydiff sample``; options given on the command line are kept (and checked). Returns the config and the
    ``section.key=value`` items left out."""
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}
    cfg, dropped = dict(cfg), []
    for section in PLUGIN_SECTIONS:
        if f"{section}.name" not in given or not isinstance(cfg.get(section), Mapping):
            continue
        schema = SECTIONS[section].__dataclass_fields__
        takes = _plugins(section)[1](str(cfg[section].get("name")))
        kept = {}
        for key, value in cfg[section].items():
            if key in schema or key in takes or f"{section}.{key}" in given:
                kept[key] = value
            else:
                dropped.append(f"{section}.{key}={value}")
        cfg[section] = kept
    return cfg, dropped


def merge_sampler(saved: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sampler`` section ``polydiff sample`` uses: the run's (``saved``) with the command line's (``given``)
    over it, typed by :class:`SamplerConfig` and checked. Another sampler named on the command line starts from its
    own defaults: the run's options it does not take were the run's sampler's, and are left out."""
    from omegaconf import OmegaConf

    saved, given = sampler_section(saved), dict(given)
    if "name" in given and given["name"] != saved.get("name"):
        takes = _plugins("sampler")[1](str(given["name"]))
        saved = {k: v for k, v in saved.items() if k in SamplerConfig.__dataclass_fields__ or k in takes}
    merged = OmegaConf.to_container(OmegaConf.merge(open_section(SamplerConfig), saved, given))
    check_section("sampler", merged)
    return merged


# trainer.KEY -> (lowest allowed value, highest or None): checked before anything is built.
_LIMITS = {
    "max_steps": (1, None),
    "batch_size": (1, None),
    "grad_accum": (1, None),
    "log_every": (1, None),
    "ckpt_every": (1, None),
    "keep_every": (0, None),
    "num_samples": (1, None),
    "warmup_steps": (0, None),
    "sample_every": (0, None),
    "num_workers": (0, None),
    "grad_clip": (0, None),
    "weight_decay": (0, None),
    "label_dropout": (0, 1),
    "lr": (0, None),
    "ema_decay": (0, 1),
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
