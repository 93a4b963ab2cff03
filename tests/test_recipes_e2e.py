"""The image and molecule recipes train end to end (CPU profile, shrunk) and write readable outputs."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn.modules.module import register_module_forward_hook

from polydiff.cli import main
from polydiff.recipes import compose_recipe
from polydiff.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["trainer.log_every=5", "trainer.ckpt_every=1000", "trainer.progress=false", "trainer.eval=false"]


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_image_recipe_trains_and_writes_png_grids(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    cfg = compose_recipe(
        ROOT / "recipes" / "image_unet.yaml",
        [
            "profile=cpu",
            "trainer.max_steps=60",
            "trainer.batch_size=32",
            "trainer.num_samples=20",
            "model.channels=16",
            "sampler.steps=5",
            *SHORT,
        ],
    )
    run = tmp_path / "run"
    train(cfg, run)
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]
    grid = Image.open(run / "samples" / "step_0000060.png")
    grid.verify()
    out = tmp_path / "new"
    main(["sample", str(run), "--n", "10", "--out", str(out), "sampler.steps=4", "label=3", "guidance.scale=2"])
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["x"].shape == (10, 1, 8, 8) and torch.isfinite(saved["x"]).all()
    assert saved["label"].tolist() == [3] * 10
    assert Image.open(out / "samples.png").size[0] > 0


def test_molecule_recipe_trains_and_writes_a_readable_sdf(tmp_path, monkeypatch):
    from rdkit import Chem

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    cfg = compose_recipe(
        ROOT / "recipes" / "molecule_egnn.yaml",
        [
            "profile=cpu",
            "trainer.max_steps=40",
            "trainer.num_samples=6",
            "domain.max_molecules=20",
            "domain.num_conformers=2",
            "model.hidden=32",
            "model.layers=2",
            "sampler.steps=5",
            *SHORT,
        ],
    )
    run = tmp_path / "run"
    train(cfg, run)
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]  # training drops it 4-10x; zero gradients do not halve it
    sdf = sorted((run / "samples").glob("*.sdf"))
    assert sdf, list((run / "samples").iterdir())
    mols = [m for m in Chem.SDMolSupplier(str(sdf[0]), sanitize=False, removeHs=False)]
    assert len(mols) == 6 and all(m is not None and m.GetNumAtoms() > 0 for m in mols)
    assert all(m.GetConformer().Is3D() for m in mols)


def test_property_conditional_molecule_run_reports_property_mae(tmp_path, monkeypatch):
    """A property-conditional run's end-of-training evaluation and `polydiff sample --eval` score EDM's property MAE
    (the predictor fits inside the trainer's no-grad evaluation), with the predictor's own error as reference."""
    from tests.test_molecule import write_sized_sdf

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    sdf = write_sized_sdf(tmp_path / "m.sdf")
    cfg = compose_recipe(
        ROOT / "recipes" / "molecule_egnn.yaml",
        [
            "profile=cpu",
            "domain.source=sdf",
            f"domain.path={sdf}",
            "domain.condition_on=size",
            "+domain.split=[0.4,0.4,0.2]",
            "domain.property_epochs=150",
            "trainer.max_steps=4",
            "trainer.batch_size=8",
            "trainer.num_samples=4",
            "model.hidden=16",
            "model.layers=1",
            "sampler.steps=3",
            "trainer.log_every=2",
            "trainer.progress=false",
        ],
    )
    run = tmp_path / "run"
    train(cfg, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if r["kind"] == "eval"][-1]
    reference = [r for r in records if r["kind"] == "reference"][-1]
    assert {"property_mae", "property_mae_shuffled", "property_mae_num_atoms", "property_scored"} <= set(evaluated)
    assert reference["property_mae"] < 0.5 * reference["property_mae_shuffled"], reference
    out = tmp_path / "new"
    main(["sample", str(run), "--n", "5", "--out", str(out), "--eval", "sampler.steps=3", "prior.context=9"])
    metrics = json.loads((out / "sampling.json").read_text())["metrics"]
    assert metrics["property_scored"] > 0 and metrics["property_mae"] >= 0


@pytest.mark.parametrize(
    "recipe,overrides",
    [
        ("audio_unet", ["domain.duration=0.25", "model.channels=8"]),
        ("molecule_egnn", ["domain.max_molecules=10", "domain.num_conformers=1", "model.hidden=16", "model.layers=2"]),
        ("image_unet", ["model.channels=8"]),
        ("audio_autoencoder", ["domain.duration=0.25", "model.channels=4", "+domain.metrics=false"]),
    ],
    ids=["audio", "molecule", "image", "audio_autoencoder"],
)
def test_bf16_autocast_training_keeps_float32_weights(tmp_path, monkeypatch, recipe, overrides):
    """trainer.precision=bf16 (the GPU default) through each shipped network, here under CPU autocast."""
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    cfg = compose_recipe(
        ROOT / "recipes" / f"{recipe}.yaml",
        [
            "profile=cpu",
            "trainer.precision=bf16",
            "trainer.max_steps=4",
            "trainer.batch_size=4",
            "trainer.log_every=1",
            "trainer.ckpt_every=1000",
            "trainer.progress=false",
            "trainer.eval=false",
            "trainer.num_samples=2",
            "sampler.steps=2",
            *overrides,
        ],
    )
    # Output dtypes of every module called while training (not while sampling).
    dtypes = set()
    real_micro_step = Trainer._micro_step

    def micro_step(self, batch, last):
        hook = register_module_forward_hook(lambda module, args, out: dtypes.add(getattr(out, "dtype", None)))
        try:
            return real_micro_step(self, batch, last)
        finally:
            hook.remove()

    monkeypatch.setattr(Trainer, "_micro_step", micro_step)
    run = tmp_path / "run"
    train(cfg, run)
    assert torch.bfloat16 in dtypes, f"no layer computed in bfloat16: {dtypes}"
    losses = _losses(run)
    assert len(losses) == 4 and all(0 < loss < 1e3 for loss in losses)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
