"""Draws split into chunks of ``sampler.batch_size`` with users' own spaces, conditions and layouts: the chunks
keep the space's class and constraint, conditions follow their samples, and what cannot be split is named."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from polydiff import DenseSpace, Domain, RaggedSpace
from polydiff.generate import generate
from polydiff.objectives import Objective
from polydiff.samplers import Known
from polydiff.schedules import make_schedule

SCHEDULE = make_schedule("cosine", 100)


class HalfX(nn.Module):
    """A denoiser's network that ignores every condition."""

    def forward(self, x, t, **cond):
        return 0.5 * x


class _Custom(Domain):
    """A domain whose prior a test sets: ``prior_fn(n) -> (space, cond)``."""

    name = "chunks_custom"

    def __init__(self, prior_fn, class_names=(), sample_shape=(4,)):
        super().__init__()
        self.sample_shape, self.class_names, self._prior_fn = sample_shape, list(class_names), prior_fn

    def dataset(self, split):
        raise NotImplementedError

    def build_network(self):
        return HalfX()

    def prior(self, n, labels=None, device="cpu", generator=None):
        space, cond = self._prior_fn(n)
        if self.class_names:
            cond["label"] = labels if labels is not None else torch.full((n,), -1)
        return space, cond


# ---------------------------------------------------------------- Space.take drops subclasses


@dataclasses.dataclass
class ZeroMean(DenseSpace):
    """A user's dense space whose states keep a zero mean per sample (a projection, as RaggedSpace's centring)."""

    def project(self, x):
        return x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True)

    def randn(self, generator=None, dtype=torch.float32):
        return self.project(super().randn(generator, dtype))


class PushMean(nn.Module):
    def forward(self, x, t):
        return 0.5 * x + 1.0  # moves the mean off zero: project() must pull it back every step


def test_chunks_keep_a_space_subclass_and_its_projection():
    dom = _Custom(lambda n: (ZeroMean((n, 4)), {}))
    for size in (None, 2):
        out = generate(
            dom,
            PushMean(),
            SCHEDULE,
            Objective("x0"),
            4,
            {"name": "ddim", "steps": 5, "batch_size": size},
            generator=torch.Generator().manual_seed(0),
        )
        torch.testing.assert_close(
            out.x.mean(1), torch.zeros(4), atol=1e-5, rtol=0, msg=lambda m, size=size: f"batch_size={size}: {m}"
        )
    space, rows = ZeroMean((4, 4)).take(1, 3)
    assert type(space) is ZeroMean and rows == slice(1, 3)
    sub = dataclasses.make_dataclass("MyRagged", [], bases=(RaggedSpace,))
    assert type(sub(torch.tensor([0, 1, 1, 2]), 3, 2).take(1, 3)[0]) is sub


# ---------------------------------------------------------------- a custom Space.randn taking one generator


class OneGeneratorSpace(DenseSpace):
    """A user's space written to the documented contract before this change: ``randn(generator)`` with one generator."""

    def randn(self, generator=None, dtype=torch.float32):
        return torch.randn(self.shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("sampler", [{"name": "ddpm", "steps": 4}, {"name": "ddim", "steps": 4, "eta": 1.0}])
def test_a_space_whose_randn_takes_one_generator_samples(sampler):
    dom = _Custom(lambda n: (OneGeneratorSpace((n, 4)), {}))
    out = generate(dom, HalfX(), SCHEDULE, Objective("eps"), 3, sampler, generator=torch.Generator().manual_seed(0))
    assert out.x.shape == (3, 4) and torch.isfinite(out.x).all()


# ---------------------------------------------------------------- a Domain that overrides concat() but not take()


def _edge_graphs(n):
    batch = torch.arange(n).repeat_interleave(2)
    edges = torch.stack([torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)])  # [2, n]: node 2i -> 2i + 1
    return RaggedSpace(batch, n, 2), {"edges": edges}


class EdgeGraphs(_Custom):
    """Two nodes per graph and an edge list ``[2, E]`` into the state's rows: it overrides concat() to offset the
    edges chunk by chunk, but not take(), its inverse."""

    def __init__(self):
        super().__init__(_edge_graphs, sample_shape=(2,))

    def concat(self, batches):
        out = super().concat(batches)
        offset, parts = 0, []
        for b in batches:
            parts.append(b.cond["edges"] + offset)
            offset += b.x.shape[0]
        out.cond["edges"] = torch.cat(parts, dim=1)
        return out


class EdgeNet(nn.Module):
    def forward(self, x, t, edges):
        msg = torch.zeros_like(x).index_add_(0, edges[1], x[edges[0]])  # each edge's source to its target
        return 0.5 * x + 0.1 * msg


def test_a_domain_overriding_concat_but_not_take_is_told():
    dom = EdgeGraphs()
    whole = generate(
        dom,
        EdgeNet(),
        SCHEDULE,
        Objective("eps"),
        4,
        {"name": "ddim", "steps": 3},
        generator=torch.Generator().manual_seed(0),
    )
    assert whole.x.shape == (8, 2)
    with pytest.raises(TypeError, match="take"):  # not an IndexError deep in the network
        generate(
            dom,
            EdgeNet(),
            SCHEDULE,
            Objective("eps"),
            4,
            {"name": "ddim", "steps": 3, "batch_size": 2},
            generator=torch.Generator().manual_seed(0),
        )


# ---------------------------------------------------------------- concat is not take's inverse


class StyledNet(nn.Module):
    """Conditions: a label per sample and ``style``, one value for the whole draw (broadcast onto every sample)."""

    def forward(self, x, t, label, style):
        return 0.5 * x + 0.1 * label.clamp(min=0).to(x.dtype)[:, None] + 0 * torch.broadcast_to(style, x.shape)


@pytest.mark.parametrize("style", [torch.tensor(0.5), torch.zeros(1, 4)], ids=["0-dim", "[1, F]"])
@pytest.mark.parametrize("batched", [False, True])
def test_a_condition_for_the_whole_draw_survives_chunks_and_stacked_guidance(style, batched):
    dom = _Custom(lambda n: (DenseSpace((n, 4)), {"style": style}), class_names=["a", "b"])
    draws = {}
    for size in (None, 2):
        out = generate(
            dom,
            StyledNet(),
            SCHEDULE,
            Objective("eps"),
            3,
            {"name": "ddim", "steps": 3, "batch_size": size},
            guidance={"scale": 2.0, "batched": batched},
            labels=torch.tensor([0, 1, 1]),
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.equal(out.cond["style"], style)  # as take() leaves it: whole
        draws[size] = out.x
    torch.testing.assert_close(draws[2], draws[None], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- known rows of an unsorted ragged layout, in chunks


def _interleaved(n):
    """A ragged layout whose rows are not sorted by sample (RaggedSpace: 'sorted or not'): sample i owns rows
    i, i + n and i + 2n."""
    batch = torch.arange(n).repeat(3)
    return RaggedSpace(batch, n, 2), {"batch": batch}


def test_known_values_follow_their_rows_in_an_unsorted_ragged_layout():
    n, dom = 4, _Custom(_interleaved, sample_shape=(2,))
    values = torch.arange(3 * n * 2, dtype=torch.float32).view(3 * n, 2)
    mask = (torch.arange(3 * n) % 2 == 0)[:, None]  # every other row of the whole draw's layout is kept
    layout = dom.prior(n)[0].batch
    for size in (None, 2, 1):
        out = generate(
            dom,
            HalfX(),
            SCHEDULE,
            Objective("eps"),
            n,
            {"name": "ddim", "steps": 3, "batch_size": size},
            known=Known(values, mask),
            generator=torch.Generator().manual_seed(0),
        )
        for i in range(n):
            got = {tuple(r) for r in out.x[out.space.batch == i].tolist()}
            want = {tuple(r) for r in values[(layout == i) & mask[:, 0]].tolist()}
            assert want <= got, f"batch_size={size}: sample {i} lost its kept rows {sorted(want - got)}"


# ---------------------------------------------------------------- DenseSpace.take and a lower-rank mask


def test_take_keeps_a_mask_of_lower_rank_whole():
    """DenseSpace accepts any mask that broadcasts to the state (e.g. ``[L]`` for ``[B, C, L]``); take() sliced its
    first dimension as if it were the samples': a crash, or at chunk size 1 a silently wrong mask."""
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])  # [L]: the first two of four steps are valid, in every sample
    space = DenseSpace((3, 1, 4), mask=mask)
    for start, stop in ((0, 2), (2, 3)):
        part, _ = space.take(start, stop)
        assert torch.equal(torch.broadcast_to(part.mask, part.shape), torch.broadcast_to(mask, (stop - start, 1, 4)))


# ---------------------------------------------------------------- an ambiguous condition in Domain.take


def _empty_samples(n):
    """Ragged samples of which some are empty, with a per-row condition: 3 rows for 3 samples."""
    batch = torch.repeat_interleave(torch.arange(n), torch.tensor([0, 2, 1]))
    return RaggedSpace(batch, n, 2), {"batch": batch, "kind": torch.arange(len(batch)) % 3}


class KindNet(nn.Module):
    def forward(self, x, t, batch, kind):
        return 0.5 * x + 0.1 * kind[:, None].to(x.dtype)  # fails unless kind has a value per row


def test_a_condition_that_could_be_per_sample_or_per_row_is_not_guessed():
    # Read per sample, sample 0's chunk would get kind[0:1] for its 0 rows and sample 1's kind[1:2] for its 2 rows,
    # which the network broadcasts: no error, and samples far from the unchunked draw's.
    with pytest.raises(ValueError, match="kind"):
        generate(
            _Custom(_empty_samples, sample_shape=(2,)),
            KindNet(),
            SCHEDULE,
            Objective("eps"),
            3,
            {"name": "ddim", "steps": 2, "batch_size": 1},
        )


def test_noise_blocks_follow_an_unsorted_ragged_layout_across_chunks():
    """Fresh noise comes in blocks of samples; a chunk spanning blocks of an interleaved layout gets each row its
    own sample's noise: the same samples at any chunk size (the joined layout lists the chunks' rows in turn)."""
    n, dom = 70, _Custom(_interleaved, sample_shape=(2,))
    draws = [
        generate(
            dom,
            HalfX(),
            SCHEDULE,
            Objective("x0"),
            n,
            {"name": "ddpm", "steps": 3, "batch_size": size},
            generator=torch.Generator().manual_seed(0),
        )
        for size in (None, 30, 7)
    ]
    for other in draws[1:]:
        for i in range(n):
            torch.testing.assert_close(
                other.x[other.space.batch == i], draws[0].x[draws[0].space.batch == i], rtol=0, atol=1e-6
            )
