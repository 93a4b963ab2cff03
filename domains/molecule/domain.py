"""The molecule domain: 3-D molecules as ragged states for equivariant diffusion (EDM, Hoogeboom et al. 2022).

State ``x [N_atoms, 3 + F] = [positions | one-hot(atom type) / 4 | atomic number / 10]`` (EDM's
feature scaling), laid out by ``RaggedSpace(batch, B, 3 + F, centered=(0, 1, 2))`` so that
noise and every sampler step keep each molecule's centre of mass at zero. Atom types are
decoded by argmax of the one-hot block. Data sources: :mod:`.sources`; the conditioning property:
:mod:`.conditioning`; files and metrics: :mod:`.outputs`.
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
from polydiff.decoders import DiscreteFeatures

from .conditioning import PropertyConditioning, property_units
from .data import SYMBOL_Z, MoleculeSet
from .egnn import EGNN
from .metrics import Molecule3D
from .outputs import MoleculeOutputs, real_molecules, smiles_of
from .sources import SOURCES, source_of

__all__ = ["MoleculeDomain", "SOURCES"]

log = logging.getLogger(__name__)

#: EDM's feature scaling: one-hot / 4 and atomic number / 10.
ONE_HOT_SCALE, CHARGE_SCALE = 4.0, 10.0


class MoleculeDomain(Domain):
    """3-D molecules with explicit hydrogens; optional conditioning on one molecular property.

    ``source``: ``builtin`` (RDKit's NCI list, ETKDG+MMFF conformers), ``smiles`` (a SMILES file
    at ``path``), ``sdf`` (an SDF with 3-D coordinates at ``path``) or ``qm9`` (raw files under
    ``path``/raw, or without ``path`` the installed ``qm9pack`` package); see :data:`.sources.SOURCES`.
    ``condition_on``: a QM9 target name (``alpha``, ``gap``, ...) or an SD tag.
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
    #: Settings a trained first stage must share with a latent recipe's domain (``latent.autoencoder=RUN``).
    first_stage_keys = ("atom_types",)

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
        source_of(source, path, condition_on)
        unknown = [s for s in atom_types if s not in SYMBOL_Z]
        if unknown:
            raise ValueError(f"domain.atom_types has unknown element(s) {unknown}; known: {sorted(SYMBOL_Z)}")
        for key, value in (
            ("num_conformers", num_conformers),
            ("max_molecules", max_molecules),
            ("max_heavy_atoms", max_heavy_atoms),
        ):
            if value is not None and value < 1:
                raise ValueError(f"domain.{key}={value} must be at least 1")
        if not isinstance(property_epochs, int) or isinstance(property_epochs, bool) or property_epochs < 0:
            raise ValueError(
                f"domain.property_epochs={property_epochs!r} must be a whole number >= 0 (0: no property MAE)"
            )
        self.source, self.path = source, path
        self.atom_types = list(atom_types)
        self.max_heavy_atoms, self.num_conformers, self.max_molecules = max_heavy_atoms, num_conformers, max_molecules
        self.split_sizes = split
        self.condition_on = condition_on
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.eval_rdkit = eval_rdkit
        self.property_epochs = property_epochs
        self.seed = seed
        self.num_atoms_hist: list[int] = []  # hist[n] = training molecules with n atoms
        self.conditioning = PropertyConditioning(condition_on, property_units(condition_on, source, path), seed)
        self._splits: Optional[dict[str, MoleculeSet]] = None
        self._train_smiles: Optional[set[str]] = None
        z_to_type = {SYMBOL_Z[s]: i for i, s in enumerate(self.atom_types)}
        self._type_of_z = torch.full((max(z_to_type) + 1,), -1, dtype=torch.long)  # [max Z + 1], -1: none
        self._type_of_z[list(z_to_type)] = torch.tensor(list(z_to_type.values()))

    # ------------------------------------------------------------------ data
    @property
    def num_features(self) -> int:
        return len(self.atom_types) + 1

    def cache_folder(self) -> Path:
        """Where conformers and the property predictor's fit are cached (``domain.cache_dir``, else the default)."""
        if self.cache_dir is not None:
            return self.cache_dir
        from domains.classifier import default_cache_dir

        return default_cache_dir()

    def splits(self) -> dict[str, MoleculeSet]:
        """The train/val/test splits of ``domain.source`` (read once, then kept)."""
        if self._splits is None:
            if "H" not in self.atom_types:
                raise ValueError("domain.atom_types must include 'H': molecules are modelled with explicit hydrogens")
            splits = SOURCES[self.source].load(self)
            for name, s in splits.items():
                log.info("molecule %s split: %d conformers", name, len(s))
            self._splits = splits
        return self._splits

    def dataset(self, split: str) -> Dataset:
        splits = self.splits()
        if split not in splits:
            raise KeyError(f"unknown split {split!r}; choose one of {sorted(splits)}")
        if len(splits[split]) == 0:
            raise ValueError(
                f"the {split} split of {self.source} data is empty; use more molecules or change domain.split"
            )
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

    def collate(self, items: Sequence[Mapping[str, Tensor]]) -> Batch:
        centred = [pos - pos.mean(0, keepdim=True) for pos in (it["pos"].float() for it in items)]  # [n_i, 3] each
        counts = [pos.shape[0] for pos in centred]
        x = torch.cat([torch.cat(centred), self.features(torch.cat([it["z"] for it in items]))], dim=-1)  # [N, 3+F]
        b = len(items)
        batch = torch.repeat_interleave(torch.arange(b), torch.tensor(counts))
        cond: dict[str, Tensor] = {"batch": batch}
        if self.condition_on:
            fitted = self.conditioning.stats is not None
            if not fitted and any("y" in it for it in items):
                raise RuntimeError("conditional molecule domain: call setup(train_set) first (context statistics)")
            # [B, 1]; NaN for a molecule without a property (read back without the tag: nothing was asked for)
            values = torch.stack([it["y"][:1].float() if "y" in it else torch.full((1,), float("nan")) for it in items])
            cond["context"] = self.conditioning.normalise(values) if fitted else values
        return Batch(x, RaggedSpace(batch, b, 3 + self.num_features, centered=(0, 1, 2)), cond)

    def can_guide(self) -> bool:
        """Guidance steers towards a property value, when the model is conditioned on one (``condition_on``)."""
        return self.condition_on is not None

    def setup(self, train_set: Dataset) -> None:
        sizes = [int(train_set[i]["z"].shape[0]) for i in range(len(train_set))]
        self.num_atoms_hist = np.bincount(sizes).tolist()
        if self.condition_on:
            self.conditioning.fit(sizes, np.array([float(train_set[i]["y"][0]) for i in range(len(train_set))]))
        # Training SMILES go into the checkpoint, so novelty needs no data at sampling time.
        self._train_smiles = smiles_of(real_molecules(train_set, self.atom_types))
        log.info(
            "molecule setup: %d training conformers, %d distinct EDM SMILES", len(train_set), len(self._train_smiles)
        )

    # --------------------------------------------------------------- network
    def build_network(self, **model: Any) -> nn.Module:
        return EGNN(self.num_features, context_dim=1 if self.condition_on else 0, **model)

    def latent_network(self, shape: Sequence[int], **model: Any) -> nn.Module:
        """The EGNN on GeoLDM latent rows ``shape`` = ``[3 + k]`` (``latent.autoencoder=RUN``): k invariant features."""
        return EGNN(int(shape[0]) - 3, context_dim=1 if self.condition_on else 0, **model)

    def autoencoder_network(self, variational: bool = True, **model: Any) -> nn.Module:
        """GeoLDM's first stage (``objective.name=autoencoder``): :class:`.autoencoder.MoleculeAutoencoder`."""
        from polydiff.config import call_checked

        from .autoencoder import MoleculeAutoencoder

        given = {"atomic_numbers": [SYMBOL_Z[s] for s in self.atom_types], "variational": variational}
        given.update(one_hot_scale=ONE_HOT_SCALE, charge_scale=CHARGE_SCALE)
        taken = sorted(set(given) & set(model))
        if taken:
            raise KeyError(f"model.{taken[0]} is set from the data and the objective; remove it from the recipe")
        if model.get("latent_features") == self.num_features:  # latent rows must differ from data rows (read back)
            raise ValueError(f"model.latent_features must differ from the {self.num_features} atom features")
        return call_checked(MoleculeAutoencoder, {**model, **given}, "model")

    # -------------------------------------------------------------- sampling
    def context_units(self) -> str:
        """The units ``prior.context`` (and the training property) is in, in words."""
        return self.conditioning.units

    def parse_label(self, value: Any) -> int:
        raise ValueError(
            "the molecule domain has no class labels: condition on a property with prior.context=VALUE "
            f"({self.condition_on or 'the property set by domain.condition_on'} in {self.context_units()})"
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
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            cpu = torch.Generator().manual_seed(seed)
        prop = self.conditioning
        draw_context = bool(self.condition_on) and context is None and bool(prop.pairs)
        ctx_raw: Optional[Tensor] = None
        if num_atoms is not None:
            counts = self._given_counts(num_atoms, n)
            if draw_context:
                ctx_raw = prop.given_counts(counts, cpu)
        elif draw_context:
            counts, ctx_raw = prop.draw_pairs(n, cpu)
        else:
            if not self.num_atoms_hist:
                raise RuntimeError(
                    "no atom-count histogram: call setup(train_set), load_state_dict, or pass prior.num_atoms"
                )
            probs = torch.tensor(self.num_atoms_hist, dtype=torch.float)
            counts = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=cpu)
        batch = torch.repeat_interleave(torch.arange(n), counts).to(device)
        cond: dict[str, Tensor] = {"batch": batch}
        if self.condition_on:
            if context is not None:
                ctx_raw = prop.asked(context, n)
            null = torch.full((n, 1), float("nan"))
            cond["context"] = (prop.normalise(ctx_raw) if ctx_raw is not None else null).to(device)
        elif context is not None:
            raise ValueError("prior.context given, but this model is unconditional (domain.condition_on is not set)")
        return RaggedSpace(batch, n, 3 + self.num_features, centered=(0, 1, 2)), cond

    def _given_counts(self, num_atoms: int | Sequence[int], n: int) -> Tensor:
        """``prior.num_atoms`` as atom counts ``[n]``; warned when far beyond the training molecules."""
        values = list(num_atoms) if isinstance(num_atoms, (list, tuple)) else [num_atoms] * n
        if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(
                f"prior.num_atoms must be a positive int or a list of {n} positive ints, got {num_atoms!r}"
            )
        counts = torch.tensor(values, dtype=torch.long)
        seen = len(self.num_atoms_hist) - 1
        if seen > 0 and int(counts.max()) > 2 * seen:
            log.warning(
                "prior.num_atoms=%d is over twice the largest training molecule (%d atoms): expect poor "
                "molecules, and the fully connected EGNN's memory grows with the square of the count",
                int(counts.max()),
                seen,
            )
        return counts

    # ------------------------------------------------------------ likelihood
    def discrete_features(self) -> DiscreteFeatures:
        """EDM's decoders of the features (Hoogeboom et al. 2022, App. B): atom types categorical, atomic numbers
        (EDM's charges) integer, each in its unscaled units."""
        k = len(self.atom_types)
        return DiscreteFeatures(tuple(range(3, 3 + k)), ONE_HOT_SCALE, (3 + k,), CHARGE_SCALE)

    def log_prob_layout(self, batch: Batch) -> Tensor:
        """``log p(N)`` ``[B]`` of each molecule's atom count under the training histogram (EDM's ``DistributionNodes``,
        with its ``log(p + 1e-30)``: -69.1 for a count never seen in training)."""
        if not self.num_atoms_hist:
            raise RuntimeError(
                "no atom-count histogram for log p(N): call setup(train_set) or load a checkpoint that has one"
            )
        counts = torch.bincount(batch.cond["batch"].cpu(), minlength=batch.num_samples)  # [B] atoms per molecule
        hist = torch.tensor(self.num_atoms_hist, dtype=torch.float64)  # [max N + 1]
        probs = torch.cat([hist / hist.sum(), hist.new_zeros(1)])  # [max N + 2]: the last for unseen larger counts
        return torch.log(probs[counts.clamp(max=len(hist))] + 1e-30)

    # --------------------------------------------------------------- outputs
    def make_outputs(self) -> MoleculeOutputs:
        return MoleculeOutputs(self)

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

    def train_smiles(self) -> Optional[set[str]]:
        """EDM-pipeline SMILES of the training conformers (for novelty), or ``None`` without data."""
        if self._train_smiles is None:
            try:
                mols = real_molecules(self.dataset("train"), self.atom_types)
            except (FileNotFoundError, ValueError) as err:
                log.warning("novelty not computed: training data unavailable (%s)", err)
                return None
            self._train_smiles = smiles_of(mols)
        return self._train_smiles

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "atom_types": list(self.atom_types),
            "num_atoms_hist": list(self.num_atoms_hist),
            **self.conditioning.state_dict(),  # condition_on, context_stats, context_range, context_pairs
            "train_smiles": sorted(self._train_smiles) if self._train_smiles is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("atom_types", self.atom_types)) != self.atom_types:
            raise ValueError(
                f"checkpoint atom types {state['atom_types']} differ from domain.atom_types={self.atom_types}"
            )
        self.num_atoms_hist = list(state.get("num_atoms_hist", []))
        self.conditioning.load_state_dict(state)
        smiles = state.get("train_smiles")
        self._train_smiles = set(smiles) if smiles is not None else None
