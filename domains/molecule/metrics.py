"""Molecule metrics as EDM defines them (Hoogeboom et al. 2022, Sec. 5 and App. E).

* atom / molecule stability: EDM bond orders from distances (:mod:`.bonds`), an atom is
  stable when its summed bond order is an allowed valence;
* validity: the EDM-bonded molecule sanitises in RDKit; its SMILES is the largest fragment's;
* uniqueness: distinct valid SMILES / valid; novelty: unique SMILES not among the training
  SMILES / unique (training SMILES are computed the same way from training conformers);
* ``validity_rdkit``: a second opinion, bonds perceived by RDKit's ``rdDetermineBonds``
  (connectivity and bond orders for a neutral molecule) instead of EDM's tables.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import numpy as np

from .bonds import atom_stability, bond_order_matrix
from .rdkit_utils import quiet_rdkit

__all__ = ["Molecule3D", "edm_mol", "edm_smiles", "rdkit_perceived_smiles", "stability", "molecule_metrics"]

log = logging.getLogger(__name__)

#: (element symbols [n], positions [n, 3] in Angstrom)
Molecule3D = tuple[Sequence[str], np.ndarray]


def edm_mol(symbols: Sequence[str], positions: np.ndarray):
    """An unsanitised RDKit ``RWMol`` whose bonds are EDM's distance-based bond orders."""
    from rdkit import Chem

    orders = bond_order_matrix(symbols, positions)
    kinds = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    mol = Chem.RWMol()
    for s in symbols:
        mol.AddAtom(Chem.Atom(s))
    n = len(symbols)
    for i in range(n):
        for j in range(i + 1, n):
            if orders[i, j]:
                mol.AddBond(i, j, kinds[int(orders[i, j])])
    conf = Chem.Conformer(n)
    for i, p in enumerate(np.asarray(positions, dtype=np.float64)):
        conf.SetAtomPosition(i, p.tolist())
    mol.AddConformer(conf, assignId=True)
    return mol


def _largest_fragment_smiles(mol) -> Optional[str]:
    """SMILES of the largest fragment of a sanitisable molecule, else ``None`` (EDM's rule)."""
    from rdkit import Chem

    try:
        Chem.SanitizeMol(mol)
    except Exception:  # RDKit raises several sanitisation error types
        return None
    frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    largest = max(frags, default=mol, key=lambda m: m.GetNumAtoms())
    try:
        Chem.SanitizeMol(largest)
        return Chem.MolToSmiles(largest)
    except Exception:
        return None


def edm_smiles(symbols: Sequence[str], positions: np.ndarray) -> Optional[str]:
    """EDM validity: the SMILES of the EDM-bonded molecule's largest fragment, or ``None``."""
    return _largest_fragment_smiles(edm_mol(symbols, positions))


def rdkit_perceived_smiles(symbols: Sequence[str], positions: np.ndarray) -> Optional[str]:
    """Validity by RDKit's own bond perception (``rdDetermineBonds``, neutral), or ``None``."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    lines = [str(len(symbols)), ""]
    lines += [f"{s} {p[0]:.6f} {p[1]:.6f} {p[2]:.6f}" for s, p in zip(symbols, np.asarray(positions, dtype=np.float64))]
    mol = Chem.MolFromXYZBlock("\n".join(lines) + "\n")
    if mol is None:
        return None
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=0)
    except Exception:  # no assignment of bond orders exists for a neutral molecule
        return None
    return _largest_fragment_smiles(Chem.RWMol(mol))


def stability(symbols: Sequence[str], positions: np.ndarray) -> tuple[int, int]:
    """(number of stable atoms, number of atoms) of one molecule under EDM's rules."""
    stable = atom_stability(symbols, bond_order_matrix(symbols, positions))
    return int(stable.sum()), len(symbols)


def molecule_metrics(
    molecules: Iterable[Molecule3D],
    train_smiles: Optional[set[str]] = None,
    rdkit_second_opinion: bool = True,
) -> dict[str, float]:
    """EDM's stability / validity / uniqueness / novelty (and RDKit-perception validity) of a set."""
    with quiet_rdkit():  # sanitisation failures are counted, not printed
        return _molecule_metrics(molecules, train_smiles, rdkit_second_opinion)


def _molecule_metrics(
    molecules: Iterable[Molecule3D], train_smiles: Optional[set[str]], rdkit_second_opinion: bool
) -> dict[str, float]:
    n_mols = n_stable_mols = n_atoms = n_stable_atoms = 0
    valid: list[str] = []
    valid_rdkit: list[str] = []
    for symbols, pos in molecules:
        n_mols += 1
        if len(symbols) == 0:
            continue
        s, n = stability(symbols, pos)
        n_stable_atoms += s
        n_atoms += n
        n_stable_mols += int(s == n)
        smi = edm_smiles(symbols, pos)
        if smi is not None:
            valid.append(smi)
        if rdkit_second_opinion:
            smi2 = rdkit_perceived_smiles(symbols, pos)
            if smi2 is not None:
                valid_rdkit.append(smi2)
    if n_mols == 0:
        raise ValueError("molecule_metrics needs at least one molecule")
    unique = set(valid)
    out = {
        "atom_stability": n_stable_atoms / max(n_atoms, 1),
        "mol_stability": n_stable_mols / n_mols,
        "validity": len(valid) / n_mols,
        "uniqueness": len(unique) / len(valid) if valid else 0.0,
    }
    if train_smiles is not None:
        out["novelty"] = len(unique - set(train_smiles)) / len(unique) if unique else 0.0
    if rdkit_second_opinion:
        out["validity_rdkit"] = len(valid_rdkit) / n_mols
        out["uniqueness_rdkit"] = len(set(valid_rdkit)) / len(valid_rdkit) if valid_rdkit else 0.0
    return out
