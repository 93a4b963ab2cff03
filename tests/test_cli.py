"""The command line, recipes and the registry."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import polydiff
from polydiff.build import check_targets
from polydiff.config import call_checked, check_call
from polydiff.objectives import build_objective_from
from polydiff.recipes import compose_recipe
from polydiff.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "polydiff.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_every_recipe_composes(recipe, profile):
    """Each recipe composes under both profiles, and its domain/model keys fit the constructors."""
    cfg = OmegaConf.to_container(compose_recipe(recipe, [f"profile={profile}"]), resolve=True)
    for key in ("max_steps", "device"):
        assert key in cfg["trainer"]
    domain_cfg = dict(cfg["domain"])
    cls = polydiff.get_domain(domain_cfg.pop("name"))
    check_call(cls, domain_cfg, "domain")
    check_call(
        cls.build_network,
        {"self": None, **cfg["model"]} if "self" in inspect.signature(cls.build_network).parameters else cfg["model"],
        "model",
    )
    if (cfg.get("objective") or {}).get("name") == "autoencoder":  # its model section is the first stage's
        builder = build_objective_from(cfg["objective"]).network_builder(cls(**domain_cfg))
        assert isinstance(call_checked(builder, cfg["model"], "model"), torch.nn.Module)
    check_targets(cfg)
    if profile == "cpu":  # minutes, not hours (the latent mel profile: 8,000 steps of 0.08 CPU-seconds)
        assert cfg["trainer"]["max_steps"] <= 8000


def _header_commands(recipe: Path) -> list[list[str]]:
    """The overrides of each ``polydiff train`` command documented in a recipe's header comment.

    A command is a line starting ``polydiff train``, ``...`` (the command above, other overrides) or
    an override itself, with its ``\\`` continuation lines.
    """
    token = re.compile(r"^\+?[A-Za-z_]+(\.[A-Za-z_0-9]+)+=\S+$|^profile=\S+$")
    commands, current = [], None
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").split("  #")[0].strip()
        words = text.split()
        if (
            current is None
            and words
            and (text.startswith("polydiff train") or words[0] == "..." or token.match(words[0]))
        ):
            current = []
        if current is None:
            continue
        current += [w for w in words if token.match(w) and not w.startswith("hydra.")]
        if not text.endswith("\\"):
            commands.append(current)
            current = None
    return commands


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_commands_in_recipe_headers_compose(recipe):
    """Every override a recipe's header documents exists in the recipe and fits the domain's constructor."""
    commands = _header_commands(recipe)
    assert any(len(c) >= 2 for c in commands), commands  # the data-set switches are documented
    for overrides in commands:
        cfg = OmegaConf.to_container(compose_recipe(recipe, overrides), resolve=True)
        domain_cfg = dict(cfg["domain"])
        check_call(polydiff.get_domain(domain_cfg.pop("name")), domain_cfg, "domain")


def test_readme_first_command_is_the_audio_recipe_on_the_cpu():
    """The README's first set-up command trains recipes/audio_unet.yaml with its CPU profile."""
    block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    words = block.split("polydiff train ", 1)[1].split()
    assert words[0] == "recipes/audio_unet.yaml" and "profile=cpu" in words
    cfg = OmegaConf.to_container(compose_recipe(ROOT / words[0], [w for w in words[1:] if not w.startswith("hydra.")]))
    assert cfg["domain"]["name"] == "audio" and cfg["domain"]["dataset"] == "spoken_digits"
    assert cfg["trainer"]["device"] == "cpu" and cfg["trainer"]["max_steps"] <= 2000


def test_readme_python_api_block_runs_as_written():
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n", text.index("### Python API")) + len("```python\n")
    scope: dict = {}
    exec(compile(text[start : text.index("```", start)], "README.md (Python API)", "exec"), scope)
    assert scope["loss"].dim() == 0 and torch.isfinite(scope["loss"])
    assert scope["samples"].shape == (16, 1, 4000) and torch.isfinite(scope["samples"]).all()


def test_misspelled_keys_fail_clearly(tmp_path):
    proc = run("train", "examples/points.yaml", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "'trainer.max_stepz'" in proc.stderr and "Did you mean 'trainer.max_steps'?" in proc.stderr
    # Hydra's '+' would add the key to the typed section, where nothing reads it: still refused.
    proc = run("train", "examples/points.yaml", "+guidance.scal=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "Did you mean 'guidance.scale'?" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(KeyError, match="Did you mean 'trainer.max_steps'"):  # the Python API refuses it too
        train(compose_recipe(ROOT / "examples" / "points.yaml", ["+trainer.max_step=3"]), tmp_path / "api")
    with pytest.raises(Exception, match="lrr"):
        compose_recipe(ROOT / "examples" / "points.yaml", ["trainer.lrr=1"])
    proc = run("train", "examples/points.yaml", "model.widht=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "Did you mean 'model.width'?" in proc.stderr
    proc = run("train", "examples/points.yaml", "domain.sise=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "Did you mean 'domain.size'?" in proc.stderr
    # A real constructor argument the recipe does not set: Hydra needs '+', and the message says so.
    proc = run("train", "recipes/molecule_egnn.yaml", "domain.max_molecules=30", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "add it with +domain.max_molecules=30" in proc.stderr
    # Several at once: each is named, not only the first Hydra stops at.
    proc = run(
        "train", "recipes/molecule_egnn.yaml", "model.hiden=64", "domain.max_molecules=30", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode != 0 and "Did you mean 'model.hidden'?" in proc.stderr
    assert "add it with +domain.max_molecules=30" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(
        "train", "recipes/molecule_egnn.yaml", "profile=cpuu", f"hydra.run.dir={tmp_path}"
    )  # Hydra's own message
    assert proc.returncode != 0 and "Could not find 'profile/cpuu'" in proc.stderr and "Traceback" not in proc.stderr
    # Inside a recipe file, a misspelled constructor key is named with the likely fix.
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((ROOT / "examples" / "points.yaml").read_text().replace("width: 128", "widht: 128"))
    proc = run("train", str(recipe), f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0 and "'model.widht'" in proc.stderr and "'model.width'" in proc.stderr


def test_unknown_names_list_the_known_ones(tmp_path):
    proc = run("train", "examples/points.yaml", "domain.name=audoi", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "'audio'" in proc.stderr and "Known domains" in proc.stderr
    proc = run("train", "examples/points.yaml", "schedule.name=cosin", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "Known schedules" in proc.stderr
    proc = run("train", "recipes/nope.yaml")
    assert proc.returncode != 0 and "not found" in proc.stderr
    shipped = "audio_autoencoder, audio_latent, audio_unet, image_unet, molecule_autoencoder, molecule_egnn, "
    shipped += "molecule_latent"
    assert f"shipped recipes, by name: {shipped}" in proc.stderr


def test_shipped_recipes_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    """Away from a clone (an installed wheel), a shipped recipe is named by name or by its repository path."""
    monkeypatch.chdir(tmp_path)
    for name in ("audio_unet", "recipes/molecule_egnn.yaml", "examples/points.yaml"):
        cfg = compose_recipe(name, ["profile=cpu"] if "points" not in name else [])
        assert cfg.domain.name in ("audio", "molecule", "examples.points:PointsDomain")
    # The console script makes the working folder importable (module:Class domains) after the installed packages,
    # so that a user's own domains/ or benchmarks/ package there cannot hide polydiff's.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    from polydiff.cli import main

    main(["--help"])
    assert sys.path[-1] == str(tmp_path) and str(tmp_path) not in sys.path[:-1]


def test_values_of_the_wrong_type_are_named():
    """A value that contradicts a constructor's plain annotation fails naming the key, before anything runs."""

    def make(rate: int = 16000, duration: float = 1.0, name: Optional[str] = None, sizes: Sequence[int] = (1,)):
        return rate

    check_call(make, {"rate": 8000, "duration": 2, "name": None, "sizes": [3, 4]}, "domain")  # int for float is fine
    for key, value, expected in [
        ("rate", "abc", "an integer"),
        ("rate", 2000.7, "an integer"),
        ("rate", True, "an integer"),
        ("duration", "1s", "a number"),
        ("name", 3, "a string or null"),
    ]:
        with pytest.raises(
            TypeError, match=re.escape(f"domain.{key}={value!r} has the wrong type: it must be {expected}")
        ):
            check_call(make, {key: value}, "domain")


def test_target_is_restricted():
    check_targets({"model": {"_target_": "domains.unet.UNet"}})
    with pytest.raises(ValueError, match="not allowed"):
        check_targets({"model": {"_target_": "os.system", "command": "true"}})


def test_train_then_sample(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(
        "train",
        "examples/points.yaml",
        "trainer.max_steps=40",
        "trainer.num_samples=32",
        "model.width=32",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in ("checkpoints/last.pt", "metrics.jsonl", "samples"):
        assert (run_dir / path).exists()
    # A recipe that cannot resume the run is refused before Hydra records its config in the run.
    recorded = (run_dir / ".hydra" / "config.yaml").read_text()
    bad = run("train", "examples/points.yaml", "trainer.max_steps=50", "model.width=16", f"hydra.run.dir={run_dir}")
    assert bad.returncode != 0 and "does not fit this recipe" in bad.stderr and "width" in bad.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == recorded
    out = tmp_path / "new"
    proc = run(
        "sample", str(run_dir), "--n", "8", "--out", str(out), "sampler.name=dpmpp_2m", "sampler.steps=10", "--eval"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = torch.load(out / "samples.pt", weights_only=True)["x"]
    assert x.shape == (8, 2) and torch.isfinite(x).all()
    assert "dist_to_centre" in proc.stdout
    record = json.loads((out / "sampling.json").read_text())
    assert record["n"] == 8 and record["step"] == 40
    assert record["sampler"]["name"] == "dpmpp_2m" and record["sampler"]["steps"] == 10
    assert 0 <= record["metrics"]["dist_to_centre"] < 10 and record["seconds"] > 0
    # --seeds K: one folder per seed, the metrics' mean and range over seeds.
    multi = tmp_path / "multi"
    proc = run(
        "sample",
        str(run_dir),
        "--n",
        "8",
        "--out",
        str(multi),
        "--seed",
        "5",
        "--seeds",
        "3",
        "--eval",
        "sampler.name=ddim",
        "sampler.steps=5",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((multi / "sampling.json").read_text())
    assert [r["seed"] for r in record["runs"]] == [5, 6, 7]
    per_seed = [r["metrics"]["dist_to_centre"] for r in record["runs"]]
    assert len(set(per_seed)) == 3  # different noise per seed
    assert record["metrics"]["dist_to_centre"] == pytest.approx(sum(per_seed) / 3)
    assert record["metrics_range"]["dist_to_centre"] == [min(per_seed), max(per_seed)]
    for seed in (5, 6, 7):
        assert torch.load(multi / f"seed-{seed}" / "samples.pt", weights_only=True)["x"].shape == (8, 2)
    assert "mean [range] of 3 seeds" in proc.stdout
    # polydiff eval scores sample files with the run's domain: the same samples give the same figures.
    proc = run("eval", str(run_dir), str(out / "samples.pt"), str(multi / "seed-6"), "--json", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads((tmp_path / "e.json").read_text())
    assert [row["n"] for row in scored["samples"]] == [8, 8]
    assert scored["samples"][0]["metrics"]["dist_to_centre"] == pytest.approx(
        json.loads((out / "sampling.json").read_text())["metrics"]["dist_to_centre"]
    )
    assert scored["samples"][1]["metrics"]["dist_to_centre"] == pytest.approx(per_seed[1])
    bad = run("eval", str(run_dir), str(tmp_path / "nothing"))
    assert bad.returncode != 0 and "no samples at" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("eval", str(run_dir), str(out / "samples.pt"), "domain.sise=3")
    assert bad.returncode != 0 and "Did you mean 'domain.size'?" in bad.stderr
    bad = run("eval", str(run_dir), str(out / "samples.pt"), "--json", str(tmp_path / "e.json"))  # never overwrites
    assert bad.returncode != 0 and "exists" in bad.stderr
    bad = run("sample", str(run_dir), "--seeds", "0")
    assert bad.returncode != 0 and "--seeds" in bad.stderr
    bad = run("sample", str(run_dir), "sampler.stepz=3")
    assert bad.returncode != 0 and "Did you mean 'sampler.steps'?" in bad.stderr
    bad = run("sample", str(run_dir), "label=seven")
    assert bad.returncode != 0 and "unconditional" in bad.stderr
    bad = run("sample", str(tmp_path / "missing"))
    assert bad.returncode != 0 and "no checkpoint" in bad.stderr
    bad = run("sample", str(run_dir), "prior.foo=1")
    assert bad.returncode != 0 and "unknown prior option(s) ['foo']" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("sample", str(run_dir), "--known", str(out / "samples.pt"))  # a domain without known_values
    assert (
        bad.returncode != 0 and "cannot take known values from a file" in bad.stderr and "Traceback" not in bad.stderr
    )
    bad = run("sample", str(run_dir), "--device", "gpu")
    assert bad.returncode != 0 and "--device='gpu' is not a device" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("sample", str(run_dir), "--n", "8", "--out", str(out))  # never overwrites earlier samples
    assert bad.returncode != 0 and "already holds samples" in bad.stderr
    torn = tmp_path / "torn" / "checkpoints" / "last.pt"
    torn.parent.mkdir(parents=True)
    torn.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes()[:4000])
    bad = run("sample", str(tmp_path / "torn"))
    assert bad.returncode != 0 and "could not be read" in bad.stderr and "Traceback" not in bad.stderr


def test_multirun(tmp_path):
    proc = run(
        "train",
        "examples/points.yaml",
        "-m",
        "trainer.max_steps=5,6",
        "trainer.num_samples=8",
        "model.width=16",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = sorted(torch.load(p, weights_only=True)["step"] for p in tmp_path.glob("*/checkpoints/last.pt"))
    assert steps == [5, 6]


def test_registry(monkeypatch):
    import polydiff.registry as registry

    monkeypatch.setitem(registry._REGISTRY, "tiny-test", None)  # the name leaves with the test (None: free)

    class Tiny(polydiff.Domain):
        pass

    polydiff.register_domain("tiny-test", Tiny)
    assert polydiff.get_domain("tiny-test") is Tiny and "tiny-test" in polydiff.list_domains()
    with pytest.raises(ValueError, match="already registered"):
        polydiff.register_domain("tiny-test", type("Other", (polydiff.Domain,), {}))
    with pytest.raises(KeyError, match="Known domains"):
        polydiff.get_domain("no-such-domain")
    with pytest.raises(TypeError, match="needs a polydiff.Domain subclass"):
        polydiff.register_domain("bad", int)
    # A "module:Class" path to a class that registers itself keeps its registered name (messages use it).
    assert polydiff.get_domain("examples.points:PointsDomain").name == "points"
    with pytest.raises(TypeError, match="not a polydiff.Domain subclass"):
        polydiff.get_domain("examples.points:MLP")


def test_entry_points_are_read_only_for_missing_names(monkeypatch):
    from importlib.metadata import EntryPoint

    import polydiff.registry as registry

    calls = []

    def fake_entry_points(group):
        calls.append(group)
        return [EntryPoint("ep-points", "examples.points:PointsDomain", group)]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    polydiff.get_domain("image")  # built-in: no entry-point lookup
    assert calls == []
    cls = polydiff.get_domain("ep-points")
    assert calls == [registry.ENTRY_POINT_GROUP] and cls.__name__ == "PointsDomain"


def _sample_fails(run_dir: Path, *args: str) -> str:
    """The message of ``polydiff sample RUN_DIR ARGS`` failing in this process."""
    from polydiff.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(run_dir), "--out", str(run_dir / "never-written"), *args])
    assert not (run_dir / "never-written").exists()
    return str(exit_info.value.code)


def test_sample_refuses_what_it_would_ignore_and_names_bad_values(tmp_path):
    """Guidance on a model without labels would change nothing yet be recorded in sampling.json; a value of the
    wrong type names its key."""
    cfg = {
        "domain": {"name": "examples.points:PointsDomain", "size": 256},
        "model": {"width": 16, "depth": 1},
        "schedule": {"steps": 50},
        "objective": {"prediction": "v"},
        "sampler": {"name": "ddim", "steps": 5},
        "trainer": {"max_steps": 2, "batch_size": 32, "device": "cpu", "num_samples": 8, "progress": False},
    }
    train(cfg, tmp_path)
    message = _sample_fails(tmp_path, "guidance.scale=3")
    assert "guidance.scale=3 would have no effect" in message and "unconditional" in message
    assert "sampler.eta: Value 'abc'" in _sample_fails(tmp_path, "sampler.eta=abc")
    assert "guidance.scale: Value 'x'" in _sample_fails(tmp_path, "guidance.scale=x")


def test_train_without_a_recipe_fails(tmp_path):
    """``polydiff train $RECIPE`` with an empty variable must not exit 0 as if it had trained."""
    from polydiff.cli import main

    for args in ([], ["trainer.max_steps=3"]):
        with pytest.raises(SystemExit, match="train needs a recipe first"):
            main(["train", *args])
    # A recipe in a folder named by an override (a Hydra sweep's override_dirname) is a recipe.
    recipe = tmp_path / "trainer.lr=1e-4" / "points.yaml"
    recipe.parent.mkdir()
    recipe.write_text((ROOT / "examples" / "points.yaml").read_text())
    proc = run("train", str(recipe), "trainer.max_steps=3", "--cfg", "job")
    assert proc.returncode == 0 and "max_steps: 3" in proc.stdout, proc.stderr[-2000:]


def test_train_refuses_a_run_past_max_steps_before_recording_its_config(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(
        "train",
        "examples/points.yaml",
        "trainer.max_steps=6",
        "trainer.num_samples=8",
        "model.width=16",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = (run_dir / ".hydra" / "config.yaml").read_text()
    bad = run(
        "train",
        "examples/points.yaml",
        "trainer.max_steps=3",
        "trainer.num_samples=8",
        "model.width=16",
        f"hydra.run.dir={run_dir}",
    )
    assert bad.returncode != 0 and "is at step 6, past trainer.max_steps=3" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == recorded
    # A failed checkpoint write (a full disk) ends with the message, not a traceback.
    launcher = tmp_path / "full_disk.py"
    launcher.write_text(
        "import errno, io, polydiff.checkpoint as c\n"
        "real = c.torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if isinstance(f, io.BytesIO): return real(obj, f, *a, **k)  # not a file on the disk\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "c.torch.save = save\nfrom polydiff.cli import main\nmain()\n"
    )
    full = subprocess.run(
        [
            sys.executable,
            str(launcher),
            "train",
            "examples/points.yaml",
            "trainer.max_steps=8",
            "trainer.num_samples=8",
            "model.width=16",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert full.returncode == 1 and "could not write the checkpoint of step 8" in full.stderr, full.stderr[-2000:]
    assert "Traceback" not in full.stderr


# A user's domain module, written into a folder of its own (not the working directory).
USER_DOMAIN = """
import numpy as np
import torch
import polydiff
from examples.points import MLP, PointsDomain


@polydiff.register_domain("user-points")
class UserPoints(PointsDomain):
    numpy_state = False

    def state_dict(self):
        state = super().state_dict()
        if self.numpy_state:
            state["histogram"] = np.bincount([1, 2, 2])
        return state

    def evaluate(self, batch):
        return {"step": torch.tensor(7.0), "spread": torch.tensor(float(batch.x.std()))}
"""


def _user_recipe(folder: Path, monkeypatch, **trainer) -> Path:
    """A user's recipe and domain module in ``folder``; the module and its registrations leave with the test."""
    import polydiff.registry as registry

    monkeypatch.delitem(sys.modules, "userdomain", raising=False)
    for name in ("user-points", "userdomain:UserPoints"):  # None: free to register; the names leave with the test
        monkeypatch.setitem(registry._REGISTRY, name, None)
    (folder / "userdomain.py").write_text(USER_DOMAIN)
    recipe = folder / "user.yaml"
    tc = {"max_steps": 3, "batch_size": 32, "device": "cpu", "num_samples": 8, "progress": False, **trainer}
    recipe.write_text(
        "defaults: [polydiff_recipe, _self_]\n"
        + OmegaConf.to_yaml(
            OmegaConf.create(
                {
                    "domain": {"name": "userdomain:UserPoints", "size": 256},
                    "model": {"width": 16, "depth": 1},
                    "schedule": {"steps": 50},
                    "sampler": {"name": "ddim", "steps": 5},
                    "trainer": tc,
                }
            )
        )
    )
    return recipe


def test_a_users_domain_beside_its_recipe_trains_logs_and_samples_from_python(tmp_path, monkeypatch):
    """module:Class beside the recipe resolves from another working directory; tensor metrics are logged as
    numbers (one named like a log field as metric_NAME); polydiff.load_run samples the run from Python, also where
    its registered name is unknown, through the class path saved in the checkpoint."""
    from polydiff.cli import main
    from polydiff.generate import generate

    user = tmp_path / "user"
    user.mkdir()
    recipe = _user_recipe(user, monkeypatch)
    monkeypatch.chdir(tmp_path)
    main(["train", str(recipe), f"hydra.run.dir={tmp_path / 'run'}"])
    final = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "eval" and final["step"] == 3 and final["metric_step"] == 7.0
    assert isinstance(final["spread"], float)
    import polydiff.registry as registry

    monkeypatch.delitem(registry._REGISTRY, "user-points")
    monkeypatch.delitem(registry._REGISTRY, "userdomain:UserPoints")
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["domain_class"] == {"class": "userdomain:UserPoints", "root": str(user)}
    ckpt["config"]["domain"]["name"] = "user-points"  # as a recipe naming the registered domain would save it
    torch.save(ckpt, tmp_path / "renamed.pt")
    parts, _ = polydiff.load_run(tmp_path / "renamed.pt")
    assert type(parts.domain).__name__ == "UserPoints" and not parts.net.training
    batch = generate(parts.domain, parts.net, parts.schedule, parts.objective, 4, {"steps": 5})
    assert batch.x.shape == (4, 2) and torch.isfinite(batch.x).all()
    ckpt["domain_class"] = {"class": "nowhere_module:UserPoints", "root": "/somewhere"}
    torch.save(ckpt, tmp_path / "moved.pt")
    with pytest.raises(ImportError, match="add that folder to PYTHONPATH"):
        polydiff.load_run(tmp_path / "moved.pt")
    # A recipe naming the domain "module:Class", sampled where the module does not import: the same hint.
    ckpt["config"]["domain"]["name"] = ckpt["domain_class"]["class"] = "gone_module:UserPoints"
    torch.save(ckpt, tmp_path / "gone.pt")
    with pytest.raises(ImportError, match=r"gone_module:UserPoints, which does not import here.*/somewhere: add"):
        polydiff.load_run(tmp_path / "gone.pt")


def test_a_domain_state_that_checkpoints_cannot_load_is_named_before_training(tmp_path, monkeypatch):
    """A numpy array in Domain.state_dict() would save, then never load (weights_only): refused at the start."""
    user = tmp_path / "user"
    user.mkdir()
    _user_recipe(user, monkeypatch)
    monkeypatch.syspath_prepend(str(user))
    import userdomain

    monkeypatch.setattr(userdomain.UserPoints, "numpy_state", True)
    cfg = OmegaConf.to_container(OmegaConf.load(user / "user.yaml"))
    cfg.pop("defaults")
    with pytest.raises(TypeError, match=r"UserPoints.state_dict\(\)\['histogram'\] is a numpy.ndarray"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    torch.save({"format": "polydiff-checkpoint-v1", "domain_state": {"h": np.bincount([1])}}, tmp_path / "np.pt")
    from polydiff.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match="holds a Python object .numpy.* that safe loading .* refuses"):
        load_checkpoint(tmp_path / "np.pt")


def test_a_recipe_without_the_schema_and_multirun_flags_first(tmp_path):
    """A recipe without `defaults: [polydiff_recipe, _self_]` is refused with the fix; -m may come before the
    overrides of a recipe with config groups (profile/)."""
    bare = tmp_path / "bare.yaml"
    bare.write_text("domain: {name: examples.points:PointsDomain}\ntrainer: {max_steps: 2}\n")
    proc = run("train", str(bare), "trainer.max_steps=3")
    assert proc.returncode != 0 and "put `defaults: [polydiff_recipe, _self_]` at its top" in proc.stderr
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text(
        (ROOT / "examples" / "points.yaml").read_text().replace("_self_", "_self_\n  - profile: big", 1)
        if "  - _self_" in (ROOT / "examples" / "points.yaml").read_text()
        else ""
    )
    assert grouped.read_text(), "examples/points.yaml lists its defaults one per line"
    (tmp_path / "grouped" / "profile").mkdir(parents=True)
    (tmp_path / "grouped" / "profile" / "big.yaml").write_text("# @package _global_\nmodel: {width: 16}\n")
    (tmp_path / "grouped" / "profile" / "small.yaml").write_text("# @package _global_\nmodel: {width: 8}\n")
    for where, flag_first in (("sweep", True), ("sweep_last", False)):
        overrides = [
            "profile=small",
            "trainer.max_steps=2,3",
            "trainer.num_samples=8",
            f"hydra.sweep.dir={tmp_path / where}",
        ]
        proc = run("train", str(grouped), *(["-m", *overrides] if flag_first else [*overrides, "-m"]))
        assert proc.returncode == 0, proc.stderr[-2000:]
        steps = sorted(
            torch.load(p, weights_only=True)["step"] for p in (tmp_path / where).glob("*/checkpoints/last.pt")
        )
        assert steps == [2, 3]
    proc = run("train", "recipes/image_unet.yaml", "profile=cpu", "trainer.lr=1e-4", "--cfg", "job")  # a shipped one
    assert proc.returncode == 0 and "lr: 0.0001" in proc.stdout, proc.stderr[-2000:]


def test_saved_samples_keep_their_layout(tmp_path):
    """The template's save_samples/read_samples round trip keeps masks and ragged layouts (polydiff eval)."""
    domain = polydiff.Domain()
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    dense = polydiff.Batch(torch.randn(2, 3), polydiff.DenseSpace((2, 3), mask=mask), {"label": torch.tensor([0, 1])})
    ragged = polydiff.Batch(
        torch.randn(5, 3),
        polydiff.RaggedSpace(torch.tensor([0, 0, 1, 1, 1]), 2, 3, centered=(0, 1)),
        {"batch": torch.tensor([0, 0, 1, 1, 1])},
    )
    for name, batch in (("dense", dense), ("ragged", ragged)):
        back = domain.read_samples(domain.save_samples(batch, tmp_path / name)[0])
        assert torch.equal(back.x, batch.x) and type(back.space) is type(batch.space)
        assert torch.equal(back.space.count(), batch.space.count())
        assert back.cond.keys() == batch.cond.keys()


def test_guidance_needs_a_condition_in_every_domain_and_eval_names_stray_settings(tmp_path):
    """An unconditional molecule model cannot be guided (it guides towards a property, not a label); eval refuses
    KEY=V items that are neither samples nor domain settings."""
    from polydiff.cli import main
    from polydiff.cli_sample import check_guidance as _check_guidance

    molecule = polydiff.get_domain("molecule")
    with pytest.raises(ValueError, match="guidance.scale=3 would have no effect"):
        _check_guidance(molecule(), {"scale": 3.0, "rescale": 0.0}, {"scale": 3})
    assert molecule.can_guide(type("M", (), {"condition_on": "alpha"})())
    with pytest.raises(SystemExit, match=r"no samples at \['profile=cpu'\]"):
        main(["eval", str(ROOT / "examples" / "points.yaml"), str(tmp_path), "profile=cpu"])


def test_objective_and_sampler_values_are_checked():
    from polydiff.generate import check_sampler
    from polydiff.objectives import Objective
    from polydiff.schedules import make_schedule

    with pytest.raises(ValueError, match="objective.gamma=0 must be positive"):
        Objective("v", weighting="min_snr", gamma=0)
    with pytest.raises(ValueError, match="sampler.steps=2.5 must be a whole number"):
        check_sampler({"name": "ddim", "steps": 2.5}, make_schedule("cosine", 100))


def test_readme_block_loading_a_trained_run_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n", text.index("A trained run from Python")) + len("```python\n")
    cfg = {
        "domain": {"name": "examples.points:PointsDomain", "size": 256},
        "model": {"width": 16, "depth": 1},
        "schedule": {"steps": 50},
        "sampler": {"name": "ddim", "steps": 5},
        "trainer": {"max_steps": 2, "batch_size": 32, "device": "cpu", "num_samples": 8, "progress": False},
    }
    train(cfg, tmp_path / "runs" / "points")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(text[start : text.index("```", start)], "README.md (a trained run)", "exec"), scope)
    assert scope["batch"].x.shape == (512, 2) and set(scope["metrics"]) == {"dist_to_centre", "modes_covered"}


def test_sampling_uses_the_ema_weights_unless_told_and_any_kept_checkpoint(tmp_path):
    """load_run and polydiff sample take the EMA weights (--weights raw the trained ones); --checkpoint samples a
    kept step_NNNNNNN.pt and sampling.json names it with its step."""
    from polydiff.cli import main

    cfg = {
        "domain": {"name": "examples.points:PointsDomain", "size": 256},
        "model": {"width": 16, "depth": 1},
        "schedule": {"steps": 50},
        "sampler": {"name": "ddim", "steps": 3},
        "trainer": {
            "max_steps": 6,
            "batch_size": 32,
            "device": "cpu",
            "num_samples": 8,
            "progress": False,
            "ema_decay": 0.5,
            "keep_every": 4,
            "lr": 1e-2,
        },
    }
    train(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    ema = {k[len("module.") :]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    for weights, expected in (("ema", ema), ("raw", ckpt["model"])):
        state = polydiff.load_run(tmp_path, weights=weights)[0].net.state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in state)
    assert not all(torch.equal(ema[k], ckpt["model"][k]) for k in ema)  # the two differ, so the test can tell
    kept = tmp_path / "checkpoints" / "step_0000004.pt"
    main(["sample", str(tmp_path), "--n", "4", "--checkpoint", str(kept), "--out", str(tmp_path / "s4")])
    record = json.loads((tmp_path / "s4" / "sampling.json").read_text())
    assert record["checkpoint"] == str(kept) and record["step"] == 4 and record["weights"] == "ema"
    main(["sample", str(tmp_path), "--n", "4", "--weights", "raw", "--out", str(tmp_path / "raw")])
    main(["sample", str(tmp_path), "--n", "4", "--out", str(tmp_path / "ema")])
    a, b = (torch.load(tmp_path / d / "samples.pt", weights_only=True)["x"] for d in ("raw", "ema"))
    assert not torch.equal(a, b)
    main(["sample", str(tmp_path), "--n", "4", "--out", str(tmp_path / "ema2")])  # the same seed, the same samples
    assert torch.equal(b, torch.load(tmp_path / "ema2" / "samples.pt", weights_only=True)["x"])


def test_an_error_in_the_users_own_code_names_where_it_was_raised(tmp_path):
    """One line for errors of the user's own domain code, with the place it came from; never an empty message."""
    from polydiff.cli_common import user_message as _message

    user = tmp_path / "mydomain.py"
    user.write_text("def evaluate(batch):\n    return 1 - batch\n\ndef fail():\n    raise ValueError()\n")
    namespace: dict = {}
    exec(compile(user.read_text(), str(user), "exec"), namespace)
    try:
        namespace["evaluate"](None)
    except TypeError as err:
        assert _message(err).endswith(f"(raised at {user}:2, in evaluate)")
    try:
        namespace["fail"]()
    except ValueError as err:
        assert _message(err).startswith("ValueError (raised at")
    try:
        polydiff.get_domain("no-such-domain")
    except KeyError as err:  # raised inside polydiff: the message alone
        assert "raised at" not in _message(err) and "no-such-domain" in _message(err)
