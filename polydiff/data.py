"""Deterministic, resumable, rank-aware batch order for training."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless shuffled batches whose order depends only on ``(seed, batch number)``.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; every rank takes its own slice of
    each global batch, so a run resumed at batch ``start`` sees exactly the batches an
    uninterrupted run would, on any number of ranks.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
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
            yield perm[lo : lo + self.batch_size].tolist()
            b += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62
