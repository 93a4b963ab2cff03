"""Samplers and objectives as plug-ins: a toy of each from outside the package, used by name by the command line;
options checked against the chosen plug-in's signature; old checkpoints' sampler sections read as before."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import polydiff
from polydiff import objectives, samplers
from polydiff.cli import main
from polydiff.config import check_keys, check_overrides, merge_sampler, sampler_section
from polydiff.generate import check_sampler, generate
from polydiff.schedules import make_schedule
from polydiff.trainer import train

# A module of the user's own, beside their recipe: a sampler and an objective, each one function or class.
TOY = textwrap.dedent('''
    """A sampler and an objective from outside polydiff."""
    import torch
    import polydiff
    from polydiff.objectives import BaseObjective, Prediction
    from polydiff.samplers import prepare, run_steps


    def sample_toy(denoiser, noise, schedule, steps=10, *, space=None, generator=None, callback=None, clip_x0=None,
                   spacing="trailing", known=None, shrink: float = 1.0):
        """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0), its x0 estimate scaled by ``shrink``."""
        space, grid, ab = prepare(noise, space, steps, schedule, spacing)
        a, s = ab.sqrt().to(noise.dtype), (1 - ab).sqrt().to(noise.dtype)  # [n + 1, B]

        def update(i, x, x0, eps):
            return space.expand(a[i + 1]) * x0 * shrink + space.expand(s[i + 1]) * eps

        return run_steps(denoiser, noise, grid, ab, space, clip_x0, callback, update, known, generator)


    @polydiff.register_objective("toy_x0")
    class ToyObjective(BaseObjective):
        """x0-prediction at times uniform in (0, 1), its loss scaled by ``scale``."""

        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def losses(self, net, batch, schedule, generator=None, t=None):
            x0, space = batch.x, batch.space
            if t is None:
                t = torch.rand(space.num_samples, generator=generator).to(x0.device)
            a, s = (space.expand(v) for v in schedule.alpha_sigma(t, dtype=x0.dtype))
            x_t = a * x0 + s * space.randn(generator=generator, dtype=x0.dtype)
            return space.mean((net(x_t, t, **batch.cond) - x0) ** 2) * self.scale

        def denoiser(self, net, schedule, space, cond=None):
            def denoise(x_t, t):
                a, s = (space.expand(v) for v in schedule.alpha_sigma(t, dtype=x_t.dtype))
                x0 = net(x_t, t.to(x_t.dtype), **(cond or {}))
                return Prediction(x0, (x_t - a * x0) / s)

            return denoise
''')

RECIPE = textwrap.dedent("""
    defaults: [polydiff_recipe, _self_]
    domain: {name: "examples.points:PointsDomain", size: 256}
    model: {width: 16, depth: 1}
    schedule: {steps: 50}
    objective: {name: "toyplug:ToyObjective", scale: 2.0}
    sampler: {name: ddim, steps: 5, eta: 0.5}
    trainer: {max_steps: 3, batch_size: 32, device: cpu, num_samples: 8, progress: false, ckpt_every: 3}
""")


@pytest.fixture
def registries():
    """Registrations made by a test are undone after it (other tests list the registered names). The tables are
    emptied and refilled in place: the modules that register and those that look up share them."""
    saved = [(table, dict(table)) for table in (samplers.SAMPLERS, objectives.OBJECTIVES)]
    yield
    for table, entries in saved:
        table.clear()
        table.update(entries)


@pytest.fixture
def toy(tmp_path, monkeypatch, registries):
    """The toy module and a recipe using it, in a folder of their own on sys.path."""
    (tmp_path / "toyplug.py").write_text(TOY)
    (tmp_path / "toy.yaml").write_text(RECIPE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toyplug", raising=False)
    return tmp_path


def _train_cli(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polydiff.cli", "train", str(recipe), *overrides],
        cwd=recipe.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _fails(*args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return str(exit_info.value.code)


def test_toy_sampler_and_objective_train_and_sample_by_name(toy):
    """polydiff train uses a toy objective named module:Class with its own option, and a sampler option from the
    command line without '+'; polydiff sample uses a toy sampler by module:function and by registered name."""
    run_dir = toy / "run"
    proc = _train_cli(toy / "toy.yaml", "sampler.name=ddim", "sampler.eta=0.3", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert saved["objective"] == {"name": "toyplug:ToyObjective", "scale": 2.0}
    assert saved["sampler"]["eta"] == 0.3 and "variance" not in saved["sampler"]
    parts, _ = polydiff.load_run(run_dir)
    assert type(parts.objective).__name__ == "ToyObjective" and parts.objective.scale == 2.0

    out = toy / "by_path"
    main(
        ["sample", str(run_dir), "--n", "6", "--out", str(out), "sampler.name=toyplug:sample_toy", "sampler.shrink=0.5"]
    )
    record = json.loads((out / "sampling.json").read_text())
    # The run's eta belonged to its DDIM: another sampler starts from its own defaults.
    assert record["sampler"]["name"] == "toyplug:sample_toy" and record["sampler"]["shrink"] == 0.5
    assert "eta" not in record["sampler"]
    x = torch.load(out / "samples.pt", weights_only=True)["x"]
    assert x.shape == (6, 2) and torch.isfinite(x).all()

    import toyplug

    polydiff.register_sampler("toy", toyplug.sample_toy)
    main(["sample", str(run_dir), "--n", "6", "--out", str(toy / "by_name"), "sampler.name=toy", "sampler.shrink=0.5"])
    assert torch.equal(torch.load(toy / "by_name" / "samples.pt", weights_only=True)["x"], x)
    message = _fails("sample", str(run_dir), "sampler.name=toy", "sampler.eta=0.5")
    assert "sampler.eta is not an option of sampler 'toy' (samplers that take it: ddim)" in message
    message = _fails("sample", str(run_dir), "sampler.name=toy", "sampler.shrink=abc")
    assert "sampler.shrink: Value 'abc' has the wrong type" in message


def test_an_objective_option_another_objective_takes_is_refused_before_training(toy):
    proc = _train_cli(toy / "toy.yaml", "objective.prediction=v", f"hydra.run.dir={toy / 'run'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "objective.prediction is not an option of objective 'toyplug:ToyObjective'" in proc.stderr
    assert "(objectives that take it: vp)" in proc.stderr and not (toy / "run" / "checkpoints").exists()


def _tiny_run(tmp_path: Path, sampler: dict) -> Path:
    cfg = {
        "domain": {"name": "examples.points:PointsDomain", "size": 256},
        "model": {"width": 16, "depth": 1},
        "schedule": {"steps": 50},
        "objective": {"prediction": "v"},
        "sampler": sampler,
        "trainer": {"max_steps": 2, "batch_size": 32, "device": "cpu", "num_samples": 8, "progress": False},
    }
    train(cfg, tmp_path)
    return tmp_path


def test_sample_refuses_an_option_the_chosen_sampler_does_not_take(tmp_path):
    """Before the registry, sampler.name=ddpm sampler.eta=0.5 ran DDPM and dropped eta silently."""
    run_dir = _tiny_run(tmp_path, {"name": "ddim", "steps": 5})
    message = _fails("sample", str(run_dir), "sampler.name=ddpm", "sampler.eta=0.5")
    assert "sampler.eta is not an option of sampler 'ddpm' (samplers that take it: ddim)" in message
    message = _fails("sample", str(run_dir), "sampler.variance=large")  # the run's sampler is DDIM
    assert "sampler.variance is not an option of sampler 'ddim' (samplers that take it: ddpm)" in message
    assert "Did you mean 'sampler.steps'?" in _fails("sample", str(run_dir), "sampler.stepz=3")
    main(
        [
            "sample",
            str(run_dir),
            "--n",
            "4",
            "--out",
            str(tmp_path / "ok"),
            "sampler.name=ddpm",
            "sampler.variance=large",
            "sampler.steps=10",
        ]
    )
    assert json.loads((tmp_path / "ok" / "sampling.json").read_text())["sampler"]["variance"] == "large"


def test_a_checkpoint_of_the_previous_format_samples_exactly_as_before(tmp_path):
    """A run saved its sampler section with every key of every sampler (eta for DDPM, variance for DDIM): the
    defaults its sampler does not take are left out, so it samples as that code did; other values are refused."""
    run_dir = _tiny_run(tmp_path, {"name": "ddpm", "steps": 10})
    path = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    old = {
        "name": "ddpm",
        "steps": 10,
        "eta": 0.0,
        "spacing": "trailing",
        "variance": "small",
        "clip_x0": None,
        "batch_size": 64,
        "precision": "fp32",
    }
    ckpt["config"]["sampler"] = old
    ckpt["config"]["objective"] = {"prediction": "v", "weighting": "uniform", "gamma": 5.0}  # no name: vp
    torch.save(ckpt, path)
    main(["sample", str(run_dir), "--n", "5", "--out", str(tmp_path / "old")])
    parts, _ = polydiff.load_run(run_dir)
    drawn = generate(
        parts.domain,
        parts.net,
        parts.schedule,
        parts.objective,
        5,
        sampler=old,
        generator=torch.Generator().manual_seed(0),
    ).x
    new = {"name": "ddpm", "steps": 10, "batch_size": 64}
    expected = generate(
        parts.domain,
        parts.net,
        parts.schedule,
        parts.objective,
        5,
        sampler=new,
        generator=torch.Generator().manual_seed(0),
    ).x
    assert torch.equal(drawn, expected)
    assert torch.equal(torch.load(tmp_path / "old" / "samples.pt", weights_only=True)["x"], expected)
    assert sampler_section(old) == {k: v for k, v in old.items() if k != "eta"}
    dpm = {**old, "name": "dpmpp_2m"}
    assert sampler_section(dpm) == {k: v for k, v in dpm.items() if k not in ("eta", "variance")}
    with pytest.raises(KeyError, match="sampler.eta is not an option of sampler 'ddpm'"):
        generate(parts.domain, parts.net, parts.schedule, parts.objective, 5, sampler={**old, "eta": 0.5})


def test_sampler_options_are_checked_by_name_in_recipes_overrides_and_calls():
    schedule = make_schedule("cosine", 100)
    check_keys({"sampler": {"name": "ddpm", "variance": "large"}, "objective": {"prediction": "x0"}})
    with pytest.raises(
        KeyError,
        match=r"sampler.eta is not an option of sampler 'dpmpp_2m' \(samplers that take "
        r"it: ddim\)",
    ):
        check_keys({"sampler": {"name": "dpmpp_2m", "eta": 0.2}})
    with pytest.raises(KeyError, match="Did you mean 'objective.weighting'"):
        check_keys({"objective": {"weigting": "min_snr"}})
    with pytest.raises(KeyError, match="unknown objective 'flo'"):
        check_keys({"objective": {"name": "flo"}})
    check_overrides(["sampler.eta=0.5", "objective.gamma=3"])  # the recipe names the sampler: checked once composed
    with pytest.raises(KeyError, match="samplers that take it: ddim"):
        check_overrides(["sampler.name=ddpm", "sampler.eta=0.5"])
    with pytest.raises(KeyError, match="Did you mean 'sampler.steps'"):
        check_overrides(["sampler.stepz=4"])
    with pytest.raises(KeyError, match="samplers that take it: ddpm"):
        samplers.sample("ddim", None, torch.zeros(1, 3), schedule, 5, variance="large")
    # A value is checked by the sampler itself before any work: a recipe's is used only after training.
    with pytest.raises(ValueError, match=r"sampler.eta=2.0 is outside \[0, 1\]"):
        check_sampler({"name": "ddim", "steps": 5, "eta": 2.0}, schedule)
    with pytest.raises(KeyError, match="unknown sampler.variance 'medium'"):
        check_sampler({"name": "ddpm", "steps": 5, "variance": "medium"}, schedule)
    # Generation settings never reach the sampler, whatever it takes.
    assert merge_sampler({"name": "ddim", "steps": 5}, {"precision": "bf16"})["precision"] == "bf16"


def test_a_registration_keeps_the_contract(registries):
    with pytest.raises(TypeError, match=r"lacks \['clip_x0', 'spacing', 'known'\]"):
        polydiff.register_sampler("bad", lambda denoiser, noise, schedule, steps, *, space, generator, callback: noise)
    with pytest.raises(ValueError, match="already registered"):
        polydiff.register_sampler("ddim", samplers.sample_ddpm)
    with pytest.raises(TypeError, match="BaseObjective subclass"):
        polydiff.register_objective("bad", object)
    with pytest.raises(ValueError, match="standard library"):
        samplers.get_sampler("os:system")
    known = r"\['consistency', 'ddim', 'ddpm', 'dpmpp_2m', 'euler', 'heun', 'ode', 'sde'\]"
    with pytest.raises(KeyError, match=rf"unknown sampler 'ddmi'. Known samplers: {known}"):
        samplers.get_sampler("ddmi")
