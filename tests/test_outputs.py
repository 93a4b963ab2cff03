"""The outputs half of the domain contract: a domain's own :class:`polydiff.outputs.Outputs`, and domains that still
override the output hooks on the domain itself (the contract before the outputs object), through training, sampling
and scoring."""

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import polydiff
from examples.points import MLP, mixture
from polydiff.outputs import Outputs
from polydiff.scoring import score_samples
from polydiff.trainer import train


def _write(batch: polydiff.Batch, out_dir: Path, prefix: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savetxt(out_dir / f"{prefix}.txt", batch.x.detach().cpu().numpy())
    return [out_dir / f"{prefix}.txt"]


def _read(path: Path) -> polydiff.Batch:
    files = sorted(Path(path).rglob("*.txt")) if Path(path).is_dir() else [Path(path)]
    x = torch.from_numpy(np.concatenate([np.loadtxt(f, ndmin=2) for f in files])).float()
    return polydiff.Batch(x, polydiff.DenseSpace(tuple(x.shape)))


def _radius(batch: polydiff.Batch) -> dict[str, float]:
    return {"mean_radius": float(batch.x.norm(dim=1).mean())}


class Points(polydiff.Domain):
    def dataset(self, split: str):
        return mixture(256, seed=0 if split == "train" else 1)

    def build_network(self, width: int = 16, depth: int = 1):
        return MLP(width, depth)


class OldWay(Points):
    """Output hooks overridden on the domain."""

    def save_samples(self, batch, out_dir, prefix="samples"):
        return _write(batch, out_dir, prefix)

    def read_samples(self, path):
        return _read(path)

    def evaluate(self, batch):
        return _radius(batch)

    def reference_metrics(self, n):
        x = self.dataset("test")[:n]
        return _radius(polydiff.Batch(x, polydiff.DenseSpace(tuple(x.shape))))


class TextOutputs(Outputs):
    """The same hooks on an outputs object; ``known_values`` keeps the first ``keep`` coordinates of a file."""

    save_samples = staticmethod(_write)
    read_samples = staticmethod(_read)
    evaluate = staticmethod(_radius)

    def reference_metrics(self, n):
        x = self.domain.dataset("test")[:n]
        return _radius(polydiff.Batch(x, polydiff.DenseSpace(tuple(x.shape))))

    def known_values(self, path, n, keep: int = 1, note: Optional[str] = None):
        values = _read(path).x[:1]
        mask = torch.zeros_like(values, dtype=torch.bool)
        mask[:, :keep] = True
        return polydiff.Known(values, mask)


class NewWay(Points):
    def make_outputs(self):
        return TextOutputs(self)


@pytest.mark.parametrize("cls", [OldWay, NewWay])
def test_output_hooks_on_the_domain_or_its_outputs_object_serve_train_sample_and_eval(cls, tmp_path, monkeypatch):
    import polydiff.registry as registry
    from polydiff.cli import main

    name = f"test-{cls.__name__}"
    monkeypatch.setitem(registry._REGISTRY, name, None)  # the registration leaves with the test
    polydiff.register_domain(name, cls)
    cfg = {
        "domain": {"name": name},
        "model": {"width": 16, "depth": 1},
        "schedule": {"steps": 50},
        "sampler": {"name": "ddim", "steps": 5},
        "trainer": {"max_steps": 3, "batch_size": 32, "device": "cpu", "num_samples": 8, "progress": False},
    }
    train(cfg, tmp_path / "run")
    rows = {row["kind"]: row for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert "mean_radius" in rows["eval"] and "mean_radius" in rows["reference"]
    assert (tmp_path / "run" / "samples" / "step_0000003.txt").is_file()
    main(["sample", str(tmp_path / "run"), "--n", "6", "--out", str(tmp_path / "drawn"), "--eval", "--device", "cpu"])
    assert np.loadtxt(tmp_path / "drawn" / "samples.txt").shape == (6, 2)
    domain = cls()
    domain.setup(domain.dataset("train"))
    record = score_samples(domain, [tmp_path / "drawn"])
    assert record["samples"][0]["n"] == 6 and set(record["samples"][0]["metrics"]) == {"mean_radius"}
    assert record["reference"] == domain.reference_metrics(6)
    if cls is NewWay:
        assert isinstance(domain.outputs, TextOutputs) and domain.outputs is domain.outputs


def test_the_domain_names_a_mistyped_option_of_its_outputs_known_values(tmp_path):
    domain = NewWay()
    domain.setup(domain.dataset("train"))
    path = domain.save_samples(polydiff.Batch(torch.ones(2, 2), polydiff.DenseSpace((2, 2))), tmp_path)[0]
    assert torch.equal(domain.known_values(path, 3, keep=1).mask, torch.tensor([[True, False]]))
    with pytest.raises(KeyError, match=r"unknown key 'known.kep'.*Did you mean 'known.keep'"):
        domain.known_values(path, 3, kep=1)
    with pytest.raises(NotImplementedError, match="cannot take known values from a file"):
        Points().known_values(path, 3)


def test_the_dense_defaults_live_on_the_outputs_object(tmp_path):
    domain = polydiff.Domain()
    batch = polydiff.Batch(torch.randn(3, 2), polydiff.DenseSpace((3, 2)), {"label": torch.tensor([0, 1, 0])})
    (path,) = domain.outputs.save_samples(batch, tmp_path)
    back = domain.read_samples(path)
    assert (
        type(domain.outputs) is Outputs
        and torch.equal(back.x, batch.x)
        and torch.equal(back.cond["label"], batch.cond["label"])
    )
    assert domain.evaluate(batch) == {} and domain.reference_metrics(3) == {}
