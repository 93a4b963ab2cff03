"""``polydiff train``: a recipe checked (keys, safety, run folder, resume) before Hydra runs it, then trained."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cli_common import USAGE, USER_ERRORS, check_writable, fail, user_message
from .recipes import check_recipe, check_schema, compose_recipe, explain_composition, recipe_paths

__all__ = ["train_command"]


def _check_run_dir(recipe: str, overrides: Sequence[str]) -> Optional[Path]:
    """Refuse a run directory that cannot be written, or whose checkpoint the recipe cannot resume, before Hydra
    records the new config there. Returns the run folder where it exists already (the user's, never removed)."""
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from .build import to_plain
    from .checkpoint import load_checkpoint
    from .resume import check_resumable, resume_source

    plain = [o for o in overrides if "=" in o and not o.startswith("-")]
    try:
        cfg = compose_recipe(recipe, plain, with_hydra=True)
    except ConfigCompositionException as err:
        try:
            base = compose_recipe(recipe)
        except ConfigCompositionException as inner:  # the recipe itself, not an override: name its key and file
            raise explain_composition(recipe, inner) from None
        check_schema(base, recipe)
        _explain_override(recipe, plain, err)
        raise explain_composition(recipe, err, plain) from None
    check_schema(cfg, recipe)
    run_dir = Path(cfg.hydra.run.dir)
    check_writable(run_dir, ("checkpoints", "samples", ".hydra"), "hydra.run.dir")
    named = "${" not in str(OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"])
    ckpt = resume_source(cfg.trainer.resume, run_dir / "checkpoints" / "last.pt")
    if ckpt is not None:
        del cfg.hydra
        check_resumable(load_checkpoint(ckpt, mmap=True), to_plain(cfg), ckpt)
    return run_dir.resolve() if named and run_dir.exists() else None


def _explain_override(recipe: str, overrides: Sequence[str], err: Exception) -> None:
    """For ``domain.KEY=V`` / ``model.KEY=V`` naming keys the recipe does not set, say whether to add or fix each."""
    from . import get_domain
    from .config import unknown_key

    bad: list[str] = []
    rest = list(overrides)
    while True:  # Hydra names one override at a time: collect them all, then compose what is left
        o = next((o for o in rest if f"Could not override '{o.split('=', 1)[0]}'" in str(err)), None)
        section, _, key = (o or "").split("=", 1)[0].partition(".")
        if section not in ("domain", "model") or not key or "." in key:
            return  # not a key this function can explain: Hydra reports it as usual
        bad.append(o)
        rest.remove(o)
        try:
            base = compose_recipe(recipe, rest)
            break
        except Exception as e:  # noqa: BLE001 -- the next override Hydra cannot apply
            err = e
    messages = []
    for o in bad:
        section, key = o.split("=", 1)[0].split(".")
        if section == "domain":
            cls = get_domain(base.domain.name)
            known = [n for n in inspect.signature(cls).parameters if n != "self"]
            messages.append(
                unknown_key("domain", key, known, cls.__qualname__).args[0]
                if key not in known
                else f"domain.{key} is an argument of {cls.__qualname__} that this recipe does not set: "
                f"add it with +{o}"
            )
        else:
            message = unknown_key("model", key, [str(k) for k in base.model]).args[0]
            messages.append(
                message if "Did you mean" in message else f"{message}. If the network takes it, add it with +{o}"
            )
    raise KeyError("\n".join(messages)) from err


def train_command(args: Sequence[str]) -> None:
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return
    # KEY=V first is an override; a recipe file may still hold "=" (a sweep's folder: lr=1e-4/recipe.yaml).
    if not args or args[0].startswith("-") or ("=" in args[0] and not Path(args[0]).is_file()):
        raise fail(
            "train needs a recipe first: polydiff train RECIPE.yaml [hydra overrides], e.g. "
            "polydiff train recipes/image_unet.yaml profile=cpu"
        )
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .config import check_overrides, register_configs
    from .trainer import CheckpointWriteError, train

    register_configs()
    try:
        path, search = recipe_paths(args[0])
    except FileNotFoundError as err:
        raise fail(str(err)) from err
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):
        # Hydra's default folder holds the start time, which each process reads on its own clock.
        raise fail("under torchrun, give every process the same run folder: add hydra.run.dir=DIR")
    if any(a.startswith("--experimental-rerun") for a in args[1:]):
        raise fail(
            "--experimental-rerun loads a pickle (config.pickle), which can run code: polydiff does not take "
            "it; run the recipe again with the same overrides (recorded in RUN/.hydra/overrides.yaml)"
        )
    existing = None
    try:
        check_overrides(args[1:])
        if not {"-m", "--multirun", "--cfg", "-c", "--help", "-h"} & set(args[1:]):
            existing = _check_run_dir(args[0], args[1:])
        check_recipe(args[0], args[1:])  # before Hydra acts on the recipe's hydra section (callbacks, logging)
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise fail(user_message(err)) from err

    @hydra.main(version_base=None, config_path=None, config_name=None)
    def _task(cfg) -> None:
        if int(os.environ.get("RANK", "0")) > 0:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs progress; the others only what goes wrong
        out = Path(HydraConfig.get().runtime.output_dir)
        try:
            train(cfg, out)
        except USER_ERRORS + (CheckpointWriteError,) as err:
            message = user_message(err)
            _log_to_files(f"polydiff: error: {message}")  # the terminal shows it once, as the exit message
            raise fail(message + _remove_stub(out, existing)) from err
        except Exception:
            logging.getLogger("polydiff").exception("polydiff train stopped on an error")
            raise

    saved = sys.argv
    # The recipe's config groups (RECIPE/profile/...) as a --config-dir option: an option may stand anywhere, so
    # Hydra's flags (-m, --cfg) may come before or after the user's overrides.
    groups = ["--config-dir", str(path.with_suffix(""))] if search else []
    sys.argv = ["polydiff train", "--config-path", str(path.parent), "--config-name", path.stem, *groups, *args[1:]]
    try:
        _task()
    finally:
        sys.argv = saved


def _log_to_files(message: str) -> None:
    """Write ``message`` to the log files of the run (Hydra's ``cli_train.log``), not to the terminal."""
    record = logging.LogRecord("polydiff", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _remove_stub(out: Path, existing: Optional[Path]) -> str:
    """Remove a run folder this command created that holds only Hydra's records and the log (a run that failed
    before training wrote anything); the text to add to the error says what happened to it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (existing is not None and out.resolve() == existing):
        return ""
    if out.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)
        return f" (nothing was trained: the new run folder {out} was removed)"
    return f" (also written to the log in {out})"
