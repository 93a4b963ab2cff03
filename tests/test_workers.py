"""The data path with DataLoader workers: the same batches, augmentation and resume point with any number of
workers (fork and spawn), and data sets that reach spawned workers cheaply."""

import io
import json
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
from torch.utils.data import DataLoader

import polydiff
from domains.image.data import ImageArrays, ImageSet
from domains.molecule.data import MoleculeSet
from polydiff.checkpoint import load_checkpoint
from polydiff.data import Draw, ResumableBatchSampler, draw_seed, item_generator
from polydiff.trainer import train


def _images(n: int = 40, labelled: bool = True) -> ImageArrays:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 3, 4, 5), dtype=np.uint8)
    labels = (np.arange(n) % 3).astype(np.int64) if labelled else None
    return ImageArrays(pixels, labels, ["a", "b", "c"] if labelled else [], max_value=255)


def _batches(dataset, n: int, batch_size: int = 8, start: int = 0, seed: int = 0, **loader) -> list[polydiff.Batch]:
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=seed, start=start)
    data = DataLoader(dataset, batch_sampler=sampler, collate_fn=polydiff.Domain().collate, **loader)
    it = iter(data)
    return [next(it) for _ in range(n)]


def _same(a: list[polydiff.Batch], b: list[polydiff.Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.x, y.x) and torch.equal(x.cond["label"], y.cond["label"]) for x, y in zip(a, b)
    )


# ------------------------------------------------------------------ the sampler's draws
def test_draws_carry_seeds_of_their_place_in_the_data_order():
    run = ResumableBatchSampler(24, 4, seed=3)
    straight = [batch for batch, _ in zip(run, range(12))]  # two epochs of six batches
    resumed = [batch for batch, _ in zip(ResumableBatchSampler(24, 4, seed=3, start=5), range(7))]
    seeds = [[d.seed for d in batch] for batch in straight]
    assert all(type(d) is Draw for batch in straight for d in batch)
    assert resumed == straight[5:] and [[d.seed for d in b] for b in resumed] == seeds[5:]
    assert len({s for batch in seeds for s in batch}) == 48  # every draw its own seed
    first_epoch = {int(d): d.seed for batch in straight[:6] for d in batch}
    assert all(first_epoch[int(d)] != d.seed for batch in straight[6:] for d in batch)  # new draws next epoch
    assert [d.seed for d in next(iter(ResumableBatchSampler(24, 4, seed=4)))] != seeds[0]  # another run seed
    # Two processes: each rank's slice of a global batch holds the indices and seeds of one process's global batch.
    ranks = [ResumableBatchSampler(24, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for (a, b), whole in zip(zip(*ranks), straight[:6]):
        assert [(int(d), d.seed) for d in a + b] == [(int(d), d.seed) for d in whole]


def test_a_draw_indexes_like_its_int_and_keeps_its_seed_through_pickling():
    draw = Draw(3, 7, 12345)
    assert torch.equal(torch.arange(10)[draw], torch.tensor(3)) and np.arange(10)[draw] == 3 and "abcd"[draw] == "d"
    assert json.dumps([draw]) == "[3]"
    back = pickle.loads(ForkingPickler.dumps([draw]))[0]
    assert type(back) is Draw and back == 3 and back.seed == draw.seed == draw_seed(7, 12345)
    a, b = item_generator(draw), item_generator(Draw(5, 7, 12345))  # the same draw seed, whatever the index
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert item_generator(3) is None  # a plain index: torch's global stream


# ------------------------------------------------------------------ augmentation with workers
def test_image_flips_are_the_same_with_any_number_of_workers_and_after_a_resume():
    dataset = ImageSet(_images(), hflip=True)
    g = torch.Generator().manual_seed(0)  # the loader's base seed must not move the global stream (see below)
    before = torch.get_rng_state()
    single = _batches(dataset, 12, generator=g)
    assert torch.equal(torch.get_rng_state(), before)  # flips no longer draw from the main process's stream
    assert _same(single, _batches(dataset, 12, num_workers=2))
    assert _same(single[7:], _batches(dataset, 5, start=7, num_workers=1))
    # Flips happen, about half the time, and anew each epoch (40 images: five batches an epoch).
    plain = torch.from_numpy(_images().images).float() * (2 / 255) - 1
    flipped = {}
    order = [batch for batch, _ in zip(ResumableBatchSampler(40, 8), range(12))]
    for batch, idx in zip(single, order):
        for row, i in zip(batch.x, idx):
            assert torch.equal(row, plain[i]) or torch.equal(row, plain[i].flip(-1))
            flipped.setdefault(int(i), []).append(bool(torch.equal(row, plain[i].flip(-1))))
    share = sum(sum(v) for v in flipped.values()) / sum(len(v) for v in flipped.values())
    assert 0.3 < share < 0.7
    assert sum(len(set(v)) > 1 for v in flipped.values()) >= 10  # many images flipped in one epoch, not in another


def test_batched_image_fetch_gives_the_items_one_by_one():
    for labelled in (True, False):
        dataset = ImageSet(_images(labelled=labelled), hflip=True)
        draws = next(iter(ResumableBatchSampler(40, 16, seed=5)))
        one_by_one = [dataset[d] for d in draws]
        batched = dataset.__getitems__(draws)
        assert [label for _, label in batched] == [label for _, label in one_by_one]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batched, one_by_one))
        # Plain indices flip from torch's global stream, in the same order either way.
        torch.manual_seed(1)
        one_by_one = [dataset[i] for i in range(16)]
        torch.manual_seed(1)
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(dataset.__getitems__(list(range(16))), one_by_one))


def test_spawned_workers_give_the_batches_of_the_main_process():
    """'spawn' (macOS) and 'forkserver' (Python 3.14 on Linux) pickle the data set, collate function and indices."""
    dataset = ImageSet(_images(), hflip=True)
    spawned = _batches(dataset, 6, num_workers=1, multiprocessing_context="spawn")
    assert _same(_batches(dataset, 6), spawned)


def _image_run(tmp_path, name: str, max_steps: int, num_workers: int, **model) -> dict:
    cfg = {
        "domain": {"name": "image", "hflip": True, "metric_epochs": 1},
        "model": {
            "channels": 8,
            "channel_mults": [1],
            "num_res_blocks": 1,
            "attention_levels": [],
            "mid_attention": False,
            **model,
        },
        "schedule": {"name": "cosine", "steps": 50},
        "trainer": dict(
            max_steps=max_steps,
            batch_size=16,
            lr=1e-2,
            warmup_steps=0,
            device="cpu",
            num_samples=2,
            log_every=1,
            ckpt_every=1000,
            progress=False,
            eval=False,
            num_workers=num_workers,
        ),
        "sampler": {"name": "ddim", "steps": 2},
    }
    train(cfg, tmp_path / name)
    return load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in run.read_text().splitlines() if '"train"' in line]


def test_training_with_flips_is_the_same_with_workers_and_after_a_resume(tmp_path):
    straight = _image_run(tmp_path, "straight", 6, num_workers=0)
    _image_run(tmp_path, "split", 3, num_workers=2)
    split = _image_run(tmp_path, "split", 6, num_workers=2)
    assert _losses(tmp_path / "straight" / "metrics.jsonl") == _losses(tmp_path / "split" / "metrics.jsonl")
    for name, value in straight["model"].items():
        assert torch.equal(value, split["model"][name]), name


def test_resume_keeps_dropouts_stream_without_workers(tmp_path):
    """Creating a DataLoader iterator draws its workers' base seed from torch's global stream (even with no
    workers): after a resume that draw comes after the checkpoint's stream is restored, so dropout differs."""
    straight = _image_run(tmp_path, "straight", 6, num_workers=0, dropout=0.3)
    _image_run(tmp_path, "split", 3, num_workers=0, dropout=0.3)
    split = _image_run(tmp_path, "split", 6, num_workers=0, dropout=0.3)
    for name, value in straight["model"].items():
        assert torch.equal(value, split["model"][name]), name


# ------------------------------------------------------------------ molecules to spawned workers
class _CountingPickler(pickle.Pickler):
    def __init__(self, f):
        super().__init__(f, protocol=4)
        self.tensors = 0

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors += 1
        return NotImplemented


def _molecules(n: int) -> MoleculeSet:
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(3, 12, (n,), generator=g).tolist()
    z = [torch.randint(1, 10, (k,), generator=g) for k in sizes]
    pos = [torch.randn(k, 3, generator=g, dtype=torch.float64) for k in sizes]
    return MoleculeSet(z, pos, None, [f"m{i}" for i in range(n)])


def test_a_molecule_set_pickles_as_a_few_tensors_not_one_per_molecule():
    """Each pickled tensor takes a shared-memory file under 'spawn': QM9's 390,000 exceeded the open-file limit."""
    ds = _molecules(500)
    items = [ds[i] for i in range(len(ds))]
    pickler = _CountingPickler(io.BytesIO())
    pickler.dump(ds)
    assert pickler.tensors <= 3
    for copy in (pickle.loads(pickle.dumps(ds)), pickle.loads(ForkingPickler.dumps(ds))):
        assert type(copy) is MoleculeSet and len(copy) == 500 and copy.smiles == ds.smiles
        for i in (0, 17, 499):
            for key in ("z", "pos", "y"):
                assert torch.equal(copy[i][key], items[i][key]) and copy[i][key].dtype == items[i][key].dtype
    assert all(torch.equal(ds[i]["pos"], items[i]["pos"]) for i in range(len(ds)))  # the original is unchanged
    # A changed molecule list is packed again, not sent stale.
    ds.pos[5] = torch.zeros(ds.z[5].shape[0], 3, dtype=torch.float64)
    assert torch.equal(pickle.loads(pickle.dumps(ds))[5]["pos"], ds.pos[5])
    mixed = MoleculeSet([torch.tensor([6])], [torch.zeros(1, 3)], [torch.tensor(1.0)])  # a 0-d property: as it is
    assert torch.equal(pickle.loads(pickle.dumps(mixed))[0]["y"], torch.tensor(1.0))
