"""The benchmark suite end to end on a tiny budget: valid JSON, every field filled, nothing constant."""

import json
import math
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.suite import CHURN, DomainBench, _train_steps, main, run_suite, suites, with_steps

ROOT = Path(__file__).resolve().parents[1]


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
        "points": DomainBench(
            "examples/points.yaml",
            _train_steps(30),
            64,
            [("ddim", 10), ("ddim", 5), ("dpmpp_2m", 5)],
            batch_sizes=[16, 64],
            peers=["samplers", "diffusers"],
            objectives=[("flow", ["objective.name=flow"], [("euler", 4), ("heun", 3), ("heun", 3, CHURN), ("ode", 0)])],
        ),
    }
    path = run_suite("quick", ["points"], "cpu", tmp_path, specs=specs)
    result = json.loads(path.read_text())
    for key in ("git_commit", "torch", "device", "device_name", "date"):
        assert result["environment"][key]
    assert isinstance(result["environment"]["git_dirty"], bool)  # uncommitted changes are recorded
    d = result["domains"]["points"]
    assert "error" not in d, d.get("error")
    assert d["train"]["steps"] == 30 and len(d["train"]["loss_curve"]) >= 10
    # The variational bound on held-out points, before and after training: it falls.
    start, bound = d["train"]["nll"]["start"], d["train"]["nll"]["trained"]
    assert bound["n"] == 64 and bound["steps"] == 50 and bound["time"] == "discrete"
    assert bound["nll_bpd"] < start["nll_bpd"], (start, bound)
    assert len(d["sampling"]) == 7 and len(d["throughput_vs_batch"]) == 2
    # The same budget trained with flow matching (the recipe's v-prediction left out), swept by NFE.
    flow = d["objectives"]["flow"]
    assert flow["steps"] == 30 and flow["final_loss"] > 0
    rows = {(r["objective"], r["sampler"], r["steps"]): r["nfe"] for r in d["sampling"]}
    ode = rows.pop(("flow", "ode", 0))  # the adaptive solver's own count (RK45: 6 calls a step), not a grid's
    assert ode >= 8 and float(ode).is_integer(), ode
    assert rows == {
        ("vp", "ddim", 10): 10,
        ("vp", "ddim", 5): 5,
        ("vp", "dpmpp_2m", 5): 5,
        ("flow", "euler", 4): 4,
        ("flow", "heun", 3): 5,
        ("flow", "heun s_churn=40 s_tmin=0.05 s_tmax=50", 3): 5,  # EDM's churn: the same calls, named in the row
    }
    by_label = {r["sampler"]: r["metrics"]["dist_to_centre"] for r in d["sampling"] if r["objective"] == "flow"}
    assert by_label["heun"] != by_label["heun s_churn=40 s_tmin=0.05 s_tmax=50"]  # the options reached the sampler
    for name, value in _numbers(d):
        assert math.isfinite(value), name
    for row in [*d["sampling"], *d["throughput_vs_batch"], d["train"]]:
        assert row["peak_mem_mb"] > 50, row  # the process's peak resident set: torch alone holds more
    for row in d["sampling"]:
        assert row["wall_s"] > 0 and row["samples_per_s"] > 0
        assert set(row["metrics"]) == {"dist_to_centre", "modes_covered"}
    # Measured, not constant: figures differ between configurations.
    assert len({row["wall_s"] for row in d["sampling"]}) == 7
    assert len({row["metrics"]["dist_to_centre"] for row in d["sampling"]}) > 1
    assert len({x["samples_per_s"] for x in d["throughput_vs_batch"]}) == 2
    peer = d["peers"]["samplers"]
    assert "error" not in peer, peer
    assert set(peer["samplers"]) == {"ddim", "dpmpp_2m"}
    for r in peer["samplers"].values():
        assert r["max_rel_diff"] < 1e-4  # polydiff and diffusers agree on the same denoiser
        assert r["ratio_polydiff_over_diffusers"] > 0
    trained = d["peers"]["diffusers"]
    assert "error" not in trained, trained
    assert set(trained["samplers"]) == {"ddpm-100", "ddim-50", "dpmpp_2m-20"}
    for r in trained["samplers"].values():  # the same samples from both libraries (DDPM: same noise seed)
        assert r["polydiff_s"] > 0 and r["diffusers_s"] > 0 and r["max_rel_diff"] < 1e-4
        ours, theirs = r["metrics_polydiff"]["dist_to_centre"], r["metrics_diffusers"]["dist_to_centre"]
        assert ours == pytest.approx(theirs, rel=1e-3)
    md = path.with_suffix(".md").read_text()
    assert md.count("| ddim |") == 3 and "| ddim | 50 |" in md  # 2 sweep rows + the peer's
    assert "| flow | heun | 3 | 5 |" in md and "objective flow, same budget: 30 steps" in md
    assert f"| flow | ode | adaptive | {int(ode)} |" in md
    assert f"{bound['nll_bpd']:.3f} ± {bound['nll_bpd_sem']:.3f} after it" in md
    assert d["objectives"]["flow"]["nll"]["trained"]["time"] == "continuous"  # flow matching: VDM's bound
    plots = sorted(p.name for p in (tmp_path / path.stem).glob("*.png"))
    assert plots == ["loss_curves.png", "quality_vs_steps.png", "scaling.png"]


def test_training_figures_leave_out_the_final_draw(tmp_path, monkeypatch):
    """train.wall_s and peak_mem_mb time the optimizer steps: fit()'s closing draw (DDPM-1000 of 256 molecules
    for qm9), which the sweep does not need, is no part of them."""
    import time

    import polydiff.trainer

    real, slow, draws = polydiff.trainer.generate, 3.0, []

    def slow_generate(*args, **kwargs):
        draws.append(time.perf_counter())
        time.sleep(slow)
        return real(*args, **kwargs)

    monkeypatch.setattr(polydiff.trainer, "generate", slow_generate)
    spec = DomainBench(
        "examples/points.yaml", [*_train_steps(5), "model.width=16"], 16, [("ddim", 2)], batch_sizes=[16]
    )
    path = run_suite("quick", ["points"], "cpu", tmp_path, specs={"points": spec})
    d = json.loads(path.read_text())["domains"]["points"]
    assert "error" not in d, d["error"]
    t = d["train"]
    assert t["steps"] == 5 and t["wall_s"] > 0 and t["peak_mem_mb"] > 50 and t["samples_per_s"] > 0
    assert len(d["sampling"]) == 1 and all(math.isfinite(v) for _, v in _numbers(d))
    assert [p.parent.parent.name for p in (tmp_path / "runs").glob("*/*/checkpoints/last.pt")] == ["points"]
    assert draws == []  # the trainer drew nothing: the sweep samples every configuration itself


def test_unknown_domain_is_named(tmp_path):
    with pytest.raises(KeyError, match="no benchmark configuration"):
        run_suite("quick", ["nope"], "cpu", tmp_path)


def test_full_suite_skips_literature_data_that_is_not_placed(tmp_path, monkeypatch):
    from benchmarks import suite

    monkeypatch.setattr(suite, "packaged", lambda key: False)  # as without qm9pack installed
    path = run_suite("full", ["qm9", "sc09"], "cpu", tmp_path)
    result = json.loads(path.read_text())
    assert (
        "--data qm9=PATH" in result["domains"]["qm9"]["skipped"] and "gdb9.sdf" in result["domains"]["qm9"]["skipped"]
    )
    assert "pip install qm9pack" in result["domains"]["qm9"]["skipped"]
    assert "--data sc09=PATH" in result["domains"]["sc09"]["skipped"]
    assert "skipped: needs a local copy of SC09" in path.with_suffix(".md").read_text()


def test_steps_and_data_options_reach_the_recipe(tmp_path, monkeypatch):
    from benchmarks import suite

    monkeypatch.setattr(suite, "packaged", lambda key: False)  # as without qm9pack installed
    spec = with_steps(suites()["full"]["qm9"], 7)
    assert "trainer.max_steps=7" in spec.overrides and "trainer.max_steps=200000" not in spec.overrides
    assert "domain.source=qm9" in spec.overrides
    with pytest.raises(SystemExit, match="qm9=PATH or sc09=PATH"):
        main(["--suite", "full", "--data", "qm7=/x"])
    with pytest.raises(SystemExit, match=r"\['qm9'\] belong to --suite full"):
        main(["--domains", "qm9"])
    # Nothing but skips is a failed run, named with the --data to give; --data that nothing reads is refused.
    with pytest.raises(
        SystemExit,
        match=r"qm9 needs its data: place gdb9.sdf.*--data qm9=PATH \(or pip install qm9pack.*"
        r"sc09 needs its data: place speech_commands.*--data sc09=PATH",
    ):
        main(["--suite", "full", "--domains", "qm9", "sc09", "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))
    with pytest.raises(SystemExit, match="--data is for the full suite.*add --suite full"):
        main(["--data", f"qm9={tmp_path}"])
    with pytest.raises(SystemExit, match="no domain that reads it.*add --domains qm9"):
        main(["--suite", "full", "--domains", "points", "--data", f"qm9={tmp_path}"])


def _tiny(spec: DomainBench, *overrides: str, scaling=None) -> DomainBench:
    overrides = [*with_steps(spec, 2).overrides, "trainer.num_samples=2", "sampler.steps=2", *overrides]
    return replace(
        spec,
        overrides=overrides,
        num_samples=4,
        samplers=[("ddim", 2)],
        guidance=[1.0],
        batch_sizes=[4],
        scaling=scaling,
        compile_check=False,
        objectives=[],
    )


def test_compile_check_and_overrides_for_every_domain(tmp_path, monkeypatch):
    """--set reaches every domain's recipe; the full suite's compile check times eager against compiled."""
    import benchmarks.suite as suite

    seen, outcome = {}, {"domains": {}}

    def fake_run_suite(name, domains, device, out, seed, specs, data):
        seen.update(specs)
        (tmp_path / "fake.json").write_text(json.dumps(outcome))
        return tmp_path / "fake.json"

    monkeypatch.setattr(suite, "run_suite", fake_run_suite)
    main(["--suite", "full", "--set", "trainer.lr=1e-5", "--set", "seed=3"])
    assert seen and all(s.overrides[-2:] == ["trainer.lr=1e-5", "seed=3"] for s in seen.values())
    assert all(seen[n].compile_check for n in ("image", "audio", "molecule", "qm9", "sc09"))
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["--set", "trainer.lr"])
    # Bad arguments stop before any training; a failed domain makes the exit status non-zero.
    with pytest.raises(SystemExit, match="Did you mean 'trainer.max_steps'"):
        main(["--set", "+trainer.max_step=3"])
    with pytest.raises(SystemExit, match="--steps must be at least 1"):
        main(["--steps", "0"])
    with pytest.raises(SystemExit, match="no folder at"):
        main(["--suite", "full", "--data", f"qm9={tmp_path / 'missing'}"])
    ran = []
    monkeypatch.setattr(
        suite, "run_suite", lambda name, domains, *a, **k: ran.append(domains) or fake_run_suite(name, domains, *a, **k)
    )
    main(["--recipe", "mine=examples/points.yaml", "--steps", "3"])  # a user's domain alone: no built-in trains
    main(["--recipe", "mine=examples/points.yaml", "--domains", "mine", "points"])  # beside a built-in one
    assert ran == [["mine"], ["mine", "points"]]
    outcome["domains"] = {"points": {"error": "ValueError: boom"}, "image": {"train": {}}}
    with pytest.raises(SystemExit, match="1 domain.*failed.*points: ValueError: boom"):
        main(["--domains", "points", "image"])
    monkeypatch.undo()

    spec = DomainBench(
        "examples/points.yaml",
        [*_train_steps(5), "model.width=16"],
        16,
        [("ddim", 2)],
        batch_sizes=[32],
        compile_check=True,
    )
    path = run_suite("full", ["points"], "cpu", tmp_path, specs={"points": spec})
    c = json.loads(path.read_text())["domains"]["points"]["compile"]
    assert c["batch_size"] == 32 and c["compile_s"] > 0
    assert c["eager_samples_per_s"] > 0 and c["compiled_samples_per_s"] > 0
    assert c["ratio_compiled_over_eager"] == pytest.approx(c["compiled_samples_per_s"] / c["eager_samples_per_s"])
    assert "torch.compile, training at batch 32" in path.with_suffix(".md").read_text()


def test_literature_settings_run_on_local_copies(tmp_path, monkeypatch):
    """QM9 with EDM's model and SC09 (shrunk by profile=cpu) on fake local copies, through --data."""
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))  # the metric classifier fits here, not in ~/.cache
    from tests.test_audio import make_fake_sc09
    from tests.test_molecule import _write_sdf

    raw = tmp_path / "qm9" / "raw"
    raw.mkdir(parents=True)
    smiles = [
        "C",
        "N",
        "O",
        "CC",
        "CO",
        "CN",
        "C=O",
        "C#N",
        "CCO",
        "CCN",
        "CC=O",
        "OCO",
        "NC=O",
        "CC#N",
        "COC",
        "CNC",
        "C=C",
        "C#C",
        "CF",
        "FCF",
    ]
    _write_sdf(raw / "gdb9.sdf", smiles)
    header = "mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,u0_atom,u298_atom,h298_atom,g298_atom"
    rows = [f"gdb_{i + 1}," + ",".join(str(float(i + j)) for j in range(19)) for i in range(len(smiles))]
    (raw / "gdb9.sdf.csv").write_text("\n".join([header, *rows]) + "\n")
    (raw / "uncharacterized.txt").write_text("\n".join(f"header {k}" for k in range(9)) + "\n2 skipped\n----\n")
    make_fake_sc09(tmp_path / "sc")
    full = suites()["full"]
    specs = {
        "qm9": _tiny(full["qm9"], "trainer.batch_size=4", scaling=("num_atoms", [3, 6])),
        "sc09": _tiny(full["sc09"], "profile=cpu", "trainer.batch_size=4"),
    }
    path = run_suite(
        "full",
        ["qm9", "sc09"],
        "cpu",
        tmp_path / "out",
        specs=specs,
        data={"qm9": str(tmp_path / "qm9"), "sc09": str(tmp_path / "sc")},
    )
    result = json.loads(path.read_text())
    for name in ("qm9", "sc09"):
        d = result["domains"][name]
        assert "error" not in d and "skipped" not in d, d
        assert d["train"]["steps"] == 2 and len(d["sampling"]) == 1
    qm9 = result["domains"]["qm9"]
    assert any(o.endswith("qm9") and o.startswith("domain.path=") for o in qm9["overrides"])
    assert {"atom_stability", "mol_stability", "validity"} <= set(qm9["sampling"][0]["metrics"])
    assert [x["size"] for x in qm9["throughput_vs_size"]] == [3, 6]
    assert "label_acc" in result["domains"]["sc09"]["sampling"][0]["metrics"]


def test_full_suite_reads_qm9_from_its_package_without_data(tmp_path, monkeypatch):
    """With qm9pack installed the full suite's qm9 entry needs no --data: no domain.path, the package's molecules."""
    from benchmarks import suite
    from tests.test_molecule import write_fake_qm9pack

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    smiles = [
        "C",
        "N",
        "O",
        "CC",
        "CO",
        "CN",
        "C=O",
        "C#N",
        "CCO",
        "CCN",
        "CC=O",
        "OCO",
        "NC=O",
        "CC#N",
        "COC",
        "CNC",
        "C=C",
        "C#C",
        "CF",
        "FCF",
    ]
    monkeypatch.syspath_prepend(str(write_fake_qm9pack(tmp_path / "site", smiles)))
    import importlib.util

    assert suite.packaged("qm9") and not suite.packaged("sc09")
    assert Path(importlib.util.find_spec("qm9pack").origin).is_relative_to(tmp_path)  # the fake, not an installed one
    specs = {
        "qm9": _tiny(
            suites()["full"]["qm9"],
            "trainer.batch_size=4",
            "model.hidden=16",
            "model.layers=1",
            scaling=("num_atoms", [3]),
        )
    }
    result = json.loads(run_suite("full", ["qm9"], "cpu", tmp_path / "out", specs=specs).read_text())
    qm9 = result["domains"]["qm9"]
    assert "error" not in qm9 and "skipped" not in qm9, qm9
    assert not any(o.startswith("domain.path=") for o in qm9["overrides"])
    assert qm9["reference"]["validity"] > 0.9  # the package's 20 molecules, scored as training data


def test_merge_joins_runs_of_one_suite(tmp_path):
    """Domains run as separate jobs merge into one report; a measured domain is never silently replaced."""
    spec = DomainBench(
        "examples/points.yaml", [*_train_steps(5), "model.width=16"], 16, [("ddim", 2)], batch_sizes=[16]
    )
    a = run_suite("quick", ["p1"], "cpu", tmp_path / "a", specs={"p1": spec})
    b = run_suite("quick", ["p2"], "cpu", tmp_path / "b", specs={"p2": replace(spec, num_samples=32)})
    skipped = tmp_path / "skipped.json"
    result = json.loads(b.read_text())
    result["domains"]["p1"] = {"skipped": "not placed"}
    result["environment"]["device_name"] = "machine B"  # where p2 ran: not the first file's machine
    skipped.write_text(json.dumps(result))
    path = main(["--merge", str(a), str(skipped), "--out", str(tmp_path / "m")])
    merged = json.loads(path.read_text())
    assert list(merged["domains"]) == ["p1", "p2"] and merged["merged_from"] == [str(a), str(skipped)]
    assert merged["domains"]["p1"]["sampling"][0]["num_samples"] == 16  # the measured p1, not the skipped one
    assert merged["domains"]["p2"]["sampling"][0]["num_samples"] == 32
    assert merged["domains"]["p2"]["environment"]["git_commit"]
    md = path.with_suffix(".md").read_text()
    assert "## p1" in md and "## p2" in md and "skipped" not in md and md.count("measured on ") == 2
    assert "peak MiB" in md and " MB" not in md  # the figures are 2**20 bytes
    assert sorted(p.name for p in (path.parent / path.stem).glob("*.png")) == [
        "loss_curves.png",
        "quality_vs_steps.png",
        "scaling.png",
    ]
    # A merged result merged again: every domain keeps the environment it ran in, not the merged file's first one.
    third = json.loads(b.read_text())
    third["environment"]["device_name"] = "machine C"
    third["domains"] = {"p3": third["domains"]["p2"]}
    third["config"] = {"p3": third["config"]["p2"]}
    (tmp_path / "c.json").write_text(json.dumps(third))
    again = json.loads(
        main(["--merge", str(path), str(tmp_path / "c.json"), "--out", str(tmp_path / "m2")]).read_text()
    )
    assert [again["domains"][n]["environment"]["device_name"] for n in ("p2", "p3")] == ["machine B", "machine C"]
    assert again["domains"]["p1"]["environment"] == merged["domains"]["p1"]["environment"]
    with pytest.raises(SystemExit, match="measured in both"):
        main(["--merge", str(a), str(a), "--out", str(tmp_path / "m")])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json"):
        main(["--merge", str(a), str(tmp_path / "bad.json"), "--out", str(tmp_path / "never")])
    result["suite"] = "full"
    skipped.write_text(json.dumps(result))
    with pytest.raises(SystemExit, match="different suites"):
        main(["--merge", str(a), str(skipped), "--out", str(tmp_path / "never")])


def test_diffusers_schedulers_match_polydiff_with_x0_clipping():
    """With the image recipe's clip_x0=1.0 the diffusers counterparts (clip_sample; thresholding at 1) agree too."""
    import torch

    from benchmarks.bench_samplers import compare_on_network, toy_eps
    from polydiff.objectives import Objective
    from polydiff.schedules import make_schedule
    from polydiff.space import DenseSpace

    space = DenseSpace((4, 3, 8, 8))
    noise = torch.randn(space.shape, generator=torch.Generator().manual_seed(0))
    rows = compare_on_network(
        toy_eps,
        Objective(prediction="eps"),
        make_schedule("cosine", 1000),
        space,
        noise,
        [("ddpm", 20), ("ddim", 20), ("dpmpp_2m", 10)],
        clip_x0=1.0,
    )
    for r in rows:
        assert r["max_rel_diff"] < 1e-4, r["sampler"]
    unclipped = compare_on_network(
        toy_eps, Objective(prediction="eps"), make_schedule("cosine", 1000), space, noise, [("ddim", 20)]
    )[0]
    assert (unclipped["x_polydiff"] - rows[1]["x_polydiff"]).abs().max() > 1e-3  # clipping took effect


def test_ddpm_row_runs_at_the_recipes_training_T(tmp_path):
    """The sweep's DDPM row samples at the recipe's schedule.steps (a --recipe or --set schedule.steps=...),
    rather than at a fixed 1000 that a 50-step schedule refuses, losing the domain."""
    points = suites()["quick"]["points"]
    spec = replace(
        points,
        overrides=[*_train_steps(5), "model.width=16", "schedule.steps=50"],
        num_samples=16,
        samplers=points.samplers[:1],
        batch_sizes=[16],
        peers=[],
        objectives=[],
    )
    path = run_suite("quick", ["points"], "cpu", tmp_path, specs={"points": spec})
    d = json.loads(path.read_text())["domains"]["points"]
    assert "error" not in d, d["error"]
    assert [(r["sampler"], r["steps"]) for r in d["sampling"]] == [("ddpm", 50)]


def test_a_failing_compiler_keeps_the_domains_figures(tmp_path, monkeypatch):
    """torch.compile failing on a network (after hours of training on a GPU) is reported, and the sweep still runs."""
    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("no backend")

    monkeypatch.setattr(torch, "compile", broken)
    spec = DomainBench(
        "examples/points.yaml",
        [*_train_steps(5), "model.width=16"],
        16,
        [("ddim", 2)],
        batch_sizes=[16],
        compile_check=True,
    )
    path = run_suite("full", ["points"], "cpu", tmp_path, specs={"points": spec})
    d = json.loads(path.read_text())["domains"]["points"]
    assert "error" not in d, d["error"]
    assert d["compile"] == {"error": "RuntimeError: no backend"} and len(d["sampling"]) == 1
    assert "torch.compile check failed: RuntimeError: no backend" in path.with_suffix(".md").read_text()


def test_a_failing_sampler_row_keeps_the_others(tmp_path, monkeypatch):
    """One sampler row failing (out of memory at DDPM-1000 on a GPU, say) is recorded; the trained domain's other
    rows stay."""
    import benchmarks.suite as suite_module

    real = suite_module.sampler_row

    def row(trainer, sampler, steps, *args):
        if sampler == "ddpm":
            raise MemoryError("no room for DDPM")
        return real(trainer, sampler, steps, *args)

    monkeypatch.setattr(suite_module, "sampler_row", row)
    spec = DomainBench(
        "examples/points.yaml", [*_train_steps(5), "model.width=16"], 16, [("ddpm", 10), ("ddim", 2)], batch_sizes=[16]
    )
    path = run_suite("quick", ["points"], "cpu", tmp_path, specs={"points": spec})
    d = json.loads(path.read_text())["domains"]["points"]
    assert "error" not in d and [(r["sampler"], r["steps"]) for r in d["sampling"]] == [("ddim", 2)]
    assert d["sampling_errors"] == [
        {"objective": "vp", "sampler": "ddpm", "steps": 10, "guidance": 1.0, "error": "MemoryError: no room for DDPM"}
    ]
    assert "| vp | ddpm | 10 |  | 1.0 | failed: MemoryError: no room for DDPM |" in path.with_suffix(".md").read_text()
    monkeypatch.setattr(suite_module, "suites", lambda: {"quick": {"points": spec}, "full": {}})
    with pytest.raises(
        SystemExit,
        match=r"1 domain\(s\) or sampler row\(s\) failed \(points ddpm-10 guidance 1.0: "
        r"MemoryError: no room for DDPM\); results so far in",
    ):
        main(["--suite", "quick", "--domains", "points", "--out", str(tmp_path / "cli")])


def test_drive_diffusers_reads_no_timestep_back_to_the_host():
    """diffusers' loop is timed as its pipelines run it: no int(timestep) a step (a device sync on a GPU,
    which polydiff's samplers avoid). Meta tensors raise on any read back to the host."""
    from types import SimpleNamespace

    import torch

    from benchmarks.bench_samplers import drive_diffusers, toy_eps

    class MetaScheduler:
        config = SimpleNamespace(num_train_timesteps=1000)

        def set_timesteps(self, steps, device):
            self.timesteps = torch.arange(999, -1, -1000 // steps, device=device)

        def step(self, out, k, x):
            return SimpleNamespace(prev_sample=x - 0.1 * out)

    x = drive_diffusers(MetaScheduler(), toy_eps, torch.empty(4, 3, device="meta"), 5)
    assert x.shape == (4, 3) and x.device.type == "meta"


def _die(spec):
    os._exit(spec["code"])  # as the kernel's OOM killer would end it: no exception, no result


def test_run_isolated_reports_a_process_that_dies():
    """A measuring process killed outright gives an error, not a suite that waits for it forever."""
    from benchmarks.memory import run_isolated

    out = {}
    worker = threading.Thread(target=lambda: out.update(run_isolated(_die, {"code": 3})), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "run_isolated still waits for a process that has exited"
    assert "exited with code 3" in out["error"]


def test_peer_line_names_a_failed_model():
    """A peer whose one model failed in its own process says so in the Markdown, not 'no ratios reported'."""
    from benchmarks.report import _peer_line

    line = _peer_line(
        {"results": {"1d": {"ours": {"samples_per_s": 3.0}, "lucidrains": {"error": "OutOfMemoryError: CUDA"}}}}
    )
    assert line == "results.1d.lucidrains failed (OutOfMemoryError: CUDA)"


def test_cpu_peak_memory_excludes_what_an_earlier_phase_freed():
    """On a CPU a phase's peak starts from the live memory, not from the free heap pages an earlier phase left."""
    import torch

    from benchmarks.suite import PeakMemory

    net = torch.nn.Sequential(*[torch.nn.Conv1d(64, 64, 3, padding=1) for _ in range(8)])

    def phase(fn) -> float:
        mem = PeakMemory(torch.device("cpu"))
        with mem.measure():
            fn()
        return mem.peak_mb

    def big() -> None:
        x = torch.randn(16, 64, 8000, requires_grad=True)
        net(x).square().mean().backward()  # activations of ~30 MB each, freed at the end

    def small() -> None:
        with torch.no_grad():
            net(torch.randn(1, 64, 100))

    base = phase(lambda: None)
    assert phase(big) > base + 150
    assert phase(small) < base + 30


def test_egnn_peer_leaves_the_thread_count_as_it_was(monkeypatch):
    """bench_egnn --quick pins torch to 2 threads; the domains benchmarked after it keep the run's count."""
    import torch

    import benchmarks.bench_egnn
    from benchmarks.suite import run_peer

    def pinning(argv):
        torch.set_num_threads(1)
        return {"argv": argv}

    monkeypatch.setattr(benchmarks.bench_egnn, "main", pinning)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run_peer("egnn", torch.device("cpu"), quick=True) == {
            "argv": ["--device", "cpu", "--quick", "--skip-sampling"]
        }
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _tables(md):
    """Every Markdown table of ``md`` as its rows' cell counts."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.strip().strip("|").count("|") + 1)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_report_tables_keep_their_shape_for_a_domain_without_metrics(tmp_path):
    """Header, separator and rows have as many cells, with metrics and without (a user's domain may have none)."""
    from benchmarks.report import write_markdown

    result = json.loads((ROOT / "benchmarks" / "results" / "20261129-042021_quick_cpu.json").read_text())
    for d in result["domains"].values():
        d.pop("reference", None)
        for r in d.get("sampling", []):
            r["metrics"] = {}
        for r in d.get("peers", {}).get("diffusers", {}).get("samplers", {}).values():
            r["metrics_polydiff"], r["metrics_diffusers"] = {}, {}
    md = write_markdown(result, tmp_path / "r.md")
    tables = _tables(md)
    assert len(tables) >= 5 and "None" not in md
    for counts in tables:
        assert len(set(counts)) == 1, counts


# 20 clips a split, 0.3 s, no metric classifier, a tiny U-Net: the latent audio domain in seconds.
AUDIO_TINY = ["domain.duration=0.3", "+domain.limit=20", "+domain.metrics=false", "trainer.batch_size=4"]
TINY_UNET = ["model.channels=8", "model.channel_mults=[1,2]", "model.down_factors=[2]", "model.attention_levels=[]"]


def test_latent_audio_beside_waveform_audio(tmp_path, monkeypatch):
    """audio_latent trains on a budget of its own (--steps sets both alike); its result carries the first stage's
    cost apart (the training split encoded on a cold cache, even when the run's own cache holds it), its
    reconstruction row beside the real data's, and seconds of audio per second that compare with the waveform model's
    at equal steps."""
    import torch

    from domains.audio.mel_stage import MelAutoencoder

    torch.set_num_threads(1)  # tiny tensors: on a loaded machine a second thread only waits (the fixture resets it)
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    quick = suites()["quick"]
    assert quick["audio_latent"].overrides[:2] == ["profile=cpu", "latent.autoencoder=mel"]
    assert with_steps(quick["audio_latent"], 1).overrides == with_steps(quick["audio"], 1).overrides[:1] + [
        "latent.autoencoder=mel",
        *_train_steps(1),
    ]  # --steps: the same for both
    assert "audio_latent" in suites()["full"]
    for suite in ("quick", "full"):  # the EDM rows train what the README measured: F an x0-prediction, min-SNR
        edm = {name: o for name, o, _ in suites()[suite]["audio_latent"].objectives}["edm"]
        assert {"objective.precond=x0", "objective.weighting=min_snr", "objective.sigma_data=1.0"} <= set(edm)
    encoded = []
    real = MelAutoencoder.encode
    monkeypatch.setattr(MelAutoencoder, "encode", lambda self, x: encoded.append(len(x)) or real(self, x))
    specs = {
        "audio": replace(_tiny(quick["audio"], *AUDIO_TINY, *TINY_UNET), peers=[]),
        "audio_latent": _tiny(quick["audio_latent"], *AUDIO_TINY, *TINY_UNET),
    }
    path = run_suite("quick", ["audio", "audio_latent"], "cpu", tmp_path / "out", specs=specs)
    result = json.loads(path.read_text())
    wave, latent = result["domains"]["audio"], result["domains"]["audio_latent"]
    assert "error" not in wave and "error" not in latent, (wave.get("error"), latent.get("error"))
    assert "first_stage" not in wave and "reconstruction" not in wave
    first = latent["first_stage"]
    assert first["autoencoder"] == "mel" and first["kind"] == "fixed" and first["encode_train_s"] > 0
    assert first["encoded_items"] == 20 and first["latent_shape"] == [64, 19] and first["data_shape"] == [1, 4800]
    assert sum(encoded) >= 40  # the run's own encoding, then the bench's on a fresh cache (not read back)
    assert not list((tmp_path / "out" / "runs").glob("*/audio_latent-first-stage-cache"))  # removed after
    assert set(latent["reconstruction"]) == {"si_sdr", "mrstft", "num_samples"}
    assert "not defined for a latent diffusion model" in latent["train"]["nll"]["trained"]["error"]
    assert wave["train"]["nll"]["trained"]["nll_bpd"] > 0  # the waveform model has one
    assert latent["peers"]["diffusers"].get("samplers"), latent["peers"]["diffusers"]  # decoded before scoring
    (row,) = latent["sampling"]
    assert 0 < row["decode_s"] < row["wall_s"] and "decode_s" not in wave["sampling"][0]  # decoding is timed
    assert row["audio_seconds_per_s"] == pytest.approx(row["samples_per_s"] * 0.3)
    assert wave["sampling"][0]["audio_seconds_per_s"] == pytest.approx(wave["sampling"][0]["samples_per_s"] * 0.3)
    (speed,) = result["audio_latent_vs_audio"]
    assert (speed["sampler"], speed["steps"]) == ("ddim", 2)
    assert speed["ratio_latent_over_waveform"] == pytest.approx(
        row["audio_seconds_per_s"] / wave["sampling"][0]["audio_seconds_per_s"]
    )
    md = path.with_suffix(".md").read_text()
    assert "first stage `mel` (fixed), apart from the training above: 20 training items" in md
    assert "| first stage `mel` reconstruction (4 held-out) |" in md and "reconstruction si_sdr" in md
    assert "## audio_latent against audio" in md and "| vp | ddim | 2 | 1.0 |" in md
    for counts in _tables(md):
        assert len(set(counts)) == 1, counts


def test_a_trained_first_stage_reports_its_own_training(tmp_path, monkeypatch):
    """--set latent.autoencoder=RUN: the first stage's cost adds the autoencoder run's training, read from its
    metrics.jsonl."""
    import torch

    from polydiff.cli import main as polydiff
    from tests.test_autoencoder import _ae_args  # the first stage's tiny settings, kept with its recipe

    torch.set_num_threads(1)
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    ae = tmp_path / "ae"
    args = _ae_args(ae, "trainer.log_every=1")
    polydiff(args)
    batch = int(next(a for a in reversed(args) if a.startswith("trainer.batch_size=")).split("=")[1])
    spec = _tiny(suites()["quick"]["audio_latent"], *AUDIO_TINY, *TINY_UNET, f"latent.autoencoder={ae}")
    specs = {"audio_latent": replace(spec, peers=[])}
    path = run_suite("quick", ["audio_latent"], "cpu", tmp_path / "out", specs=specs)
    d = json.loads(path.read_text())["domains"]["audio_latent"]
    assert "error" not in d, d["error"]
    first = d["first_stage"]
    assert first["kind"] == "trained" and first["autoencoder"] == str(ae) and len(first["latent_shape"]) == 2
    assert first["training_steps"] == 3 and first["training_s"] > 0
    records = [json.loads(line) for line in (ae / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert first["training_s"] == pytest.approx(sum(batch / r["samples_per_s"] for r in train))
    assert "its own training: 3 steps in" in path.with_suffix(".md").read_text()
