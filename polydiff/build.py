"""Build a recipe's parts (domain, network, schedule, objective) from a plain config mapping."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .autoencoder import LearnedAutoencoder
from .config import call_checked
from .domain import Domain
from .latent import LatentDomain, latent_domain
from .objectives import BaseObjective, build_objective_from
from .registry import get_domain
from .safety import safe_instantiate
from .schedules import NoiseSchedule, Schedule, make_schedule

__all__ = [
    "Parts",
    "load_run",
    "parts_from_checkpoint",
    "saved_config",
    "domain_class_path",
    "build_domain",
    "split_domain_overrides",
    "with_domain_overrides",
    "build_network",
    "build_schedule",
    "build_objective",
    "sampling_schedule",
    "to_plain",
    "check_targets",
]


def to_plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a config (DictConfig, dataclass or mapping)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if hasattr(cfg, "__dataclass_fields__"):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return cfg


def check_targets(cfg: Any, where: str = "") -> None:
    """Refuse ``_target_`` entries that are not ``nn.Module`` classes defined in polydiff, domains or a registered
    domain's package (see :mod:`polydiff.safety`)."""
    from .safety import check_config

    check_config(cfg if not where else {where: cfg}, "config")


def build_domain(domain_cfg: Mapping[str, Any]) -> Domain:
    """Instantiate the domain named ``domain_cfg['name']`` with the remaining keys."""
    cfg = dict(to_plain(domain_cfg) or {})
    if "name" not in cfg:
        raise KeyError("the recipe's 'domain' section needs 'name' (one of polydiff.list_domains())")
    cls = get_domain(cfg.pop("name"))
    return call_checked(cls, cfg, "domain")


def split_domain_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """``([domain.KEY=V, ...], [everything else])`` of command-line items (a leading ``+`` allowed)."""
    ours = [o for o in items if "=" in o and o.lstrip("+").startswith("domain.")]
    return ours, [o for o in items if o not in ours]


def with_domain_overrides(cfg: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``cfg`` with ``domain.KEY=V`` overrides merged into its domain section (e.g. where the data now lie);
    keys are checked against the domain's constructor when it is built."""
    bad = split_domain_overrides(overrides)[1]
    if bad:
        raise KeyError(f"only domain.KEY=V overrides apply here, got {bad}")
    if not overrides:
        return dict(cfg)
    given = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]).domain
    return {**cfg, "domain": to_plain(OmegaConf.merge(OmegaConf.create(dict(cfg["domain"])), given))}


def build_network(domain: Domain, model_cfg: Mapping[str, Any], objective: Optional[BaseObjective] = None) -> nn.Module:
    """The network: ``model._target_`` when given (restricted), else the objective's builder (the domain's
    ``build_network(**model)`` for a denoiser), wrapped as the objective trains it."""
    cfg = dict(to_plain(model_cfg) or {})
    check_targets(cfg, "model")
    if "_target_" in cfg:
        net = safe_instantiate(cfg, "model")  # builds the classes that were checked, never a name resolved anew
        if not isinstance(net, nn.Module):
            raise TypeError(f"model._target_ {cfg['_target_']!r} built a {type(net).__name__}, not a torch.nn.Module")
    else:
        net = call_checked(objective.network_builder(domain) if objective else domain.build_network, cfg, "model")
    return objective.wrap_network(net) if objective else net


def build_schedule(schedule_cfg: Mapping[str, Any]) -> NoiseSchedule:
    cfg = dict(to_plain(schedule_cfg))
    return call_checked(make_schedule, cfg, "schedule")


def sampling_schedule(cfg: Mapping[str, Any]) -> Schedule:
    """The schedule a recipe's samplers read: its ``schedule`` section, or the path its objective fixes."""
    return build_objective_from(to_plain(cfg.get("objective")) or {}).sampling_schedule(build_schedule(cfg["schedule"]))


def build_objective(objective_cfg: Mapping[str, Any], schedule: NoiseSchedule) -> BaseObjective:
    """The objective the ``objective`` section names (``vp`` without a name), its options checked by name."""
    objective = build_objective_from(to_plain(objective_cfg) or {})
    objective.check_schedule(schedule)  # before training, not only when sampling
    return objective


@dataclass
class Parts:
    """A recipe's built parts."""

    domain: Domain
    net: nn.Module
    schedule: Schedule  # what samplers read: the recipe's, or the objective's own path
    objective: BaseObjective
    train_set: Any = None  # the training set, when it was read to set the domain up

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], domain_state: Mapping[str, Any] | None = None) -> "Parts":
        """Build everything; ``domain_state`` (from a checkpoint) replaces reading the data set."""
        plain = to_plain(cfg)
        domain = latent_domain(build_domain(plain["domain"]), plain.get("latent"), load_first_stage)  # latent diffusion
        train_set = None
        if domain_state is not None:
            domain.load_state_dict(domain_state)
        else:
            train_set = domain.dataset("train")
            domain.setup(train_set)
        schedule = build_schedule(plain["schedule"])
        objective = build_objective(plain["objective"], schedule)
        schedule = objective.sampling_schedule(schedule)  # flow matching and EDM fix their own path
        if domain_state is None:  # training: an objective that learns from a teacher checks it fits
            objective.check_domain(domain)
        net = build_network(domain, plain.get("model", {}), objective)
        return cls(domain, net, schedule, objective, train_set)


def domain_class_path(domain: Domain) -> dict[str, Optional[str]]:
    """Where a domain's class lives, saved in checkpoints: ``{"class": "module:Qualname", "root": folder}``, the root
    being the folder that makes the module importable (named in errors when it is not, e.g. when sampling elsewhere)."""
    cls = type(domain.inner if isinstance(domain, LatentDomain) else domain)  # a latent domain: the one it wraps
    module = sys.modules.get(cls.__module__)
    root = None
    if getattr(module, "__file__", None):
        path = Path(module.__file__).resolve()
        path = path.parent if path.name == "__init__.py" else path
        root = str(path.parents[len(cls.__module__.split(".")) - 1])
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "root": root}


def saved_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's config, its domain named by the saved class path where the registered name is unknown here
    (a domain registered by code that is not imported now). The class is imported by name only: a checkpoint never
    adds folders to ``sys.path``."""
    cfg = dict(ckpt["config"])
    name, saved = cfg["domain"]["name"], ckpt.get("domain_class") or {}
    try:
        get_domain(name)
        return cfg
    except (KeyError, ImportError):  # not registered here, or a "module:Class" name whose module does not import
        if not saved.get("class") or saved["class"].startswith("__main__:"):
            raise KeyError(
                f"unknown domain {name!r}: the run's domain class is not importable here"
                + (
                    " (it was defined in a script run as __main__: move it into a module)"
                    if saved
                    else "; import or register it first (polydiff.register_domain)"
                )
            ) from None
    try:
        get_domain(saved["class"])
    except ImportError as err:
        where = f"; its module lies under {saved['root']}: add that folder to PYTHONPATH" if saved.get("root") else ""
        raise ImportError(f"domain {name!r} of this run is {saved['class']}, which does not import here ({err}){where}")
    return {**cfg, "domain": {**cfg["domain"], "name": saved["class"]}}


def load_run(
    path: str | Path, weights: str = "ema", device: str | torch.device = "cpu", domain_overrides: Sequence[str] = ()
) -> tuple[Parts, dict[str, Any]]:
    """The parts of a trained run (a run folder or a checkpoint file), its network holding the EMA (``"ema"``) or
    raw (``"raw"``) weights on ``device`` in eval mode, and the checkpoint. Samples come from
    :func:`polydiff.generate.generate` with the parts and the checkpoint's ``config["sampler"]``."""
    from .checkpoint import load_checkpoint, run_checkpoint

    ckpt_path = run_checkpoint(path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}: give a run folder or a checkpoint file")
    ckpt = load_checkpoint(ckpt_path)
    parts = parts_from_checkpoint(ckpt, weights, domain_overrides)
    parts.net.to(device)
    return parts, ckpt


def parts_from_checkpoint(ckpt: Mapping[str, Any], weights: str = "ema", domain_overrides: Sequence[str] = ()) -> Parts:
    """:func:`load_run` for a checkpoint already loaded: the network on the CPU, in eval mode."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}: choose 'ema' or 'raw'")
    parts = Parts.from_config(
        with_domain_overrides(saved_config(ckpt), domain_overrides), domain_state=ckpt["domain_state"]
    )
    state = ckpt["model"]
    if weights == "ema":
        state = {k[len("module.") :]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    parts.net.load_state_dict(state)
    parts.net.eval()
    return parts


def load_first_stage(spec: str, domain: Domain) -> LearnedAutoencoder:
    """The trained autoencoder run ``latent.autoencoder=spec`` names, checked to fit ``domain``: a finished run of
    ``objective.name=autoencoder`` on the same domain class and the data settings its ``first_stage_keys`` name."""
    import hashlib

    from .checkpoint import load_checkpoint, run_checkpoint

    what = f"latent.autoencoder={spec}"
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what}: no such run folder; train one first (polydiff train recipes/audio_autoencoder.yaml "
            "hydra.run.dir=RUN for audio) or give a fixed stage by name (audio: mel)"
        )
    ckpt_path = run_checkpoint(path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{what}: {ckpt_path} does not exist (the run has saved no checkpoint yet): train it")
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    kind = (cfg.get("objective") or {}).get("name", "vp")
    if kind != "autoencoder":
        raise ValueError(
            f"{what} is a run of objective {kind!r}, not an autoencoder: train one with polydiff train RECIPE "
            "objective.name=autoencoder (e.g. recipes/audio_autoencoder.yaml)"
        )
    step, total = int(ckpt["step"]), int(cfg["trainer"]["max_steps"])
    if step < total:
        raise ValueError(
            f"{what} is unfinished (step {step} of its trainer.max_steps={total}): its latents would change when it "
            f"finishes; run its training command again with hydra.run.dir={path} to finish it"
        )
    if (cfg.get("latent") or {}).get("autoencoder"):
        raise ValueError(f"{what} was itself trained on latents: give an autoencoder of the data")
    parts = parts_from_checkpoint(ckpt, "ema")
    theirs = parts.domain
    if type(theirs) is not type(domain):
        raise ValueError(
            f"{what} was trained on domain {theirs.name or type(theirs).__name__!r} ({type(theirs).__qualname__}), "
            f"this recipe's is {domain.name or type(domain).__name__!r} ({type(domain).__qualname__}): train an "
            "autoencoder on this domain"
        )
    for key in getattr(domain, "first_stage_keys", ()):
        if getattr(theirs, key) != getattr(domain, key):
            raise ValueError(
                f"{what} was trained with domain.{key}={getattr(theirs, key)}, this recipe has "
                f"domain.{key}={getattr(domain, key)}: set domain.{key}={getattr(theirs, key)} or train an "
                "autoencoder with this setting"
            )
    version = getattr(parts.net, "version", "")
    digest = hashlib.sha1(json.dumps([cfg["model"], cfg["objective"], version], sort_keys=True).encode())
    for name, value in sorted(parts.net.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return LearnedAutoencoder(parts.net, digest.hexdigest()[:16], domain)


def resolve_device(device: str, where: str = "trainer.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a clear error for an unknown or unavailable device.

    A numbered GPU (``cuda:1``) also becomes the current one.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{where}={device!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}={device} but CUDA is not available here; use {where}=auto or cpu")
    if dev.type == "cuda" and dev.index is not None:
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"{where}={device} but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(dev)  # the current GPU: code that asks for "cuda" (metric classifiers) lands here too
    return dev
