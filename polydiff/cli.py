"""The ``polydiff`` command: ``train`` (Hydra recipes), ``sample`` (from a run directory), ``eval`` (score sample files), ``bench``."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from .recipes import check_recipe, check_schema, compose_recipe, recipe_paths

__all__ = ["main", "compose_recipe"]

USAGE = """usage: polydiff <command> [args]

commands:
  train RECIPE.yaml [hydra overrides]   train a recipe (a file, or a shipped recipe's name from any folder:
        audio_unet, image_unet, molecule_egnn), e.g.
        polydiff train recipes/audio_unet.yaml profile=cpu trainer.max_steps=500 hydra.run.dir=runs/audio
        (multirun: -m trainer.lr=1e-4,2e-4; every Hydra flag works)
  sample RUN_DIR [--n N] [--eval] [--seeds K] [overrides]   write new samples from a run's last checkpoint, e.g.
        polydiff sample runs/audio --n 16 sampler.name=ddim sampler.steps=50 guidance.scale=3 label=seven
        polydiff sample runs/audio --n 4 --known take.wav known.start=0.4 known.end=0.6   (fill 0.4-0.6 s)
  eval RUN_DIR|RECIPE.yaml SAMPLES... [--json FILE] [domain.KEY=V]   score sample files (WAV/FLAC, SDF/XYZ,
        PNG/JPEG, .pt) made by any model with the domain's metrics, beside real held-out data, e.g.
        polydiff eval runs/audio other_model_wavs/ runs/audio/samples/sample-20261129-101500
  bench [--suite quick|full] [--domains ...] [--recipe NAME=RECIPE.yaml]   benchmark the built-in domains and
        the example, plus any domain of your own given by its recipe
"""


def _fail(msg: str) -> "SystemExit":
    return SystemExit(f"polydiff: error: {msg}")


def _check_run_dir(recipe: str, overrides: Sequence[str]) -> None:
    """Refuse a run directory whose checkpoint the recipe cannot resume before Hydra records the new config there."""
    from hydra.errors import ConfigCompositionException

    from .build import to_plain
    from .checkpoint import load_checkpoint
    from .resume import check_resumable, resume_source

    plain = [o for o in overrides if "=" in o and not o.startswith("-")]
    try:
        cfg = compose_recipe(recipe, plain, with_hydra=True)
    except ConfigCompositionException as err:
        check_schema(compose_recipe(recipe), recipe)
        _explain_override(recipe, plain, err)
        return  # not ours to explain: Hydra reports it as usual
    check_schema(cfg, recipe)
    ckpt = resume_source(cfg.trainer.resume, Path(cfg.hydra.run.dir) / "checkpoints" / "last.pt")
    if ckpt is not None:
        del cfg.hydra
        check_resumable(load_checkpoint(ckpt, mmap=True), to_plain(cfg), ckpt)


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
            messages.append(unknown_key("domain", key, known, cls.__qualname__).args[0] if key not in known else
                            f"domain.{key} is an argument of {cls.__qualname__} that this recipe does not set: add it with +{o}")
        else:
            message = unknown_key("model", key, [str(k) for k in base.model]).args[0]
            messages.append(message if "Did you mean" in message else f"{message}. If the network takes it, add it with +{o}")
    raise KeyError("\n".join(messages)) from err


_USER_ERRORS = (KeyError, ValueError, FileNotFoundError, TypeError, ImportError, FloatingPointError, NotImplementedError)


def _message(err: BaseException) -> str:
    """One line for the user: the error's message (its type where it has none) and, where it was raised in the
    user's own code (a domain of theirs), that place."""
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err) or type(err).__name__
    root = Path(__file__).resolve().parents[1]
    shipped = tuple(str(root / package) for package in ("polydiff", "domains", "benchmarks", "examples"))
    frames = [f for f in traceback.extract_tb(err.__traceback__)  # the last is where it was raised, libraries aside
              if f.filename.startswith(shipped)
              or not any(part in f.filename for part in ("site-packages", "dist-packages", "<frozen"))]
    if not frames or frames[-1].filename.startswith(shipped):
        return message
    return f"{message} (raised at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})"


def _train(args: Sequence[str]) -> None:
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return
    # KEY=V first is an override; a recipe file may still hold "=" (a sweep's folder: lr=1e-4/recipe.yaml).
    if not args or args[0].startswith("-") or ("=" in args[0] and not Path(args[0]).is_file()):
        raise _fail("train needs a recipe first: polydiff train RECIPE.yaml [hydra overrides], e.g. "
                    "polydiff train recipes/image_unet.yaml profile=cpu")
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .config import check_overrides, register_configs
    from .trainer import CheckpointWriteError, train

    register_configs()
    try:
        path, search = recipe_paths(args[0])
    except FileNotFoundError as err:
        raise _fail(str(err)) from err
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):
        # Hydra's default folder holds the start time, which each process reads on its own clock.
        raise _fail("under torchrun, give every process the same run folder: add hydra.run.dir=DIR")
    if any(a.startswith("--experimental-rerun") for a in args[1:]):
        raise _fail("--experimental-rerun loads a pickle (config.pickle), which can run code: polydiff does not take "
                    "it; run the recipe again with the same overrides (recorded in RUN/.hydra/overrides.yaml)")
    try:
        check_overrides(args[1:])
        if not {"-m", "--multirun", "--cfg", "-c", "--help", "-h"} & set(args[1:]):
            _check_run_dir(args[0], args[1:])
        check_recipe(args[0], args[1:])  # before Hydra acts on the recipe's hydra section (callbacks, logging)
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise _fail(_message(err)) from err

    @hydra.main(version_base=None, config_path=None, config_name=None)
    def _task(cfg) -> None:
        if int(os.environ.get("RANK", "0")) > 0:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs progress; the others only what goes wrong
        try:
            train(cfg, HydraConfig.get().runtime.output_dir)
        except _USER_ERRORS + (CheckpointWriteError,) as err:
            raise _fail(_message(err)) from err

    saved = sys.argv
    # The recipe's config groups (RECIPE/profile/...) as a --config-dir option: an option may stand anywhere, so
    # Hydra's flags (-m, --cfg) may come before or after the user's overrides.
    groups = ["--config-dir", str(path.with_suffix(""))] if search else []
    sys.argv = ["polydiff train", "--config-path", str(path.parent), "--config-name", path.stem, *groups, *args[1:]]
    try:
        _task()
    finally:
        sys.argv = saved


def _sample(args: Sequence[str]) -> None:
    import torch
    from omegaconf import OmegaConf

    from .build import parts_from_checkpoint, resolve_device, split_domain_overrides
    from .checkpoint import load_checkpoint
    from .config import GuidanceConfig, SamplerConfig, check_call, check_overrides
    from .generate import generate

    p = argparse.ArgumentParser(prog="polydiff sample", description="Write new samples from a run's checkpoint.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default RUN_DIR/checkpoints/last.pt")
    p.add_argument("--out", type=Path, default=None, help="default RUN_DIR/samples/sample-TIME")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat with seeds SEED..SEED+K-1 (one folder each); with --eval, metrics' mean and range")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--eval", action="store_true", help="also compute the domain's metrics")
    p.add_argument("--known", type=Path, default=None,
                   help="a sample file whose part outside the region given by known.KEY=V is kept (inpainting, "
                        "continuation): audio known.start=S known.end=E (seconds), images known.box=[l,t,r,b]")
    p.add_argument("overrides", nargs="*", help="sampler.KEY=V guidance.KEY=V label=NAME prior.KEY=V")
    a = p.parse_intermixed_args(args)

    if a.seeds < 1 or a.n < 1:
        raise _fail(f"--n and --seeds must be at least 1, got --n {a.n} --seeds {a.seeds}")
    if a.out is not None and (a.out / "sampling.json").exists():
        raise _fail(f"{a.out} already holds samples (sampling.json): choose another --out, or remove it first")
    ckpt_path = a.checkpoint or a.run_dir / "checkpoints" / "last.pt"
    if not ckpt_path.is_file():
        raise _fail(f"no checkpoint at {ckpt_path}: train first (polydiff train RECIPE hydra.run.dir={a.run_dir})")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except (ValueError, KeyError) as err:
        raise _fail(_message(err)) from err
    cfg = ckpt["config"]

    over = OmegaConf.from_dotlist([o.lstrip("+") for o in a.overrides]) if a.overrides else OmegaConf.create({})
    unknown = set(over.keys()) - {"sampler", "guidance", "label", "prior", "domain", "known"}
    if unknown:
        raise _fail(f"unknown override(s) {sorted(unknown)}; use sampler.KEY=V, guidance.KEY=V, label=NAME, prior.KEY=V "
                    "or domain.KEY=V (e.g. domain.root=DIR where the training data now lie, for --eval)")
    domain_over = split_domain_overrides(a.overrides)[0]
    try:
        check_overrides(a.overrides)
        sampler = OmegaConf.to_container(
            OmegaConf.merge(OmegaConf.structured(SamplerConfig), cfg["sampler"], over.get("sampler", {}))
        )
        guidance = OmegaConf.to_container(
            OmegaConf.merge(OmegaConf.structured(GuidanceConfig), cfg["guidance"], over.get("guidance", {}))
        )
    except Exception as err:  # a misspelled key, or omegaconf's error naming a bad value
        raise _fail(_override_error(err)) from err
    prior = OmegaConf.to_container(over.get("prior", OmegaConf.create({})))
    known_options = OmegaConf.to_container(over.get("known", OmegaConf.create({})))
    if known_options and a.known is None:
        raise _fail("known.KEY=V options need --known FILE (the sample to keep part of)")

    try:
        device = resolve_device(a.device, "--device")
        parts = parts_from_checkpoint(ckpt, a.weights, domain_over)
        parts.net.to(device)
        domain = parts.domain
        _check_guidance(domain, guidance, over.get("guidance", {}))
        label = over.get("label", None)
        if label is not None and str(label) != "all":
            labels = torch.full((a.n,), domain.parse_label(label), dtype=torch.long, device=device)
        else:
            labels = domain.default_labels(a.n, device)
        known = None
        if a.known is not None:
            check_call(domain.known_values, known_options, "known", given=("path", "n"))
            known = domain.known_values(a.known, a.n, **known_options)
        out = a.out or _fresh_dir(a.run_dir / "samples" / time.strftime("sample-%Y%m%d-%H%M%S"))
        seeds = list(range(a.seed, a.seed + a.seeds))
        runs, paths = [], []
        for seed in seeds:
            gen = torch.Generator(device=device).manual_seed(seed)
            t0 = time.perf_counter()
            batch = generate(
                domain, parts.net, parts.schedule, parts.objective, a.n, sampler=sampler, guidance=guidance,
                labels=labels, device=device, generator=gen, prior=prior, known=known,
            )
            run = {"seed": seed, "seconds": time.perf_counter() - t0}
            paths += domain.save_samples(batch, out if len(seeds) == 1 else out / f"seed-{seed}", prefix="samples")
            if a.eval:
                try:
                    run["metrics"] = domain.evaluate(batch)
                except (FileNotFoundError, ValueError, OSError) as err:  # the metric classifier needs the data
                    raise _fail(f"{err}; the samples are in {out}. Score them later with polydiff eval "
                                f"{a.run_dir} {out} domain.root=DIR (where the training data now lie)") from err
            print(f"{a.n} samples ({sampler['name']}, {sampler['steps']} steps, guidance {guidance['scale']}, "
                  f"seed {seed}) in {run['seconds']:.1f}s" + (f": {_fmt_metrics(run['metrics'])}" if a.eval and len(seeds) > 1 else ""))
            runs.append(run)
    except _USER_ERRORS as err:
        raise _fail(_message(err)) from err
    record = {
        "checkpoint": str(ckpt_path), "step": int(ckpt["step"]), "n": a.n, "seed": a.seed, "weights": a.weights,
        "sampler": sampler, "guidance": guidance, "label": None if label is None else str(label), "prior": prior,
        "known": None if a.known is None else {"path": str(a.known), **known_options},
        "seconds": sum(r["seconds"] for r in runs), "device": str(device),
    }
    if len(seeds) > 1:
        record["runs"] = runs
    if a.eval:
        record["metrics"] = runs[0]["metrics"]
        if len(seeds) > 1:  # mean and range over seeds of every numeric metric
            keys = [k for k in runs[0]["metrics"] if all(isinstance(r["metrics"].get(k), (int, float)) for r in runs)]
            values = {k: [float(r["metrics"][k]) for r in runs] for k in keys}
            record["metrics"] = {k: sum(v) / len(v) for k, v in values.items()}
            record["metrics_range"] = {k: [min(v), max(v)] for k, v in values.items()}
        try:  # real data, the same metrics, as many samples
            record["reference"] = domain.reference_metrics(a.n)
        except (FileNotFoundError, ValueError, OSError) as err:
            print(f"polydiff: warning: no real-data reference row: the training data could not be read ({err})",
                  file=sys.stderr)
            record["reference"] = None
    paths.append(out / "sampling.json")
    (out / "sampling.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(f"wrote {len(paths)} files to {out}")
    for path in paths if len(paths) <= 12 else [*paths[:5], "...", *paths[-5:]]:
        print(f"  {path}")
    if a.eval:
        what = "samples" if len(seeds) == 1 else f"samples, mean [range] of {len(seeds)} seeds"
        print(f"{what}: {_fmt_metrics(record['metrics'], record.get('metrics_range'))}")
        if record["reference"]:
            print(f"real data: {_fmt_metrics(record['reference'])}")


def _override_error(err: Exception) -> str:
    """The first line of an override's error, naming ``section.key`` where omegaconf knows which value it was."""
    message = _message(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    section = getattr(err, "object_type", None)
    where = {"SamplerConfig": "sampler", "GuidanceConfig": "guidance"}.get(getattr(section, "__name__", ""))
    return f"{where}.{key}: {message}" if key and where else message


def _check_guidance(domain: Any, guidance: dict[str, Any], given: Any) -> None:
    """Refuse guidance options given for a model without labels: they would change nothing, yet be recorded."""
    if not given or domain.can_guide():
        return  # the recipe's own guidance, or a conditional model
    if float(guidance["scale"]) != 1.0 or float(guidance["rescale"]) > 0:
        named = " ".join(f"guidance.{k}={v}" for k, v in given.items())
        raise ValueError(
            f"{named} would have no effect: domain "
            f"{domain.name!r} of this run is unconditional (no condition to guide towards); drop the guidance.KEY=V "
            f"overrides"
        )


def _eval(args: Sequence[str]) -> None:
    from .build import split_domain_overrides
    from .scoring import load_domain, score_samples

    p = argparse.ArgumentParser(
        prog="polydiff eval",
        description="Score sample files made by any model with a domain's metrics, beside real held-out data.",
    )
    p.add_argument("source", help="a run directory (its checkpoint names the domain) or a recipe .yaml")
    p.add_argument("samples", nargs="+", help="files or folders of samples, one row each; domain.KEY=V overrides too")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--no-reference", action="store_true", help="skip the real-data reference row")
    a = p.parse_intermixed_args(args)
    overrides, paths = split_domain_overrides(a.samples)
    if not paths:
        raise _fail("give at least one file or folder of samples to score")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise _fail(f"no samples at {missing}: give files or folders of samples; of KEY=V settings only domain.KEY=V "
                    "apply here (a recipe is composed with its defaults)")
    if a.json is not None and a.json.exists():
        raise _fail(f"{a.json} exists: choose another --json file, or remove it first")
    try:
        domain, _ = load_domain(a.source, overrides)
        record = score_samples(domain, paths, reference=not a.no_reference)
    except _USER_ERRORS + (RuntimeError,) as err:
        raise _fail(_message(err)) from err
    if not any(row["metrics"] for row in record["samples"]):
        print(f"polydiff: warning: domain {domain.name!r} computed no metrics for these samples (too few samples for "
              "its metrics, samples of another length or size than the trained ones, or a domain without metrics)",
              file=sys.stderr)
    for row in record["samples"]:
        print(f"{row['path']} ({row['n']} samples): {_fmt_metrics(row['metrics'])}")
    if record.get("reference"):
        print(f"real data: {_fmt_metrics(record['reference'])}")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"source": str(a.source), **record}, indent=1, default=float) + "\n")
        print(f"wrote {a.json}")


def _fresh_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... where it exists (two draws within one second)."""
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    return candidate


def _fmt_metrics(metrics: dict[str, Any], ranges: Optional[dict[str, list[float]]] = None) -> str:
    """``fid 192.3 [175–216], is 4.09 [...]``: floats to 4 significant digits, ranges where given."""
    parts = []
    for k, v in metrics.items():
        text = f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        if ranges and k in ranges:
            text += f" [{ranges[k][0]:.4g}–{ranges[k][1]:.4g}]"
        parts.append(text)
    return ", ".join(parts)


def _bench(args: Sequence[str]) -> None:
    from .bench import main as bench_main

    bench_main(list(args))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``polydiff`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        # "module:Class" domains in recipes resolve from here, as with python -m; packages installed from a wheel come
        # first, so a folder of the user's own named domains/ or benchmarks/ does not hide polydiff's.
        sys.path.append(str(Path.cwd()))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    commands = {"train": _train, "sample": _sample, "eval": _eval, "bench": _bench}
    if command not in commands:
        raise _fail(f"unknown command {command!r}; choose one of {sorted(commands)}")
    try:
        commands[command](rest)
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGUSR1: the trainer has saved what it could and says so
        message = err.args[0] if err.args else "interrupted"
        if not err.args and command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            message += ("; under torchrun the last periodic checkpoint (trainer.ckpt_every) holds the run: the same "
                        "command resumes from it")
        if not err.args or int(os.environ.get("RANK", "0")) == 0:  # DDP processes stop alike: rank 0 says so
            print(f"polydiff: {message}", file=sys.stderr)
        # 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), as a shell reports it: a scheduler sees an unfinished run.
        raise SystemExit(128 + getattr(err, "signum", 2)) from None


if __name__ == "__main__":
    main()
