"""Fixed against learned reverse-step variances (Nichol & Dhariwal 2021, Improved DDPM, sec. 3.1 and Fig. 8).

Trains two runs of ``--recipe`` (default: the image recipe's CPU profile) with the same settings but
``objective.variance=fixed`` and ``objective.variance=learned``, then for each run draws DDPM samples at several step
counts (default 25, 50, 100 and the trained T, respaced on the trained grid) from the same seeded noise and labels
(every ``--seeds`` entry is one such draw), scores them with the domain's metrics (the headline one: images FID,
points distance to the nearest centre), and computes the variational bound in bits per dimension on held-out items
(``polydiff eval --nll bound``, the code the suite's ``nll_row`` calls). The fixed run is sampled with the posterior
variance beta~ (polydiff's DDPM default, Ho et al.'s "small") and also with beta ("large"), the two ends the learned
variance interpolates. Training cost is the CPU time (all threads) of each ``polydiff train`` command, run in this
process after one untimed warm-up step, and the wall time of its optimizer steps (its ``metrics.jsonl``); both runs skip
the closing draw's metrics (``trainer.eval=false``), which this script computes itself. ``--runs FIXED LEARNED``
scores two runs trained before instead (their CPU time is then unknown).

    python benchmarks/bench_variance.py [--recipe recipes/image_unet.yaml] [--set profile=cpu ...]
        [--train-steps 1500] [--steps 25 50 100 T] [--n 200] [--seeds 0] [--nll-items 64] [--nll-strata 50]
        [--out DIR] [--runs FIXED LEARNED] [--json FILE]
    python benchmarks/bench_variance.py --recipe examples/points.yaml --set trainer.threads=1 --json X.json
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.bench_distill import HEADLINE, draw, timed, write_result
from polydiff.build import load_run
from polydiff.cli import main as polydiff
from polydiff.nll import evaluate_nll

IMAGE = "recipes/image_unet.yaml"
IMAGE_CPU = ["profile=cpu"]  # the default recipe's overrides when --recipe and --set are not given
STEPS = ("25", "50", "100", "T")
VARIANCES = ("fixed", "learned")
# Sampled variants: (name, run, DDPM's sampler.variance); the learned run's v overrides the option.
VARIANTS = (("fixed", "fixed", "small"), ("fixed_large", "fixed", "large"), ("learned", "learned", "small"))
NOT_METRICS = ("steps", "nfe", "wall_s", "seeds")


def draw_row(run: tuple[Any, dict[str, Any]], steps: int, variance: str, n: int, seeds: list[int]) -> dict[str, Any]:
    """DDPM at ``steps`` (the run's ``clip_x0`` and ``batch_size``) on each seed's draw of ``n`` samples: every metric
    the domain's ``evaluate`` returns, averaged over the seeds (``KEY_sd``: their spread, with two seeds or more)."""
    per_seed: list[dict[str, Any]] = []
    wall = 0.0
    for seed in seeds:
        batch, seconds, _ = draw(run, {"name": "ddpm", "steps": steps, "variance": variance}, n, seed)
        wall += seconds
        per_seed.append(run[0].domain.evaluate(batch))
    row: dict[str, Any] = {"steps": steps, "nfe": steps, "wall_s": wall / len(seeds)}
    for key in per_seed[0]:
        values = [float(m[key]) for m in per_seed]
        row[key] = statistics.fmean(values)
        if len(values) > 1:
            row[f"{key}_sd"] = statistics.stdev(values)
    if len(seeds) > 1:
        row["seeds"] = {key: [m[key] for m in per_seed] for key in per_seed[0]}
    return row


def bound_row(run: tuple[Any, dict[str, Any]], items: int, strata: int) -> dict[str, Any]:
    """The variational bound on ``items`` held-out items, ``strata`` strata of its denoising terms, as ``polydiff eval
    --nll bound`` computes it (a learned run's bound reads its variance), or ``{"error": why}``."""
    try:
        return evaluate_nll(run[0], "bound", n=items, steps=strata, device="cpu")
    except ValueError as err:  # a model without a likelihood (a latent one)
        return {"error": str(err)}


def reference_row(domain: Any, n: int) -> dict[str, Any]:
    """The domain's metrics on ``n`` held-out items (its own reference row, else ``evaluate`` on the test split): where
    the samples' figures should land (a points draw spread wider or narrower than the data scores worse or better).
    """
    try:
        ref = domain.reference_metrics(n)
        if not ref:
            data = domain.dataset("test")
            ref = domain.evaluate(domain.collate([data[i] for i in range(min(n, len(data)))]))
    except Exception as err:  # a domain without a test split or a metric for it: the table goes on without
        return {"error": f"{type(err).__name__}: {err}"}
    return dict(ref)


def side_by_side(runs: dict[str, dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per figure: the headline metric at each step count (fixed beta~, fixed beta, learned), the bound in
    bits per dimension, training CPU minutes and the optimizer steps' wall minutes; ``ratio``: learned / fixed."""
    table = []
    by_steps = {v: {r["steps"]: r for r in runs[v]["rows"]} for v in runs}
    for steps in by_steps["learned"]:
        cells = {v: by_steps[v][steps].get(metric) for v in by_steps}
        table.append({"figure": f"{metric} DDPM-{steps}", **cells})
    table.append({"figure": "bound bits/dim", **{v: runs[v]["nll"].get("nll_bpd") for v in VARIANCES}})
    table.append({"figure": "training CPU min", **{v: runs[v]["training"]["cpu_min"] for v in VARIANCES}})
    table.append({"figure": "optimizer steps min", **{v: runs[v]["training"]["optimizer_wall_min"] for v in VARIANCES}})
    for row in table:
        fixed, learned = row.get("fixed"), row.get("learned")
        ok = isinstance(fixed, (int, float)) and isinstance(learned, (int, float)) and fixed != 0
        row["ratio"] = learned / fixed if ok else None
    return table


def _fmt(value: Any) -> str:
    return f"{value:>12.4g}" if isinstance(value, (int, float)) else f"{'-':>12}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=IMAGE, help="the recipe of both runs (default: the image recipe)")
    p.add_argument("--set", nargs="*", default=None, help="overrides of both runs (default with the image recipe: "
                   "profile=cpu), e.g. trainer.threads=1")  # fmt: skip
    p.add_argument("--train-steps", type=int, default=None, help="trainer.max_steps (default: the recipe's)")
    p.add_argument("--steps", nargs="+", default=list(STEPS), help="DDPM step counts; T: the trained T")
    p.add_argument("--n", type=int, default=None, help="samples a draw (default: the run's trainer.num_samples)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one draw of --n samples per seed")
    p.add_argument("--nll-items", type=int, default=None, help="held-out items of the bound (default: the suite's)")
    p.add_argument("--nll-strata", type=int, default=None, help="strata of the bound (default: the suite's)")
    p.add_argument("--runs", nargs=2, default=None, metavar=("FIXED", "LEARNED"), help="score two trained runs "
                   "instead of training (their CPU minutes unknown)")  # fmt: skip
    p.add_argument("--out", default=None, help="runs folder (default runs/bench_variance_NAME)")
    p.add_argument("--json", default=None)
    return p


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Train both runs, score them, print the side-by-side table; the result (also written to ``--json``)."""
    from benchmarks.suite import NLL_ITEMS, NLL_STRATA, environment, run_training_time

    a = _parser().parse_args(argv)
    overrides = a.set if a.set is not None else (IMAGE_CPU if a.recipe == IMAGE else [])
    if a.train_steps is not None:
        overrides = [*overrides, f"trainer.max_steps={a.train_steps}"]
    bad = [s for s in a.steps if s != "T" and not (s.isdigit() and int(s) >= 1)]
    if bad:
        raise SystemExit(f"--steps {bad}: positive step counts, or T for the trained T")
    if any(o.split("=", 1)[0].lstrip("+~") in ("objective.variance", "objective.vlb_weight") for o in overrides):
        raise SystemExit("--set: objective.variance is what this benchmark varies; leave it (and vlb_weight) out")
    out = Path(a.out or f"runs/bench_variance_{Path(a.recipe).stem}")
    runs: dict[str, dict[str, Any]] = {}
    loaded = {}
    if a.runs is None:
        # One untimed step first, so that neither timed run pays the process's one-time costs (imports, data, caches).
        polydiff(
            ["train", a.recipe, *overrides, "trainer.max_steps=1", "trainer.eval=false", f"hydra.run.dir={out}/warmup"]
        )
    for i, variance in enumerate(VARIANCES):
        run_dir = out / variance if a.runs is None else Path(a.runs[i])
        own = [*overrides, f"objective.variance={variance}", "trainer.eval=false", f"hydra.run.dir={run_dir}"]
        # A given run's CPU time is unknown: only its optimizer steps' wall time, from its metrics.jsonl.
        cost: dict[str, Any] = timed("train", a.recipe, *own) if a.runs is None else {"cpu_min": None}
        took = run_training_time(str(run_dir))
        cost.update(steps=took["training_steps"], optimizer_wall_min=(took.get("training_s") or math.nan) / 60)
        loaded[variance] = load_run(run_dir)
        saved = loaded[variance][1]["config"]["objective"].get("variance", "fixed")
        if saved != variance:
            raise SystemExit(f"--runs: {run_dir} was trained with objective.variance={saved}, not {variance}")
        given = {"overrides": own[:-1]} if a.runs is None else {"given": True}
        runs[variance] = {"run": str(run_dir), **given, "training": cost}
    parts, ckpt = loaded["fixed"]
    cfg = ckpt["config"]
    domain = parts.domain.name or cfg["domain"]["name"]
    big_t = int(cfg["schedule"]["steps"])
    steps = sorted({big_t if s == "T" else int(s) for s in a.steps})
    n = a.n or int(cfg["trainer"]["num_samples"])
    items, strata = a.nll_items or NLL_ITEMS, a.nll_strata or NLL_STRATA
    for variance in VARIANCES:
        runs[variance]["nll"] = bound_row(loaded[variance], items, strata)
    for name, source, option in VARIANTS:
        runs.setdefault(name, {"run": runs[source]["run"], "sampler_variance": option})
        runs[name]["rows"] = [draw_row(loaded[source], s, option, n, a.seeds) for s in steps]
    reference = reference_row(parts.domain, n)
    metric, lower = HEADLINE.get(domain, (None, True))
    keys = [k for k in runs["fixed"]["rows"][0] if k not in NOT_METRICS and not k.endswith("_sd")]
    if metric not in keys:
        metric, lower = (keys[0] if keys else None), True
    table = side_by_side(runs, metric)
    width = max(len(r["figure"]) for r in table)
    print(f"\n{'':<{width}} " + " ".join(f"{c:>12}" for c in (*[v[0] for v in VARIANTS], "learned/fixed")))
    for r in table:
        print(f"{r['figure']:<{width}} " + " ".join(_fmt(r.get(c)) for c in (*[v[0] for v in VARIANTS], "ratio")))
    print(f"\n{metric} ({'lower' if lower else 'higher'} is better) on {n} samples x {len(a.seeds)} seed(s); bound on "
          f"{runs['fixed']['nll'].get('n', items)} held-out items, {strata} strata")  # fmt: skip
    print(f"held-out data (up to {n} items): {metric} {_fmt(reference.get(metric)).strip()}")
    for name, _, _ in VARIANTS:
        for r in runs[name]["rows"]:
            shown = {k: v for k, v in r.items() if k not in ("seeds",)}
            print(f"{name:<12} " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    result = {
        "benchmark": "variance",
        "recipe": a.recipe,
        "domain": domain,
        "overrides": overrides,
        "trained_steps": big_t,
        "n": n,
        "seeds": a.seeds,
        "nll_items": items,
        "nll_strata": strata,
        "headline": {"metric": metric, "lower_is_better": lower},
        "reference": reference,
        "runs": runs,
        "table": table,
        "environment": environment(torch.device("cpu")),
    }
    return write_result(a.json, result)


if __name__ == "__main__":
    main()
