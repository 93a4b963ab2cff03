"""The benchmark suite end to end on a tiny budget: valid JSON, every field filled, nothing constant."""

import json
import math

import pytest

from benchmarks.suite import DomainBench, _train_steps, run_suite


def _numbers(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{prefix}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


def test_quick_suite_tiny_budget(tmp_path):
    specs = {
        "points": DomainBench("examples/points.yaml", _train_steps(30), 64, [("ddim", 10), ("ddim", 5), ("dpmpp_2m", 5)],
                              batch_sizes=[16, 64], peers=["samplers"]),
    }
    path = run_suite("quick", ["points"], "cpu", tmp_path, specs=specs)
    result = json.loads(path.read_text())
    for key in ("git_commit", "torch", "device", "device_name", "date"):
        assert result["environment"][key]
    d = result["domains"]["points"]
    assert "error" not in d, d.get("error")
    assert d["train"]["steps"] == 30 and len(d["train"]["loss_curve"]) >= 10
    assert len(d["sampling"]) == 3 and len(d["throughput_vs_batch"]) == 2
    for name, value in _numbers(d):
        assert math.isfinite(value), name
    for row in d["sampling"]:
        assert row["wall_s"] > 0 and row["samples_per_s"] > 0
        assert set(row["metrics"]) == {"dist_to_centre", "modes_covered"}
    # Measured, not constant: figures differ between configurations.
    assert len({row["wall_s"] for row in d["sampling"]}) == 3
    assert len({row["metrics"]["dist_to_centre"] for row in d["sampling"]}) > 1
    assert len({x["samples_per_s"] for x in d["throughput_vs_batch"]}) == 2
    peer = d["peers"]["samplers"]
    assert "error" not in peer, peer
    for r in peer["samplers"].values():
        assert r["max_rel_diff"] < 1e-4  # polydiff and diffusers agree on the same denoiser
        assert r["ratio_polydiff_over_diffusers"] > 0
    assert path.with_suffix(".md").read_text().count("| ddim |") == 2
    plots = sorted(p.name for p in (tmp_path / path.stem).glob("*.png"))
    assert plots == ["loss_curves.png", "quality_vs_steps.png", "scaling.png"]


def test_unknown_domain_is_named(tmp_path):
    with pytest.raises(KeyError, match="no benchmark configuration"):
        run_suite("quick", ["nope"], "cpu", tmp_path)
