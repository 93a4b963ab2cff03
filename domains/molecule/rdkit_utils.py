"""RDKit helpers shared by the molecule data readers and metrics."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["quiet_rdkit"]


@contextmanager
def quiet_rdkit() -> Iterator[None]:
    """Silence RDKit's own logger (``rdApp.*``: "Explicit valence ..." on every molecule that fails
    sanitisation) for the block, then restore its previous state. Python logging is untouched."""
    from rdkit import rdBase

    block = rdBase.BlockLogs()
    try:
        yield
    finally:
        del block
