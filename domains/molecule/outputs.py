"""Writers for generated molecules: SDF (EDM-inferred bonds), XYZ files and a PNG grid of 2-D depictions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .metrics import Molecule3D, edm_mol, stability

__all__ = ["write_xyz", "write_sdf", "write_grid_png"]

log = logging.getLogger(__name__)


def write_xyz(molecules: Sequence[Molecule3D], folder: Path) -> list[Path]:
    """One ``.xyz`` file per molecule in ``folder`` (Angstrom)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (symbols, pos) in enumerate(molecules):
        path = folder / f"mol_{i:04d}.xyz"
        lines = [str(len(symbols)), f"generated molecule {i}"]
        lines += [f"{s:<2s} {p[0]:12.6f} {p[1]:12.6f} {p[2]:12.6f}" for s, p in zip(symbols, np.asarray(pos, dtype=np.float64))]
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def _bonded(symbols: Sequence[str], pos: np.ndarray, aromatic: bool):
    """The EDM-bonded molecule and whether RDKit sanitises it (valid).

    ``aromatic``: the sanitised form when valid (for depictions); otherwise exactly the inferred
    single/double/triple bonds, as an SDF must hold them (a sanitised ring would be written as
    V2000 bond type 4, a query-only type).
    """
    from rdkit import Chem

    mol = edm_mol(symbols, pos)
    sanitised = Chem.Mol(mol)  # a copy: validity never changes the inferred bonds
    try:
        Chem.SanitizeMol(sanitised)
        ok = True
    except Exception:  # invalid valences: keep the raw bond graph
        ok = False
    if aromatic and ok:
        return sanitised, True
    mol.UpdatePropertyCache(strict=False)
    return mol, ok


def write_sdf(molecules: Sequence[Molecule3D], path: Path, tags: Optional[Mapping[str, Sequence[Any]]] = None) -> Path:
    """An SDF of all molecules with EDM's distance-inferred bonds; tags ``valid``, ``stable`` and any
    per-molecule ``tags`` (e.g. the property a conditional model was asked for)."""
    from rdkit import Chem

    writer = Chem.SDWriter(str(path))
    writer.SetKekulize(False)  # the bonds are EDM's orders as inferred: nothing aromatic to kekulise
    try:
        for i, (symbols, pos) in enumerate(molecules):
            mol, ok = _bonded(symbols, pos, aromatic=False)
            stable, n = stability(symbols, pos)
            mol.SetProp("_Name", f"generated_{i}")
            mol.SetProp("valid", str(int(ok)))
            mol.SetProp("stable", str(int(stable == n)))
            for name, values in (tags or {}).items():
                mol.SetProp(name, str(values[i]))
            writer.write(mol)
    finally:
        writer.close()
    return path


def _drawable(mol, size: int) -> bool:
    """Whether RDKit's grid drawer can depict ``mol`` (it fails on bonds of zero length in 2-D)."""
    from rdkit.Chem import Draw

    try:
        Draw.MolsToGridImage([mol], molsPerRow=1, subImgSize=(size, size))
    except RuntimeError:
        return False
    return True


def write_grid_png(molecules: Sequence[Molecule3D], path: Path, per_row: int = 6, size: int = 220) -> Path:
    """A PNG grid of 2-D depictions (largest fragment, hydrogens hidden when the molecule is valid)."""
    from rdkit import Chem
    from rdkit.Chem import Draw, rdDepictor

    mols, legends = [], []
    for i, (symbols, pos) in enumerate(molecules):
        mol, ok = _bonded(symbols, pos, aromatic=True)
        mol.RemoveAllConformers()
        if ok:
            frags = Chem.GetMolFrags(mol, asMols=True)
            mol = max(frags, key=lambda m: m.GetNumAtoms())
            mol = Chem.RemoveHs(mol)
        rdDepictor.Compute2DCoords(mol)
        stable, n = stability(symbols, pos)
        legend = f"{i}: {'valid' if ok else 'invalid'}, {stable}/{n} stable"
        if not ok and not _drawable(mol, size):  # a dense nonsense graph can put two atoms on one 2-D point
            mol = Chem.RWMol(mol)
            for bond in list(mol.GetBonds()):
                mol.RemoveBond(bond.GetBeginAtomIdx(), bond.GetEndAtomIdx())
            rdDepictor.Compute2DCoords(mol)
            legend += " (atoms only)"
        mols.append(mol)
        legends.append(legend)
    img = Draw.MolsToGridImage(mols, molsPerRow=per_row, subImgSize=(size, size), legends=legends)
    img.save(str(path))
    return path
