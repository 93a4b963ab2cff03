"""Fresh sampler noise that does not depend on how a draw is split into chunks of ``sampler.batch_size``.

The samples of a draw are grouped in fixed blocks of :data:`BLOCK` (by index, whatever the chunks), each block
with a noise stream of its own seeded once per draw. A chunk draws, at every sampler step, the whole noise of
each block it touches and keeps its own samples' part, so sample ``i``'s noise is the same in any chunking: one
``randn`` call per block and step rather than one per sample.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .space import Space

__all__ = ["NoiseSource", "BLOCK", "block_seeds"]

#: Samples per noise stream.
BLOCK = 64


def block_seeds(n: int, generator: torch.Generator | None) -> list[int]:
    """The seed of each block's stream for a draw of ``n`` samples, from ``generator`` (torch's global stream
    without one)."""
    on = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**62, (math.ceil(n / BLOCK),), generator=generator, device=on).tolist()


class NoiseSource:
    """The fresh noise of samples ``start .. stop`` of a draw laid out as ``whole``, block by block.

    ``randn(dtype)`` returns the chunk's next noise, laid out like ``whole.take(start, stop)``'s state; make one
    source per chunk and sampler run (every chunk then reads its blocks' streams from their start).
    """

    def __init__(self, whole: Space, start: int, stop: int, seeds: Sequence[int], device: torch.device | str) -> None:
        self.parts = []  # (generator, the block's space, rows of the block's state that belong to the chunk)
        self.order = None  # where the blocks' rows go in the chunk's state, when not simply one after another
        if type(whole).take is Space.take:  # a space that cannot be split (drawn in one chunk): one stream
            self.parts.append((torch.Generator(device=device).manual_seed(seeds[0]), whole, slice(None)))
            return
        picked = []  # the whole draw's rows that each part gives, for a layout not sorted by sample
        for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            lo, hi = b * BLOCK, min(whole.num_samples, (b + 1) * BLOCK)
            block, block_rows = (whole, slice(None)) if (lo, hi) == (0, whole.num_samples) else whole.take(lo, hi)
            mine = (max(start, lo) - lo, min(stop, hi) - lo)
            rows = slice(None) if mine == (0, hi - lo) else block.take(*mine)[1]
            self.parts.append((torch.Generator(device=device).manual_seed(seeds[b]), block, rows))
            if isinstance(block_rows, Tensor):
                picked.append(block_rows[rows])
        if len(picked) > 1:  # ragged rows of several blocks: in the chunk's row order (the whole draw's, ascending)
            whole_rows = torch.cat(picked)
            if not bool((whole_rows[1:] > whole_rows[:-1]).all()):
                self.order = torch.argsort(whole_rows)

    def randn(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The next standard Gaussian noise of the chunk's samples (projected as their space wants)."""
        draws = [block.randn(generator=g, dtype=dtype)[rows] for g, block, rows in self.parts]
        noise = draws[0] if len(draws) == 1 else torch.cat(draws)
        return noise if self.order is None else noise[self.order.to(noise.device)]
