"""Registries of plug-ins (samplers, objectives) and the check of their options against their signatures.

A plug-in is found by its registered name, by a ``"module:attr"`` path imported on demand, or through an
installed package's entry point (read only when a name is missing). Its options are exactly the keyword
arguments of its signature: a key it does not take is refused, naming the registered plug-ins that take it.
This module imports nothing else of polydiff, so the config layer and the plug-in modules can both use it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import types
import typing
from importlib.metadata import entry_points
from typing import Any, Callable, Collection, Mapping, Optional, Sequence, TypeVar

__all__ = [
    "register",
    "lookup",
    "option_params",
    "check_options",
    "check_call",
    "call_checked",
    "unknown_key",
    "accepts",
    "describe",
]

T = TypeVar("T")
#: ``check(name, obj)``: raise ``TypeError`` where ``obj`` does not keep the plug-in's contract.
Check = Callable[[str, Any], None]


def unknown_key(where: str, key: str, known: Collection[str], owner: str = "") -> KeyError:
    """``KeyError`` naming ``where.key``, the closest known key and the known keys."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{where}.{close[0]}'?" if close else ""
    return KeyError(f"unknown key '{where}.{key}'{f' for {owner}' if owner else ''}.{hint} Known keys: {known}")


def register(table: dict[str, T], kind: str, name: str, obj: T, check: Check, overwrite: bool = False) -> T:
    """Put ``obj`` in ``table`` as ``name`` after ``check``; another object already there needs ``overwrite``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(
            f"a {kind} name must be a non-empty string without ':' (kept for module:attr paths), got {name!r}"
        )
    check(name, obj)
    known = table.get(name)
    if known is not None and known is not obj and not overwrite:
        # A script that names its own plug-in by module path imports itself a second time under its real name.
        same = getattr(known, "__module__", "") == "__main__" and known.__qualname__ == obj.__qualname__
        if not same:
            raise ValueError(f"{kind} {name!r} is already registered to {known!r}; pass overwrite=True to replace it")
    table[name] = obj
    return obj


def lookup(table: Mapping[str, T], kind: str, name: str, group: str, check: Check) -> T:
    """The plug-in registered as ``name``, at the ``"module:attr"`` path ``name``, or under the entry-point
    ``group``; an unknown name lists the known ones. A path is imported each time (Python caches the module) and
    never joins ``table``, so the names a message lists are the registered ones."""
    if not isinstance(name, str) or not name:
        raise KeyError(f"{kind}.name must be a {kind}'s name, got {name!r}; known {kind}s: {sorted(table)}")
    if name in table:
        return table[name]
    if ":" in name:
        obj = _import(kind, name)
        check(name, obj)
        return obj
    for ep in entry_points(group=group):
        if ep.name == name:
            obj = ep.load()
            check(name, obj)
            return obj
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(
        f"unknown {kind} {name!r}. Known {kind}s: {sorted(table)}.{hint} A {kind} of your own is named "
        f"by its 'module:attr' path, or registered with polydiff.register_{kind} (import its module "
        f"first), or exposed by an installed package under the entry-point group {group!r}."
    )


def _import(kind: str, path: str) -> Any:
    """The object at ``"module:attr"``; never a standard-library module (importing some of them acts)."""
    module, _, attr = path.partition(":")
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ValueError(
            f"{kind}.name={path!r}: a {kind} never lies in the standard library module {top!r}; "
            f"name your own module:attr or a registered {kind}"
        )
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"{kind} {path!r} failed to import: {err} (is its folder on PYTHONPATH?)") from err
    return obj


def option_params(fn: Callable[..., Any], skip: Collection[str] = ()) -> dict[str, inspect.Parameter]:
    """The keyword-passable parameters of ``fn`` (a class: of its constructor) outside ``skip``: its options."""
    return {
        n: p
        for n, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in skip and n != "self"
    }


def _takes_any(fn: Callable[..., Any]) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def check_options(
    kind: str,
    name: str,
    fn: Callable[..., Any],
    given: Mapping[str, Any],
    table: Mapping[str, Callable[..., Any]],
    skip: Collection[str] = (),
    settings: Collection[str] = (),
) -> None:
    """Refuse what plug-in ``fn`` (chosen as ``name``) would not take of the options ``given``.

    ``KeyError`` for a key it does not take, naming the plug-ins of ``table`` that take it (or the closest of its
    own keys and the section's ``settings``) and for a required option missing; ``TypeError`` for a value whose
    type contradicts a plain annotation (int, float, bool, str, optional). ``skip``: arguments the caller passes.
    """
    params = option_params(fn, skip)
    if not _takes_any(fn):
        for key, value in given.items():
            if key in params:
                continue
            takers = sorted(n for n, other in table.items() if key in option_params(other, skip))
            if takers:
                raise KeyError(
                    f"{kind}.{key} is not an option of {kind} {name!r} ({kind}s that take it: "
                    f"{', '.join(takers)}); {kind}.{key}={value!r} would change nothing: remove it, or "
                    f"set {kind}.name to one of them"
                )
            raise unknown_key(kind, str(key), [*settings, *params], f"{kind} {name!r}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in given]
    if missing:
        raise KeyError(f"{kind} {name!r} needs {[f'{kind}.{m}' for m in missing]}")
    wrong = mistyped(fn, {k: v for k, v in given.items() if k in params})
    if wrong is not None:
        key, value, expected = wrong
        raise TypeError(f"{kind}.{key}: Value {value!r} has the wrong type: {kind} {name!r} takes {expected}")


_PLAIN = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def accepts(value: Any, tp: Any) -> Optional[bool]:
    """Whether ``value`` fits the annotation ``tp``; ``None`` where the annotation is not a plain one."""
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp in (bool, str, type(None)):
        return isinstance(value, tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        verdicts = [accepts(value, arg) for arg in typing.get_args(tp)]
        return True if True in verdicts else (None if None in verdicts else False)
    return None


def describe(tp: Any) -> str:
    """An annotation in words: ``Optional[float]`` -> ``a number or null``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(tp))
    return _PLAIN.get(tp, getattr(tp, "__name__", str(tp)))


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
        known = [
            n
            for n, p in params.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self" and n not in given
        ]
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
    wrong = mistyped(fn, kwargs)
    if wrong is not None:
        key, value, expected = wrong
        raise TypeError(f"{where}.{key}={value!r} has the wrong type: it must be {expected}")


def mistyped(fn: Callable[..., Any], values: Mapping[str, Any]) -> Optional[tuple[str, Any, str]]:
    """The first ``(key, value, expected type)`` of ``values`` that contradicts a plain annotation of ``fn``."""
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # annotations that do not evaluate here: nothing to check
        return None
    for key, value in values.items():
        if key in hints and accepts(value, hints[key]) is False:
            return str(key), value, describe(hints[key])
    return None
