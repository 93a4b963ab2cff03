"""Reproducibility and invariances of sampling that users rely on.

Guards (hold today): the same seed gives bit-identical samples (Python and ``polydiff sample``), ``--seeds K``
repeats ``--seed S+k`` exactly, different seeds differ, deterministic samplers ignore the generator, guidance in
one stacked call equals two calls, and known values (inpainting) are kept exactly.

Defect (fails today): ``sampler.batch_size``, documented as the chunk size of a draw (a memory knob), changes
the samples of a seed: each chunk draws its prior (a molecule's atom count), its starting noise and the
sampler's fresh noise from the shared generator in turn, so sample i depends on how the draw is chunked.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polydiff import Domain
from polydiff.generate import generate
from polydiff.objectives import Objective
from polydiff.samplers import Known, sample
from polydiff.schedules import make_schedule

SAMPLERS = [
    {"name": "ddim", "steps": 4},
    {"name": "dpmpp_2m", "steps": 4},
    {"name": "ddpm", "steps": 4},
    {"name": "ddim", "steps": 4, "eta": 0.5},
]
IDS = ["ddim", "dpmpp_2m", "ddpm", "ddim_eta0.5"]


class TinyNet(nn.Module):
    """A conditional denoiser of ``[B, 3, 5]`` states: a convolution, t and a label embedding (null label: index 4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 3, 3, padding=1)
        self.emb = nn.Embedding(5, 3)

    def forward(self, x, t, label):
        h = self.conv(x) * (1 + t[:, None, None]) + self.emb(torch.where(label < 0, 4, label))[:, :, None]
        return torch.tanh(h)


class Tiny(Domain):
    """Dense states of 15 values each: not a multiple of torch's 16-value noise blocks, as with most real shapes."""

    name = "tiny"

    def __init__(self):
        super().__init__()
        self.sample_shape, self.class_names = (3, 5), ["a", "b", "c", "d"]

    def dataset(self, split):
        raise NotImplementedError

    def build_network(self):
        return TinyNet()


SCHEDULE, OBJECTIVE = make_schedule("cosine", 100), Objective(prediction="v")
LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 2])


def _dense(sampler, seed=0, n=7, **kw):
    kw.setdefault("labels", LABELS[:n])
    return generate(
        Tiny(), TinyNet(), SCHEDULE, OBJECTIVE, n, sampler, generator=torch.Generator().manual_seed(seed), **kw
    )


@pytest.fixture(scope="module")
def molecules():
    """An unconditional molecule domain (atom counts from a histogram, as after training) and a small EGNN."""
    from domains.molecule import MoleculeDomain

    dom = MoleculeDomain(source="sdf", path="unused.sdf")  # nothing read: the histogram is set as a checkpoint would
    dom.num_atoms_hist = [0, 0, 0, 2, 3, 5, 4, 3, 2, 1]
    torch.manual_seed(0)
    return dom, dom.build_network(hidden=16, layers=2), make_schedule("polynomial", 100), Objective("eps")


def _mol(molecules, sampler, seed=0, n=5, **kw):
    dom, net, schedule, objective = molecules
    return generate(dom, net, schedule, objective, n, sampler, generator=torch.Generator().manual_seed(seed), **kw)


# ----------------------------------------------------------------------------------------------- guards


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_same_seed_is_bit_identical_and_another_seed_differs(sampler, molecules):
    for size in (None, 3):
        s = {**sampler, "batch_size": size}
        assert torch.equal(_dense(s).x, _dense(s).x)
        assert (_dense(s).x - _dense(s, seed=1).x).abs().max() > 0.1
        a, b, c = _mol(molecules, s), _mol(molecules, s), _mol(molecules, s, seed=1)
        assert torch.equal(a.space.batch, b.space.batch) and torch.equal(a.x, b.x)
        assert not (torch.equal(a.space.batch, c.space.batch) and torch.allclose(a.x, c.x, atol=0.1))


def test_deterministic_samplers_ignore_the_generator_and_stochastic_ones_follow_it():
    dom = Tiny()
    space, cond = dom.prior(4, labels=LABELS[:4])
    noise = space.randn(generator=torch.Generator().manual_seed(0))
    den = OBJECTIVE.denoiser(TinyNet(), SCHEDULE, space, cond)
    for name in ("ddim", "dpmpp_2m"):
        g = torch.Generator().manual_seed(5)
        outs = [
            sample(name, den, noise, SCHEDULE, 4, space=space, generator=gen)
            for gen in (None, g, torch.Generator().manual_seed(6))
        ]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
        assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state())  # nothing drawn
    for name, options in (("ddpm", {}), ("ddim", {"eta": 1.0})):
        one, again, other = (
            sample(name, den, noise, SCHEDULE, 4, space=space, generator=torch.Generator().manual_seed(s), **options)
            for s in (1, 1, 2)
        )
        assert torch.equal(one, again) and (one - other).abs().max() > 0.1


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_batched_guidance_equals_two_network_calls(sampler):
    for guidance in ({"scale": 3.0}, {"scale": 2.0, "rescale": 0.7}, {"scale": 0.0, "rescale": 0.5}):
        for size in (None, 3):
            s = {**sampler, "batch_size": size}
            one = _dense(s, guidance={**guidance, "batched": True}).x
            two = _dense(s, guidance={**guidance, "batched": False}).x
            torch.testing.assert_close(one, two, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_known_values_are_kept_exactly(sampler, molecules):
    g = torch.Generator().manual_seed(3)
    values, mask = torch.randn(7, 3, 5, generator=g), torch.rand(7, 3, 5, generator=g) < 0.5
    for size in (None, 3):
        for precision in ("fp32", "bf16"):
            out = _dense({**sampler, "batch_size": size, "precision": precision}, known=Known(values, mask)).x
            assert torch.equal(out[mask], values[mask])
    # Zero-centre-of-mass positions: the kept atoms keep their features exactly and their geometry up to a shift.
    counts = [4, 6, 5]
    space, _ = molecules[0].prior(3, num_atoms=counts)
    values = space.randn(generator=torch.Generator().manual_seed(4))
    kept = torch.arange(values.shape[0]) % 2 == 0
    for size in (None, 2):
        out = _mol(
            molecules,
            {**sampler, "batch_size": size},
            n=3,
            prior={"num_atoms": counts},
            known=Known(values, kept[:, None]),
        )
        assert torch.equal(out.x[kept, 3:], values[kept, 3:])
        for i in range(3):
            rows = kept & (out.space.batch == i)
            got, want = out.x[rows, :3], values[rows, :3]
            torch.testing.assert_close(got - got.mean(0), want - want.mean(0), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def points_run(tmp_path_factory):
    from polydiff.trainer import train

    run = tmp_path_factory.mktemp("points")
    cfg = {
        "domain": {"name": "examples.points:PointsDomain", "size": 256},
        "model": {"width": 16, "depth": 1},
        "schedule": {"steps": 50},
        "objective": {"prediction": "v"},
        "sampler": {"name": "ddpm", "steps": 5},
        "trainer": {"max_steps": 2, "batch_size": 32, "device": "cpu", "num_samples": 8, "progress": False},
    }
    train(cfg, run)
    return run


def _cli_samples(run, out, *args):
    from polydiff.cli import main

    main(["sample", str(run), "--out", str(out), *args])
    return out


def test_cli_same_seed_gives_identical_files_and_seeds_repeat_single_seeds(points_run, tmp_path):
    a = _cli_samples(points_run, tmp_path / "a", "--n", "5", "--seed", "3")
    b = _cli_samples(points_run, tmp_path / "b", "--n", "5", "--seed", "3")
    assert (a / "samples.pt").read_bytes() == (b / "samples.pt").read_bytes()
    many = _cli_samples(points_run, tmp_path / "many", "--n", "5", "--seed", "2", "--seeds", "3")
    for seed in (2, 3, 4):
        single = a if seed == 3 else _cli_samples(points_run, tmp_path / f"s{seed}", "--n", "5", "--seed", str(seed))
        assert (many / f"seed-{seed}" / "samples.pt").read_bytes() == (single / "samples.pt").read_bytes()
    other = torch.load(many / "seed-2" / "samples.pt")["x"]
    assert (other - torch.load(a / "samples.pt")["x"]).abs().max() > 0.1


# ------------------------------------------------------------------------------------ defect: chunking


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_chunk_size_does_not_change_dense_samples(sampler):
    """sampler.batch_size is a memory knob: sample i of a seed is the same in one chunk or several (up to the
    network's rounding, which may differ with the number of rows it sees at once)."""
    whole = _dense({**sampler, "batch_size": None}).x
    for size in (3, 2):
        torch.testing.assert_close(
            _dense({**sampler, "batch_size": size}).x,
            whole,
            rtol=0,
            atol=1e-5,
            msg=lambda m, size=size: f"batch_size={size}: {m}",
        )


@pytest.mark.parametrize("sampler", SAMPLERS[:1] + SAMPLERS[2:3], ids=["ddim", "ddpm"])
def test_chunk_size_does_not_change_molecule_sizes_or_positions(sampler, molecules):
    """The atom counts drawn from the training histogram, and then the molecules, do not depend on the chunking."""
    whole = _mol(molecules, {**sampler, "batch_size": None})
    for size in (2,):
        part = _mol(molecules, {**sampler, "batch_size": size})
        assert torch.bincount(part.space.batch).tolist() == torch.bincount(whole.space.batch).tolist()
        torch.testing.assert_close(part.x, whole.x, rtol=1e-4, atol=1e-4)  # an untrained EGNN's features reach ~1e3


def test_cli_batch_size_does_not_change_the_samples(points_run, tmp_path):
    """``polydiff sample --seed S`` writes the same samples whatever sampler.batch_size (the recipe's sampler: DDPM)."""
    one = torch.load(_cli_samples(points_run, tmp_path / "one", "--n", "6", "sampler.batch_size=6") / "samples.pt")["x"]
    three = torch.load(_cli_samples(points_run, tmp_path / "three", "--n", "6", "sampler.batch_size=3") / "samples.pt")[
        "x"
    ]
    torch.testing.assert_close(three, one, rtol=0, atol=1e-5)
