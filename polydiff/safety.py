"""What a recipe or a checkpoint from someone else may name, checked before anything is built or run.

A config is data. Three of its parts would otherwise name code to run:

* ``_target_`` entries (``model._target_``): each must resolve to an ``nn.Module`` subclass *defined* in polydiff,
  ``domains`` or a registered domain's package; a name re-exported through them (``polydiff.checkpoint.os.system``)
  resolves to an object defined elsewhere and is refused. What is built is the class that was checked.
* the ``hydra`` section, which Hydra acts on before any of polydiff's code runs: callbacks are refused; launchers
  and sweepers must be Hydra's own or an installed ``hydra_plugins`` class; logging configs may use only the
  standard handlers and formatters and write only below the run folder (``hydra.job.name``, which names Hydra's log
  file, is a plain name); ``env_set``/``env_copy`` are refused
  (``LD_PRELOAD`` or ``PYTHONPATH`` reach every process a run starts). Hydra resolves interpolations after this
  check, so those sections may hold none but references to ``hydra.run``/``sweep``/``runtime``/``job`` values
  (``${oc.create:...}`` or ``${domain.x}`` could stand for a whole handler), and what is built is resolved first.
* a domain given as ``"module:Class"``: the module is imported (as ``python -m`` would from the recipe's folder or
  the working folder), never one of the standard library's, and the class must be a ``polydiff.Domain``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import PurePosixPath
from typing import Any, Iterable, Mapping

from .registry import UnsafeConfigError, check_domain_name, domain_module_prefixes

__all__ = [
    "UnsafeConfigError",
    "check_config",
    "check_domain_name",
    "check_hydra",
    "check_plugin_names",
    "resolve_target",
    "safe_instantiate",
]


def _allowed_packages() -> set[str]:
    """polydiff, domains and the top-level packages of registered domains and installed domain entry points."""
    return domain_module_prefixes()


def _locate(path: str, allowed: Iterable[str], where: str) -> Any:
    """The object ``a.b.C`` names, importing only modules below an allowed top-level package (as Hydra's
    ``_locate``: attribute access first, a submodule import where the attribute is missing)."""
    parts = path.split(".")
    if not path or not all(p.isidentifier() for p in parts):
        raise UnsafeConfigError(f"{where}: {path!r} is not a dotted Python name (package.module.Class)")
    if parts[0] not in allowed:
        raise UnsafeConfigError(
            f"{where}: {path!r} is not allowed: a config may only name classes defined in {sorted(allowed)} "
            "(register your domain with polydiff.register_domain to allow its package)"
        )
    try:
        obj = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], start=2):
            if hasattr(obj, part):
                obj = getattr(obj, part)
            else:
                obj = importlib.import_module(".".join(parts[:i]))
    except ImportError as err:
        raise UnsafeConfigError(f"{where}: {path!r} does not import ({err})") from err
    return obj


def _defined_in(obj: Any, packages: Iterable[str]) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return isinstance(obj, type) and module.split(".")[0] in set(packages)


def resolve_target(target: Any, where: str) -> type:
    """The ``nn.Module`` subclass a ``_target_`` names, or :class:`UnsafeConfigError` saying why it is refused."""
    from torch import nn

    if isinstance(target, type):
        cls = target
    elif isinstance(target, str):
        cls = _locate(target, _allowed_packages(), where)
    else:
        raise UnsafeConfigError(f"{where}: _target_ must be a class name, got {type(target).__name__}")
    allowed = _allowed_packages()
    if not _defined_in(cls, allowed) or not issubclass(cls, nn.Module):
        what = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', type(cls).__name__)}"
        raise UnsafeConfigError(
            f"{where}: {target!r} resolves to {what}, which is not a torch.nn.Module class defined in "
            f"{sorted(allowed)}: a config may only build networks defined there, not names re-exported through them"
        )
    return cls


def _targets(cfg: Any, where: str) -> Any:
    """A copy of ``cfg`` with every ``_target_`` replaced by the class it was checked to be."""
    if isinstance(cfg, Mapping):
        out = {k: _targets(v, f"{where}.{k}" if where else str(k)) for k, v in cfg.items()}
        if "_target_" in out:
            out["_target_"] = resolve_target(cfg["_target_"], f"{where}._target_" if where else "_target_")
        return out
    if isinstance(cfg, (list, tuple)):
        return [_targets(v, f"{where}[{i}]") for i, v in enumerate(cfg)]
    return cfg


def safe_instantiate(cfg: Mapping[str, Any], where: str) -> Any:
    """``hydra.utils.instantiate`` of ``cfg`` whose ``_target_`` entries are the classes :func:`resolve_target`
    checked (Hydra never resolves a name of its own)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # Hydra resolves interpolations before it builds anything: resolved first, a nested ${oc.create:{_target_: ...}}
    # is checked like the rest, and text that would be read as an interpolation again is refused.
    resolved = OmegaConf.to_container(OmegaConf.create(_plain(cfg), flags={"allow_objects": True}), resolve=True)
    _refuse_interpolations(resolved, where, ())
    return instantiate(_targets(resolved, where))


def check_config(cfg: Any, where: str = "recipe") -> None:
    """Refuse a config (a recipe, with or without its ``hydra`` section, or a checkpoint's saved config) that names
    code: every ``_target_`` outside the ``hydra`` section, and the ``hydra`` section by :func:`check_hydra`."""
    plain = _plain(cfg)
    if not isinstance(plain, Mapping):
        return
    hydra = plain.get("hydra")
    try:
        _targets({k: v for k, v in plain.items() if k != "hydra"}, "")
    except UnsafeConfigError as err:
        raise UnsafeConfigError(f"{where}: {err}") from None
    if hydra is not None:
        check_hydra(hydra, f"{where}: hydra")
    domain = plain.get("domain")
    if isinstance(domain, Mapping) and isinstance(domain.get("name"), str):
        check_domain_name(domain["name"], f"{where}: domain.name")
    check_latent(plain.get("latent"), f"{where}: latent")


def check_latent(latent: Any, where: str = "latent") -> None:
    """``latent.autoencoder`` is data: ``null``, the word ``mel`` or a run folder's path, never code (a
    ``module:attr`` name, a ``_target_``, a mapping)."""
    if latent is None:
        return
    if not isinstance(latent, Mapping):
        raise UnsafeConfigError(f"{where} must be a section (latent.autoencoder=mel or =RUN_DIR), got {latent!r}")
    value = latent.get("autoencoder")
    if value is None:
        return
    if not isinstance(value, str) or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
        raise UnsafeConfigError(
            f"{where}.autoencoder={value!r} names no first stage: give 'mel' or the path of a trained autoencoder's "
            "run folder (a module:attr name is code, which a recipe or checkpoint may not name)"
        )


# Hydra's own launcher and sweeper, and installed plugins (hydra_plugins.*), by their base classes.
_PLUGIN_PACKAGES = ("hydra", "hydra_plugins")
# logging.config.dictConfig builds these by name ("class" or "()"): the standard handlers and formatters only.
_LOGGING_CLASSES = {
    "logging.StreamHandler",
    "logging.FileHandler",
    "logging.NullHandler",
    "logging.Formatter",
    "logging.Filter",
    "logging.handlers.RotatingFileHandler",
    "logging.handlers.TimedRotatingFileHandler",
    "logging.handlers.WatchedFileHandler",
    "colorlog.ColoredFormatter",
    "colorlog.formatter.ColoredFormatter",
}
_LOGGING_STREAMS = {"ext://sys.stdout", "ext://sys.stderr"}
_RUN_FOLDERS = ("${hydra.runtime.output_dir}", "${hydra.run.dir}", "${hydra.sweep.dir}")
_JOB_NAME = "${hydra.job.name}"  # Hydra's own log file is ${hydra.runtime.output_dir}/${hydra.job.name}.log


def check_hydra(hydra: Mapping[str, Any], where: str = "hydra") -> None:
    """Refuse a ``hydra`` section that makes Hydra run code: callbacks, foreign launchers or sweepers, logging
    factories or files outside the run folder, environment variables for the run's processes."""
    hydra = _plain(hydra)
    if not isinstance(hydra, Mapping):
        raise UnsafeConfigError(f"{where}={hydra!r}: the hydra section must be a mapping of Hydra's settings")
    for key in ("callbacks", "launcher", "sweeper", "hydra_logging", "job_logging", "job"):
        _refuse_interpolations(hydra.get(key), f"{where}.{key}", _HYDRA_REFERENCES)
    callbacks = hydra.get("callbacks") or {}
    if callbacks:
        raise UnsafeConfigError(
            f"{where}.callbacks: {sorted(callbacks)}: a recipe may not set Hydra callbacks (Hydra runs them as code); "
            "polydiff writes its own logs, checkpoints and metrics. Remove the hydra.callbacks section"
        )
    for key, base in (("launcher", "Launcher"), ("sweeper", "Sweeper")):
        section = hydra.get(key) or {}
        target = section.get("_target_") if isinstance(section, Mapping) else None
        if target is not None:
            _check_plugin(target, base, f"{where}.{key}._target_")
        if isinstance(section, Mapping):
            _targets({k: v for k, v in section.items() if k != "_target_"}, f"{where}.{key}")
    for key in ("hydra_logging", "job_logging"):
        if hydra.get(key):
            _check_logging(hydra[key], f"{where}.{key}")
    job = hydra.get("job") or {}
    for key in ("env_set", "env_copy"):
        if job.get(key):
            raise UnsafeConfigError(
                f"{where}.job.{key}: {sorted(job[key]) if isinstance(job[key], Mapping) else list(job[key])}: a recipe "
                "may not set environment variables for the run's processes (LD_PRELOAD or PYTHONPATH would run code); "
                "set them in your shell before polydiff train"
            )
    name = job.get("name")
    if name is not None and not (_inside(str(name)) and "/" not in str(name) and "${" not in str(name)):
        raise UnsafeConfigError(
            f"{where}.job.name={name!r}: Hydra names the run's log file after it (RUN/NAME.log): give a plain name "
            "without '/', '..' or interpolations"
        )
    subdir = hydra.get("output_subdir")
    if subdir is not None and (not _inside(str(subdir)) or "${" in str(subdir)):
        raise UnsafeConfigError(
            f"{where}.output_subdir={subdir!r}: it must be a folder inside the run folder "
            "(a relative path without '..'), e.g. .hydra"
        )


def _check_plugin(target: Any, base: str, where: str) -> None:
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    cls = _locate(str(target), _PLUGIN_PACKAGES, where)
    kind = {"Launcher": Launcher, "Sweeper": Sweeper}[base]
    if not (_defined_in(cls, _PLUGIN_PACKAGES) and issubclass(cls, kind)):
        raise UnsafeConfigError(
            f"{where}: {target!r} is not a Hydra {base} class of hydra or an installed hydra_plugins package"
        )


def _check_logging(cfg: Any, where: str) -> None:
    """A ``logging.config.dictConfig`` mapping that builds only standard handlers and writes inside the run folder."""
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            here = f"{where}.{key}"
            if key == ".":  # attributes set on the built object: baseFilename would move a log file anywhere
                raise UnsafeConfigError(
                    f"{here}: a recipe's logging config may not set attributes of handlers or formatters ('.'); "
                    "give them as the handler's own arguments"
                )
            if key in ("class", "()") and str(value) not in _LOGGING_CLASSES:
                raise UnsafeConfigError(
                    f"{here}: {value!r}: a recipe's logging config may only use the standard handlers and formatters "
                    f"({', '.join(sorted(_LOGGING_CLASSES))})"
                )
            if key == "filename" and not _log_file_inside(str(value)):
                raise UnsafeConfigError(
                    f"{here}={value!r}: a log file must lie in the run folder, e.g. "
                    "${hydra.runtime.output_dir}/train.log (the run folder, '/', then a relative path without '..' "
                    "whose only interpolation is ${hydra.job.name})"
                )
            _check_logging(value, here)
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            _check_logging(value, f"{where}[{i}]")
    elif isinstance(cfg, str) and cfg.startswith("ext://") and cfg not in _LOGGING_STREAMS:
        raise UnsafeConfigError(
            f"{where}={cfg!r}: a recipe's logging config may name only ext://sys.stdout and ext://sys.stderr"
        )


# Interpolations Hydra resolves after the check: in the sections it builds code from, only references to the run's
# folders and names; ${domain.x} or ${oc.create:...} could stand for a whole handler, launcher or callback.
_HYDRA_REFERENCES = ("hydra.run.", "hydra.sweep.", "hydra.runtime.", "hydra.job.")
_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


def _refuse_interpolations(cfg: Any, where: str, allowed: tuple[str, ...]) -> None:
    """Refuse any ``${...}`` in ``cfg`` but plain references to nodes under the ``allowed`` prefixes."""
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            _refuse_interpolations(value, f"{where}.{key}", allowed)
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            _refuse_interpolations(value, f"{where}[{i}]", allowed)
    elif isinstance(cfg, str) and "${" in cfg:
        # ${hydra:runtime.output_dir} is Hydra's resolver for its own node: the same reference.
        refs = [r.strip().replace("hydra:", "hydra.", 1) for r in _INTERPOLATION.findall(cfg)]
        plain = len(refs) == cfg.count("${") and all(r.startswith(allowed) and ":" not in r for r in refs)
        if not (allowed and plain):
            named = f"only references to {', '.join(p + '*' for p in allowed)}" if allowed else "no interpolation"
            raise UnsafeConfigError(
                f"{where}={cfg!r}: Hydra resolves interpolations after polydiff's check, so here a config may hold "
                f"{named} (a resolver or another node could stand for code to build)"
            )


def _log_file_inside(path: str) -> bool:
    """Whether a log file's path is the run folder, ``/``, then a relative path inside it: text right after the
    folder (``${hydra.run.dir}_x``) names a sibling, and any interpolation but the checked job name could hold '..'."""
    folder = next((f for f in _RUN_FOLDERS if path.startswith(f + "/")), None)
    if folder is None:
        return False
    rest = path[len(folder) + 1 :].replace(_JOB_NAME, "job")
    return "${" not in rest and _inside(rest)


def _inside(path: str) -> bool:
    p = PurePosixPath(path.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and ":" not in path


def _plain(cfg: Any) -> Any:
    """An unresolved plain copy (interpolations stay text: a check never runs a resolver)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=False)
    return cfg


def check_plugin_names(cfg: Any, where: str, also: Iterable[str] = ()) -> None:
    """Refuse a checkpoint's ``sampler.name`` given as ``"module:function"`` in a package that polydiff would not
    build a network from (:func:`resolve_target`'s packages and ``also``, e.g. the run's domain's package) unless
    that module is imported already: a sampler is any function of the sampler signature, called with the config's
    values. (An objective must subclass ``BaseObjective``, a domain ``Domain``: naming them only imports a module.)"""
    import sys

    plain = _plain(cfg)
    section = plain.get("sampler") if isinstance(plain, Mapping) else None
    name = section.get("name") if isinstance(section, Mapping) else None
    if not isinstance(name, str) or ":" not in name:
        return
    module, allowed = name.partition(":")[0], _allowed_packages() | set(also)
    if module.split(".")[0] not in allowed and module not in sys.modules:
        raise UnsafeConfigError(
            f"{where}: sampler.name={name!r} names a module outside {sorted(allowed)}: a checkpoint may name a sampler "
            "of another package only once it is imported or registered (polydiff.register_sampler, or the "
            "polydiff.samplers entry points) by code you trust"
        )
