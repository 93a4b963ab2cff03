"""Molecule data: built-in RDKit conformers, SMILES files and SDF files (QM9: :mod:`domains.molecule.qm9`).

Every source yields :class:`MoleculeSet` items ``{"z": [n] long, "pos": [n, 3] float (Angstrom),
"y": [k] float (properties, may be empty)}`` with explicit hydrogens. Bad records are skipped,
counted and logged by name; a source with no usable record is an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from domains.files import split_by_suffix, visible_files
from polydiff.checkpoint import atomic_save

from .rdkit_utils import quiet_rdkit

__all__ = [
    "SYMBOL_Z",
    "MoleculeSet",
    "builtin_smiles_path",
    "read_smiles_file",
    "conformers_from_smiles",
    "read_sdf",
    "read_sample_molecules",
    "split_indices",
]

log = logging.getLogger(__name__)

#: Atomic number of each element symbol the molecule domain can model (``domain.atom_types``).
SYMBOL_Z = {"H": 1, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "Si": 14, "P": 15, "S": 16, "Cl": 17, "Br": 35, "I": 53}


class MoleculeSet(Dataset):
    """Conformers with atomic numbers, positions and optional property vectors."""

    def __init__(
        self, z: list[Tensor], pos: list[Tensor], y: Optional[list[Tensor]] = None, smiles: Optional[list[str]] = None
    ) -> None:
        if len(z) != len(pos):
            raise ValueError(f"{len(z)} atom lists but {len(pos)} position arrays")
        self.z, self.pos = z, pos
        self.y = y if y is not None else [torch.zeros(0) for _ in z]
        self.smiles = smiles if smiles is not None else [""] * len(z)

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"z": self.z[i], "pos": self.pos[i], "y": self.y[i]}

    def subset(self, idx: Sequence[int]) -> "MoleculeSet":
        return MoleculeSet(
            [self.z[i] for i in idx],
            [self.pos[i] for i in idx],
            [self.y[i] for i in idx],
            [self.smiles[i] for i in idx],
        )

    def __getstate__(self) -> dict:
        """Each field as one tensor (DataLoader workers under 'spawn', macOS's default, or 'forkserver', Python
        3.14's on Linux, get the data set pickled): a tensor per molecule would each take a shared-memory file
        (QM9's 390,000 exceed the open-file limit) and long to send."""
        return {**self.__dict__, **{key: _pack(self.__dict__[key]) for key in _PACKED_FIELDS}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({**state, **{key: _unpack(state[key]) for key in _PACKED_FIELDS}})


_PACKED_FIELDS = ("z", "pos", "y")


def _pack(tensors: Any) -> Any:
    """A list of tensors of one dtype and trailing shape as ``(flat tensor, lengths)``; anything else as it is."""
    if not isinstance(tensors, list) or not tensors or not all(isinstance(t, Tensor) and t.dim() > 0 for t in tensors):
        return tensors
    first = tensors[0]
    if any(t.dtype != first.dtype or t.shape[1:] != first.shape[1:] or t.layout != torch.strided for t in tensors):
        return tensors
    return _Packed(torch.cat(tensors), [int(t.shape[0]) for t in tensors])


def _unpack(value: Any) -> Any:
    """The list of views :func:`_pack` packed (its one tensor holds them all), or ``value`` as it is."""
    return list(torch.split(value.flat, value.lengths)) if isinstance(value, _Packed) else value


class _Packed(NamedTuple):
    flat: Tensor  # [sum of lengths, ...]
    lengths: list[int]


def split_indices(n: int, sizes: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into parts of ``sizes`` (counts, or fractions summing to 1)."""
    if all(float(s) <= 1.0 for s in sizes):
        if abs(sum(sizes) - 1.0) > 1e-6:
            raise ValueError(f"split fractions {list(sizes)} must sum to 1")
        counts = [int(round(f * n)) for f in sizes[:-1]]
        counts.append(n - sum(counts))
    else:
        counts = [int(s) for s in sizes]
        if sum(counts) > n:
            raise ValueError(f"split sizes {counts} need {sum(counts)} items but the data has {n}")
    perm = np.random.RandomState(seed).permutation(n)  # EDM's qm9 split: np.random.seed(0); permutation
    cuts = np.cumsum(counts)[:-1]
    return np.split(perm[: sum(counts)], cuts)


# ------------------------------------------------------------------ SMILES sources
def builtin_smiles_path() -> Path:
    """RDKit's bundled NCI SMILES list (``RDDataDir/NCI/first_5K.smi``)."""
    from rdkit import RDConfig

    return Path(os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi"))


@quiet_rdkit()  # RDKit's own messages on bad records: ours name each one
def read_smiles_file(path: Path | str, elements: Sequence[str], max_heavy_atoms: int) -> list[str]:
    """SMILES (first column) of neutral, single-fragment molecules made only of ``elements``.

    Unparsable lines, molecules outside the filter and repeats of an earlier molecule (same
    canonical SMILES) are skipped, each named with its line number and counted in one summary line.
    """
    from rdkit import Chem

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SMILES file {path} does not exist")
    allowed = set(elements)
    kept: list[str] = []
    seen: set[str] = set()
    bad = filtered = repeated = 0
    # Each filtered record is named; for RDKit's bundled list (thousands of them) only at debug level.
    bundled = path.resolve() == builtin_smiles_path().resolve()
    quiet = logging.DEBUG if bundled else logging.INFO
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        mol = Chem.MolFromSmiles(parts[0])
        if mol is None:
            bad += 1
            log.log(
                logging.DEBUG if bundled else logging.WARNING,
                "%s:%d: skipped SMILES %r: RDKit cannot parse it",
                path,
                lineno,
                parts[0],
            )
            continue
        symbols = {a.GetSymbol() for a in mol.GetAtoms()}
        reason = (
            f"{len(Chem.GetMolFrags(mol))} fragments"
            if len(Chem.GetMolFrags(mol)) != 1
            else f"{mol.GetNumHeavyAtoms()} heavy atoms > {max_heavy_atoms}"
            if mol.GetNumHeavyAtoms() > max_heavy_atoms
            else f"elements {sorted(symbols - set(allowed))}"
            if not symbols <= set(allowed)
            else "charged or radical atoms"
            if any(a.GetFormalCharge() or a.GetNumRadicalElectrons() for a in mol.GetAtoms())
            else None
        )
        if reason is not None:
            filtered += 1
            log.log(quiet, "%s:%d: skipped SMILES %r: %s", path, lineno, parts[0], reason)
            continue
        canonical = Chem.MolToSmiles(mol)
        if canonical in seen:  # a molecule listed twice would count double and could straddle the splits
            repeated += 1
            log.log(quiet, "%s:%d: skipped SMILES %r: the same molecule as an earlier line", path, lineno, parts[0])
            continue
        seen.add(canonical)
        kept.append(canonical)
    log.info(
        "%s: %d molecules kept, %d outside the filter (elements %s, <= %d heavy atoms, neutral, one fragment), "
        "%d repeats of an earlier molecule, %d unparsable",
        path,
        len(kept),
        filtered,
        sorted(allowed),
        max_heavy_atoms,
        repeated,
        bad,
    )
    if not kept:
        raise ValueError(
            f"{path} has no usable molecule: need SMILES of neutral single-fragment molecules with only elements "
            f"{sorted(allowed)} and at most {max_heavy_atoms} heavy atoms ({bad} lines did not parse)"
        )
    return kept


def _embed(smiles: str, num_conformers: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """ETKDG v3 conformers (Wang, Witek, Landrum & Riniker 2020) relaxed with MMFF94: [(z [n], pos [n, 3])]."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    params.pruneRmsThresh = 0.1  # near-duplicates add nothing
    cids = list(AllChem.EmbedMultipleConfs(mol, num_conformers, params))
    if not cids:
        return []
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=500)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    return [(z, mol.GetConformer(c).GetPositions().astype(np.float32)) for c in cids]


def conformers_from_smiles(
    smiles: Sequence[str],
    num_conformers: int,
    cache_dir: Optional[Path],
    seed: int = 0,
    tag: str = "",
) -> MoleculeSet:
    """Explicit-H conformers of each SMILES, cached atomically under ``cache_dir`` on first use."""
    key = hashlib.sha1(("\n".join(smiles) + f"|{num_conformers}|{seed}|etkdgv3+mmff94").encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"molecule_conformers_{tag}{key}.pt" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return MoleculeSet(blob["z"], blob["pos"], None, blob["smiles"])
        except Exception as err:  # a damaged cache: rebuilt from the SMILES, never trusted
            log.warning("conformer cache %s is unreadable (%s: %s): rebuilding it", cache, type(err).__name__, err)
    z_list, pos_list, smi_list = [], [], []
    failed = 0
    for i, smi in enumerate(smiles):
        confs = _embed(smi, num_conformers, seed + i)
        if not confs:
            failed += 1
            log.warning("skipped %s: RDKit could not embed a 3-D conformer", smi)
        for z, pos in confs:
            z_list.append(torch.from_numpy(z))
            pos_list.append(torch.from_numpy(pos))
            smi_list.append(smi)
    if not z_list:
        raise ValueError("no conformer could be embedded for any of the given SMILES")
    log.info("embedded %d conformers of %d molecules (%d failed)", len(z_list), len(smiles) - failed, failed)
    if cache is not None:
        atomic_save({"z": z_list, "pos": pos_list, "smiles": smi_list}, cache)
    return MoleculeSet(z_list, pos_list, None, smi_list)


# ----------------------------------------------------------------------- SDF
def _overlapping_atoms(pos: np.ndarray, min_distance: float = 0.5) -> bool:
    """True when two atoms sit closer than ``min_distance`` Å (no real bond is under 0.7 Å)."""
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)  # [N, N]
    np.fill_diagonal(d, np.inf)
    return bool(len(pos) > 1 and d.min() < min_distance)


def _lacks_3d(mol) -> bool:
    """True for a missing or 2-D-flagged conformer, or a flat depiction flagged 3-D.

    All z exactly 0 is only a real geometry when the molecule can be planar: an sp3 atom with
    3 or more neighbours (explicit hydrogens count) never is, so such a record is a 2-D drawing.
    """
    from rdkit import Chem

    if mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
        return True
    if np.any(mol.GetConformer().GetPositions()[:, 2] != 0.0):  # z of [N, 3]
        return False
    sp3 = Chem.HybridizationType.SP3
    return any(a.GetHybridization() == sp3 and a.GetDegree() >= 3 for a in mol.GetAtoms())


@quiet_rdkit()  # RDKit's own messages on bad records: ours name each one
def read_sdf(path: Path | str, elements: Sequence[str], properties: Sequence[str] = ()) -> MoleculeSet:
    """3-D molecules with explicit hydrogens from an SDF file; ``properties`` are SD tags read as floats.

    Records that do not parse, have no atoms, lack 3-D coordinates, lack explicit hydrogens, contain elements
    outside ``elements`` or lack a requested property are skipped and logged by record number
    and name.
    """
    from rdkit import Chem

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SDF file {path} does not exist")
    allowed = set(elements)
    z_list, pos_list, y_list, smi_list = [], [], [], []
    skipped = 0
    if not path.read_bytes().strip():
        raise ValueError(f"{path} is empty: it holds no usable molecule; expected an SDF with 3-D coordinates")
    supplier = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=True)
    for i, mol in enumerate(supplier):
        where = f"{path} record {i + 1}"
        if mol is None:
            skipped += 1
            log.warning("%s: skipped: RDKit cannot parse or sanitise it", where)
            continue
        name = mol.GetProp("_Name") if mol.HasProp("_Name") else ""
        where += f" ({name!r})" if name else ""
        reason = None
        symbols = [a.GetSymbol() for a in mol.GetAtoms()]
        if not symbols:  # a blank record: a 0-atom sample would put 0 in the atom-count prior and 0/0 in the loss
            reason = "no atoms"
        elif _lacks_3d(mol):
            reason = (
                "no 3-D coordinates (missing conformer, 2-D flag, or all z = 0 for a non-planar molecule); "
                "give it 3-D coordinates (RDKit: AllChem.EmbedMolecule after Chem.AddHs)"
            )
        elif any(s not in allowed for s in symbols):
            reason = f"elements {sorted(set(symbols) - allowed)} are outside the vocabulary {sorted(allowed)}"
        elif any(a.GetTotalNumHs(includeNeighbors=False) > 0 for a in mol.GetAtoms()):
            reason = (
                "hydrogens are implicit; write the SDF with explicit hydrogens (RDKit: Chem.AddHs before embedding)"
            )
        elif any(a.GetFormalCharge() or a.GetNumRadicalElectrons() for a in mol.GetAtoms()):
            reason = "charged or radical atoms: the model encodes neutral, closed-shell molecules only"
        elif _overlapping_atoms(mol.GetConformer().GetPositions()):
            reason = "atoms closer than 0.5 Å to each other (collapsed or all-zero coordinates)"
        elif any(not mol.HasProp(p) for p in properties):
            reason = f"missing property tag(s) {[p for p in properties if not mol.HasProp(p)]}"
        if reason is not None:
            skipped += 1
            log.warning("%s: skipped: %s", where, reason)
            continue
        try:
            y = torch.tensor([float(mol.GetProp(p)) for p in properties], dtype=torch.float32)
        except ValueError:
            skipped += 1
            log.warning("%s: skipped: property %s is not a number", where, list(properties))
            continue
        if not bool(torch.isfinite(y).all()):
            skipped += 1
            log.warning("%s: skipped: property %s is %s, not a finite number", where, list(properties), y.tolist())
            continue
        z_list.append(torch.tensor([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=torch.long))
        pos_list.append(torch.from_numpy(mol.GetConformer().GetPositions().astype(np.float32)))
        y_list.append(y)
        smi_list.append(Chem.MolToSmiles(Chem.RemoveHs(mol)))
    if not z_list:
        raise ValueError(
            f"{path} holds no usable molecule ({skipped} record(s) skipped; see the log for each reason). "
            f"Records need 3-D coordinates, explicit hydrogens and only the elements {sorted(allowed)}."
        )
    if skipped:
        log.warning("%s: %d record(s) skipped, %d read", path, skipped, len(z_list))
    return MoleculeSet(z_list, pos_list, y_list, smi_list)


# ------------------------------------------------------------ generated samples
def _read_xyz(path: Path) -> list[tuple[list[str], np.ndarray, str]]:
    """Every frame of an XYZ file (atom count, comment, ``symbol x y z`` lines; frames may follow each other)."""
    lines = [ln for ln in path.read_text().splitlines()]
    out, i = [], 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        where = f"{path} line {i + 1}"
        try:
            n = int(lines[i].split()[0])
            rows = [lines[i + 2 + k].split() for k in range(n)]
            symbols = [r[0].capitalize() for r in rows]
            pos = np.array([[float(v) for v in r[1:4]] for r in rows], dtype=np.float64)  # [n, 3]
        except (ValueError, IndexError) as err:
            raise ValueError(
                f"{where}: not an XYZ frame (atom count, comment line, then 'symbol x y z' per atom): {err}"
            ) from err
        if n < 1 or pos.shape != (n, 3):
            raise ValueError(f"{where}: an XYZ frame needs at least one atom with three coordinates")
        out.append((symbols, pos, where))
        i += 2 + n
    return out


def _read_sdf_atoms(path: Path) -> list[tuple[list[str], np.ndarray, str, dict[str, Any]]]:
    """Atoms, coordinates and SD tags of every SDF record, unsanitised: bonds are ignored (the metrics infer them)."""
    from rdkit import Chem

    out = []
    with quiet_rdkit():
        mols = list(Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False))
    for i, mol in enumerate(mols):
        where = f"{path} record {i + 1}"
        if mol is None or mol.GetNumConformers() == 0:
            raise ValueError(f"{where}: RDKit cannot read atoms and coordinates from it; fix or remove the record")
        tags = mol.GetPropsAsDict(includePrivate=False, includeComputed=False)
        out.append(
            ([a.GetSymbol() for a in mol.GetAtoms()], mol.GetConformer().GetPositions().astype(np.float64), where, tags)
        )
    return out


#: Suffixes of sample files: SDF, XYZ, and .txt holding XYZ frames (EDM writes its samples as molecule_000.txt).
_SAMPLE_SUFFIXES = (".sdf", ".xyz", ".txt")


def _read_txt_xyz(path: Path) -> list[tuple[list[str], np.ndarray, str]]:
    """XYZ frames from a ``.txt`` file (EDM's sample files); an error naming the file when it is not XYZ."""
    try:
        return _read_xyz(path)
    except ValueError as err:
        raise ValueError(
            f"{path} is a .txt file but not XYZ ({err}); polydiff reads .txt samples only as XYZ, as EDM writes them "
            "(molecule_000.txt): move other .txt files out of the samples folder"
        ) from err


def read_sample_molecules(path: Path | str) -> list[tuple[list[str], np.ndarray, str, dict[str, Any]]]:
    """Generated molecules to score, as ``(symbols, positions [n, 3] in Å, where, SD tags)``: an SDF or XYZ file
    (``.txt`` files are read as XYZ, as EDM writes them; no tags), or every ``.sdf``/``.xyz``/``.txt`` file under a
    folder. Nothing is sanitised or skipped: invalid molecules are what the metrics measure."""
    path = Path(path)
    if path.is_dir():
        files = split_by_suffix(visible_files(path, follow_links=False), _SAMPLE_SUFFIXES)[0]  # not .ipynb_checkpoints/
        # polydiff writes each draw twice, NAME.sdf and NAME_xyz/*.xyz: read it once.
        files = [
            p
            for p in files
            if not (
                p.parent != path
                and p.parent.name.endswith("_xyz")
                and (p.parent.parent / f"{p.parent.name[:-4]}.sdf").is_file()
            )
        ]
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(
            f"no samples at {path}: give an SDF or XYZ file (EDM's XYZ .txt too), or a folder of them"
        )
    if not files:
        raise ValueError(f"{path} holds no .sdf, .xyz or .txt (XYZ) files")
    out = []
    for f in files:
        suffix = f.suffix.lower()
        if suffix not in _SAMPLE_SUFFIXES:
            raise ValueError(f"{f} is neither an SDF nor an XYZ file (by its suffix: .sdf, .xyz, or .txt holding XYZ)")
        out += (
            _read_sdf_atoms(f)
            if suffix == ".sdf"
            else [(*m, {}) for m in (_read_xyz(f) if suffix == ".xyz" else _read_txt_xyz(f))]
        )
    if not out:
        raise ValueError(f"{path} holds no molecules")
    empty = [where for symbols, _, where, _ in out if len(symbols) == 0]
    if empty:  # a generator never makes a molecule of no atoms: a broken file, not a sample to score
        raise ValueError(
            f"{empty[0]} has no atoms"
            + (f" (and {len(empty) - 1} more records)" if len(empty) > 1 else "")
            + ": remove such records, or regenerate the file"
        )
    return out
