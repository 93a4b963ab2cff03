"""Noise-aware classifiers on a ragged layout under ``torchrun``: a label classifier (one network call per class on
a graph batch) and a regressor of a float property train over gloo on two CPU processes and keep the ranks' weights
identical to the checkpoint's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CLOUDS = '''
import math
import torch
from torch import nn
import polydiff
from polydiff import Batch, RaggedSpace


class PointNet(nn.Module):
    """net(x_t, t, batch, label, centre): a per-point MLP on the point, its cloud's t and label embeddings."""

    def __init__(self, width=16):
        super().__init__()
        self.embed = nn.Embedding(3, 4)
        self.body = nn.Sequential(nn.Linear(2 + 4 + 4, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, batch, label, centre):
        freqs = torch.exp(torch.arange(2, device=x.device) * -math.log(1000.0) / 2)
        angles = (t * 1000)[:, None] * freqs  # [B, 2]
        lab = self.embed(torch.where(label < 0, torch.full_like(label, 2), label))  # [B, 4]
        per_cloud = torch.cat([angles.sin(), angles.cos(), lab], dim=-1)[batch]  # [N, 8]
        return self.body(torch.cat([x, per_cloud], dim=-1))


class Clouds(polydiff.Domain):
    """Clouds of 3 to 6 points in 2-D around (-2, 0) (class 0) or (2, 0) (class 1); ``centre`` is its x-centre."""

    def __init__(self, size=64):
        super().__init__()
        self.size = size

    def dataset(self, split):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        items = []
        for _ in range(self.size):
            label = int(torch.randint(0, 2, (), generator=g))
            n = int(torch.randint(3, 7, (), generator=g))
            centre = 4.0 * label - 2 + 0.5 * float(torch.randn((), generator=g))
            pos = torch.tensor([centre, 0.0]) + 0.3 * torch.randn(n, 2, generator=g)
            items.append({"pos": pos, "label": label, "centre": centre})
        return items

    def collate(self, items):
        counts = torch.tensor([it["pos"].shape[0] for it in items])
        batch = torch.repeat_interleave(torch.arange(len(items)), counts)
        cond = {
            "batch": batch,
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "centre": torch.tensor([it["centre"] for it in items], dtype=torch.float32),
        }
        return Batch(torch.cat([it["pos"] for it in items]).float(), RaggedSpace(batch, len(items), 2), cond)

    def prior(self, n, labels=None, device="cpu", generator=None):
        counts = torch.randint(3, 7, (n,), generator=generator)
        batch = torch.repeat_interleave(torch.arange(n), counts).to(device)
        label = labels.to(device) if labels is not None else torch.full((n,), -1, dtype=torch.long, device=device)
        cond = {"batch": batch, "label": label, "centre": torch.full((n,), float("nan"), device=device)}
        return RaggedSpace(batch, n, 2), cond

    def build_network(self, width=16):
        return PointNet(width)
'''

RECIPE = """
defaults: [polydiff_recipe, _self_]
domain: {name: "clouds_domain:Clouds", size: 64}
schedule: {name: cosine, steps: 100}
trainer: {max_steps: 4, batch_size: 8, lr: 3e-3, warmup_steps: 1, device: cpu, ckpt_every: 1000, num_samples: 16,
          log_every: 1, progress: false, eval: false}
"""

# Each rank saves its final weights to DUMP/rank{N}.pt.
LAUNCH = """
import sys
import torch
from polydiff import trainer
from polydiff.cli import main

dump = sys.argv.pop(1)
real_fit = trainer.Trainer.fit

def fit(self):
    result = real_fit(self)
    torch.save({"model": self.net.state_dict(), "world": self.world_size}, f"{dump}/rank{self.rank}.pt")
    return result

trainer.Trainer.fit = fit
main()
"""


@pytest.mark.parametrize(
    "overrides, metric",
    [([], "accuracy_t0.5"), (["objective.key=centre"], "mae_t0.5")],
    ids=["label-classifier", "regressor"],
)
def test_a_classifier_on_a_ragged_layout_trains_under_ddp(overrides, metric, tmp_path):
    """``torchrun --nproc_per_node 2 polydiff train RECIPE objective.name=classifier``: the K calls of a label
    classifier (or the one call of a regressor) before one backward train over gloo; both ranks end bit for bit on
    the checkpoint's weights and rank 0 logs the classifier's own eval record."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "clouds_domain.py").write_text(CLOUDS)
    (tmp_path / "clouds.yaml").write_text(RECIPE)
    script, run = tmp_path / "launch.py", tmp_path / "run"
    script.write_text(LAUNCH)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script)]
    cmd += [str(tmp_path), "train", str(tmp_path / "clouds.yaml"), "objective.name=classifier", "trainer.max_steps=4"]
    cmd += [*overrides, f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert ckpt["step"] == 4 and len(train) == 4 and {r["world_size"] for r in train} == {2}
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 4 and metric in evals[0]
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["world"] == 2
        for name, value in ckpt["model"].items():
            assert torch.equal(saved["model"][name], value), f"rank {rank}'s {name} is not the checkpoint's"
