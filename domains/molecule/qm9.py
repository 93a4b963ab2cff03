"""QM9 (Ramakrishnan et al. 2014): from a local copy of its raw files, parsed by ``torch_geometric.datasets.QM9``,
or from the ``qm9pack`` package on PyPI, whose CSV files hold the same 130,831 DFT geometries and properties.

Nothing is downloaded at run time: a missing or misplaced copy gives a message saying where the files go (or
which package to install). PyG's parse is cached in ``ROOT/processed``; the raw files' sizes recorded beside it
tell when to rebuild it. The package's CSV files are parsed on each load (about 8 s).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import MoleculeSet
from .rdkit_utils import quiet_rdkit

__all__ = [
    "load_qm9",
    "load_qm9_package",
    "qm9_package_dir",
    "QM9_PACKAGE",
    "QM9_RAW_FILES",
    "QM9WriteError",
    "QM9_TARGETS",
    "QM9_UNITS",
    "EDM_QM9_SPLIT",
]

log = logging.getLogger(__name__)

QM9_RAW_FILES = ("gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt")
#: Where the raw files come from (torch_geometric's QM9.raw_url and raw_url2); fetched by hand, never by polydiff.
QM9_RAW_URLS = (
    "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/molnet_publish/qm9.zip",
    "https://ndownloader.figshare.com/files/3195404",
)
#: Column names of ``torch_geometric.datasets.QM9``'s ``y``, in PyG's units (:data:`QM9_UNITS`).
QM9_TARGETS = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv")
#: Units of each target as ``torch_geometric.datasets.QM9`` stores it (its docstring's table): PyG
#: converts the csv's Hartree energies to eV, so these are neither the csv's units nor EDM's
#: tables' (EDM reports homo, lumo and gap in meV: divide EDM's figure by 1000).
QM9_UNITS = {
    "mu": "D",
    "alpha": "Bohr^3",
    "homo": "eV",
    "lumo": "eV",
    "gap": "eV",
    "r2": "Bohr^2",
    "zpve": "eV",
    "U0": "eV",
    "U": "eV",
    "H": "eV",
    "G": "eV",
    "Cv": "cal/(mol K)",
}
#: Where polydiff records the raw files that ``processed/`` was built from (beside PyG's data_v3.pt).
QM9_FINGERPRINT = "polydiff_raw_fingerprint.json"
#: EDM's QM9 split sizes (train, valid, test) over the 130,831 characterised molecules.
EDM_QM9_SPLIT = (100_000, 17_748, 13_083)
#: The PyPI package (by QM9's first author) whose CSV files hold QM9: ``pip install qm9pack`` (or ``polydiff[qm9]``).
QM9_PACKAGE = "qm9pack"
QM9_PACKAGE_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
#: Hartree in eV, the factor ``torch_geometric.datasets.QM9`` applies to the csv's energies (CODATA 2018).
HARTREE_EV = 27.211386246
#: The package's CSV column of each target and the factor to PyG's units (:data:`QM9_UNITS`).
QM9_PACKAGE_COLUMNS = {
    "mu": ("Dipole_debye", 1.0),
    "alpha": ("Polarizability_bohr3", 1.0),
    "homo": ("HOMO_au", HARTREE_EV),
    "lumo": ("LUMO_au", HARTREE_EV),
    "gap": ("HOMO_LUMO_gap_au", HARTREE_EV),
    "r2": ("R2_bohr2", 1.0),
    "zpve": ("ZPVE_au", HARTREE_EV),
    "U0": ("InternalEnergy_0K_au", HARTREE_EV),
    "U": ("InternalEnergy_298K_au", HARTREE_EV),
    "H": ("Enthalphy_298K_au", HARTREE_EV),
    "G": ("GibbsFreeEnergy_298K_au", HARTREE_EV),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", 1.0),
}
_ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


def _qm9_raw_fingerprint(raw: Path) -> dict[str, list[int]]:
    """``{name: [size in bytes]}`` of the QM9 raw files present under ``raw`` (sizes only: copying the
    data set elsewhere changes modification times, not contents)."""
    return {name: [int((raw / name).stat().st_size)] for name in QM9_RAW_FILES if (raw / name).is_file()}


def _qm9_stale_reason(processed: Path, fingerprint: dict[str, list[int]]) -> Optional[str]:
    """Why ``processed`` (PyG's data_v3.pt) no longer matches the raw files, or ``None`` when it does."""
    record = processed.parent / QM9_FINGERPRINT
    if not record.is_file():  # built before records were kept: trusted, and recorded from now on
        _write_qm9_fingerprint(processed.parent, fingerprint)
        return None
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        return f"its record {record.name} is unreadable ({type(err).__name__}: {err})"
    changed = sorted(n for n in set(recorded) | set(fingerprint) if recorded.get(n) != fingerprint.get(n))
    if changed:
        return f"raw file(s) {changed} changed size since it was built"
    return None


def _write_qm9_fingerprint(processed_dir: Path, fingerprint: dict[str, list[int]]) -> None:
    """Record ``fingerprint`` beside the processed data (temporary file + rename: never torn); a read-only
    ``processed/`` keeps its data unrecorded, with a warning."""
    path = processed_dir / QM9_FINGERPRINT
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        log.warning(
            "could not record the QM9 raw files' sizes in %s (%s: %s): the processed data is used, but "
            "not checked against changed raw files",
            path,
            type(err).__name__,
            err,
        )


class QM9WriteError(OSError, ValueError):
    """QM9's ``processed/`` folder cannot be written (an OSError; a ValueError too, so the CLI reports it plainly)."""


def _qm9_write_error(err: OSError, root: Path) -> Optional[QM9WriteError]:
    """The error naming the folder and the fix when ``err`` is a failure to write under ``root`` (not to read raw
    files)."""
    if not err.filename:
        return None
    target = Path(os.path.abspath(err.filename))
    processed_dir, raw = Path(os.path.abspath(root / "processed")), Path(os.path.abspath(root / "raw"))
    if target == raw:  # PyG creates raw/ before anything else, even to read processed/ alone
        return QM9WriteError(
            f"cannot create {raw}/ ({type(err).__name__}: {err}): torch_geometric's QM9 makes that folder even when it "
            f"reads only processed/; create it (mkdir {raw}) or copy {root} to a writable place and set "
            "domain.path there"
        )
    if target != processed_dir and processed_dir not in target.parents:
        return None
    if processed_dir.exists() and not processed_dir.is_dir():
        fix = f"{processed_dir} is a file, not a folder: move or delete it"
    else:
        fix = f"make {processed_dir} writable"
    return QM9WriteError(
        f"cannot write QM9's processed data to {processed_dir}/ ({type(err).__name__}: {err}); torch_geometric parses "
        f"the raw files once into that folder. Fix: {fix}, or copy {raw}/ into a writable folder ROOT/raw/ and set "
        f"domain.path=ROOT"
    )


def _qm9_missing_message(root: Path, missing: list[str], processed: Path) -> str:
    """Where the QM9 raw files ``missing`` from ``root/raw`` come from and go (nothing is downloaded)."""
    return (
        f"QM9 raw files {missing} are missing under {root / 'raw'}. polydiff never downloads data: place "
        f"gdb9.sdf and gdb9.sdf.csv (unzipped from MoleculeNet's {QM9_RAW_URLS[0]}) and uncharacterized.txt "
        f"({QM9_RAW_URLS[1]}, renamed) in {root / 'raw'}/, then run again; processing them once writes {processed}."
    )


def _check_qm9_root(root: Path, missing: list[str], processed: Path) -> None:
    """Raise a FileNotFoundError that says where the raw files must go when ``root/raw`` lacks them."""
    if not missing or processed.is_file():
        return
    here = [f for f in QM9_RAW_FILES if (root / f).is_file()]
    if here and root.name == "raw":
        raise FileNotFoundError(
            f"domain.path={root} is one level too deep: it holds the QM9 raw files {here} itself, but domain.path "
            f"must be the folder above raw/ (where processed/ is written). Use domain.path={root.parent}"
        )
    if here:
        raise FileNotFoundError(
            f"domain.path={root} holds the QM9 raw files {here} directly, but they must be in {root / 'raw'}/: "
            f"move them there (mkdir {root / 'raw'} && mv {' '.join(str(root / f) for f in here)} {root / 'raw'}/)"
        )
    raise FileNotFoundError(_qm9_missing_message(root, missing, processed))


def _local_qm9(root: Path, missing: list[str], processed: Path):
    """``torch_geometric.datasets.QM9`` on ``root`` whose ``download()`` never downloads.

    PyG calls ``download()`` whenever a raw file is missing, even when ``processed/`` is all it reads:
    a processed-only copy is read as it is, and without ``processed`` the missing-raw-files error is raised.
    """
    from torch_geometric.datasets import QM9

    class LocalQM9(QM9):
        """QM9 from local files only."""

        def download(self) -> None:
            if not processed.is_file():
                raise FileNotFoundError(_qm9_missing_message(root, missing or list(QM9_RAW_FILES), processed))

    return LocalQM9(str(root))


def _qm9_unusable(err: Exception, root: Path, missing: list[str], processed: Path) -> Exception:
    """The error to raise when PyG's QM9 fails on ``root``: a write failure, missing raw files, or a damaged copy."""
    written = _qm9_write_error(err, root) if isinstance(err, OSError) else None
    if written is not None:
        return written
    if isinstance(err, FileNotFoundError) and missing:  # download() refused: the raw files are missing
        return err
    raw = root / "raw"
    if missing:  # a processed-only copy whose processed data cannot be read, and nothing to rebuild it from
        return ValueError(
            f"QM9 processed data {processed} could not be read ({type(err).__name__}: {err}), and {raw} lacks the raw "
            f"files {missing} to rebuild it. {_qm9_missing_message(root, missing, processed)}"
        )
    return ValueError(
        f"QM9 raw files in {raw} could not be processed ({type(err).__name__}: {err}); replace them with intact "
        f"copies of gdb9.sdf, gdb9.sdf.csv and uncharacterized.txt and remove {processed} if it exists"
    )


def load_qm9(root: Path | str) -> MoleculeSet:
    """QM9 via ``torch_geometric.datasets.QM9`` from local files (never downloaded).

    ``y`` holds :data:`QM9_TARGETS` in PyG's units (:data:`QM9_UNITS`: eV for energies, not the
    csv's Hartree). PyG caches its parse in ``root/processed/data_v3.pt``; the raw files' names
    and sizes are recorded beside it, and a processed file whose record does not match the raw
    files is deleted and rebuilt, with a warning (one without a record is trusted and recorded).
    A copy with ``processed/data_v3.pt`` but no raw files is read as it is (nothing to check it against).
    """
    root = Path(root).expanduser()
    raw = root / "raw"
    missing = [f for f in QM9_RAW_FILES if not (raw / f).is_file()]
    processed = root / "processed" / "data_v3.pt"
    _check_qm9_root(root, missing, processed)
    fingerprint = _qm9_raw_fingerprint(raw)
    stale = _qm9_stale_reason(processed, fingerprint) if processed.is_file() and not missing else None
    try:
        if stale is not None:
            log.warning(
                "QM9 processed data %s cannot be trusted: %s; deleting it and rebuilding it from %s",
                processed,
                stale,
                raw,
            )
            processed.unlink()
        with quiet_rdkit():  # PyG's RDKit parse of gdb9.sdf ("Explicit valence ..." lines)
            ds = _local_qm9(root, missing, processed)
    except Exception as err:  # PyG parses the raw files on first use; a damaged copy fails deep inside it
        raise _qm9_unusable(err, root, missing, processed) from err
    if not missing and _qm9_stale_reason(processed, fingerprint) is not None:  # just built
        _write_qm9_fingerprint(processed.parent, fingerprint)
    if stale is not None:
        log.info(
            "QM9 processed data %s rebuilt from the changed raw files in %s (%d molecules)", processed, raw, len(ds)
        )
    z_list, pos_list, y_list, smi_list = [], [], [], []
    for i in range(len(ds)):
        d = ds[i]
        z_list.append(d.z.long())
        pos_list.append(d.pos.float())
        y_list.append(d.y[0, : len(QM9_TARGETS)].float())
        smi_list.append(d.smiles)
    log.info("QM9: %d molecules from %s", len(z_list), root)
    return MoleculeSet(z_list, pos_list, y_list, smi_list)


# ------------------------------------------------------------------ the qm9pack package
def qm9_package_dir() -> Optional[Path]:
    """The data folder of the installed ``qm9pack`` package (found without importing it), or ``None``."""
    spec = importlib.util.find_spec(QM9_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def qm9_missing_message() -> str:
    """What to do when ``domain.source=qm9`` has no ``domain.path`` and ``qm9pack`` is not installed."""
    return (
        f"domain.source=qm9 without domain.path reads QM9 from the {QM9_PACKAGE} package, which is not installed: "
        f"pip install {QM9_PACKAGE} (or polydiff[qm9]; 104 MB from PyPI), or place QM9's raw files "
        f"({', '.join(QM9_RAW_FILES)}) in DIR/raw and set domain.path=DIR"
    )


def _floats(text: str, where: str) -> np.ndarray:
    """The numbers of a nested list written as text (``[[0.1,1.,...],...]``)."""
    try:
        return np.array(text.replace("[", "").replace("]", "").split(","), dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{where}: unreadable numbers ({err})") from None


def _read_package_csv(path: Path) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, str]]:
    """``(index, z [n], pos [n, 3], y [12], smiles)`` of each row of one of qm9pack's CSV files."""
    rows = []
    limit = csv.field_size_limit(1 << 30)  # a row's fields (frequencies, coordinates) outgrow csv's default
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            needed = {"Index", "Elements", "XYZ_Ang", "N_atoms", "SMILES"} | {
                c for c, _ in QM9_PACKAGE_COLUMNS.values()
            }
            lacking = sorted(needed - set(reader.fieldnames or ()))
            if lacking:
                raise ValueError(
                    f"{path} lacks the column(s) {lacking}: not a {QM9_PACKAGE} QM9 file; reinstall {QM9_PACKAGE}"
                )
            for line, row in enumerate(reader, start=2):
                where = f"{path}, line {line} ({row.get('XYZ_file', '?')})"
                symbols = re.findall(r"[A-Z][a-z]?", row["Elements"])
                unknown = sorted(set(symbols) - set(_ATOMIC_NUMBER))
                if unknown or not symbols:
                    raise ValueError(f"{where}: elements {unknown or row['Elements']!r} are not QM9's H, C, N, O, F")
                pos = _floats(row["XYZ_Ang"], where)
                if pos.size != 3 * len(symbols) or len(symbols) != int(row["N_atoms"]):
                    raise ValueError(
                        f"{where}: {len(symbols)} elements, {pos.size} coordinates and "
                        f"N_atoms={row['N_atoms']} disagree"
                    )
                y = [float(row[col]) * factor for col, factor in QM9_PACKAGE_COLUMNS.values()]
                z = torch.tensor([_ATOMIC_NUMBER[s] for s in symbols], dtype=torch.long)
                rows.append(
                    (int(row["Index"]), z, torch.from_numpy(pos.reshape(-1, 3)).float(), torch.tensor(y), row["SMILES"])
                )
    finally:
        csv.field_size_limit(limit)
    return rows


def load_qm9_package(data_dir: Optional[Path | str] = None) -> MoleculeSet:
    """QM9 from the CSV files of the ``qm9pack`` package, in QM9's index order (EDM's split applies).

    The package holds the 130,831 characterised molecules (the 3,054 of ``uncharacterized.txt`` are
    left out, as EDM and PyG leave them out) with the DFT geometries of QM9's xyz files. ``y`` holds
    :data:`QM9_TARGETS` converted to PyG's units (:data:`QM9_UNITS`), so both QM9 sources condition alike.
    """
    folder = Path(data_dir) if data_dir is not None else qm9_package_dir()
    if folder is None:
        raise FileNotFoundError(qm9_missing_message())
    missing = [name for name in QM9_PACKAGE_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {missing}: the {QM9_PACKAGE} package is incomplete; reinstall it "
            f"(pip install --force-reinstall {QM9_PACKAGE})"
        )
    rows = sorted((r for name in QM9_PACKAGE_FILES for r in _read_package_csv(folder / name)), key=lambda r: r[0])
    _, z, pos, y, smiles = (list(col) for col in zip(*rows))
    log.info("QM9: %d molecules from the %s package (%s)", len(z), QM9_PACKAGE, folder)
    return MoleculeSet(z, pos, y, smiles)
