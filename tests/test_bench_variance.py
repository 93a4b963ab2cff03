"""benchmarks/bench_variance.py on a tiny budget: fixed and learned variance runs of the points example."""

import json
import math

import pytest
import torch

from benchmarks.bench_variance import main


def test_variance_bench_both_runs_finite(tmp_path):
    torch.set_num_threads(1)  # tiny tensors: on a loaded machine a second thread only waits (the fixture resets it)
    out = tmp_path / "result.json"
    settings = ["model.width=16", "schedule.steps=20", "trainer.progress=false", "trainer.num_samples=16"]
    result = main(
        ["--recipe", "examples/points.yaml", "--set", *settings, "--train-steps", "10", "--steps", "2", "5", "T"]
        + ["--n", "32", "--seeds", "0", "1", "--nll-items", "8", "--nll-strata", "3", "--out", str(tmp_path / "runs")]
        + ["--json", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["table"] == result["table"] and saved["domain"] == "points" and saved["trained_steps"] == 20
    assert saved["headline"] == {"metric": "dist_to_centre", "lower_is_better": True}
    assert 0 < saved["reference"]["dist_to_centre"] < 0.5  # 32 held-out points, 0.15 from their centres
    runs = saved["runs"]
    assert set(runs) == {"fixed", "fixed_large", "learned"}
    assert runs["fixed"]["overrides"][-2:] == ["objective.variance=fixed", "trainer.eval=false"]
    assert runs["learned"]["overrides"][-2:] == ["objective.variance=learned", "trainer.eval=false"]
    for name in ("fixed", "learned"):  # each trained, its bound on held-out items
        run = runs[name]
        assert run["training"]["steps"] == 10 and run["training"]["cpu_min"] > 0
        assert run["nll"]["n"] == 8 and run["nll"]["steps"] == 3 and math.isfinite(run["nll"]["nll_bpd"])
    assert runs["learned"]["nll"]["variance"] == "learned (Improved DDPM)" and "variance" not in runs["fixed"]["nll"]
    for run in runs.values():  # DDPM at 2, 5 and T = 20 steps, every metric averaged over two seeded draws
        assert [r["steps"] for r in run["rows"]] == [2, 5, 20]
        for r in run["rows"]:
            assert len(r["seeds"]["dist_to_centre"]) == 2 and r["dist_to_centre_sd"] >= 0
            assert math.isfinite(r["dist_to_centre"]) and r["wall_s"] > 0
    figures = [r["figure"] for r in saved["table"]]
    assert figures == [
        "dist_to_centre DDPM-2",
        "dist_to_centre DDPM-5",
        "dist_to_centre DDPM-20",
        "bound bits/dim",
        "training CPU min",
        "optimizer steps min",
    ]
    for row in saved["table"]:  # both runs, and their ratio, finite in every row
        assert all(math.isfinite(row[k]) for k in ("fixed", "learned", "ratio")), row
        assert row["ratio"] == pytest.approx(row["learned"] / row["fixed"])
    # one trained network, two sampler variances: different samples
    rows = {name: runs[name]["rows"][0]["seeds"]["dist_to_centre"] for name in runs}
    assert rows["fixed"] != rows["fixed_large"]

    # the two trained runs scored again without training: the same draws, training time from their logs only
    given = [runs["fixed"]["run"], runs["learned"]["run"]]
    again = main(["--runs", *given, "--steps", "2", "--n", "32", "--seeds", "0", "1", "--nll-items", "8"])
    assert again["runs"]["fixed"]["rows"][0]["seeds"] == runs["fixed"]["rows"][0]["seeds"]
    assert again["runs"]["learned"]["training"]["cpu_min"] is None
    assert again["runs"]["learned"]["training"]["optimizer_wall_min"] > 0
    with pytest.raises(SystemExit, match="trained with objective.variance=learned, not fixed"):
        main(["--runs", given[1], given[0]])


def test_variance_bench_refuses_bad_flags():
    with pytest.raises(SystemExit, match="positive step counts"):
        main(["--recipe", "examples/points.yaml", "--steps", "0"])
    with pytest.raises(SystemExit, match="what this benchmark varies"):
        main(["--recipe", "examples/points.yaml", "--set", "objective.variance=learned"])
