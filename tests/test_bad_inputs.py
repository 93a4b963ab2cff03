"""The bad-input battery: each mistake a new user made gets one clear message naming the file, key or value and the
fix (never a traceback), and loses nothing already saved. Grows with each issue."""

from pathlib import Path

import pytest

from polydiff.cli import main

ROOT = Path(__file__).resolve().parents[1]
POINTS = ROOT / "examples" / "points.yaml"
TINY = [
    "domain.size=64",
    "model.width=16",
    "model.depth=1",
    "trainer.max_steps=4",
    "trainer.batch_size=16",
    "trainer.num_samples=2",
    "trainer.eval=false",
    "trainer.ckpt_every=2",
    "sampler.steps=2",
]


def _fails(*args: str) -> str:
    """The one-line message of a ``polydiff`` command that must fail."""
    with pytest.raises(SystemExit) as err:
        main(list(args))
    message = str(err.value)
    assert message.startswith("polydiff: error: ") and "Traceback" not in message
    return message


def _recipe(tmp_path: Path, old: str, new: str) -> Path:
    text = POINTS.read_text()
    assert old in text
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    "old, new, named",
    [
        ("ema_decay: 0.99", "ema_decy: 0.99", "Did you mean 'trainer.ema_decay'?"),
        ("trainer:\n", "traner:\n", "Did you mean 'recipe.trainer'?"),
        ("objective: {prediction: v}", "objective: {prediction: v, _target_: os.system}", "objective._target_"),
    ],
)
def test_a_typo_inside_a_recipe_file_is_named_with_its_file(tmp_path, old, new, named):
    recipe = _recipe(tmp_path, old, new)
    for extra in ([], ["-m"]):
        message = _fails("train", str(recipe), f"hydra.run.dir={tmp_path / 'run'}", *extra)
        assert named in message and str(recipe) in message
        assert not (tmp_path / "run").exists()


def test_a_run_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    message = _fails("train", str(POINTS), *TINY, f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert "hydra.run.dir" in message and "is a file, not a folder" in message
    run = tmp_path / "run"
    (run / "samples").parent.mkdir()
    (run / "samples").write_text("")  # where samples would go, found only after training until now
    assert "samples is a file" in _fails("train", str(POINTS), *TINY, f"hydra.run.dir={run}")


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path):
    message = _fails("train", str(POINTS), *TINY, "domain.size=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert "was removed" in message and not (tmp_path / "run").exists()


def test_a_run_that_fails_after_training_keeps_its_folder_and_logs_the_error(tmp_path):
    import torch

    run = tmp_path / "run"
    main(["train", str(POINTS), *TINY, "trainer.max_steps=2", f"hydra.run.dir={run}"])
    message = _fails(
        "train",
        str(POINTS),
        *TINY,
        "trainer.max_steps=8",
        "trainer.lr=1e30",
        "trainer.grad_clip=0",
        f"hydra.run.dir={run}",
    )
    assert "nan" in message and "last.pt" in message and "is kept" in message
    assert any("polydiff: error:" in log.read_text() for log in run.glob("*.log"))
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in kept.values())  # a NaN never replaced the good checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    main(["train", str(POINTS), *TINY, "trainer.max_steps=2", f"hydra.run.dir={run}"])
    return run


def test_sample_names_a_missing_checkpoint_file_and_the_ones_there(tiny_run):
    message = _fails("sample", str(tiny_run), "--checkpoint", str(tiny_run / "checkpoints" / "step_0000009.pt"))
    assert "does not exist" in message and "last.pt" in message and "train first" not in message


def test_sample_into_a_folder_that_cannot_be_written_is_refused_before_sampling(tiny_run, tmp_path):
    (tmp_path / "file").write_text("")
    message = _fails("sample", str(tiny_run), "--out", str(tmp_path / "file" / "samples"))
    assert "--out" in message and "is a file, not a folder" in message


def test_negative_guidance_scale_is_refused(tiny_run):
    from polydiff.build import load_run
    from polydiff.generate import generate

    parts, ckpt = load_run(tiny_run)
    with pytest.raises(ValueError, match="guidance.scale=-2.0 must be a number >= 0"):
        generate(
            parts.domain,
            parts.net,
            parts.schedule,
            parts.objective,
            2,
            sampler=ckpt["config"]["sampler"],
            guidance={"scale": -2.0},
        )


def test_noise_of_another_shape_than_the_space_is_refused():
    import torch

    from polydiff import DenseSpace, make_schedule, sample_ddim
    from polydiff.state import Prediction

    def denoiser(x, t):
        return Prediction(torch.zeros_like(x), x)

    with pytest.raises(ValueError, match=r"shape \(5, 3\) but the space describes states of shape \(4, 3\)"):
        sample_ddim(denoiser, torch.randn(5, 3), make_schedule("cosine", 10), 2, space=DenseSpace((4, 3)))


def test_a_nan_before_the_first_checkpoint_says_none_was_kept_and_points_at_the_data_first(tmp_path):
    message = _fails(
        "train",
        str(POINTS),
        *TINY,
        "trainer.lr=1e30",
        "trainer.grad_clip=0",
        "trainer.warmup_steps=0",
        "trainer.ckpt_every=100",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "no checkpoint was written yet" in message and "is kept" not in message
    assert message.index("data") < message.index("trainer.lr")


def test_molecules_that_diverged_or_hold_no_atoms(tmp_path, caplog):
    import numpy as np

    from domains.molecule.bonds import bond_order, bond_order_matrix
    from domains.molecule.data import read_sample_molecules
    from domains.molecule.outputs import write_sdf

    assert bond_order("C", "C", float("nan")) == 0 and bond_order("C", "C", 1.54) == 1  # EDM tests d < limit
    assert bond_order_matrix(["C", "C"], np.full((2, 3), np.nan)).sum() == 0
    good = (["C", "O"], np.array([[0.0, 0, 0], [1.43, 0, 0]]))
    bad = (["C", "C"], np.array([[0.0, 0, 0], [np.nan, 0, 0]]))
    path = write_sdf([good, bad, good], tmp_path / "s.sdf")
    read = read_sample_molecules(path)  # RDKit reads every record written
    assert [len(symbols) for symbols, *_ in read] == [2, 2]
    assert "generated_1" in caplog.text and "non-finite" in caplog.text
    (tmp_path / "empty.sdf").write_text("empty\n  polydiff\n\n  0  0  0  0  0  0  0  0  0  0999 V2000\nM  END\n$$$$\n")
    with pytest.raises(ValueError, match="has no atoms"):
        read_sample_molecules(tmp_path / "empty.sdf")


def test_an_old_checkpoint_whose_explicit_linear_range_was_scaled_is_refused_with_its_conversion(tmp_path):
    import subprocess
    import sys

    import torch

    from polydiff.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
    from polydiff.schedules import make_schedule

    old = {
        "schedule": {"name": "linear", "steps": 50, "beta_start": 1e-4, "beta_end": 0.01},
        "objective": {"prediction": "eps"},
        "domain": {"name": "image"},
    }
    path = tmp_path / "old.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": old}, path)
    with pytest.raises(ValueError, match="scaled by 1000 / steps and now uses as given") as err:
        load_checkpoint(path)
    command = str(err.value).split("python -c ", 1)[1].strip()[1:-1]
    subprocess.run([sys.executable, "-c", command], check=True)
    converted = load_checkpoint(path)["config"]["schedule"]
    before = torch.linspace(1e-4 * 20, 0.01 * 20, 50, dtype=torch.float64)  # what the older code trained with
    after = make_schedule(**converted).betas
    torch.testing.assert_close(after, before)
