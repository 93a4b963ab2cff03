"""benchmarks/bench_distill.py on a tiny budget: a teacher of any recipe, both students, rows scored on one draw."""

import json

import pytest
import torch

from benchmarks.bench_distill import headline, main


def test_distill_bench_rows_and_headline(tmp_path):
    torch.set_num_threads(1)  # tiny tensors: on a loaded machine a second thread only waits (the fixture resets it)
    out = tmp_path / "result.json"
    result = main(
        [
            "--recipe",
            "examples/points.yaml",
            "--teacher-set",
            "model.width=16",
            "schedule.steps=50",
            "trainer.progress=false",
            "--out",
            str(tmp_path / "runs"),
            "--train-steps",
            "20",
            "--round-steps",
            "3",
            "--teacher-steps",
            "4",
            "--steps",
            "1",
            "2",
            "--consistency-steps",
            "3",
            "--n",
            "32",
            "--set",
            "trainer.progress=false",
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = [(r["model"], r["steps"], r["nfe"]) for r in result["rows"]]
    assert rows == [
        ("teacher dpmpp_2m", 20, 20),
        ("teacher dpmpp_2m", 10, 10),
        ("teacher ddpm", 50, 50),  # DDPM at the teacher's training T
        ("teacher ddim", 1, 1),
        ("teacher ddim", 2, 2),
        ("progressive ddim", 1, 1),
        ("progressive ddim", 2, 2),
        ("consistency", 1, 1),
        ("consistency", 2, 2),
    ]
    assert result["domain"] == "points" and result["n"] == 32
    assert result["headline"]["metric"] == "dist_to_centre" and result["headline"]["lower_is_better"]
    assert result["rows"][0]["vs_teacher"] == pytest.approx(1.0)
    assert all(r["wall_s"] > 0 and "modes_covered" in r for r in result["rows"])
    assert set(result["costs"]) == {"teacher training", "progressive", "consistency"}
    assert all(c["cpu_min"] > 0 for c in result["costs"].values())
    assert result["environment"]["git_commit"]


def test_headline_per_domain_and_bad_steps():
    rows = [{"model": "teacher dpmpp_2m", "steps": 20, "nfe": 20, "wall_s": 1.0, "fid": 50.0, "is": 3.0}]
    rows.append({**rows[0], "model": "consistency", "steps": 1, "fid": 55.0})
    assert headline("image", rows) == {"metric": "fid", "lower_is_better": True, "teacher_dpmpp_2m_20": 50.0}
    assert rows[1]["vs_teacher"] == pytest.approx(1.1)
    assert headline("mine", [{"model": "x", "steps": 1, "score": 2.0}])["metric"] == "score"  # else the first key
    with pytest.raises(SystemExit, match="powers of 2"):
        main(["--steps", "3"])
    with pytest.raises(SystemExit, match="powers of 2 below --teacher-steps 4"):
        main(["--steps", "4", "--teacher-steps", "4"])
