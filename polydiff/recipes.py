"""Recipes: Hydra configs found by path, composed with overrides exactly as ``polydiff train`` composes them."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["recipe_paths", "compose_recipe", "check_recipe", "check_schema", "explain_composition"]


# The folder holding polydiff/, recipes/ and examples/: the repository, or site-packages when installed from a wheel.
SHIPPED = Path(__file__).resolve().parents[1]


def shipped_recipes() -> list[str]:
    """Names of the recipes that come with polydiff (``polydiff train NAME`` finds them from any folder)."""
    return sorted(p.stem for p in (SHIPPED / "recipes").glob("*.yaml"))


def recipe_paths(recipe: str | Path) -> tuple[Path, list[str]]:
    """The recipe file (``.yaml`` added when missing) and the search-path override for its config groups
    (``RECIPE/profile/*.yaml`` beside ``RECIPE.yaml``). Its folder joins ``sys.path``, so ``module:Class``
    domains beside the recipe resolve from any working directory. A relative path that does not exist here
    is looked up among the shipped recipes: ``audio_unet``, ``recipes/audio_unet.yaml``, ``examples/points.yaml``."""
    path = Path(recipe)
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_suffix(".yaml")
    if not path.is_file() and not path.is_absolute():
        path = next((c for c in (SHIPPED / "recipes" / path, SHIPPED / path) if c.is_file()), path)
    if not path.is_file():
        known = sorted(str(p) for p in Path("recipes").glob("*.yaml")) if Path("recipes").is_dir() else []
        raise FileNotFoundError(
            f"recipe {str(recipe)!r} not found"
            + (f"; recipes here: {known}" if known else "")
            + f"; shipped recipes, by name: {', '.join(shipped_recipes()) or 'none'}"
        )
    path = path.resolve()
    if str(path.parent) not in sys.path:
        sys.path.insert(1, str(path.parent))
    extra = path.with_suffix("")
    return path, [f"hydra.searchpath=[file://{extra}]"] if extra.is_dir() else []


def compose_recipe(recipe: str | Path, overrides: Sequence[str] = (), with_hydra: bool = False) -> Any:
    """Compose a recipe with overrides into a DictConfig, exactly as ``polydiff train`` does."""
    from hydra import compose, initialize_config_dir

    from .config import register_configs
    from .safety import check_config

    register_configs()
    path, search = recipe_paths(recipe)
    with initialize_config_dir(config_dir=str(path.parent), version_base=None):
        cfg = compose(config_name=path.stem, overrides=[*search, *overrides], return_hydra_config=with_hydra)
    check_config(cfg, f"recipe {path}")  # with_hydra: the hydra section too, which Hydra acts on before polydiff
    return cfg


def check_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> None:
    """Compose ``recipe`` as ``polydiff train`` would, its Hydra section included, once for every value of every
    sweep (``-m`` overrides and ``hydra.sweeper.params``), and refuse one that names code (:mod:`polydiff.safety`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    plain = [o for o in overrides if "=" in o and not o.startswith("-")]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(plain)
    except Exception:  # noqa: BLE001 -- Hydra reports a malformed override itself, naming it
        return
    fixed = [_first(o) for o in parsed]
    variants = [fixed]
    for i, override in enumerate(parsed):
        if override.is_sweep_override():
            variants += [
                fixed[:i] + [f"{override.get_key_element()}={v}"] + fixed[i + 1 :]
                for v in override.sweep_string_iterator()
            ]
    for variant in variants:
        try:
            cfg = compose_recipe(recipe, variant, with_hydra=True)
        except ConfigCompositionException as err:  # never hand Hydra a config that could not be checked
            raise explain_composition(recipe, err, variant) from None
        params = cfg.hydra.sweeper.get("params") or {}
        for key, values in params.items():  # a recipe's own sweep, as Hydra's basic sweeper reads it
            for value in parser.parse_overrides([f"{key}={values}"])[0].sweep_string_iterator():
                compose_recipe(recipe, [*variant, f"{key}={value}"], with_hydra=True)


def _first(override: Any) -> str:
    """An override as text, a sweep by its first value."""
    if not override.is_sweep_override():
        return override.input_line
    first = next(iter(override.sweep_string_iterator()))
    return f"{override.get_key_element()}={first}"


def check_schema(cfg: Any, recipe: str | Path) -> None:
    """Refuse a recipe composed without polydiff's schema: its defaults and overrides would not apply."""
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, "trainer.resume") is None:
        raise ValueError(
            f"recipe {recipe} does not build on polydiff's recipe schema: put `defaults: [polydiff_recipe, "
            f"_self_]` at its top (as in examples/points.yaml), so that its defaults and overrides apply"
        )


def explain_composition(recipe: str | Path, err: Exception, overrides: Sequence[str] = ()) -> Exception:
    """The error to show for a recipe that does not compose: an unknown key is named with the file that holds it and
    the closest known key (as for a command-line typo), anything else by Hydra's own first lines, never a traceback."""
    from .config import SECTIONS, RecipeConfig, unknown_key

    cause = err.__cause__ or err.__context__
    full_key = str(getattr(cause, "full_key", "") or "")
    section, _, key = full_key.rpartition(".")
    if type(cause).__name__ == "ConfigKeyError" and full_key and "." not in section:
        known = list((SECTIONS[section] if section in SECTIONS else RecipeConfig).__dataclass_fields__)
        if section and section not in SECTIONS:
            known = []
        if not section or known:
            message = unknown_key(section or "recipe", key, known).args[0]
            if key == "_target_":
                message = f"'{full_key}' is not allowed: only the model section may name a network class with _target_"
            return KeyError(f"{message} (in {_holder(recipe, key)})")
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    given = f" with {list(overrides)}" if overrides else ""
    return ValueError(f"recipe {recipe} does not compose{given}: {' '.join(lines[:3])}")


def _holder(recipe: str | Path, key: str) -> str:
    """The recipe file, or the file of its config groups, whose text sets ``key``."""
    path, _ = recipe_paths(recipe)
    for candidate in [path, *sorted(path.with_suffix("").rglob("*.yaml"))]:
        if candidate.is_file() and re.search(rf"(^|[{{\s,]){re.escape(key)}\s*:", candidate.read_text(), re.M):
            return str(candidate)
    return str(path)
