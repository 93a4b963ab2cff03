"""The molecule domain's outputs: SDF (EDM-inferred bonds), XYZ files and a PNG grid of 2-D depictions, sample files
read back, and EDM's metrics (Hoogeboom et al. 2022): stability, validity, uniqueness, novelty and the property MAE."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polydiff import Batch
from polydiff.outputs import Outputs
from polydiff.report_items import ReportItem

from .conditioning import fit_predictor
from .data import SYMBOL_Z, read_sample_molecules
from .metrics import Molecule3D, edm_mol, edm_smiles, molecule_metrics, stability
from .properties import PropertyPredictor, property_errors
from .rdkit_utils import quiet_rdkit

if TYPE_CHECKING:
    from .domain import MoleculeDomain

__all__ = [
    "MoleculeOutputs",
    "write_xyz",
    "write_sdf",
    "write_grid_png",
    "depiction_png",
    "real_molecules",
    "smiles_of",
]

log = logging.getLogger(__name__)


class MoleculeOutputs(Outputs):
    """Generated molecules as an SDF (tagged with the property asked for), XYZ files and a PNG grid; read back from
    SDF or XYZ; scored by EDM's metrics and, for a conditional model, the property MAE of a fitted predictor."""

    domain: MoleculeDomain

    def __init__(self, domain: MoleculeDomain) -> None:
        super().__init__(domain)
        self._predictor: Optional[PropertyPredictor | bool] = None  # False: it could not be fitted

    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        """An SDF (tagged with the requested property when conditional), XYZ files and a PNG grid."""
        dom = self.domain
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        mols = dom.decode(batch)
        tags = {}
        context = batch.cond.get("context")
        if dom.condition_on and context is not None and dom.conditioning.stats is not None:
            # back to the property's units; null (unconditional) rows stay empty
            values = dom.conditioning.denormalise(context[:, 0].cpu()).tolist()
            tags[dom.condition_on] = ["" if v != v else f"{v:.6g}" for v in values]
        with quiet_rdkit():  # invalid molecules are tagged valid=0, not printed
            paths = [write_sdf(mols, out_dir / f"{prefix}.sdf", tags)]
            write_xyz(mols, out_dir / f"{prefix}_xyz")
            paths.append(out_dir / f"{prefix}_xyz")
            paths.append(write_grid_png(mols, out_dir / f"{prefix}.png"))
        return paths

    def read_samples(self, path: Path) -> Batch:
        """Molecules generated elsewhere: an SDF or XYZ file (EDM's XYZ ``molecule_000.txt`` too), or a folder of
        them (bonds, if any, are ignored; the metrics infer them from distances as EDM does). For a conditional
        model an SD tag named ``condition_on`` (as :meth:`save_samples` writes) is the value the molecule was
        asked for."""
        dom = self.domain
        items = []
        for symbols, pos, where, tags in read_sample_molecules(path):
            unknown = sorted(set(symbols) - set(dom.atom_types))
            if unknown:
                raise ValueError(
                    f"{where}: elements {unknown} are outside domain.atom_types={dom.atom_types}; "
                    "the metrics score molecules of the model's vocabulary"
                )
            z = torch.tensor([SYMBOL_Z[sym] for sym in symbols], dtype=torch.long)
            item = {"z": z, "pos": torch.from_numpy(pos).float()}
            asked = tags.get(dom.condition_on, "") if dom.condition_on else ""
            if asked != "":
                try:
                    value = float(asked)
                except ValueError:
                    value = float("nan")
                if value != value or value in (float("inf"), float("-inf")):
                    raise ValueError(
                        f"{where}: its {dom.condition_on} tag {asked!r} is not a finite number; fix the "
                        "tag, or remove it for a molecule that was asked for no value"
                    )
                item["y"] = torch.tensor([value])
            items.append(item)
        return dom.collate(items)

    def property_predictor(self) -> Optional[PropertyPredictor]:
        """The predictor of the conditioning property (EDM Sec. 5.3), fitted on the validation split on first
        use and cached; ``None`` for an unconditional model, ``property_epochs=0`` or without data."""
        dom = self.domain
        if not dom.condition_on or dom.property_epochs == 0 or self._predictor is False:
            return None
        if self._predictor is None:
            self._predictor = False  # until fitted: a failure is warned about once, not at every evaluation
            try:
                fit_set = dom.dataset("val")
            except (FileNotFoundError, ValueError) as err:
                log.warning("property MAE not computed: no validation molecules to fit its predictor on (%s)", err)
                return None
            self._predictor = fit_predictor(fit_set, dom.cache_folder(), dom.property_epochs, dom.seed) or False
        return self._predictor or None

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """EDM's metrics; for a conditional model also the property MAE of the samples against the values asked for."""
        dom = self.domain
        mols = dom.decode(batch)
        out = molecule_metrics(mols, dom.train_smiles(), rdkit_second_opinion=dom.eval_rdkit)
        context = batch.cond.get("context")
        asked = context is not None and dom.conditioning.stats is not None and not bool(context.isnan().all())
        predictor = self.property_predictor() if asked else None
        if predictor is not None:
            target = dom.conditioning.denormalise(context[:, 0].double().cpu())  # [B] its units; NaN: unconditional
            by_size = dom.conditioning.mean_by_size([len(symbols) for symbols, _ in mols])
            out.update(property_errors(predictor.predict(_atoms(mols)), target, dom.seed, by_size))
        return out

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same figures on ``n`` training conformers (EDM reports them for the data set); for a conditional
        model the property MAE of ``n`` test molecules (EDM's lower bound; shuffled: its upper bound)."""
        dom = self.domain
        train = real_molecules(dom.dataset("train"), dom.atom_types, n, dom.seed)
        out = molecule_metrics(train, dom.train_smiles(), rdkit_second_opinion=dom.eval_rdkit)
        predictor = self.property_predictor()
        test = dom.splits().get("test") if predictor is not None else None
        if predictor is not None and test is not None and len(test) > 0:
            idx = np.random.RandomState(dom.seed).permutation(len(test))[:n]
            items = [test[int(i)] for i in idx]
            pred = predictor.predict([(it["z"], it["pos"]) for it in items])
            target = torch.tensor([float(it["y"][0]) for it in items], dtype=torch.float64)
            by_size = dom.conditioning.mean_by_size([len(it["z"]) for it in items])
            out.update(property_errors(pred, target, dom.seed, by_size))
        return out

    def report_items(self, samples: Batch | Sequence[Path], limit: Optional[int] = None) -> list[ReportItem]:
        """Each molecule as a 2-D depiction and its 3-D atoms and EDM-inferred bonds (the page's rotatable view)."""
        batch = self._batch_of(samples, (".sdf",), limit)
        if batch is None:
            return []
        items = []
        with quiet_rdkit():
            for i, (symbols, pos) in enumerate(self.domain.decode(batch)):
                png, ok = depiction_png(symbols, pos)
                stable, n = stability(symbols, pos)
                bonds = [
                    (b.GetBeginAtomIdx(), b.GetEndAtomIdx(), int(b.GetBondTypeAsDouble()))
                    for b in edm_mol(symbols, pos).GetBonds()
                ]
                items.append(
                    ReportItem(
                        "molecule",
                        title=f"#{i}: {'valid' if ok else 'invalid'}, {stable}/{n} atoms stable",
                        png=png,
                        atoms=list(symbols),
                        positions=pos,
                        bonds=bonds,
                    )
                )
        return items


def real_molecules(
    data: Dataset, atom_types: Sequence[str], n: Optional[int] = None, seed: int = 0
) -> list[Molecule3D]:
    """Molecules ``(symbols, positions)`` of a data set: all, or a seeded random ``n`` of them."""
    idx = range(len(data)) if n is None else np.random.RandomState(seed).permutation(len(data))[:n]
    inv = {SYMBOL_Z[s]: s for s in atom_types}
    out = []
    for i in idx:
        item = data[int(i)]
        out.append(([inv[int(a)] for a in item["z"].tolist()], item["pos"].numpy().astype(np.float64)))
    return out


def smiles_of(mols: Sequence[Molecule3D]) -> set[str]:
    """EDM-pipeline SMILES of valid ``mols`` (for novelty); RDKit's sanitisation messages are silenced."""
    with quiet_rdkit():
        return {s for s in (edm_smiles(*m) for m in mols) if s is not None}


def _atoms(mols: Sequence[Molecule3D]) -> list[tuple[Tensor, Tensor]]:
    """``(atomic numbers [n], positions [n, 3])`` of decoded molecules, as the property predictor takes them."""
    return [
        (torch.tensor([SYMBOL_Z[s] for s in sym], dtype=torch.long), torch.from_numpy(pos).float()) for sym, pos in mols
    ]


def write_xyz(molecules: Sequence[Molecule3D], folder: Path) -> list[Path]:
    """One ``.xyz`` file per molecule in ``folder`` (Angstrom)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (symbols, pos) in enumerate(molecules):
        path = folder / f"mol_{i:04d}.xyz"
        lines = [str(len(symbols)), f"generated molecule {i}"]
        xyz = np.asarray(pos, dtype=np.float64)  # [n, 3]
        lines += [f"{s:<2s} {p[0]:12.6f} {p[1]:12.6f} {p[2]:12.6f}" for s, p in zip(symbols, xyz)]
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
    diverged = []
    try:
        for i, (symbols, pos) in enumerate(molecules):
            if not np.isfinite(np.asarray(pos, dtype=np.float64)).all():
                diverged.append(i)  # RDKit cannot read "nan" coordinates back: left out, its index a gap in the names
                continue
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
    if diverged:
        log.warning(
            "%s: %d molecule(s) with non-finite coordinates (diverged samples) left out: generated_%s",
            path,
            len(diverged),
            ", generated_".join(map(str, diverged[:10])),
        )
    return path


def _drawable(mol, size: int) -> bool:
    """Whether RDKit's grid drawer can depict ``mol`` (it fails on bonds of zero length in 2-D)."""
    from rdkit.Chem import Draw

    try:
        Draw.MolsToGridImage([mol], molsPerRow=1, subImgSize=(size, size))
    except RuntimeError:
        return False
    return True


def _depiction(symbols: Sequence[str], pos: np.ndarray, size: int):
    """The RDKit molecule drawn for one sample (its largest fragment, hydrogens hidden, when valid), whether the sample
    is valid, and whether only its atoms are drawn: RDKit's drawer fails on a 2-D layout with a bond of zero length
    (a dense nonsense graph, or an early sample's), and then the atoms alone, or nothing, are drawn."""
    from rdkit import Chem
    from rdkit.Chem import rdDepictor

    mol, ok = _bonded(symbols, pos, aromatic=True)
    mol.RemoveAllConformers()
    if ok:
        mol = Chem.RemoveHs(max(Chem.GetMolFrags(mol, asMols=True), key=lambda m: m.GetNumAtoms()))
    rdDepictor.Compute2DCoords(mol)
    if _drawable(mol, size):
        return mol, ok, False
    mol = Chem.RWMol(mol)
    for bond in list(mol.GetBonds()):
        mol.RemoveBond(bond.GetBeginAtomIdx(), bond.GetEndAtomIdx())
    rdDepictor.Compute2DCoords(mol)
    return (mol if _drawable(mol, size) else Chem.Mol()), ok, True


def write_grid_png(molecules: Sequence[Molecule3D], path: Path, per_row: int = 6, size: int = 220) -> Path:
    """A PNG grid of 2-D depictions (largest fragment, hydrogens hidden when the molecule is valid)."""
    from rdkit.Chem import Draw

    mols, legends = [], []
    for i, (symbols, pos) in enumerate(molecules):
        mol, ok, atoms_only = _depiction(symbols, pos, size)
        stable, n = stability(symbols, pos)
        legend = f"{i}: {'valid' if ok else 'invalid'}, {stable}/{n} stable"
        mols.append(mol)
        legends.append(legend + (" (atoms only)" if atoms_only else ""))
    img = Draw.MolsToGridImage(mols, molsPerRow=per_row, subImgSize=(size, size), legends=legends)
    img.save(str(path))
    return path


def depiction_png(symbols: Sequence[str], pos: np.ndarray, size: int = 220) -> tuple[bytes, bool]:
    """A PNG of one molecule's 2-D depiction, drawn as :func:`write_grid_png` draws each, and whether it is valid."""
    import io

    from rdkit.Chem import Draw

    mol, ok, _ = _depiction(symbols, pos, size)
    buf = io.BytesIO()
    Draw.MolsToGridImage([mol], molsPerRow=1, subImgSize=(size, size)).save(buf, format="PNG")
    return buf.getvalue(), ok
