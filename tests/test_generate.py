"""Generation in chunks of ``sampler.batch_size``: spaces concatenate, labels and prior options follow their samples."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import polydiff
from polydiff import Batch, DenseSpace, Domain, RaggedSpace
from polydiff.generate import generate
from polydiff.objectives import Objective
from polydiff.samplers import Known
from polydiff.schedules import make_schedule


def test_dense_space_cat_keeps_shape_and_fills_missing_masks():
    a = DenseSpace((2, 3, 4))
    b = DenseSpace((3, 3, 4), mask=torch.zeros(3, 1, 4))
    both = DenseSpace.cat([a, b])
    assert both.shape == (5, 3, 4) and both.mask.shape == (5, 3, 4)
    assert both.count().tolist() == [12, 12, 0, 0, 0]
    assert DenseSpace.cat([a, DenseSpace((1, 3, 4))]).mask is None
    with pytest.raises(ValueError, match="per-sample shapes"):
        DenseSpace.cat([a, DenseSpace((2, 3, 5))])


def test_ragged_space_cat_offsets_the_batch_index():
    a = RaggedSpace(torch.tensor([0, 0, 1]), 2, 4, centered=(0, 1))
    b = RaggedSpace(torch.tensor([0, 1, 1, 1, 2]), 3, 4, centered=(0, 1))
    both = RaggedSpace.cat([a, b])
    assert both.num_samples == 5 and both.batch.tolist() == [0, 0, 1, 2, 3, 3, 3, 4]
    assert both.centered == (0, 1) and both.count().tolist() == [8, 4, 4, 12, 4]
    with pytest.raises(ValueError, match="num_features, centered"):
        RaggedSpace.cat([a, RaggedSpace(torch.tensor([0]), 1, 4)])


class LabelToValue(nn.Module):
    """An x0-predictor that answers the sample's class label everywhere (0 for the null label)."""

    def forward(self, x, t, label):
        return label.clamp(min=0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))).expand_as(x)


class Toy(Domain):
    name = "toy"

    def __init__(self):
        super().__init__()
        self.sample_shape, self.class_names = (2, 3), [str(i) for i in range(7)]

    def dataset(self, split):
        raise NotImplementedError

    def build_network(self):
        return LabelToValue()


@pytest.mark.parametrize("batch_size", [4, 7, 64])
def test_chunked_generation_keeps_each_sample_with_its_label(batch_size):
    schedule, objective = make_schedule("cosine", 100), Objective(prediction="x0")
    labels = torch.arange(7).flip(0)
    out = generate(
        Toy(),
        LabelToValue(),
        schedule,
        objective,
        7,
        {"name": "ddim", "steps": 5, "batch_size": batch_size},
        labels=labels,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.x.shape == (7, 2, 3) and out.num_samples == 7
    assert torch.equal(out.cond["label"], labels)
    assert torch.allclose(out.x, labels.float().reshape(7, 1, 1).expand(7, 2, 3), atol=1e-4)
    with pytest.raises(ValueError, match="sampler.batch_size"):
        generate(Toy(), LabelToValue(), schedule, objective, 3, {"name": "ddim", "steps": 2, "batch_size": 0})


def test_guidance_without_a_condition_is_named_once(caplog):
    """guidance.scale on samples with no label (null labels: nothing to guide towards) is warned, once per draw."""
    schedule, objective = make_schedule("cosine", 100), Objective(prediction="x0")
    with caplog.at_level(logging.WARNING, logger="polydiff.generate"):
        out = generate(
            Toy(),
            LabelToValue(),
            schedule,
            objective,
            6,
            {"name": "ddim", "steps": 3, "batch_size": 2},
            guidance={"scale": 3.0},
            labels=torch.full((6,), -1),
        )
    assert torch.allclose(out.x, torch.zeros_like(out.x), atol=1e-4)  # the null label's answer, unguided
    assert caplog.text.count("guidance (scale 3, rescale 0) has no effect") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polydiff.generate"):
        generate(
            Toy(),
            LabelToValue(),
            schedule,
            objective,
            2,
            {"name": "ddim", "steps": 3},
            guidance={"scale": 3.0},
            labels=torch.tensor([1, 2]),
        )
    assert "no effect" not in caplog.text


class LinearDenoiser(nn.Module):
    """An x0-predictor through a Linear layer, recording whether it ran under autocast and in which dtype."""

    def __init__(self):
        super().__init__()
        self.lin, self.seen = nn.Linear(3, 3), []
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the same weights in every instance
            self.lin.weight.copy_(0.3 * torch.randn(3, 3, generator=g))
            self.lin.bias.copy_(0.1 * torch.randn(3, generator=g))

    def forward(self, x, t, label):
        out = self.lin(x)
        self.seen.append((torch.is_autocast_enabled(x.device.type), out.dtype))
        return out


def test_sampler_precision_runs_the_network_in_bf16_and_the_sampler_in_fp32():
    schedule, objective = make_schedule("cosine", 100), Objective(prediction="x0")
    draws = {}
    for precision in ("fp32", "bf16"):
        net = LinearDenoiser()
        draws[precision] = generate(
            Toy(),
            net,
            schedule,
            objective,
            4,
            {"name": "ddim", "steps": 5, "precision": precision},
            labels=torch.arange(4),
            generator=torch.Generator().manual_seed(0),
        ).x
        expected = (True, torch.bfloat16) if precision == "bf16" else (False, torch.float32)
        assert set(net.seen) == {expected}
    assert draws["bf16"].dtype == torch.float32
    assert 0 < (draws["bf16"] - draws["fp32"]).abs().max() < 0.05 * draws["fp32"].abs().max()
    with pytest.raises(ValueError, match=r"sampler.precision='fp16': choose one of \['fp32', 'bf16'\]"):
        generate(Toy(), LinearDenoiser(), schedule, objective, 2, {"name": "ddim", "steps": 2, "precision": "fp16"})


class RowIndexNet(nn.Module):
    """An x0-predictor that answers, on every row, the index of its sample (read from the batch vector)."""

    def forward(self, x, t, batch):
        return batch.to(x.dtype).unsqueeze(-1).expand_as(x)


class Graphs(Domain):
    name = "graphs"

    def dataset(self, split):
        raise NotImplementedError

    def build_network(self):
        return RowIndexNet()

    def prior(self, n, labels=None, device="cpu", generator=None, num_nodes=2):
        counts = torch.as_tensor([num_nodes] * n if isinstance(num_nodes, int) else list(num_nodes))
        if counts.shape != (n,):
            raise ValueError("one count per sample")
        batch = torch.repeat_interleave(torch.arange(n), counts)
        return RaggedSpace(batch, n, 3), {"batch": batch}  # no concat override: the default offsets "batch"


def test_chunked_ragged_generation_splits_per_sample_prior_options():
    schedule, objective = make_schedule("cosine", 100), Objective(prediction="x0")
    sizes = [1, 4, 2, 3, 5]
    out = generate(
        Graphs(),
        RowIndexNet(),
        schedule,
        objective,
        5,
        {"name": "ddpm", "steps": 4, "batch_size": 2},
        prior={"num_nodes": sizes},
        generator=torch.Generator().manual_seed(0),
    )
    assert out.num_samples == 5 and out.x.shape == (sum(sizes), 3)
    assert torch.equal(out.cond["batch"], torch.repeat_interleave(torch.arange(5), torch.tensor(sizes)))
    # each chunk's net saw its local indices 0..1: samples 2k and 2k+1 of the whole draw hold 0 and 1
    local = (out.cond["batch"] % 2).float().unsqueeze(-1).expand(-1, 3)
    assert torch.allclose(out.x, local, atol=1e-3)
    with pytest.raises(ValueError, match="prior.num_nodes has 2 values for 5 samples"):
        generate(
            Graphs(),
            RowIndexNet(),
            schedule,
            objective,
            5,
            {"name": "ddim", "steps": 2, "batch_size": 2},
            prior={"num_nodes": [1, 2]},
        )


def test_molecule_domain_concat_offsets_its_batch_vector():
    from domains.molecule import MoleculeDomain

    dom = MoleculeDomain()
    dom.num_atoms_hist = [0, 0, 1, 1, 1]
    parts = []
    for n in (2, 3):
        space, cond = dom.prior(n, generator=torch.Generator().manual_seed(n))
        parts.append(Batch(space.randn(), space, cond))
    joined = dom.concat(parts)
    assert joined.num_samples == 5 and torch.equal(joined.cond["batch"], joined.space.batch)
    assert len(dom.decode(joined)) == 5


def test_dense_space_rejects_a_mask_that_does_not_fit():
    DenseSpace((4, 1, 64), torch.ones(1, 1, 64))  # broadcast over the batch: fine
    with pytest.raises(
        ValueError, match=r"mask of shape \(4, 64\) does not broadcast to the state's shape \(4, 1, 64\)"
    ):
        DenseSpace((4, 1, 64), torch.ones(4, 64))


@pytest.mark.parametrize("batch_size", [3, 64])
def test_known_values_follow_their_samples_through_chunks(batch_size):
    """Per-sample known values are split with the chunks: each sample keeps its own, the rest is generated."""

    schedule, objective = make_schedule("cosine", 100), Objective(prediction="x0")
    labels = torch.arange(7)
    values = torch.arange(7.0).reshape(7, 1, 1).expand(7, 2, 3) * -10  # sample k: -10 k
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, 0, 0] = True  # one element of every sample, broadcast over the draw
    out = generate(
        Toy(),
        LabelToValue(),
        schedule,
        objective,
        7,
        {"name": "ddim", "steps": 5, "batch_size": batch_size},
        labels=labels,
        generator=torch.Generator().manual_seed(0),
        known=Known(values, mask),
    )
    assert torch.equal(out.x[:, 0, 0], values[:, 0, 0])
    rest = out.x.reshape(7, -1)[:, 1:]  # generated: the label, as the net answers
    assert torch.allclose(rest, labels.float()[:, None].expand_as(rest), atol=1e-4)


def test_generate_checks_its_arguments_before_any_work():
    """Labels, n, guidance keys and sampler values are refused by name; omitted sampler keys take the defaults."""
    domain, net, sch, obj = Toy(), LabelToValue(), make_schedule("cosine", 100), Objective("x0")
    out = generate(domain, net, sch, obj, 3, {}, labels=[1, 2, 3])  # DDIM-50, labels as a list
    assert out.x[:, 0, 0].tolist() == pytest.approx([1, 2, 3])
    grid = generate(
        domain, net, sch, obj, 2, {"name": "ddim", "steps": torch.tensor([1.0, 0.5, 0.0])}, labels=torch.tensor([4, 5])
    )  # an explicit time grid
    assert grid.x[:, 0, 0].tolist() == pytest.approx([4, 5])
    for labels, message in [
        ([1, 2], "must be 3 class indices"),
        ([0, 1, 7], "label 7 is out of range"),
        (torch.ones(3), "must be 3 class indices"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate(domain, net, sch, obj, 3, {}, labels=labels)
    with pytest.raises(KeyError, match=r"unknown guidance option\(s\) \['scael'\]"):
        generate(domain, net, sch, obj, 3, {}, guidance={"scael": 3})
    with pytest.raises(ValueError, match="n=0"):
        generate(domain, net, sch, obj, 0, {})
    with pytest.raises(ValueError, match=r"sampler.eta=-0.5 is outside \[0, 1\]"):
        generate(domain, net, sch, obj, 3, {"eta": -0.5})
    with pytest.raises(ValueError, match="sampler.clip_x0=0"):
        generate(domain, net, sch, obj, 3, {"name": "dpmpp_2m", "clip_x0": 0})
    domain.class_names = []
    with pytest.raises(ValueError, match="unconditional"):
        generate(domain, net, sch, obj, 3, {}, labels=[0, 1, 2])


def test_known_of_lower_rank_broadcasts_over_every_chunk():
    """Values and a mask shaped like one sample ([6] for states [3, 6]) hold the same part of every sample,
    whether the draw is chunked or not."""

    class Zero(nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    domain, sch, obj = Toy(), make_schedule("cosine", 100), Objective("v")
    domain.sample_shape, domain.class_names = (6,), []
    known = Known(torch.arange(1.0, 7.0), torch.tensor([1.0, 1, 1, 0, 0, 0]))
    for batch_size in (1, 3):
        x = generate(domain, Zero(), sch, obj, 3, {"steps": 5, "batch_size": batch_size}, known=known).x
        assert torch.equal(x[:, :3], torch.tensor([[1.0, 2, 3]] * 3))
        assert (x[:, 3:] != torch.arange(4.0, 7.0)).all()


def test_noise_for_another_device_is_drawn_on_the_generators_own():
    """A CPU generator seeds noise for a state on another device (the meta device stands in for a GPU here),
    as a script passing torch.Generator() with device="cuda" does."""
    space = DenseSpace((2, 3), device_=torch.device("meta"))
    noise = space.randn(generator=torch.Generator().manual_seed(0))
    assert noise.device.type == "meta" and noise.shape == (2, 3)
    cpu = DenseSpace((2, 3)).randn(generator=torch.Generator().manual_seed(0))
    assert torch.equal(cpu, torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))


def test_guidance_mixes_the_conditional_and_unconditional_predictions():
    """x0 = u + scale (c - u): the null label answers 0 and label k answers k, so scale 3 gives 3k; rescale
    (Lin et al. 2024) then brings the guided x0's spread back towards the conditional one's."""
    domain, sch, obj = Toy(), make_schedule("cosine", 100), Objective("x0")
    labels = torch.tensor([1, 2])
    out = generate(domain, LabelToValue(), sch, obj, 2, {"steps": 3}, guidance={"scale": 3.0}, labels=labels)
    assert out.x[:, 0, 0].tolist() == pytest.approx([3.0, 6.0])
    plain = generate(domain, LabelToValue(), sch, obj, 2, {"steps": 3}, labels=labels)
    assert plain.x[:, 0, 0].tolist() == pytest.approx([1.0, 2.0])
    rescaled = generate(
        domain, LabelToValue(), sch, obj, 2, {"steps": 3}, guidance={"scale": 3.0, "rescale": 1.0}, labels=labels
    )
    assert torch.isfinite(rescaled.x).all() and not torch.allclose(rescaled.x, out.x)


class CountingLinear(LinearDenoiser):
    """LinearDenoiser that also adds a per-label offset and records the rows of each call."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, x, t, label):
        self.rows.append(x.shape[0])
        shift = label.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # the null label is -1
        return super().forward(x, t, label) + 0.1 * shift


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_batched_guidance_is_one_call_on_both_halves_and_equals_two_calls(rescale):
    """guidance.batched=true stacks [x; x] with the condition on the first half: one network call per step
    of twice the rows, and the same samples as two calls (guidance.batched=false)."""
    domain, sch, obj = Toy(), make_schedule("cosine", 100), Objective("eps")
    net, labels = CountingLinear(), torch.tensor([1, 2, 6])
    draws = {}
    for batched in (True, False):
        net.rows.clear()
        draws[batched] = generate(
            domain,
            net,
            sch,
            obj,
            3,
            {"name": "dpmpp_2m", "steps": 5},
            guidance={"scale": 3.0, "rescale": rescale, "batched": batched},
            labels=labels,
            generator=torch.Generator().manual_seed(0),
        ).x
        assert net.rows == ([6] * 5 if batched else [3] * 10)
    torch.testing.assert_close(draws[True], draws[False], rtol=1e-5, atol=1e-6)
    net.rows.clear()
    generate(domain, net, sch, obj, 3, {"name": "dpmpp_2m", "steps": 5}, guidance={"scale": 3.0}, labels=labels)
    assert net.rows == [3] * 10  # the default off CUDA: two calls (faster on the CPU)
    unguided = generate(
        domain,
        net,
        sch,
        obj,
        3,
        {"name": "dpmpp_2m", "steps": 5},
        labels=labels,
        generator=torch.Generator().manual_seed(0),
    ).x
    assert not torch.allclose(unguided, draws[True], atol=1e-3)  # the guidance did change the samples


class ZeroMeanSpace(DenseSpace):
    """A DenseSpace of my own: every sample's channels keep a zero mean over time."""

    def project(self, x):
        return x - x.mean(dim=-1, keepdim=True)

    def randn(self, generator=None, dtype=torch.float32):
        return self.project(super().randn(generator, dtype))


class ZeroMeanToy(Toy):
    def prior(self, n, labels=None, device="cpu", generator=None):
        space, cond = super().prior(n, labels=labels, device=device, generator=generator)
        return ZeroMeanSpace(space.shape), cond


def test_a_space_subclass_keeps_its_constraint_through_chunks():
    """take and cat keep the space's own class: a chunked draw of a user's constrained space stays constrained."""
    domain, sch, obj = ZeroMeanToy(), make_schedule("cosine", 100), Objective("x0")
    draws = [
        generate(
            domain,
            LinearDenoiser(),
            sch,
            obj,
            7,
            {"name": "ddpm", "steps": 5, "batch_size": size},
            labels=torch.arange(7),
            generator=torch.Generator().manual_seed(0),
        )
        for size in (None, 3)
    ]
    for out in draws:
        assert type(out.space) is ZeroMeanSpace and out.x.mean(dim=-1).abs().max() < 1e-6 * out.x.abs().max()
    torch.testing.assert_close(draws[0].x, draws[1].x, rtol=1e-5, atol=1e-6)
    ragged = RaggedSpace(torch.tensor([0, 0, 1, 2, 2]), 3, 2, centered=(0,))
    part, rows = ragged.take(1, 3)
    assert part.batch.tolist() == [0, 1, 1] and rows.tolist() == [2, 3, 4] and part.centered == (0,)


def test_a_space_without_the_chunking_methods_says_which_it_lacks():
    class Bare(polydiff.Space):
        num_samples = 2

    with pytest.raises(NotImplementedError, match=r"Bare has no take\(\): implement it to draw samples in chunks"):
        Bare().take(0, 1)
    with pytest.raises(NotImplementedError, match=r"Bare has no cat\(\): implement it .*guidance.batched"):
        Bare.cat([Bare(), Bare()])
    with pytest.raises(NotImplementedError, match=r"Bare has no expand\(\)"):
        Bare().expand(torch.zeros(2))


def test_generation_settings_never_reach_the_sampler(monkeypatch):
    """batch_size and precision are generate()'s; the sampler gets the runtime arguments and its own options."""
    from polydiff import samplers

    calls = []

    def spy(
        denoiser,
        noise,
        schedule,
        steps,
        *,
        space=None,
        generator=None,
        callback=None,
        clip_x0=None,
        spacing="trailing",
        known=None,
        eta: float = 0.0,
    ):
        calls.append({"space": space, "clip_x0": clip_x0, "spacing": spacing, "eta": eta})
        return samplers.sample_ddim(
            denoiser,
            noise,
            schedule,
            steps,
            space=space,
            generator=generator,
            callback=callback,
            clip_x0=clip_x0,
            spacing=spacing,
            known=known,
            eta=eta,
        )

    monkeypatch.setitem(samplers.SAMPLERS, "spy", spy)  # removed again after the test
    polydiff.register_sampler("spy", spy)
    sampler = {"name": "spy", "steps": 3, "batch_size": 2, "precision": "bf16", "eta": 0.5, "spacing": "leading"}
    out = generate(
        Toy(),
        LabelToValue(),
        make_schedule("cosine", 100),
        Objective("x0"),
        4,
        sampler,
        labels=torch.arange(4),
        generator=torch.Generator().manual_seed(0),
    )
    drawn = [c for c in calls if c["space"] is not None]  # the others: the check's dry run
    assert len(drawn) == 2 and all(c["eta"] == 0.5 and c["spacing"] == "leading" for c in drawn)
    assert out.x[:, 0, 0].tolist() == pytest.approx([0, 1, 2, 3], abs=0.05)
    with pytest.raises(KeyError, match=r"sampler.variance is not an option of sampler 'spy' \(samplers that take it"):
        generate(
            Toy(), LabelToValue(), make_schedule("cosine", 100), Objective("x0"), 4, {**sampler, "variance": "large"}
        )
