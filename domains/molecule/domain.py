"""The molecule domain: 3-D molecules as ragged states for equivariant diffusion (EDM, Hoogeboom et al. 2022).

State ``x [N_atoms, 3 + F] = [positions | one-hot(atom type) / 4 | atomic number / 10]`` (EDM's
feature scaling), laid out by ``RaggedSpace(batch, B, 3 + F, centered=(0, 1, 2))`` so that
noise and every sampler step keep each molecule's centre of mass at zero. Atom types are
decoded by argmax of the one-hot block.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from polydiff import Batch, Domain, RaggedSpace

from .data import (
    MoleculeSet,
    builtin_smiles_path,
    conformers_from_smiles,
    read_sample_molecules,
    read_sdf,
    read_smiles_file,
    split_indices,
)
from .egnn import EGNN
from .metrics import Molecule3D, edm_smiles, molecule_metrics
from .outputs import write_grid_png, write_sdf, write_xyz
from .properties import PropertyPredictor, property_errors
from .qm9 import EDM_QM9_SPLIT, QM9_TARGETS, QM9_UNITS, load_qm9, load_qm9_package
from .rdkit_utils import quiet_rdkit

__all__ = ["MoleculeDomain"]

log = logging.getLogger(__name__)

_SYMBOL_Z = {"H": 1, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "Si": 14, "P": 15, "S": 16, "Cl": 17, "Br": 35, "I": 53}
SOURCES = ("builtin", "smiles", "sdf", "qm9")
#: EDM's feature scaling: one-hot / 4 and atomic number / 10.
ONE_HOT_SCALE, CHARGE_SCALE = 4.0, 10.0
#: A ``prior.context`` value further than this many mean absolute deviations from the training
#: mean is far outside the training distribution (warned: the model extrapolates).
CONTEXT_FAR_MADS = 4.0


class MoleculeDomain(Domain):
    """3-D molecules with explicit hydrogens; optional conditioning on one molecular property.

    ``source``: ``builtin`` (RDKit's NCI list, ETKDG+MMFF conformers), ``smiles`` (a SMILES file
    at ``path``), ``sdf`` (an SDF with 3-D coordinates at ``path``) or ``qm9`` (raw files under
    ``path``/raw, or without ``path`` the installed ``qm9pack`` package). ``condition_on``: a QM9
    target name (``alpha``, ``gap``, ...) or an SD tag.
    Property values (training data and ``prior.context``) are in torch_geometric's QM9 units
    (``QM9_UNITS``: D, Bohr^3, eV for all energies, cal/(mol K) for Cv; not the csv's Hartree,
    and EDM's tables give homo/lumo/gap in meV) or, for ``sdf``, the SD tag's own units.

    ``max_molecules`` applies to every source: for ``builtin`` and ``smiles`` it keeps the first
    ``max_molecules`` SMILES of the filtered list before the split (each with its conformers); for
    ``qm9`` and ``sdf`` the split is made first (QM9: EDM's split) and the training split is cut to
    a random ``max_molecules`` of its records, seeded by ``seed``; valid and test stay whole.

    ``property_epochs``: for a conditional model, the fit of the predictor behind EDM's property MAE
    (:mod:`.properties`, fitted on the validation split); 0 reports no property MAE.
    """

    guidance_keys = ("context",)

    def __init__(
        self,
        source: str = "builtin",
        path: Optional[str] = None,
        atom_types: Sequence[str] = ("H", "C", "N", "O", "F"),
        max_heavy_atoms: int = 9,
        num_conformers: int = 10,
        max_molecules: Optional[int] = None,
        split: Optional[Sequence[float]] = None,
        condition_on: Optional[str] = None,
        cache_dir: Optional[str] = None,
        eval_rdkit: bool = True,
        property_epochs: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"domain.source={source!r} is unknown; choose one of {list(SOURCES)}")
        if source in ("smiles", "sdf") and not path:
            raise ValueError(f"domain.source={source} needs domain.path (a file)")
        unknown = [s for s in atom_types if s not in _SYMBOL_Z]
        if unknown:
            raise ValueError(f"domain.atom_types has unknown element(s) {unknown}; known: {sorted(_SYMBOL_Z)}")
        if condition_on is not None and source == "qm9" and condition_on not in QM9_TARGETS:
            raise ValueError(f"domain.condition_on={condition_on!r} is not a QM9 target; choose one of {list(QM9_TARGETS)}")
        if condition_on is not None and source in ("builtin", "smiles"):
            raise ValueError("domain.condition_on needs property values: use source=qm9 or source=sdf with an SD tag")
        for key, value in (("num_conformers", num_conformers), ("max_molecules", max_molecules),
                           ("max_heavy_atoms", max_heavy_atoms)):
            if value is not None and value < 1:
                raise ValueError(f"domain.{key}={value} must be at least 1")
        if not isinstance(property_epochs, int) or isinstance(property_epochs, bool) or property_epochs < 0:
            raise ValueError(f"domain.property_epochs={property_epochs!r} must be a whole number >= 0 (0: no property MAE)")
        self.source, self.path = source, path
        self.atom_types = list(atom_types)
        self.max_heavy_atoms, self.num_conformers, self.max_molecules = max_heavy_atoms, num_conformers, max_molecules
        self.split_sizes = split
        self.condition_on = condition_on
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.eval_rdkit = eval_rdkit
        self.property_epochs = property_epochs
        self._predictor: Optional[PropertyPredictor | bool] = None  # False: it could not be fitted
        self.seed = seed
        self.num_atoms_hist: list[int] = []  # hist[n] = training molecules with n atoms
        self.context_stats: Optional[tuple[float, float]] = None  # (mean, mean absolute deviation), EDM
        self.context_range: Optional[tuple[float, float]] = None  # (min, max) of the training property
        self.context_pairs: list[tuple[int, float]] = []  # (num_atoms, property in its data units) to sample context jointly
        self._splits: Optional[dict[str, MoleculeSet]] = None
        self._train_smiles: Optional[set[str]] = None
        self._z_to_type = {_SYMBOL_Z[s]: i for i, s in enumerate(self.atom_types)}
        self._type_of_z = torch.full((max(self._z_to_type) + 1,), -1, dtype=torch.long)  # [max Z + 1], -1: none
        self._type_of_z[list(self._z_to_type)] = torch.tensor(list(self._z_to_type.values()))

    # ------------------------------------------------------------------ data
    @property
    def num_features(self) -> int:
        return len(self.atom_types) + 1

    def _cache(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        from domains.classifier import default_cache_dir

        return default_cache_dir()

    def _load(self) -> dict[str, MoleculeSet]:
        if self._splits is not None:
            return self._splits
        if "H" not in self.atom_types:
            raise ValueError("domain.atom_types must include 'H': molecules are modelled with explicit hydrogens")
        if self.source in ("builtin", "smiles"):
            src = builtin_smiles_path() if self.source == "builtin" else Path(self.path)
            smiles = read_smiles_file(src, self.atom_types, self.max_heavy_atoms)
            if self.max_molecules is not None:
                smiles = smiles[: self.max_molecules]
            # Split by molecule, so test and novelty never see a training molecule's other conformers.
            parts = split_indices(len(smiles), self.split_sizes or (0.8, 0.1, 0.1), self.seed)
            full = conformers_from_smiles(smiles, self.num_conformers, self._cache(), self.seed, tag=self.source + "_")
            index = {s: i for i, s in enumerate(smiles)}
            owner = np.array([index[s] for s in full.smiles])
            splits = {name: full.subset(np.flatnonzero(np.isin(owner, p)).tolist()) for name, p in zip(("train", "val", "test"), parts)}
        else:
            if self.source == "sdf":
                full = read_sdf(self.path, self.atom_types, [self.condition_on] if self.condition_on else ())
                sizes = self.split_sizes or (0.8, 0.1, 0.1)
            else:
                full = load_qm9(self.path) if self.path else load_qm9_package()
                if self.condition_on:
                    col = QM9_TARGETS.index(self.condition_on)
                    full.y = [y[col : col + 1] for y in full.y]
                else:
                    full.y = [torch.zeros(0) for _ in full.y]
                if self.split_sizes:
                    sizes = self.split_sizes
                elif len(full) == sum(EDM_QM9_SPLIT):
                    sizes = EDM_QM9_SPLIT
                else:
                    sizes = tuple(s / sum(EDM_QM9_SPLIT) for s in EDM_QM9_SPLIT)
                    log.warning("QM9 (%s) has %d molecules, not %d: using EDM's split fractions",
                                self.path or "the qm9pack package", len(full), sum(EDM_QM9_SPLIT))
                bad = sorted({int(z) for zs in full.z for z in zs.tolist()} - set(self._z_to_type))
                if bad:
                    raise ValueError(f"QM9 has atomic numbers {bad} outside domain.atom_types={self.atom_types}")
            parts = split_indices(len(full), sizes, self.seed)
            splits = {name: full.subset(p.tolist()) for name, p in zip(("train", "val", "test"), parts)}
            splits["train"] = self._limit_train(splits["train"])
        for name, s in splits.items():
            log.info("molecule %s split: %d conformers", name, len(s))
        self._splits = splits
        return splits

    def _limit_train(self, train: MoleculeSet) -> MoleculeSet:
        """A seeded random ``max_molecules`` of the training records (qm9 and sdf; after the split)."""
        if self.max_molecules is None or self.max_molecules >= len(train):
            return train
        keep = np.sort(np.random.RandomState(self.seed).permutation(len(train))[: self.max_molecules])
        log.info("domain.max_molecules=%d: training on a random %d of the %d %s training molecules (seed %d); "
                 "valid and test stay whole; set domain.max_molecules=null to train on all",
                 self.max_molecules, len(keep), len(train), self.source, self.seed)
        return train.subset(keep.tolist())

    def dataset(self, split: str) -> Dataset:
        splits = self._load()
        if split not in splits:
            raise KeyError(f"unknown split {split!r}; choose one of {sorted(splits)}")
        if len(splits[split]) == 0:
            raise ValueError(f"the {split} split of {self.source} data is empty; use more molecules or change domain.split")
        return splits[split]

    def features(self, z: Tensor) -> Tensor:
        """EDM node features ``[n, F]`` of atomic numbers ``z [n]``."""
        z = z.long()
        table = self._type_of_z.to(z.device)
        idx = table[z.clamp(0, len(table) - 1)]  # [n] atom-type index, -1 outside atom_types
        bad = (z < 0) | (z >= len(table)) | (idx < 0)
        if bad.any():
            raise ValueError(f"atomic number {int(z[bad][0])} is outside domain.atom_types={self.atom_types}")
        onehot = torch.nn.functional.one_hot(idx, len(self.atom_types)).float() / ONE_HOT_SCALE
        return torch.cat([onehot, z.float().unsqueeze(-1) / CHARGE_SCALE], dim=-1)

    def _normalise(self, y: Tensor) -> Tensor:
        mean, mad = self.context_stats  # type: ignore[misc]
        return (y - mean) / mad

    def collate(self, items: Sequence[Mapping[str, Tensor]]) -> Batch:
        centred = [pos - pos.mean(0, keepdim=True) for pos in (it["pos"].float() for it in items)]  # [n_i, 3] each
        counts = [pos.shape[0] for pos in centred]
        x = torch.cat([torch.cat(centred), self.features(torch.cat([it["z"] for it in items]))], dim=-1)  # [N, 3+F]
        b = len(items)
        batch = torch.repeat_interleave(torch.arange(b), torch.tensor(counts))
        cond: dict[str, Tensor] = {"batch": batch}
        if self.condition_on:
            if self.context_stats is None and any("y" in it for it in items):
                raise RuntimeError("conditional molecule domain: call setup(train_set) first (context statistics)")
            # [B, 1]; NaN for a molecule without a property (read back without the tag: nothing was asked for)
            values = torch.stack([it["y"][:1].float() if "y" in it else torch.full((1,), float("nan")) for it in items])
            cond["context"] = self._normalise(values) if self.context_stats is not None else values
        return Batch(x, RaggedSpace(batch, b, 3 + self.num_features, centered=(0, 1, 2)), cond)

    def can_guide(self) -> bool:
        """Guidance steers towards a property value, when the model is conditioned on one (``condition_on``)."""
        return self.condition_on is not None

    def setup(self, train_set: Dataset) -> None:
        sizes = [int(train_set[i]["z"].shape[0]) for i in range(len(train_set))]
        hist = np.bincount(sizes)
        self.num_atoms_hist = hist.tolist()
        if self.condition_on:
            ys = np.array([float(train_set[i]["y"][0]) for i in range(len(train_set))])
            mean = float(ys.mean())
            mad = float(np.abs(ys - mean).mean()) or 1.0
            self.context_stats = (mean, mad)
            self.context_range = (float(ys.min()), float(ys.max()))
            rng = np.random.RandomState(self.seed)
            pick = rng.choice(len(ys), size=min(len(ys), 2000), replace=False)
            self.context_pairs = [(sizes[i], float(ys[i])) for i in pick]
        # Training SMILES go into the checkpoint, so novelty needs no data at sampling time.
        self._train_smiles = self._smiles_of(self._molecules(train_set))
        log.info("molecule setup: %d training conformers, %d distinct EDM SMILES", len(train_set), len(self._train_smiles))

    # --------------------------------------------------------------- network
    def build_network(self, **model: Any) -> nn.Module:
        return EGNN(self.num_features, context_dim=1 if self.condition_on else 0, **model)

    # -------------------------------------------------------------- sampling
    def context_units(self) -> str:
        """The units ``prior.context`` (and the training property) is in, in words."""
        name = self.condition_on
        if name is None:
            return "no property: domain.condition_on is not set"
        if self.source == "qm9" and name in QM9_UNITS:
            meV = " (EDM's tables give meV: divide by 1000)" if name in ("homo", "lumo", "gap") else ""
            hartree = ", not the csv's Hartree" if QM9_UNITS[name] == "eV" else ""
            return f"{QM9_UNITS[name]}, torch_geometric's QM9 units{hartree}{meV}"
        return f"the units of the SD tag {name!r} in {self.path}"

    def parse_label(self, value: Any) -> int:
        raise ValueError(
            "the molecule domain has no class labels: condition on a property with prior.context=VALUE "
            f"({self.condition_on or 'the property set by domain.condition_on'} in {self.context_units()})"
        )

    def _context_bounds(self) -> tuple[float, float]:
        """(min, max) of the training property: recorded by setup, else the sampled pairs' (older checkpoints)."""
        if self.context_range is not None:
            return self.context_range
        ys = [y for _, y in self.context_pairs]
        return (min(ys), max(ys)) if ys else (float("nan"), float("nan"))

    def _warn_far_context(self, values: Sequence[float]) -> None:
        """Warn when a ``prior.context`` value lies far outside the training property's distribution."""
        if self.context_stats is None:
            return
        mean, mad = self.context_stats
        far = sorted({v for v in values if abs(v - mean) > CONTEXT_FAR_MADS * mad}, key=lambda v: -abs(v - mean))
        if not far:
            return
        lo, hi = self._context_bounds()
        log.warning(
            "prior.context=%g is far outside the training distribution of %s (%s): training mean %.4g, range "
            "[%.4g, %.4g], mean absolute deviation %.4g, so %g is %.1f deviations from the mean (warned beyond %g)%s. "
            "The model will extrapolate: give a value inside the training range, in those units",
            far[0], self.condition_on, self.context_units(), mean, lo, hi, mad, far[0], abs(far[0] - mean) / mad,
            CONTEXT_FAR_MADS, f"; {len(far) - 1} more value(s) as far" if len(far) > 1 else "",
        )

    def prior(
        self,
        n: int,
        labels: Optional[Tensor] = None,
        device: torch.device | str = "cpu",
        generator: Optional[torch.Generator] = None,
        num_atoms: Optional[int | Sequence[int]] = None,
        context: Optional[float | Sequence[float]] = None,
    ) -> tuple[RaggedSpace, dict[str, Tensor]]:
        """``n`` molecules; atom counts from ``num_atoms`` (int or list of n) or the training histogram.

        For a conditional model ``context`` (one value or n, in the training property's units:
        torch_geometric's for QM9, see :meth:`context_units`) sets the property, warned when far
        outside the training distribution; without it, (atom count, property) pairs are drawn
        jointly from training, or the property given each atom count when ``num_atoms`` is set.
        """
        if labels is not None:
            raise ValueError("the molecule domain takes no labels; use prior.context=VALUE for a property")
        cpu = None  # atom counts are drawn on the CPU, seeded from the caller's generator on any device
        if generator is not None:
            cpu = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
        ctx_raw: Optional[Tensor] = None
        if num_atoms is not None:
            values = list(num_atoms) if isinstance(num_atoms, (list, tuple)) else [num_atoms] * n
            if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
                raise ValueError(f"prior.num_atoms must be a positive int or a list of {n} positive ints, got {num_atoms!r}")
            counts = torch.tensor(values, dtype=torch.long)
            seen = len(self.num_atoms_hist) - 1
            if seen > 0 and int(counts.max()) > 2 * seen:
                log.warning("prior.num_atoms=%d is over twice the largest training molecule (%d atoms): expect poor "
                            "molecules, and the fully connected EGNN's memory grows with the square of the count",
                            int(counts.max()), seen)
            if self.condition_on and context is None and self.context_pairs:
                ctx_raw = self._context_given_counts(counts, cpu)
        elif self.condition_on and context is None and self.context_pairs:
            pick = torch.randint(len(self.context_pairs), (n,), generator=cpu)
            counts = torch.tensor([self.context_pairs[i][0] for i in pick.tolist()], dtype=torch.long)
            ctx_raw = torch.tensor([[self.context_pairs[i][1]] for i in pick.tolist()])
        else:
            if not self.num_atoms_hist:
                raise RuntimeError("no atom-count histogram: call setup(train_set), load_state_dict, or pass prior.num_atoms")
            probs = torch.tensor(self.num_atoms_hist, dtype=torch.float)
            counts = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=cpu)
        batch = torch.repeat_interleave(torch.arange(n), counts).to(device)
        cond: dict[str, Tensor] = {"batch": batch}
        if self.condition_on:
            if context is not None:
                vals = [float(context)] * n if isinstance(context, (int, float)) else [float(c) for c in context]
                if len(vals) != n:
                    raise ValueError(f"prior.context must be one value or {n} values, got {len(vals)}")
                self._warn_far_context(vals)
                ctx_raw = torch.tensor(vals).unsqueeze(-1)
            cond["context"] = (self._normalise(ctx_raw) if ctx_raw is not None else torch.full((n, 1), float("nan"))).to(device)
        elif context is not None:
            raise ValueError("prior.context given, but this model is unconditional (domain.condition_on is not set)")
        return RaggedSpace(batch, n, 3 + self.num_features, centered=(0, 1, 2)), cond

    def _property_pools(self) -> dict[int, list[float]]:
        """The sampled training property values by atom count."""
        pools: dict[int, list[float]] = {}
        for size, value in self.context_pairs:
            pools.setdefault(size, []).append(value)
        return pools

    @staticmethod
    def _nearest(pools: Mapping[int, Any], n: int) -> int:
        """The atom count of ``pools`` nearest ``n`` (the smaller on a tie)."""
        return min(pools, key=lambda k: (abs(k - n), k))

    def _context_given_counts(self, counts: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """A training property value per molecule, drawn among training molecules of its atom count (EDM's p(c | N)): [n, 1]."""
        pools = self._property_pools()
        nearest = {c: self._nearest(pools, c) for c in set(counts.tolist())}
        if any(k != c for c, k in nearest.items()):
            log.warning("no training molecule has %s atoms: their property values are drawn from the nearest atom "
                        "count seen in training (give prior.context=VALUE to choose them)",
                        sorted(c for c, k in nearest.items() if k != c))
        picks = torch.rand(len(counts), generator=generator)
        values = [pools[nearest[c]][int(u * len(pools[nearest[c]]))] for c, u in zip(counts.tolist(), picks.tolist())]
        return torch.tensor(values).unsqueeze(-1)

    def _mean_property_by_size(self, sizes: Sequence[int]) -> Optional[Tensor]:
        """The training property's mean among molecules of each atom count (the nearest count seen), ``[M]``:
        what the atom count alone tells of the property (EDM's "#Atoms" row); ``None`` without training pairs."""
        means = {k: float(np.mean(v)) for k, v in self._property_pools().items()}
        if not means:
            return None
        return torch.tensor([means[self._nearest(means, n)] for n in sizes], dtype=torch.float64)

    # --------------------------------------------------------------- outputs
    def decode(self, batch: Batch) -> list[Molecule3D]:
        """Molecules ``(symbols, positions)`` of a state batch: argmax atom types (EDM)."""
        x = batch.x.detach().float().cpu()
        b = batch.cond["batch"].cpu()
        types = x[:, 3 : 3 + len(self.atom_types)].argmax(-1)
        out = []
        for i in range(batch.num_samples):
            rows = (b == i).nonzero().squeeze(-1)
            out.append(([self.atom_types[int(k)] for k in types[rows]], x[rows, :3].numpy().astype(np.float64)))
        return out

    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        """An SDF (tagged with the requested property when conditional), XYZ files and a PNG grid."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        mols = self.decode(batch)
        tags = {}
        context = batch.cond.get("context")
        if self.condition_on and context is not None and self.context_stats is not None:
            mean, mad = self.context_stats  # back to the property's units; null (unconditional) rows stay empty
            tags[self.condition_on] = ["" if v != v else f"{v:.6g}" for v in (context[:, 0].cpu() * mad + mean).tolist()]
        with quiet_rdkit():  # invalid molecules are tagged valid=0, not printed
            paths = [write_sdf(mols, out_dir / f"{prefix}.sdf", tags)]
            write_xyz(mols, out_dir / f"{prefix}_xyz")
            paths.append(out_dir / f"{prefix}_xyz")
            paths.append(write_grid_png(mols, out_dir / f"{prefix}.png"))
        return paths

    def read_samples(self, path: Path) -> Batch:
        """Molecules generated elsewhere: an SDF or XYZ file (EDM's XYZ ``molecule_000.txt`` too), or a folder of
        them (bonds, if any, are ignored; the metrics infer them from distances as EDM does). For a conditional
        model an SD tag named ``condition_on`` (as :meth:`save_samples` writes) is the value the molecule was asked for."""
        items = []
        for symbols, pos, where, tags in read_sample_molecules(path):
            unknown = sorted(set(symbols) - set(self.atom_types))
            if unknown:
                raise ValueError(f"{where}: elements {unknown} are outside domain.atom_types={self.atom_types}; "
                                 "the metrics score molecules of the model's vocabulary")
            z = torch.tensor([_SYMBOL_Z[sym] for sym in symbols], dtype=torch.long)
            item = {"z": z, "pos": torch.from_numpy(pos).float()}
            asked = tags.get(self.condition_on, "") if self.condition_on else ""
            if asked != "":
                try:
                    value = float(asked)
                except ValueError:
                    value = float("nan")
                if value != value or value in (float("inf"), float("-inf")):
                    raise ValueError(f"{where}: its {self.condition_on} tag {asked!r} is not a finite number; fix the "
                                     "tag, or remove it for a molecule that was asked for no value")
                item["y"] = torch.tensor([value])
            items.append(item)
        return self.collate(items)

    def _molecules(self, data: Dataset, n: Optional[int] = None) -> list[Molecule3D]:
        idx = range(len(data)) if n is None else np.random.RandomState(self.seed).permutation(len(data))[:n]
        inv = {_SYMBOL_Z[s]: s for s in self.atom_types}
        out = []
        for i in idx:
            item = data[int(i)]
            out.append(([inv[int(a)] for a in item["z"].tolist()], item["pos"].numpy().astype(np.float64)))
        return out

    @staticmethod
    def _smiles_of(mols: Sequence[Molecule3D]) -> set[str]:
        """EDM-pipeline SMILES of valid ``mols``; RDKit's sanitisation messages are silenced."""
        with quiet_rdkit():
            return {s for s in (edm_smiles(*m) for m in mols) if s is not None}

    def train_smiles(self) -> Optional[set[str]]:
        """EDM-pipeline SMILES of the training conformers (for novelty), or ``None`` without data."""
        if self._train_smiles is None:
            try:
                mols = self._molecules(self.dataset("train"))
            except (FileNotFoundError, ValueError) as err:
                log.warning("novelty not computed: training data unavailable (%s)", err)
                return None
            self._train_smiles = self._smiles_of(mols)
        return self._train_smiles

    def property_predictor(self) -> Optional[PropertyPredictor]:
        """The predictor of the conditioning property (EDM Sec. 5.3), fitted on the validation split on first
        use and cached; ``None`` for an unconditional model, ``property_epochs=0`` or without data."""
        if not self.condition_on or self.property_epochs == 0 or self._predictor is False:
            return None
        if self._predictor is None:
            self._predictor = False  # until fitted: a failure is warned about once, not at every evaluation
            try:
                fit_set = self.dataset("val")
            except (FileNotFoundError, ValueError) as err:
                log.warning("property MAE not computed: no validation molecules to fit its predictor on (%s)", err)
                return None
            if len(fit_set) < 2:
                log.warning("property MAE not computed: %d validation molecule(s) to fit its predictor on; enlarge the "
                            "validation part of domain.split", len(fit_set))
                return None
            items = [fit_set[i] for i in range(len(fit_set))]
            self._predictor = PropertyPredictor([(it["z"], it["pos"]) for it in items],
                                                torch.tensor([float(it["y"][0]) for it in items]),
                                                cache=self._cache(), epochs=self.property_epochs, seed=self.seed)
        return self._predictor or None

    def _atoms(self, mols: Sequence[Molecule3D]) -> list[tuple[Tensor, Tensor]]:
        """``(atomic numbers [n], positions [n, 3])`` of decoded molecules, as the property predictor takes them."""
        return [(torch.tensor([_SYMBOL_Z[s] for s in sym], dtype=torch.long), torch.from_numpy(pos).float()) for sym, pos in mols]

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """EDM's metrics; for a conditional model also the property MAE of the samples against the values asked for."""
        mols = self.decode(batch)
        out = molecule_metrics(mols, self.train_smiles(), rdkit_second_opinion=self.eval_rdkit)
        context = batch.cond.get("context")
        asked = context is not None and self.context_stats is not None and not bool(context.isnan().all())
        predictor = self.property_predictor() if asked else None
        if predictor is not None:
            mean, mad = self.context_stats  # type: ignore[misc]
            target = context[:, 0].double().cpu() * mad + mean  # [B] in the property's units; NaN: unconditional
            sizes = [len(symbols) for symbols, _ in mols]
            out.update(property_errors(predictor.predict(self._atoms(mols)), target, self.seed, self._mean_property_by_size(sizes)))
        return out

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same figures on ``n`` training conformers (EDM reports them for the data set); for a conditional
        model the property MAE of ``n`` test molecules (EDM's lower bound; shuffled: its upper bound)."""
        out = molecule_metrics(self._molecules(self.dataset("train"), n), self.train_smiles(), rdkit_second_opinion=self.eval_rdkit)
        predictor = self.property_predictor()
        test = self._load().get("test") if predictor is not None else None
        if predictor is not None and test is not None and len(test) > 0:
            idx = np.random.RandomState(self.seed).permutation(len(test))[:n]
            items = [test[int(i)] for i in idx]
            pred = predictor.predict([(it["z"], it["pos"]) for it in items])
            target = torch.tensor([float(it["y"][0]) for it in items], dtype=torch.float64)
            out.update(property_errors(pred, target, self.seed, self._mean_property_by_size([len(it["z"]) for it in items])))
        return out

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "atom_types": list(self.atom_types),
            "num_atoms_hist": list(self.num_atoms_hist),
            "condition_on": self.condition_on,
            "context_stats": list(self.context_stats) if self.context_stats else None,
            "context_range": list(self.context_range) if self.context_range else None,
            "context_pairs": [list(p) for p in self.context_pairs],
            "train_smiles": sorted(self._train_smiles) if self._train_smiles is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("atom_types", self.atom_types)) != self.atom_types:
            raise ValueError(f"checkpoint atom types {state['atom_types']} differ from domain.atom_types={self.atom_types}")
        self.num_atoms_hist = list(state.get("num_atoms_hist", []))
        stats = state.get("context_stats")
        self.context_stats = (float(stats[0]), float(stats[1])) if stats else None
        bounds = state.get("context_range")  # absent from older checkpoints: the sampled pairs' range
        self.context_range = (float(bounds[0]), float(bounds[1])) if bounds else None
        self.context_pairs = [(int(a), float(b)) for a, b in state.get("context_pairs", [])]
        smiles = state.get("train_smiles")
        self._train_smiles = set(smiles) if smiles is not None else None
