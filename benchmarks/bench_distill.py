"""Few-step students beside their teacher, for any recipe: progressive and consistency distillation.

Trains a teacher of ``--recipe`` (default: the points example; ``--teacher-set`` overrides its training, e.g.
``profile=cpu``) or takes ``--teacher RUN``, distils it both ways with ``polydiff distill``, then scores the students
at 1, 2, 4 and 8 steps beside the teacher's DPM-Solver++ at 10 and 20 steps, DDPM at its training T and DDIM at the
students' step counts, on the same seeded draw (the same noise and labels for every row). Each row samples with its
run's own sampler section (``clip_x0``, ``batch_size``) and guidance scale (a student distilled at the teacher's scale
samples at 1). Every metric the domain's ``evaluate`` returns is kept; the headline one per domain (points: distance
to the nearest centre, images: FID, audio: label accuracy, molecules: atom stability; else the first key) is also
given against the teacher's DPM-Solver++ 20. Distillation's cost is the CPU time of its process (all threads).

    python benchmarks/bench_distill.py [--out DIR] [--teacher RUN] [--n 4096] [--train-steps 1500]
        [--round-steps 300] [--consistency-steps 1500] [--set KEY=V ...] [--json FILE]
    python benchmarks/bench_distill.py --recipe recipes/image_unet.yaml --teacher-set profile=cpu \\
        --train-steps 1500 --round-steps 200 --consistency-steps 1000 --n 200 --json benchmarks/results/X.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from polydiff.build import load_run
from polydiff.cli import main as polydiff
from polydiff.config import merge_sampler
from polydiff.generate import generate
from polydiff.samplers import network_calls

STEPS = (1, 2, 4, 8)
POINTS = "examples/points.yaml"
# The headline metric of each shipped domain (its evaluate() key) and whether lower is better.
HEADLINE = {
    "points": ("dist_to_centre", True),
    "image": ("fid", True),
    "audio": ("label_acc", False),
    "molecule": ("atom_stability", False),
}


def timed(*args: str) -> dict[str, float]:
    """Run ``polydiff ARGS`` in this process: its CPU minutes (all threads) and wall minutes."""
    cpu, wall = time.process_time(), time.perf_counter()
    polydiff(list(args))
    return {"cpu_min": (time.process_time() - cpu) / 60, "wall_min": (time.perf_counter() - wall) / 60}


def draw(run: tuple[Any, dict[str, Any]], sampler: dict[str, Any], n: int, seed: int) -> tuple[Any, float, float]:
    """``n`` samples of a loaded run (``load_run``'s ``(parts, checkpoint)``) on seed ``seed``'s draw (its noise and
    default labels), with its own sampler section updated by ``sampler`` (its ``clip_x0``, ``batch_size``) and its own
    guidance scale: the batch, the wall seconds and the scale."""
    parts, ckpt = run
    cfg = ckpt["config"]
    scale = float((cfg.get("guidance") or {}).get("scale", 1.0))
    start = time.perf_counter()
    batch = generate(
        parts.domain,
        parts.net,
        parts.schedule,
        parts.objective,
        n,
        sampler=merge_sampler(cfg["sampler"], sampler),
        guidance={"scale": scale},
        labels=parts.domain.default_labels(n),
        generator=torch.Generator().manual_seed(seed),
    )
    return batch, time.perf_counter() - start, scale


class Scorer:
    """Draws ``n`` samples of a run with a sampler and scores them with the domain's metrics; each run loaded once."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.runs = n, seed, {}

    def __call__(self, run: Path, name: str, steps: int) -> dict[str, Any]:
        if run not in self.runs:
            self.runs[run] = load_run(run)
        batch, wall, scale = draw(self.runs[run], {"name": name, "steps": steps}, self.n, self.seed)
        timing = {"nfe": network_calls(name, steps), "guidance": scale, "wall_s": wall}
        return {**timing, **self.runs[run][0].domain.evaluate(batch)}


def headline(domain: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The domain's headline metric, and each row's value of it over the teacher's DPM-Solver++ 20 (``vs_teacher``)."""
    key, lower = HEADLINE.get(domain, (None, True))
    metrics = [k for k in rows[0] if k not in ("model", "steps", "nfe", "guidance", "wall_s")]
    if key not in metrics:
        key, lower = (metrics[0] if metrics else None), True
    ref = next((r.get(key) for r in rows if r["model"] == "teacher dpmpp_2m" and r["steps"] == 20), None)
    for r in rows:
        if key is not None and ref and isinstance(r.get(key), (int, float)):
            r["vs_teacher"] = r[key] / ref
    return {"metric": key, "lower_is_better": lower, "teacher_dpmpp_2m_20": ref}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=POINTS, help="the teacher's recipe (default: the points example)")
    p.add_argument("--teacher-set", nargs="*", default=[], help="overrides of the teacher's training, e.g. profile=cpu")
    p.add_argument("--out", default=None, help="runs folder (default runs/bench_distill, or runs/bench_distill_NAME)")
    p.add_argument("--teacher", default=None, help="a trained run: vp, flow, reflow or edm (default: train one)")
    p.add_argument("--n", type=int, default=None, help="samples a row (default 4096 for points, else the teacher's "
                   "trainer.num_samples)")  # fmt: skip
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--round-steps", type=int, default=300, help="trainer.max_steps of each progressive round")
    p.add_argument("--teacher-steps", type=int, default=64, help="the first progressive round halves these")
    p.add_argument("--consistency-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="student step counts (powers of 2)")
    p.add_argument("--methods", nargs="+", default=["progressive", "consistency"])
    p.add_argument("--set", nargs="*", default=[], help="overrides for both distillations, e.g. trainer.lr=1e-3")
    p.add_argument("--json", default=None)
    return p


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    a = _parser().parse_args(argv)
    steps = sorted(set(a.steps))
    if any(s < 1 or s & (s - 1) for s in steps) or max(steps) * 2 > a.teacher_steps:
        raise SystemExit(f"--steps {steps}: powers of 2 below --teacher-steps {a.teacher_steps} (each round halves)")
    unknown = set(a.methods) - {"progressive", "consistency"}
    if unknown:
        raise SystemExit(f"--methods: {sorted(unknown)} unknown; choose progressive and/or consistency")
    name = Path(a.recipe).stem
    out = Path(a.out or ("runs/bench_distill" if a.recipe == POINTS else f"runs/bench_distill_{name}"))
    costs: dict[str, dict[str, float]] = {}
    teacher = Path(a.teacher) if a.teacher else out / "teacher"
    if not a.teacher:
        train = [a.recipe, f"trainer.max_steps={a.train_steps}", *a.teacher_set, f"hydra.run.dir={teacher}"]
        costs["teacher training"] = timed("train", *train)
    else:  # a given teacher: its training time as its metrics.jsonl records it (optimizer steps, wall clock)
        from benchmarks.suite import run_training_time

        took = run_training_time(str(teacher))
        if took.get("training_s") is not None:
            costs["teacher training"] = {"wall_min": took["training_s"] / 60, "steps": took["training_steps"]}
    loaded = load_run(teacher)
    saved, domain = loaded[1]["config"], loaded[0].domain.name or loaded[1]["config"]["domain"]["name"]
    n = a.n or (4096 if domain == "points" else int(saved["trainer"]["num_samples"]))
    prog, cd = out / "progressive", out / "consistency"
    flags = {  # each method's command-line flags, then its trainer budget
        "progressive": ([f"--steps={steps[0]}", f"--teacher-steps={a.teacher_steps}"], a.round_steps),
        "consistency": ([], a.consistency_steps),
    }
    for method in a.methods:
        own, budget = flags[method]
        run = f"hydra.run.dir={out / method}"
        costs[method] = timed(
            "distill", str(teacher), f"--method={method}", *own, run, f"trainer.max_steps={budget}", *a.set
        )
    score = Scorer(n)
    score.runs[teacher] = loaded
    big_t = int(saved["schedule"]["steps"])
    rows = []
    for sampler, s in (("dpmpp_2m", 20), ("dpmpp_2m", 10), ("ddpm", big_t), *(("ddim", s) for s in steps)):
        rows.append({"model": f"teacher {sampler}", "steps": s, **score(teacher, sampler, s)})
    if "progressive" in a.methods:
        for s in steps:
            run = prog if s == steps[0] else prog / "rounds" / f"steps-{s}"
            rows.append({"model": "progressive ddim", "steps": s, **score(run, "ddim", s)})
    if "consistency" in a.methods:
        for s in steps:
            rows.append({"model": "consistency", "steps": s, **score(cd, "consistency", s)})
    head = headline(domain, rows)
    keys = [k for k in rows[0] if k not in ("model", "steps")]
    print(f"\n{'model':<20} {'steps':>5} " + " ".join(f"{k:>12}" for k in keys))
    for r in rows:
        print(f"{r['model']:<20} {r['steps']:>5} " + " ".join(f"{r.get(k, float('nan')):>12.4g}" for k in keys))
    spent = (
        f"{k} {v['cpu_min']:.2f} CPU, {v['wall_min']:.2f} wall"
        if "cpu_min" in v
        else f"{k} (its metrics.jsonl) {v['wall_min']:.2f} wall"
        for k, v in costs.items()
    )
    print(f"\nheadline: {head['metric']} (teacher DPM-Solver++ 20: {head['teacher_dpmpp_2m_20']})")
    print("cost (minutes): " + "; ".join(spent))
    result = {
        "benchmark": "distill",
        "recipe": a.recipe,
        "domain": domain,
        "teacher": str(teacher),
        "teacher_overrides": [f"trainer.max_steps={a.train_steps}", *a.teacher_set] if not a.teacher else None,
        "distill_overrides": {
            "round_steps": a.round_steps,
            "teacher_steps": a.teacher_steps,
            "consistency_steps": a.consistency_steps,
            "set": a.set,
        },
        "n": n,
        "headline": head,
        "rows": rows,
        "costs": costs,
        "environment": _environment(),
    }
    return write_result(a.json, result)


def write_result(path: Optional[str], result: dict[str, Any]) -> dict[str, Any]:
    """``result`` written as JSON to ``path`` (its folder made) when one is given; ``result`` itself."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
    return result


def _environment() -> dict[str, Any]:
    """Where the figures were measured (commit, torch, threads, date), as ``polydiff bench`` records it."""
    from benchmarks.suite import environment

    return environment(torch.device("cpu"))


if __name__ == "__main__":
    main()
