"""Domain registry: names -> domain classes, with lazy built-ins and an entry-point group.

Built-in domains are listed as ``"module:attr"`` strings and imported on first use, so
``import polydiff`` stays light. Third-party packages register through the entry-point
group ``polydiff.domains``, which is read only when a name is missing.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from importlib.metadata import entry_points
from typing import Callable, Optional, TypeVar, Union

from .domain import Domain

__all__ = [
    "register_domain",
    "get_domain",
    "list_domains",
    "domain_module_prefixes",
    "check_domain_name",
    "UnsafeConfigError",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "polydiff.domains"

D = TypeVar("D", bound=type)

_BUILTIN: dict[str, str] = {
    "audio": "domains.audio:AudioDomain",
    "molecule": "domains.molecule:MoleculeDomain",
    "image": "domains.image:ImageDomain",
}
_REGISTRY: dict[str, Union[type[Domain], str]] = dict(_BUILTIN)


def register_domain(
    name: str, cls: Optional[type[Domain]] = None, *, overwrite: bool = False
) -> Callable[[D], D] | type[Domain]:
    """Register a :class:`Domain` subclass under ``name``; usable as a decorator."""

    def _register(c: D) -> D:
        if not (isinstance(c, type) and issubclass(c, Domain)):
            raise TypeError(f"register_domain({name!r}) needs a polydiff.Domain subclass, got {c!r}")
        known = _REGISTRY.get(name)
        if known is not None and not isinstance(known, str) and known is not c and not overwrite:
            # A script that names its own domain by module path imports itself a second time under its real name.
            if not (known.__module__ == "__main__" and known.__qualname__ == c.__qualname__):
                raise ValueError(
                    f"domain {name!r} is already registered to {known!r}; pass overwrite=True to replace it"
                )
        c.name = name
        _REGISTRY[name] = c
        return c

    return _register(cls) if cls is not None else _register


class UnsafeConfigError(ValueError):
    """A config that names code polydiff will not run (a ``_target_``, a Hydra callback, a logging factory)."""


def check_domain_name(name: str, where: str) -> None:
    """Refuse a ``"module:Class"`` domain in the standard library: importing some of it acts (``antigravity``)."""
    if ":" not in name:
        return
    top = name.partition(":")[0].split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise UnsafeConfigError(
            f"{where}={name!r}: a domain class never lies in the standard library module "
            f"{top!r}; name your domain's module:Class or a registered domain name"
        )


def _load(name: str, target: str) -> type[Domain]:
    check_domain_name(target, "domain")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"domain {name!r} points at {target!r}, which failed to import: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Domain)):
        raise TypeError(f"domain {name!r} points at {target!r}, which is not a polydiff.Domain subclass")
    return _adopt(name, cls)


def _adopt(name: str, cls: type[Domain]) -> type[Domain]:
    """Register ``cls`` found under ``name``; a class that registered itself on import keeps its registered name."""
    if _REGISTRY.get(cls.name) is not cls:
        cls.name = name
    _REGISTRY[name] = cls
    return cls


def _from_entry_points(name: str) -> Optional[type[Domain]]:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Domain):
                return _adopt(name, obj)
            raise TypeError(f"entry point {ep.value!r} for domain {name!r} is not a polydiff.Domain subclass")
    return None


def get_domain(name: str) -> type[Domain]:
    """The domain class registered as ``name`` (or a ``"module:Class"`` path); unknown names list the known ones."""
    entry = _REGISTRY.get(name)
    if entry is None and ":" in name:  # "package.module:Class", imported on demand
        return _load(name, name)
    if isinstance(entry, str):
        return _load(name, entry)
    if entry is not None:
        return entry
    found = _from_entry_points(name)
    if found is not None:
        return found
    known = list_domains()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(
        f"unknown domain {name!r}. Known domains: {known}.{hint} A domain defined in your own code must be "
        f"registered with polydiff.register_domain before use (import its module first), or exposed by an "
        f"installed package under the entry-point group {ENTRY_POINT_GROUP!r}."
    )


def list_domains() -> list[str]:
    """Names of the registered domains and of the installed entry points."""
    names = set(_REGISTRY)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def domain_module_prefixes() -> set[str]:
    """Top-level modules of registered domains: where a config's ``_target_`` may point."""
    prefixes = {"polydiff", "domains"}
    for entry in _REGISTRY.values():
        module = entry.partition(":")[0] if isinstance(entry, str) else entry.__module__
        prefixes.add(module.split(".")[0])
    prefixes.update(ep.value.split(":")[0].split(".")[0] for ep in entry_points(group=ENTRY_POINT_GROUP))
    return prefixes
