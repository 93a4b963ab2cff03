"""Distance-based bond orders and valence stability, exactly as EDM defines them (Hoogeboom et al. 2022).

Bond lengths (pm) are the typical single/double/triple bond lengths that EDM's
``qm9/bond_analyze.py`` collects from the wiredchemist.com table of bond energies and lengths
and the chemistry-reference.com "Bond Lengths and Enthalpies" table. A pair of atoms at
distance ``d`` is bonded with order 1 if ``d < single + 10 pm``; the order is raised to 2 if
the pair has a double-bond length and ``d < double + 5 pm``, then to 3 if it has a triple-bond
length and ``d < triple + 3 pm``. An atom is *stable* when the sum of its bond orders is one of
its allowed valences; a molecule is stable when all its atoms are.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "BOND1",
    "BOND2",
    "BOND3",
    "MARGINS_PM",
    "ALLOWED_VALENCES",
    "bond_order",
    "bond_order_matrix",
    "atom_stability",
]

# Typical single-bond lengths in pm (symmetric; values as tabulated in EDM's bond_analyze.py).
_SINGLE: dict[tuple[str, str], int] = {
    ("H", "H"): 74,
    ("H", "C"): 109,
    ("H", "N"): 101,
    ("H", "O"): 96,
    ("H", "F"): 92,
    ("H", "B"): 119,
    ("H", "Si"): 148,
    ("H", "P"): 144,
    ("H", "As"): 152,
    ("H", "S"): 134,
    ("H", "Cl"): 127,
    ("H", "Br"): 141,
    ("H", "I"): 161,
    ("C", "C"): 154,
    ("C", "N"): 147,
    ("C", "O"): 143,
    ("C", "F"): 135,
    ("C", "Si"): 185,
    ("C", "P"): 184,
    ("C", "S"): 182,
    ("C", "Cl"): 177,
    ("C", "Br"): 194,
    ("C", "I"): 214,
    ("N", "N"): 145,
    ("N", "O"): 140,
    ("N", "F"): 136,
    ("N", "Cl"): 175,
    ("N", "Br"): 214,
    ("N", "S"): 168,
    ("N", "I"): 222,
    ("N", "P"): 177,
    ("O", "O"): 148,
    ("O", "F"): 142,
    ("O", "Br"): 172,
    ("O", "S"): 151,
    ("O", "P"): 163,
    ("O", "Si"): 163,
    ("O", "Cl"): 164,
    ("O", "I"): 194,
    ("F", "F"): 142,
    ("F", "S"): 158,
    ("F", "Si"): 160,
    ("F", "Cl"): 166,
    ("F", "Br"): 178,
    ("F", "P"): 156,
    ("F", "I"): 187,
    ("B", "Cl"): 175,
    ("Si", "Si"): 233,
    ("Si", "S"): 200,
    ("Si", "Cl"): 202,
    ("Si", "Br"): 215,
    ("Si", "I"): 243,
    ("Cl", "Cl"): 199,
    ("Cl", "P"): 203,
    ("Cl", "S"): 207,
    ("Cl", "Br"): 214,
    ("S", "S"): 204,
    ("S", "Br"): 225,
    ("S", "P"): 210,
    ("S", "I"): 234,
    ("Br", "Br"): 228,
    ("Br", "P"): 222,
    ("P", "P"): 221,
    ("I", "I"): 266,
}
# Typical double-bond lengths in pm.
_DOUBLE: dict[tuple[str, str], int] = {
    ("C", "C"): 134,
    ("C", "N"): 129,
    ("C", "O"): 120,
    ("C", "S"): 160,
    ("N", "N"): 125,
    ("N", "O"): 121,
    ("O", "O"): 121,
    ("O", "P"): 150,
    ("P", "S"): 186,
}
# Typical triple-bond lengths in pm.
_TRIPLE: dict[tuple[str, str], int] = {
    ("C", "C"): 120,
    ("C", "N"): 116,
    ("C", "O"): 113,
    ("N", "N"): 110,
}


def _symmetric(table: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (a, b), v in table.items():
        out.setdefault(a, {})[b] = v
        out.setdefault(b, {})[a] = v
    return out


BOND1 = _symmetric(_SINGLE)
BOND2 = _symmetric(_DOUBLE)
BOND3 = _symmetric(_TRIPLE)
#: Margins (pm) added to the single, double and triple bond lengths (EDM).
MARGINS_PM = (10, 5, 3)
#: Allowed total bond orders per element (EDM's ``allowed_bonds``).
ALLOWED_VALENCES: dict[str, tuple[int, ...]] = {
    "H": (1,),
    "C": (4,),
    "N": (3,),
    "O": (2,),
    "F": (1,),
    "B": (3,),
    "Al": (3,),
    "Si": (4,),
    "P": (3, 5),
    "S": (4,),
    "Cl": (1,),
    "As": (3,),
    "Br": (1,),
    "I": (1,),
    "Hg": (1, 2),
    "Bi": (3, 5),
}


def bond_order(a: str, b: str, distance_angstrom: float) -> int:
    """EDM's bond order (0-3) of elements ``a``, ``b`` at ``distance_angstrom``."""
    d = 100.0 * distance_angstrom  # pm
    # "not d < limit" as EDM tests "d < limit": a NaN distance (a diverged sample) is no bond.
    single = BOND1.get(a, {}).get(b)
    if single is None or not d < single + MARGINS_PM[0]:
        return 0
    double = BOND2.get(a, {}).get(b)
    if double is None or not d < double + MARGINS_PM[1]:
        return 1
    triple = BOND3.get(a, {}).get(b)
    if triple is None or not d < triple + MARGINS_PM[2]:
        return 2
    return 3


def bond_order_matrix(symbols: Sequence[str], positions: np.ndarray) -> np.ndarray:
    """Symmetric ``[n, n]`` int matrix of EDM bond orders from positions ``[n, 3]`` in Angstrom."""
    pos = np.asarray(positions, dtype=np.float64)
    n = len(symbols)
    dist = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))  # [n, n]
    orders = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(i + 1, n):
            o = bond_order(symbols[i], symbols[j], float(dist[i, j]))
            orders[i, j] = orders[j, i] = o
    return orders


def atom_stability(symbols: Sequence[str], orders: np.ndarray) -> np.ndarray:
    """Boolean ``[n]``: whether each atom's summed bond order is an allowed valence."""
    totals = np.asarray(orders).sum(axis=1)
    return np.array([int(t) in ALLOWED_VALENCES.get(s, ()) for s, t in zip(symbols, totals)], dtype=bool)
