"""Nothing from a recipe, a checkpoint or a data file runs code: every route an attacker has, tried end to end.

The payloads are functions that Hydra's own blocklist lets through (``polydiff.checkpoint.keep_copy`` copies a file)
as well as ``os.system`` through a re-export, so each test fails if polydiff's own check is removed, whatever Hydra
version is installed (.ci/run also runs this file under the oldest hydra-core and omegaconf that pyproject allows).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polydiff.build import check_targets, load_run
from polydiff.checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint, remove_stale_temporaries
from polydiff.cli import main
from polydiff.recipes import check_recipe
from polydiff.safety import UnsafeConfigError, check_hydra, resolve_target
from polydiff.trainer import train

ROOT = Path(__file__).resolve().parents[1]
POINTS = [
    "domain.size=64",
    "model.width=16",
    "model.depth=1",
    "trainer.max_steps=2",
    "trainer.batch_size=16",
    "trainer.num_samples=2",
    "trainer.eval=false",
    "trainer.ckpt_every=2",
    "sampler.steps=2",
]


def _copy_payload(marker: Path) -> dict:
    """A config entry that, if built, copies this file to ``marker``: proof that code named by data ran."""
    return {"_target_": "polydiff.checkpoint.keep_copy", "src": __file__, "dst": str(marker)}


def _recipe(tmp_path: Path, body: str, name: str = "recipe") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "defaults: [polydiff_recipe, _self_]\n"
        "domain: {name: 'examples.points:PointsDomain', size: 64}\n"
        "model: {width: 16, depth: 1}\n"
        "trainer: {max_steps: 2, batch_size: 16, device: cpu, progress: false, eval: false, num_samples: 2}\n"
        "sampler: {steps: 2}\n" + body
    )
    return path


def _train_refused(recipe: Path, run_dir: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as err:
        main(["train", str(recipe), f"hydra.run.dir={run_dir}", *extra])
    assert not run_dir.exists(), "a refused recipe must not leave a run folder"
    return str(err.value)


# ----------------------------------------------------------------------------------------------- _target_ names
@pytest.mark.parametrize(
    "target",
    [
        "polydiff.checkpoint.os.system",  # re-exported through an allowed package
        "polydiff.checkpoint.pickle.loads",
        "domains.os.system",
        "polydiff.checkpoint.keep_copy",  # a function defined in polydiff, but not a network class
        "polydiff.trainer.Trainer",  # a class defined in polydiff, but not a network
        "domains.unet.nn.Linear",  # a network class, but defined in torch
        "polydiffevil.x",  # a name sharing a prefix with an allowed package
        "domains_x.fn",
        "os.system",
        "builtins.eval",
        "polydiff.checkpoint:os",
    ],
)
def test_targets_outside_allowed_network_classes_are_refused(target):
    import polydiff.checkpoint

    assert polydiff.checkpoint.os.system  # the re-export these names go through exists
    with pytest.raises(UnsafeConfigError):
        resolve_target(target, "model._target_")
    with pytest.raises(UnsafeConfigError):
        check_targets({"model": {"_target_": "domains.unet.UNet", "inner": {"_target_": target}}})


def test_a_package_sharing_an_allowed_prefix_is_never_imported(tmp_path, monkeypatch):
    """``polydiffevil`` starts like ``polydiff``: naming it must not even import it (its import would run code)."""
    marker = tmp_path / "imported"
    (tmp_path / "polydiffevil.py").write_text(
        f"import pathlib, torch\npathlib.Path({str(marker)!r}).write_text('x')\nclass Net(torch.nn.Module):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("polydiffevil.Net", "domainsevil.Net"):
        with pytest.raises(UnsafeConfigError, match="is not allowed"):
            resolve_target(target, "model._target_")
    assert not marker.exists() and "polydiffevil" not in sys.modules


def test_network_classes_of_allowed_packages_resolve():
    from domains.unet import UNet

    assert resolve_target("domains.unet.UNet", "model._target_") is UNet


def test_a_registered_domain_allows_its_package_and_no_other(tmp_path, monkeypatch):
    pkg = tmp_path / "mylab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import os\nimport torch\nimport polydiff\n\n"
        "class Net(torch.nn.Module):\n    pass\n\n"
        "@polydiff.register_domain('mylab_points')\nclass Points(polydiff.Domain):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import mylab

    try:
        assert resolve_target("mylab.Net", "model._target_") is mylab.Net
        for bad in ("mylab.os.system", "mylab_evil.Net"):
            with pytest.raises(UnsafeConfigError):
                resolve_target(bad, "model._target_")
    finally:
        from polydiff import registry

        registry._REGISTRY.pop("mylab_points", None)
        sys.modules.pop("mylab", None)


# ------------------------------------------------------------------------------------------- recipes, routes 1-2
def test_recipe_model_target_running_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    recipe = (
        _recipe(tmp_path, "")
        .read_text()
        .replace(
            "model: {width: 16, depth: 1}",
            f"model: {{_target_: polydiff.checkpoint.keep_copy, src: {__file__}, dst: {marker}}}",
        )
    )
    (tmp_path / "recipe.yaml").write_text(recipe)
    message = _train_refused(tmp_path / "recipe.yaml", tmp_path / "run")
    assert "model._target_" in message and "keep_copy" in message
    assert not marker.exists()


def test_recipe_reexported_os_system_is_refused(tmp_path):
    marker = tmp_path / "ran"
    recipe = (
        _recipe(tmp_path, "")
        .read_text()
        .replace(
            "model: {width: 16, depth: 1}",
            f"model: {{_target_: polydiff.checkpoint.os.system, _args_: ['touch {marker}']}}",
        )
    )
    (tmp_path / "recipe.yaml").write_text(recipe)
    message = _train_refused(tmp_path / "recipe.yaml", tmp_path / "run")
    assert "polydiff.checkpoint.os.system" in message and "re-exported" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "section",
    [
        "hydra: {callbacks: {x: PAYLOAD}}",
        "hydra: {job_logging: {version: 1, handlers: {x: {'()': polydiff.checkpoint.keep_copy, src: SRC, dst: DST}}, "
        "root: {handlers: [x]}}}",
        "hydra: {hydra_logging: {version: 1, handlers: {x: {class: polydiff.checkpoint.keep_copy, src: SRC, "
        "dst: DST}}}}",
        "hydra: {launcher: {_target_: polydiff.checkpoint.os.system}}",
    ],
)
def test_recipe_hydra_section_running_code_is_refused(tmp_path, section):
    marker = tmp_path / "ran"
    payload = "{_target_: polydiff.checkpoint.keep_copy, src: SRC, dst: DST}"
    body = section.replace("PAYLOAD", payload).replace("SRC", __file__).replace("DST", str(marker))
    for extra in ([], ["-m"]):
        message = _train_refused(_recipe(tmp_path, body + "\n"), tmp_path / "run", *extra)
        assert "hydra." in message
        assert not marker.exists()


def test_recipe_environment_and_files_outside_the_run_are_refused(tmp_path):
    for body, named in [
        ("hydra: {job: {env_set: {LD_PRELOAD: /tmp/x.so}}}", "env_set"),
        (
            "hydra: {job_logging: {version: 1, handlers: {f: {class: logging.FileHandler, filename: /root/.bashrc}}}}",
            "filename",
        ),
        (
            "hydra: {job_logging: {version: 1, handlers: {f: {class: logging.StreamHandler, stream: 'ext://os.system'}}}}",
            "ext://",
        ),
        ("hydra: {output_subdir: /etc}", "output_subdir"),
    ]:
        assert named in _train_refused(_recipe(tmp_path, body + "\n"), tmp_path / "run")


@pytest.mark.parametrize(
    "body",
    [
        # Text right after the run folder names a sibling of it (RUN_out.log beside RUN).
        "hydra: {job_logging: {version: 1, handlers: {f: {class: logging.FileHandler, "
        "filename: '${hydra.runtime.output_dir}_out.log'}}, root: {handlers: [f]}}}",
        # logging's '.' sets attributes after the check: a delayed handler opens its baseFilename on first use.
        "hydra: {job_logging: {version: 1, handlers: {f: {class: logging.FileHandler, delay: true, "
        "filename: '${hydra.runtime.output_dir}/x.log', "
        "'.': {baseFilename: '${hydra.runtime.output_dir}/../../out.log'}}}, root: {handlers: [f]}}}",
        # Hydra's own log file is RUN/${hydra.job.name}.log: a job name holding '..' moves it out of the run.
        "hydra: {job: {name: ../../out}}",
    ],
)
def test_log_files_escaping_the_run_folder_are_refused(tmp_path, body):
    (tmp_path / "a" / "b").mkdir(parents=True)
    run_dir = tmp_path / "a" / "b" / "run"
    message = _train_refused(_recipe(tmp_path, body + "\n"), run_dir)
    assert "run folder" in message or "job.name" in message or "'.'" in message
    assert sorted(p.name for p in tmp_path.rglob("*") if p.suffix == ".log") == []


def test_a_log_file_may_interpolate_only_the_checked_job_name():
    """Any other interpolation after the run folder may hold '..' that the text does not show."""
    handler = {"class": "logging.FileHandler", "filename": "${hydra.runtime.output_dir}/${trainer.lr_decay}.log"}
    with pytest.raises(UnsafeConfigError, match="interpolations"):
        check_hydra({"job_logging": {"version": 1, "handlers": {"f": handler}}})
    handler["filename"] = "${hydra.runtime.output_dir}/${hydra.job.override_dirname}.log"
    with pytest.raises(UnsafeConfigError, match="run folder"):
        check_hydra({"job_logging": {"version": 1, "handlers": {"f": handler}}})
    handler["filename"] = "${hydra.runtime.output_dir}/logs/${hydra.job.name}.log"
    check_hydra({"job_logging": {"version": 1, "handlers": {"f": handler}}, "job": {"name": "cli_train"}})


@pytest.mark.parametrize(
    "body",
    [
        # Resolved by Hydra after the check, into a handler that runs a command (hydra-core 1.3.2 builds it).
        "hydra: {job_logging: '${oc.create:{version: 1, handlers: {x: {class: subprocess.Popen, args: touch MARKER, "
        "shell: true}}, root: {handlers: [x]}}}'}",
        "hydra: {job_logging: {version: 1, root: {handlers: [x]}, handlers: \"${oc.decode:'{x: {class: "
        "subprocess.Popen, args: touch MARKER, shell: true}}'}\"}}",
        # Another node of the recipe standing for a whole handler.
        "hydra: {job_logging: {version: 1, root: {handlers: [x]}, handlers: {x: '${domain.hidden}'}}}",
        "hydra: {output_subdir: '${domain.hidden}'}",
    ],
)
def test_interpolations_that_stand_for_code_in_the_hydra_section_are_refused(tmp_path, body):
    marker, outside = tmp_path / "ran", tmp_path / "outside"
    recipe = _recipe(tmp_path, body.replace("MARKER", str(marker)) + "\n")
    recipe.write_text(recipe.read_text().replace("size: 64}", f"size: 64, hidden: {outside}}}"))
    assert "interpolation" in _train_refused(recipe, tmp_path / "run") or "output_subdir" in body
    assert not marker.exists() and not outside.exists()  # Hydra writes its records to RUN/output_subdir


def test_a_sweep_value_is_checked_like_the_recipe(tmp_path):
    """A recipe's own sweep (hydra.sweeper.params) and a -m sweep reach each value's config, logging included."""
    marker = tmp_path / "ran"
    recipe = _recipe(tmp_path, "hydra: {sweeper: {params: {hydra/job_logging: 'default,evil'}}}\n")
    group = tmp_path / "recipe" / "hydra" / "job_logging"
    group.mkdir(parents=True)
    (group / "evil.yaml").write_text(
        f"version: 1\nhandlers: {{x: {{'()': polydiff.checkpoint.keep_copy, src: "
        f"{__file__}, dst: {marker}}}}}\nroot: {{handlers: [x]}}\n"
    )
    with pytest.raises(UnsafeConfigError, match="job_logging"):
        check_recipe(recipe, ["-m"])
    plain = _recipe(tmp_path, "", name="plain")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "hydra").symlink_to(tmp_path / "recipe" / "hydra")
    with pytest.raises(UnsafeConfigError, match="job_logging"):
        check_recipe(plain, ["-m", "hydra/job_logging=default,evil"])
    assert not marker.exists()


def test_hydra_defaults_and_plugins_pass():
    """The shipped recipes' Hydra config, as composed, passes; so do Hydra's own launcher and logging presets."""
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        check_recipe(recipe, ["profile=cpu", "-m", "trainer.lr=1e-4,2e-4", "hydra/job_logging=disabled,default,stdout"])
    check_hydra({"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}})
    with pytest.raises(UnsafeConfigError):
        check_hydra({"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.os.system"}})


def test_experimental_rerun_pickle_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="pickle"):
        main(["train", str(_recipe(tmp_path, "")), "--experimental-rerun", str(tmp_path / "config.pickle")])


def test_stdlib_module_domain_is_not_imported(tmp_path):
    sys.modules.pop("antigravity", None)
    recipe = _recipe(tmp_path, "").read_text().replace("'examples.points:PointsDomain'", "'antigravity:Domain'")
    (tmp_path / "recipe.yaml").write_text(recipe)
    assert "standard library" in _train_refused(tmp_path / "recipe.yaml", tmp_path / "run")
    assert "antigravity" not in sys.modules


# ------------------------------------------------------------------------------------------ checkpoints, route 3
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    from polydiff.recipes import compose_recipe

    train(compose_recipe(ROOT / "examples" / "points.yaml", POINTS), run_dir)
    return run_dir


def _hostile_copy(run_dir: Path, tmp_path: Path, model: dict) -> Path:
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    ckpt["config"]["model"] = model
    out = tmp_path / "downloaded"
    atomic_save(ckpt, out / "checkpoints" / "last.pt")
    return out


@pytest.mark.parametrize("model", ["keep_copy", "reexport"])
def test_checkpoint_config_naming_code_is_refused_by_every_reader(tiny_run, tmp_path, model):
    marker = tmp_path / "ran"
    payload = (
        _copy_payload(marker)
        if model == "keep_copy"
        else {"_target_": "polydiff.checkpoint.os.system", "_args_": [f"touch {marker}"]}
    )
    run = _hostile_copy(tiny_run, tmp_path, payload)
    with pytest.raises(SystemExit, match="checkpoint .*model._target_"):
        main(["sample", str(run), "--n", "2"])
    with pytest.raises(UnsafeConfigError):
        load_run(run)
    with pytest.raises(SystemExit, match="model._target_"):
        main(["eval", str(run), str(tmp_path)])
    recipe = ROOT / "examples" / "points.yaml"
    with pytest.raises(SystemExit, match="model._target_"):
        main(
            [
                "train",
                str(recipe),
                *POINTS,
                f"trainer.resume={run / 'checkpoints' / 'last.pt'}",
                f"hydra.run.dir={tmp_path / 'resumed'}",
            ]
        )
    assert not marker.exists()


@pytest.mark.parametrize("escape", ["", "\\"])
def test_checkpoint_model_argument_that_resolves_to_code_is_refused(tiny_run, tmp_path, escape):
    """Hydra resolves a config before it builds it: an argument that becomes a ``_target_`` node then (or, escaped,
    becomes interpolation text that Hydra would resolve once more) must be checked as one, not built."""
    marker = tmp_path / "ran"
    hidden = f"{escape}${{oc.create:{{_target_: polydiff.checkpoint.keep_copy, src: {__file__}, dst: {marker}}}}}"
    model = {"_target_": "examples.points.MLP", "width": 16, "depth": 1, "extra": hidden}
    run = _hostile_copy(tiny_run, tmp_path, model)
    with pytest.raises(SystemExit, match="model"):
        main(["sample", str(run), "--n", "2"])
    assert not marker.exists()


def test_intact_checkpoint_still_samples(tiny_run, tmp_path):
    main(["sample", str(tiny_run), "--n", "2", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "sampling.json").is_file()


def test_pickled_code_is_named_as_code_without_torchs_advice(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"format": CHECKPOINT_FORMAT, "x": Payload()}, tmp_path / "last.pt")
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "last.pt")
    message = str(err.value)
    assert "holds code" in message and "system" in message
    assert (
        "truncated" not in message
        and "weights_only=False" not in message
        and "weights_only` set to `False" not in message
    )
    assert not (tmp_path / "ran").exists()


def test_non_plain_state_is_named_as_such(tmp_path):
    torch.save({"format": CHECKPOINT_FORMAT, "x": Path("a")}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="state dicts may hold only tensors") as err:
        load_checkpoint(tmp_path / "last.pt")
    assert "weights_only=False" not in str(err.value)


# ---------------------------------------------------------------------------------------- killed writes' files
def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 3600
    stale = tmp_path / f".last.pt.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".last.pt.{os.getpid()}.0123abcd.tmp"
    recent = tmp_path / f".step_0000010.pt.{dead.pid}.89abcdef.tmp"
    other = tmp_path / "notes.tmp"
    for path in (stale, live, recent, other):
        path.write_bytes(b"x")
    for path in (stale, live, other):
        os.utime(path, (old, old))
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and recent.exists() and other.exists()


def test_a_checkpoint_naming_a_sampler_module_of_another_package_is_refused_unimported(tiny_run, tmp_path, monkeypatch):
    """A plug-in is called with the config's values: a downloaded run may not name one in a module nothing imported."""
    marker = tmp_path / "imported"
    (tmp_path / "evilplug.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "def fn(denoiser, noise, schedule, steps, **options):\n    return noise\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    ckpt["config"]["sampler"]["name"] = "evilplug:fn"
    atomic_save(ckpt, tmp_path / "run" / "checkpoints" / "last.pt")
    with pytest.raises(SystemExit, match="sampler.name='evilplug:fn' names a module outside"):
        main(["sample", str(tmp_path / "run"), "--n", "2"])
    assert not marker.exists() and "evilplug" not in sys.modules
