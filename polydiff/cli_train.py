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

__all__ = ["train_command", "reflow_command", "distill_command"]


def _check_run_dir(recipe: str, overrides: Sequence[str]) -> Optional[Path]:
    """Refuse a run directory that cannot be written, or whose checkpoint the recipe cannot resume, before Hydra
    records the new config there. Returns the run folder where it exists already (the user's, never removed)."""
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from .build import to_plain
    from .checkpoint import load_checkpoint
    from .config import retarget_plugins
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
        current, _ = retarget_plugins(to_plain(cfg), plain)  # as the run itself will see it (train's _task)
        check_resumable(load_checkpoint(ckpt, mmap=True), current, ckpt)
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

    from .build import to_plain
    from .config import check_overrides, register_configs, retarget_plugins
    from .latent import with_absolute_autoencoder
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
        hydra_cfg = HydraConfig.get()
        out = Path(hydra_cfg.runtime.output_dir)
        try:
            cfg, dropped = retarget_plugins(to_plain(cfg), list(hydra_cfg.overrides.task))
            cfg = with_absolute_autoencoder(cfg)
            if dropped:
                logging.getLogger("polydiff").info(
                    "left out the recipe's %s: the plug-in named on the command line does not take them",
                    ", ".join(dropped),
                )
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


def train_from_run(
    command: str, args: Sequence[str], objective: dict, sampler: Optional[dict] = None, guidance: Optional[dict] = None
) -> None:
    """Train a student of the run ``args[0]`` in ``hydra.run.dir`` (``polydiff reflow``): the run's own recipe with
    ``objective`` in place of its objective, starting from its EMA weights; written to STUDENT/recipe.yaml and
    trained by :func:`train_command`, so the student resumes, logs and samples like any run."""
    import yaml

    from .build import saved_config
    from .checkpoint import load_checkpoint, run_checkpoint

    if not args or "=" in args[0]:
        raise fail(f"{command} needs a trained run first: polydiff {command} RUN_DIR hydra.run.dir=NEW [overrides]")
    run, rest = Path(args[0]).resolve(), list(args[1:])
    out = next((a.split("=", 1)[1] for a in rest if a.lstrip("+").startswith("hydra.run.dir=")), None)
    if out is None:
        raise fail(f"{command} needs hydra.run.dir=NEW: the new run's own folder (the run {run} is left as it is)")
    if Path(out).resolve() == run:
        raise fail(f"hydra.run.dir={out} is the run {command} learns from: give the new run a folder of its own")
    try:
        ckpt_path = run_checkpoint(run)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"no checkpoint at {ckpt_path}: give the folder of a trained run")
        cfg = saved_config(load_checkpoint(ckpt_path))
    except (KeyError, ValueError, FileNotFoundError, ImportError) as err:
        raise fail(user_message(err)) from err
    if objective.get("name") in DISTILL_METHODS:  # a student is read on the path of its chain's first teacher
        given = dict(cfg.get("objective") or {})
        base = (given.get("base") or {"name": "vp"}) if given.get("name") in DISTILL_METHODS else given
        objective = {**objective, "base": dict(base)}
    cfg["objective"] = {**objective, "teacher": str(run)}
    cfg["trainer"] = {**cfg["trainer"], "init": str(run), "resume": "auto"}
    if sampler is not None:
        cfg["sampler"] = sampler
    if guidance is not None:  # e.g. a student that has learnt its teacher's guidance samples without it
        cfg["guidance"] = {**(cfg.get("guidance") or {}), **guidance}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / f"{command}.yaml"
    body = yaml.safe_dump({"defaults": ["polydiff_recipe", "_self_"], **cfg}, sort_keys=False)
    recipe.write_text(f"# polydiff {command} {run}\n{body}")
    train_command([str(recipe), *rest])


def reflow_command(args: Sequence[str]) -> None:
    """``polydiff reflow RUN_DIR hydra.run.dir=NEW [objective.steps=N objective.sampler=S ...]``: rectified flow."""
    train_from_run("reflow", args, {"name": "reflow"})


DISTILL_METHODS = ("progressive", "consistency")
DISTILL_FLAGS = ("--method", "--steps", "--teacher-steps", "--guidance")


def _distill_flags(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``--flag V`` / ``--flag=V`` of :data:`DISTILL_FLAGS` apart from the run folder and the Hydra overrides."""
    flags, rest, items = {}, [], list(args)
    while items:
        item = items.pop(0)
        name, eq, value = item.partition("=")
        if name not in DISTILL_FLAGS:
            rest.append(item)
            continue
        if not eq:
            if not items or items[0].startswith("-"):
                raise fail(f"{name} needs a value, e.g. {name} 4")
            value = items.pop(0)
        flags[name.lstrip("-")] = value
    return flags, rest


def _round_done(folder: Path, rest: Sequence[str]) -> bool:
    """Whether the progressive round in ``folder`` has trained its ``trainer.max_steps`` (the override's, if given)."""
    from .checkpoint import load_checkpoint

    ckpt = folder / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        return False
    saved = load_checkpoint(ckpt, mmap=True)
    given = [a.split("=", 1)[1] for a in rest if a.lstrip("+").startswith("trainer.max_steps=")]
    return int(saved["step"]) >= int(given[-1] if given else saved["config"]["trainer"]["max_steps"])


def _saved_guidance(run: str) -> float:
    """The classifier-free guidance scale the run ``run`` samples with (1 where it cannot be read: the error about
    the run comes from :func:`train_from_run`)."""
    from .checkpoint import load_checkpoint, run_checkpoint

    try:
        saved = load_checkpoint(run_checkpoint(run), mmap=True)["config"]
        return float((saved.get("guidance") or {}).get("scale", 1.0))
    except Exception:  # noqa: BLE001 -- reported by train_from_run, with the fix
        return 1.0


def distill_command(args: Sequence[str]) -> None:
    """``polydiff distill RUN_DIR --method progressive|consistency hydra.run.dir=STUDENT [--steps N] [overrides]``:
    a few-step student of a trained run (Salimans & Ho 2022; Song, Dhariwal, Chen & Sutskever 2023)."""
    flags, rest = _distill_flags(args)
    method = flags.get("method")
    if method not in DISTILL_METHODS:
        raise fail(f"distill needs --method, one of {list(DISTILL_METHODS)} (got {method!r})")
    try:
        steps = int(flags.get("steps", 4 if method == "progressive" else 1))
        start = int(flags.get("teacher-steps", 64))
        scale = float(flags.get("guidance", _saved_guidance(rest[0] if rest else "")))
    except ValueError as err:
        raise fail(f"--steps, --teacher-steps and --guidance take numbers: {err}") from None
    if steps < 1:
        raise fail(f"--steps {steps}: a student takes at least 1 step")
    guidance = None if scale == 1.0 else {"scale": 1.0}  # learnt by the student: not applied again
    if method == "consistency":
        objective = {"name": "consistency", "guidance_scale": scale}
        train_from_run("distill", rest, objective, {"name": "consistency", "steps": steps}, guidance)
        return
    halvings = (start // steps).bit_length() - 1 if start > steps else 0
    if halvings < 1 or steps * 2**halvings != start:
        raise fail(
            f"--teacher-steps {start} must be --steps {steps} doubled one or more times (each progressive round "
            f"halves the teacher's steps), e.g. --teacher-steps {steps * 16}"
        )
    rounds = [steps * 2**j for j in reversed(range(halvings))]  # 32, 16, 8, 4 from 64 to 4
    out = next((a.split("=", 1)[1] for a in rest if a.lstrip("+").startswith("hydra.run.dir=")), None)
    if not rest or out is None:
        train_from_run("distill", rest, {})  # names what is missing
        return
    teacher = rest[0]
    for k, n in enumerate(rounds):  # a round per run: STUDENT/rounds/steps-N, the last one in STUDENT itself
        folder = Path(out) if n == steps else Path(out) / "rounds" / f"steps-{n}"
        if n == steps or not _round_done(folder, rest):
            here = [a if not a.lstrip("+").startswith("hydra.run.dir=") else f"hydra.run.dir={folder}" for a in rest]
            objective = {"name": "progressive", "steps": n, "guidance_scale": scale if k == 0 else 1.0}
            train_from_run("distill", [teacher, *here[1:]], objective, {"name": "ddim", "steps": n}, guidance)
        teacher = str(folder)
