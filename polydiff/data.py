"""Deterministic, resumable, rank-aware batch order for training, with a random seed for every draw.

Random augmentation (flips, crops) must not depend on how the data is loaded: the number of DataLoader
workers, a resume, the number of processes. The sampler therefore hands out each index as a :class:`Draw`,
an ``int`` that also carries the draw's own seed, a function of the run's seed and the draw's place in the
data order alone; a data set draws its augmentation from :func:`item_generator` of the index it is given.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler", "Draw", "draw_seed", "item_generator"]

_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """The random seed (63 bits) of the draw at ``position`` of the data order of a run seeded ``seed``
    (SplitMix64 of both: neighbouring positions and seeds give unrelated seeds)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(position) + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class Draw(int):
    """A data-set index as :class:`ResumableBatchSampler` hands it out: an ``int`` in every use (indexing tensors,
    arrays, lists) that also carries ``seed``, the random seed of this one draw of the item: :func:`draw_seed` of
    the run's seed and the draw's ``position`` in the data order.

    The seed depends on nothing else, so augmentation drawn from it (:func:`item_generator`) is the same with any
    number of DataLoader workers (each worker's own random stream is seeded by the loader, not by the data order),
    after a resume and on any number of processes, and differs between epochs.
    """

    def __new__(cls, index: int, run_seed: int, position: int) -> "Draw":
        draw = super().__new__(cls, index)
        draw.run_seed, draw.position = run_seed, position  # the seed itself only when asked: 1 us an index
        return draw

    @property
    def seed(self) -> int:
        return draw_seed(self.run_seed, self.position)

    def __reduce__(self) -> tuple[Any, ...]:  # the seed travels to DataLoader workers with the index
        return (Draw, (int(self), self.run_seed, self.position))


def item_generator(index: Any) -> Optional[torch.Generator]:
    """A CPU generator seeded by a :class:`Draw`'s own seed; ``None`` (torch's global stream) for a plain index.

    Data sets draw their random augmentation from it: ``torch.rand((), generator=item_generator(i)) < 0.5``. Make
    one per item and draw all of the item's randomness from it: a second one starts the same stream again.
    """
    seed = getattr(index, "seed", None)
    return None if seed is None else torch.Generator().manual_seed(seed)


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless shuffled batches whose order depends only on ``(seed, batch number)``.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; every rank takes its own slice of
    each global batch, so a run resumed at batch ``start`` sees exactly the batches an
    uninterrupted run would, on any number of ranks. Indices come as :class:`Draw` objects whose seed is
    that of their place in the data order (global batch number and place in it), for augmentation.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.check(num_items, batch_size, world_size)
        global_batch = batch_size * world_size
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.per_epoch = num_items // global_batch  # drop the last partial batch

    @staticmethod
    def check(num_items: int, batch_size: int, world_size: int = 1) -> None:
        """Raise ``ValueError`` for an empty training set or one smaller than the global batch."""
        if num_items < 1:
            raise ValueError("the training set is empty: check the recipe's domain data settings")
        if batch_size * world_size > num_items:
            raise ValueError(
                f"trainer.batch_size={batch_size} x {world_size} process(es) exceeds the {num_items} training items; "
                "lower trainer.batch_size"
            )

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start
        epoch, perm = -1, None
        while True:
            e, k = divmod(b, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            lo = (k * self.world_size + self.rank) * self.batch_size
            first = (
                b * self.world_size * self.batch_size + self.rank * self.batch_size
            )  # this slice's place in the order
            yield [Draw(i, self.seed, first + j) for j, i in enumerate(perm[lo : lo + self.batch_size].tolist())]
            b += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62
