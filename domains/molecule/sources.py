"""The molecule domain's data sources: a table from ``domain.source`` to the loader of its train/val/test splits.

A loader reads the domain's data settings (``path``, ``atom_types``, ``max_molecules``, ``split``, ``seed``, ...)
and returns ``{"train", "val", "test"}`` :class:`~.data.MoleculeSet` splits. To add a source, write its loader
and add a :class:`Source` row to :data:`SOURCES`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .data import (
    SYMBOL_Z,
    MoleculeSet,
    builtin_smiles_path,
    conformers_from_smiles,
    read_sdf,
    read_smiles_file,
    split_indices,
)
from .qm9 import EDM_QM9_SPLIT, QM9_TARGETS, load_qm9, load_qm9_package

if TYPE_CHECKING:
    from .domain import MoleculeDomain

__all__ = ["SOURCES", "Source", "source_of"]

log = logging.getLogger(__name__)

Splits = dict[str, MoleculeSet]
SPLIT_NAMES = ("train", "val", "test")
#: The split of sources without one of their own: 80% train, 10% valid, 10% test.
DEFAULT_SPLIT = (0.8, 0.1, 0.1)


class Source(NamedTuple):
    """A data source: its loader, whether it reads ``domain.path``, and the properties it can condition on
    (``()``: none; ``None``: any SD tag of the file)."""

    load: Callable[["MoleculeDomain"], Splits]
    needs_path: bool = False
    properties: Optional[tuple[str, ...]] = ()


def _split_smiles(dom: MoleculeDomain, src: Path) -> Splits:
    """Conformers of the SMILES in ``src``, split by molecule so that test and novelty never see a training
    molecule's other conformers; ``max_molecules`` keeps the first SMILES of the filtered list."""
    smiles = read_smiles_file(src, dom.atom_types, dom.max_heavy_atoms)
    if dom.max_molecules is not None:
        smiles = smiles[: dom.max_molecules]
    parts = split_indices(len(smiles), dom.split_sizes or DEFAULT_SPLIT, dom.seed)
    full = conformers_from_smiles(smiles, dom.num_conformers, dom.cache_folder(), dom.seed, tag=dom.source + "_")
    index = {s: i for i, s in enumerate(smiles)}
    owner = np.array([index[s] for s in full.smiles])  # [conformers] the SMILES each came from
    return {name: full.subset(np.flatnonzero(np.isin(owner, p)).tolist()) for name, p in zip(SPLIT_NAMES, parts)}


def _split_records(dom: MoleculeDomain, full: MoleculeSet, sizes: Sequence[float]) -> Splits:
    """Records split by a seeded permutation; the training split then cut to ``max_molecules`` (valid and test
    stay whole)."""
    parts = split_indices(len(full), sizes, dom.seed)
    splits = {name: full.subset(p.tolist()) for name, p in zip(SPLIT_NAMES, parts)}
    train = splits["train"]
    if dom.max_molecules is not None and dom.max_molecules < len(train):
        keep = np.sort(np.random.RandomState(dom.seed).permutation(len(train))[: dom.max_molecules])
        log.info(
            "domain.max_molecules=%d: training on a random %d of the %d %s training molecules (seed %d); "
            "valid and test stay whole; set domain.max_molecules=null to train on all",
            dom.max_molecules,
            len(keep),
            len(train),
            dom.source,
            dom.seed,
        )
        splits["train"] = train.subset(keep.tolist())
    return splits


def load_builtin(dom: MoleculeDomain) -> Splits:
    """RDKit's NCI SMILES list, embedded with ETKDG and MMFF (``domain.num_conformers`` each)."""
    return _split_smiles(dom, builtin_smiles_path())


def load_smiles(dom: MoleculeDomain) -> Splits:
    """A SMILES file at ``domain.path``, embedded as :func:`load_builtin` does."""
    return _split_smiles(dom, Path(dom.path))


def load_sdf(dom: MoleculeDomain) -> Splits:
    """An SDF with 3-D coordinates at ``domain.path``; the SD tag ``condition_on`` is the property."""
    full = read_sdf(dom.path, dom.atom_types, [dom.condition_on] if dom.condition_on else ())
    return _split_records(dom, full, dom.split_sizes or DEFAULT_SPLIT)


def load_qm9_splits(dom: MoleculeDomain) -> Splits:
    """QM9 from raw files under ``domain.path``/raw, or without a path the ``qm9pack`` package; EDM's split."""
    full = load_qm9(dom.path) if dom.path else load_qm9_package()
    if dom.condition_on:
        col = QM9_TARGETS.index(dom.condition_on)
        full.y = [y[col : col + 1] for y in full.y]
    else:
        full.y = [torch.zeros(0) for _ in full.y]
    if dom.split_sizes:
        sizes = dom.split_sizes
    elif len(full) == sum(EDM_QM9_SPLIT):
        sizes = EDM_QM9_SPLIT
    else:
        sizes = tuple(s / sum(EDM_QM9_SPLIT) for s in EDM_QM9_SPLIT)
        log.warning(
            "QM9 (%s) has %d molecules, not %d: using EDM's split fractions",
            dom.path or "the qm9pack package",
            len(full),
            sum(EDM_QM9_SPLIT),
        )
    bad = sorted({int(z) for zs in full.z for z in zs.tolist()} - {SYMBOL_Z[s] for s in dom.atom_types})
    if bad:
        raise ValueError(f"QM9 has atomic numbers {bad} outside domain.atom_types={dom.atom_types}")
    return _split_records(dom, full, sizes)


#: ``domain.source`` -> :class:`Source`.
SOURCES: dict[str, Source] = {
    "builtin": Source(load_builtin),
    "smiles": Source(load_smiles, needs_path=True),
    "sdf": Source(load_sdf, needs_path=True, properties=None),
    "qm9": Source(load_qm9_splits, properties=QM9_TARGETS),
}


def source_of(name: str, path: Optional[str] = None, condition_on: Optional[str] = None) -> Source:
    """The :class:`Source` named ``name``, checked against the settings it needs (``domain.path``) and the property
    to condition on; the errors list the choices."""
    if name not in SOURCES:
        raise ValueError(f"domain.source={name!r} is unknown; choose one of {list(SOURCES)}")
    src = SOURCES[name]
    if src.needs_path and not path:
        raise ValueError(f"domain.source={name} needs domain.path (a file)")
    if condition_on is not None and src.properties is not None and condition_on not in src.properties:
        if not src.properties:
            raise ValueError("domain.condition_on needs property values: use source=qm9 or source=sdf with an SD tag")
        raise ValueError(
            f"domain.condition_on={condition_on!r} is not a {name.upper()} target; choose one of {list(src.properties)}"
        )
    return src
