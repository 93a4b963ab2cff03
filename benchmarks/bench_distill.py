"""Few-step students beside their teacher on the points example: progressive and consistency distillation.

Trains a points teacher (or takes ``--teacher RUN``), distils it both ways with ``polydiff distill``, then scores
the students at 1, 2, 4 and 8 steps beside the teacher's DPM-Solver++ at 10 and 20 steps, DDPM at 1000 and DDIM at
the students' step counts, on the same seeded draw. Distillation's cost is the CPU time of its process (all threads).

    python benchmarks/bench_distill.py [--out DIR] [--teacher RUN] [--n 4096] [--train-steps 1500]
        [--round-steps 300] [--consistency-steps 1500] [--set KEY=V ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from polydiff.build import load_run
from polydiff.cli import main as polydiff
from polydiff.generate import generate

STEPS = (1, 2, 4, 8)


def timed(*args: str) -> dict[str, float]:
    """Run ``polydiff ARGS`` in this process: its CPU minutes (all threads) and wall minutes."""
    cpu, wall = time.process_time(), time.perf_counter()
    polydiff(list(args))
    return {"cpu_min": (time.process_time() - cpu) / 60, "wall_min": (time.perf_counter() - wall) / 60}


def score(run: Path, sampler: dict[str, Any], n: int) -> dict[str, float]:
    """The domain's metrics of ``n`` samples of ``run`` with ``sampler`` (seed 0: the same noise for every row)."""
    parts, _ = load_run(run)
    batch = generate(
        parts.domain,
        parts.net,
        parts.schedule,
        parts.objective,
        n,
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    return parts.domain.evaluate(batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_distill")
    p.add_argument("--teacher", default=None, help="a trained vp run of examples/points.yaml (default: train one)")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--round-steps", type=int, default=300, help="trainer.max_steps of each progressive round")
    p.add_argument("--teacher-steps", type=int, default=64, help="the first progressive round halves these")
    p.add_argument("--consistency-steps", type=int, default=1500)
    p.add_argument("--set", nargs="*", default=[], help="overrides for both distillations, e.g. trainer.lr=1e-3")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = Path(a.out)
    costs: dict[str, dict[str, float]] = {}
    teacher = Path(a.teacher) if a.teacher else out / "teacher"
    if not a.teacher:
        costs["teacher training"] = timed(
            "train", "examples/points.yaml", f"trainer.max_steps={a.train_steps}", f"hydra.run.dir={teacher}"
        )
    prog, cd = out / "progressive", out / "consistency"
    costs["progressive"] = timed(
        "distill",
        str(teacher),
        "--method=progressive",
        "--steps=1",
        f"--teacher-steps={a.teacher_steps}",
        f"hydra.run.dir={prog}",
        f"trainer.max_steps={a.round_steps}",
        *a.set,
    )
    costs["consistency"] = timed(
        "distill",
        str(teacher),
        "--method=consistency",
        f"hydra.run.dir={cd}",
        f"trainer.max_steps={a.consistency_steps}",
        *a.set,
    )
    rows = []
    for name, steps in (("dpmpp_2m", 20), ("dpmpp_2m", 10), ("ddpm", 1000), *(("ddim", s) for s in STEPS)):
        rows.append({"model": f"teacher {name}", "steps": steps, **score(teacher, {"name": name, "steps": steps}, a.n)})
    for s in STEPS:
        run = prog if s == 1 else prog / "rounds" / f"steps-{s}"
        rows.append({"model": "progressive ddim", "steps": s, **score(run, {"name": "ddim", "steps": s}, a.n)})
    for s in STEPS:
        rows.append({"model": "consistency", "steps": s, **score(cd, {"name": "consistency", "steps": s}, a.n)})
    keys = [k for k in rows[0] if k not in ("model", "steps")]
    print(f"\n{'model':<20} {'steps':>5} " + " ".join(f"{k:>15}" for k in keys))
    for r in rows:
        print(f"{r['model']:<20} {r['steps']:>5} " + " ".join(f"{r[k]:>15.4g}" for k in keys))
    spent = (f"{k} {v['cpu_min']:.2f} CPU, {v['wall_min']:.2f} wall" for k, v in costs.items())
    print("\ncost (minutes): " + "; ".join(spent))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "costs": costs}, indent=2))


if __name__ == "__main__":
    main()
