"""``polydiff sample`` (new samples from a run's checkpoint) and ``polydiff eval`` (score sample files)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .cli_common import USER_ERRORS, check_writable, fail, fmt_metrics, fresh_dir, json_text, user_message
from .latent import reconstruction_row

__all__ = ["sample_command", "eval_command", "check_guidance"]


def sample_command(args: Sequence[str]) -> None:
    import torch
    from omegaconf import OmegaConf

    from .build import parts_from_checkpoint, resolve_device, split_domain_overrides
    from .checkpoint import load_checkpoint
    from .config import GuidanceConfig, check_call, check_overrides, merge_sampler
    from .generate import generate

    p = argparse.ArgumentParser(prog="polydiff sample", description="Write new samples from a run's checkpoint.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default RUN_DIR/checkpoints/last.pt")
    p.add_argument("--out", type=Path, default=None, help="default RUN_DIR/samples/sample-TIME")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat with seeds SEED..SEED+K-1 (one folder each); with --eval, metrics' mean and range",
    )
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--eval", action="store_true", help="also compute the domain's metrics")
    p.add_argument(
        "--known",
        type=Path,
        default=None,
        help="a sample file whose part outside the region given by known.KEY=V is kept (inpainting, "
        "continuation): audio known.start=S known.end=E (seconds), images known.box=[l,t,r,b]",
    )
    p.add_argument("overrides", nargs="*", help="sampler.KEY=V guidance.KEY=V label=NAME prior.KEY=V")
    a = p.parse_intermixed_args(args)

    if a.seeds < 1 or a.n < 1:
        raise fail(f"--n and --seeds must be at least 1, got --n {a.n} --seeds {a.seeds}")
    if a.out is not None and (a.out / "sampling.json").exists():
        raise fail(f"{a.out} already holds samples (sampling.json): choose another --out, or remove it first")
    ckpt_path = a.checkpoint or a.run_dir / "checkpoints" / "last.pt"
    if a.checkpoint is not None and not a.checkpoint.is_file():
        kept = sorted(p.name for p in (a.run_dir / "checkpoints").glob("*.pt")) if a.run_dir.is_dir() else []
        raise fail(
            f"--checkpoint {a.checkpoint} does not exist"
            + (f"; {a.run_dir / 'checkpoints'} holds {', '.join(kept)}" if kept else "")
        )
    if not ckpt_path.is_file():
        raise fail(f"no checkpoint at {ckpt_path}: train first (polydiff train RECIPE hydra.run.dir={a.run_dir})")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except (ValueError, KeyError) as err:
        raise fail(user_message(err)) from err
    cfg = ckpt["config"]

    over = OmegaConf.from_dotlist([o.lstrip("+") for o in a.overrides]) if a.overrides else OmegaConf.create({})
    unknown = set(over.keys()) - {"sampler", "guidance", "label", "prior", "domain", "known"}
    if unknown:
        raise fail(
            f"unknown override(s) {sorted(unknown)}; use sampler.KEY=V, guidance.KEY=V, label=NAME, prior.KEY=V "
            "or domain.KEY=V (e.g. domain.root=DIR where the training data now lie, for --eval)"
        )
    domain_over = split_domain_overrides(a.overrides)[0]
    try:
        check_overrides(a.overrides)
        # The run's sampler section under the command line's; another sampler named there starts from its defaults.
        sampler = merge_sampler(cfg["sampler"], over.get("sampler", {}))
        guidance = OmegaConf.to_container(
            OmegaConf.merge(OmegaConf.structured(GuidanceConfig), cfg["guidance"], over.get("guidance", {}))
        )
    except Exception as err:  # a misspelled key, or omegaconf's error naming a bad value
        raise fail(_override_error(err)) from err
    prior = OmegaConf.to_container(over.get("prior", OmegaConf.create({})))
    known_options = OmegaConf.to_container(over.get("known", OmegaConf.create({})))
    if known_options and a.known is None:
        raise fail("known.KEY=V options need --known FILE (the sample to keep part of)")

    try:
        device = resolve_device(a.device, "--device")
        parts = parts_from_checkpoint(ckpt, a.weights, domain_over)
        parts.net.to(device)
        domain = parts.domain
        check_guidance(domain, guidance, over.get("guidance", {}))
        label = over.get("label", None)
        if label is not None and str(label) != "all":
            labels = torch.full((a.n,), domain.parse_label(label), dtype=torch.long, device=device)
        else:
            labels = domain.default_labels(a.n, device)
        known = None
        if a.known is not None:
            check_call(domain.known_values, known_options, "known", given=("path", "n"))
            known = domain.known_values(a.known, a.n, **known_options)
        out = a.out or fresh_dir(a.run_dir / "samples" / time.strftime("sample-%Y%m%d-%H%M%S"))
        check_writable(out, where="--out" if a.out else "the run's samples folder")  # before any sampling work
        seeds = list(range(a.seed, a.seed + a.seeds))
        runs, paths = [], []
        for seed in seeds:
            gen = torch.Generator(device=device).manual_seed(seed)
            t0 = time.perf_counter()
            batch = generate(
                domain,
                parts.net,
                parts.schedule,
                parts.objective,
                a.n,
                sampler=sampler,
                guidance=guidance,
                labels=labels,
                device=device,
                generator=gen,
                prior=prior,
                known=known,
            )
            run = {"seed": seed, "seconds": time.perf_counter() - t0}
            paths += domain.save_samples(batch, out if len(seeds) == 1 else out / f"seed-{seed}", prefix="samples")
            if a.eval:
                try:
                    run["metrics"] = domain.evaluate(batch)
                except (FileNotFoundError, ValueError, OSError) as err:  # the metric classifier needs the data
                    raise fail(
                        f"{err}; the samples are in {out}. Score them later with polydiff eval "
                        f"{a.run_dir} {out} domain.root=DIR (where the training data now lie)"
                    ) from err
            print(
                f"{a.n} samples ({sampler['name']}, {sampler['steps']} steps, guidance {guidance['scale']}, "
                f"seed {seed}) in {run['seconds']:.1f}s"
                + (f": {fmt_metrics(run['metrics'])}" if a.eval and len(seeds) > 1 else "")
            )
            runs.append(run)
    except USER_ERRORS as err:
        raise fail(user_message(err)) from err
    record = {
        "checkpoint": str(ckpt_path),
        "step": int(ckpt["step"]),
        "n": a.n,
        "seed": a.seed,
        "weights": a.weights,
        "sampler": sampler,
        "guidance": guidance,
        "label": None if label is None else str(label),
        "prior": prior,
        "known": None if a.known is None else {"path": str(a.known), **known_options},
        "seconds": sum(r["seconds"] for r in runs),
        "device": str(device),
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
            print(
                f"polydiff: warning: no real-data reference row: the training data could not be read ({err})",
                file=sys.stderr,
            )
            record["reference"] = None
        record.update(reconstruction_row(domain, a.n))  # latent models: the first stage's ceiling, beside it
    paths.append(out / "sampling.json")
    (out / "sampling.json").write_text(json_text(record))
    print(f"wrote {len(paths)} files to {out}")
    for path in paths if len(paths) <= 12 else [*paths[:5], "...", *paths[-5:]]:
        print(f"  {path}")
    if a.eval:
        what = "samples" if len(seeds) == 1 else f"samples, mean [range] of {len(seeds)} seeds"
        print(f"{what}: {fmt_metrics(record['metrics'], record.get('metrics_range'))}")
        if record["reference"]:
            print(f"real data: {fmt_metrics(record['reference'])}")
        if record.get("reconstruction"):
            print(f"first stage (held-out data encoded and decoded): {fmt_metrics(record['reconstruction'])}")
    from .report import report_after_sampling  # warns where the page cannot be drawn: the samples are written

    if report_after_sampling(out, domain) is not None:
        print(f"see and hear them: {out / 'report.html'}")


def _override_error(err: Exception) -> str:
    """The first line of an override's error, naming ``section.key`` where omegaconf knows which value it was."""
    message = user_message(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    section = getattr(err, "object_type", None)
    where = {"SamplerConfig": "sampler", "GuidanceConfig": "guidance"}.get(getattr(section, "__name__", ""))
    return f"{where}.{key}: {message}" if key and where else message


def check_guidance(domain: Any, guidance: dict[str, Any], given: Any) -> None:
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


def eval_command(args: Sequence[str]) -> None:
    if "--nll" in args:
        return _nll_command(list(args))
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
        raise fail("give at least one file or folder of samples to score")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise fail(
            f"no samples at {missing}: give files or folders of samples; of KEY=V settings only domain.KEY=V "
            "apply here (a recipe is composed with its defaults)"
        )
    if a.json is not None and a.json.exists():
        raise fail(f"{a.json} exists: choose another --json file, or remove it first")
    try:
        domain, _ = load_domain(a.source, overrides)
        record = score_samples(domain, paths, reference=not a.no_reference)
    except USER_ERRORS + (RuntimeError,) as err:
        raise fail(user_message(err)) from err
    if not any(row["metrics"] for row in record["samples"]):
        print(
            f"polydiff: warning: domain {domain.name!r} computed no metrics for these samples (too few samples for "
            "its metrics, samples of another length or size than the trained ones, or a domain without metrics)",
            file=sys.stderr,
        )
    for row in record["samples"]:
        print(f"{row['path']} ({row['n']} samples): {fmt_metrics(row['metrics'])}")
    if record.get("reference"):
        print(f"real data: {fmt_metrics(record['reference'])}")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json_text({"source": str(a.source), **record}))
        print(f"wrote {a.json}")


def _nll_command(args: list[str]) -> None:
    """``polydiff eval --nll [bound|vdm|ode] RUN_DIR``: the run's NLL on held-out data (:mod:`polydiff.nll`)."""
    from .build import load_run, resolve_device, split_domain_overrides
    from .nll import KINDS, evaluate_nll

    at = args.index("--nll")
    kind = args[at + 1] if at + 1 < len(args) and args[at + 1] in KINDS else "bound"
    rest = args[:at] + args[at + (2 if at + 1 < len(args) and args[at + 1] == kind else 1) :]
    p = argparse.ArgumentParser(
        prog="polydiff eval --nll [bound|vdm|ode]",
        description="A trained run's negative log-likelihood on held-out data, in nats and bits per dimension.",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=256, help="held-out samples scored (default 256)")
    p.add_argument("--steps", type=int, default=None, help="bound: strata of steps (default 100); ode: RK4 steps (64)")
    p.add_argument("--bins", default="auto", help="levels of quantised data (256: 8-bit images), none, or auto")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="domain.KEY=V (e.g. domain.root=DIR where the data now lie)")
    a = p.parse_intermixed_args(rest)
    domain_over, other = split_domain_overrides(a.overrides)
    if other:
        raise fail(f"--nll takes only domain.KEY=V overrides, got {other}")
    if a.n < 1 or a.batch_size < 1 or (a.steps is not None and a.steps < 1):
        raise fail(f"--n, --batch-size and --steps must be at least 1, got {a.n}, {a.batch_size}, {a.steps}")
    if a.json is not None and a.json.exists():
        raise fail(f"{a.json} exists: choose another --json file, or remove it first")
    try:
        bins = None if a.bins.lower() == "none" else "auto" if a.bins == "auto" else int(a.bins)
    except ValueError:
        raise fail(f"--bins {a.bins!r}: give a number of levels (256 for 8-bit images), none or auto") from None
    try:
        device = resolve_device(a.device, "--device")
        parts, ckpt = load_run(a.run_dir, "ema", device, domain_over)
        steps = a.steps
        if steps is None and kind != "ode":
            steps = 100
        t0 = time.perf_counter()
        record = evaluate_nll(parts, kind, a.n, a.batch_size, steps, bins, a.split, device, a.seed)
    except USER_ERRORS + (RuntimeError,) as err:
        raise fail(user_message(err)) from err
    record.update(run=str(a.run_dir), step=int(ckpt["step"]), seconds=time.perf_counter() - t0)
    what = f"ODE, {record.get('ode_steps')} RK4 steps"
    if kind != "ode":
        what = f"{record['time']}-time bound, {record['steps']} strata"
    print(
        f"{a.run_dir} step {record['step']} ({what}, {record['n']} {a.split} samples, {record['decoder']}): "
        f"nll_nats {record['nll_nats']:.4g} +- {record['nll_nats_sem']:.2g}, "
        f"nll_bpd {record['nll_bpd']:.4g} +- {record['nll_bpd_sem']:.2g} ({record['dims_mean']:.4g} dims per sample)"
    )
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json_text(record))
        print(f"wrote {a.json}")
