"""A property predictor for property-conditional molecules (EDM, Hoogeboom et al. 2022, Sec. 5.3 and Table 3).

EDM scores a model conditioned on a QM9 property by the mean absolute error between the property
asked for and the one a separately trained predictor reads off each generated molecule; the
predictor's error on real held-out molecules is the lower bound, and the error against shuffled
targets (the property of another molecule) the upper bound. EDM's predictor is an EGNN trained on
the half of the training split that the generative model does not see; here it is PyTorch
Geometric's SchNet (Schütt et al. 2017) on fully connected molecules, fitted on the validation split,
which the generative model never trains on either.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from domains.classifier import seeded
from polydiff.checkpoint import atomic_save

from .egnn import fully_connected_edges

__all__ = ["PropertyPredictor", "property_errors"]

log = logging.getLogger(__name__)

#: (atomic numbers [n], positions [n, 3] in Angstrom) of one molecule.
Atoms = tuple[Tensor, Tensor]


#: SchNet's cutoff in Angstrom: every atom pair of a QM9 molecule (up to 12.04 apart) interacts.
CUTOFF = 15.0


def _interaction_graph(pos: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
    """SchNet's interaction graph: the ordered pairs of atoms of a molecule closer than :data:`CUTOFF`, and
    their distance (SchNet's cosine cutoff would weigh pairs beyond it again, being periodic)."""
    row, col = fully_connected_edges(batch)  # [E] each
    dist = (pos[row] - pos[col]).norm(dim=-1)  # [E]
    near = dist < CUTOFF
    return torch.stack([row[near], col[near]]), dist[near]  # [2, E'], [E']


def _schnet(hidden: int, interactions: int) -> nn.Module:
    from torch_geometric.nn.models import SchNet

    return SchNet(
        hidden_channels=hidden,
        num_filters=hidden,
        num_interactions=interactions,
        cutoff=CUTOFF,
        interaction_graph=_interaction_graph,
    )


def _collate(mols: Sequence[Atoms], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Atomic numbers ``[N]``, positions ``[N, 3]`` and the batch index ``[N]`` of ``mols``."""
    z = torch.cat([m[0] for m in mols]).long()
    pos = torch.cat([m[1] for m in mols]).float()
    batch = torch.repeat_interleave(torch.arange(len(mols)), torch.tensor([len(m[0]) for m in mols]))
    return z.to(device), pos.to(device), batch.to(device)


class PropertyPredictor:
    """SchNet regressing one property, fitted once (L1 loss on the property scaled by mean and mean absolute
    deviation, Adam with a one-cycle schedule) and cached by its data and settings; seeded on a forked RNG."""

    def __init__(
        self,
        train: Sequence[Atoms],
        targets: Tensor,
        cache: Optional[Path] = None,
        epochs: int = 10,
        hidden: int = 64,
        interactions: int = 3,
        batch_size: int = 64,
        lr: float = 1e-3,
        seed: int = 0,
        device: Optional[torch.device | str] = None,
    ) -> None:
        if len(train) < 2:
            raise ValueError(f"the property predictor needs at least 2 molecules to fit on, got {len(train)}")
        bad = int((~torch.isfinite(targets)).sum())
        if bad:
            raise ValueError(
                f"{bad} of the {len(targets)} molecules to fit the property predictor on have a non-finite "
                "property value: remove them from the data (or their NaN/inf tags from the SDF)"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        targets = targets.double().flatten()  # [M]
        self.mean = float(targets.mean())
        self.scale = float((targets - self.mean).abs().mean()) or 1.0
        # The network's own settings are in the key too, so a changed architecture never loads stale weights.
        key = self.cache_key(
            train, targets, f"schnet|{CUTOFF}|{epochs}|{hidden}|{interactions}|{batch_size}|{lr}|{seed}"
        )
        path = Path(cache) / f"molecule_property_{key}.pt" if cache is not None else None
        with seeded(seed):
            self.net = _schnet(hidden, interactions).to(self.device)
            if path is not None and path.is_file():
                self.net.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
            else:
                log.info("fitting the property predictor (SchNet, %d molecules, %d epochs) ...", len(train), epochs)
                with torch.enable_grad():
                    self._fit(train, ((targets - self.mean) / self.scale).float(), epochs, lr, seed)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_save(self.net.state_dict(), path)
        self.net.eval()

    @staticmethod
    def cache_key(train: Sequence[Atoms], targets: Tensor, settings: str) -> str:
        """16 hex digits of a SHA-1 over the fit settings, the molecules and their targets."""
        h = hashlib.sha1(settings.encode())
        for z, pos in train:
            h.update(z.long().numpy().tobytes())
            h.update(pos.float().numpy().tobytes())
        h.update(targets.double().numpy().tobytes())
        return h.hexdigest()[:16]

    def _fit(self, train: Sequence[Atoms], y: Tensor, epochs: int, lr: float, seed: int) -> None:
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        per_epoch = max(1, len(train) // self.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
        order = np.random.RandomState(seed)
        self.net.train()
        for _ in range(epochs):
            perm = order.permutation(len(train))
            for k in range(per_epoch):
                idx = perm[k * self.batch_size : (k + 1) * self.batch_size]
                pred = self.net(*_collate([train[i] for i in idx], self.device)).squeeze(-1)  # [b]
                loss = (pred - y[idx].to(self.device)).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()

    @torch.no_grad()
    def predict(self, mols: Sequence[Atoms]) -> Tensor:
        """The predicted property of each molecule ``[M]`` (float64, the property's units); NaN for an empty one or
        one with non-finite coordinates (a diverged sample)."""
        out = torch.full((len(mols),), float("nan"), dtype=torch.float64)
        keep = [i for i, m in enumerate(mols) if len(m[0]) > 0 and bool(torch.isfinite(m[1]).all())]
        for k in range(0, len(keep), 256):
            idx = keep[k : k + 256]
            pred = self.net(*_collate([mols[i] for i in idx], self.device)).squeeze(-1)  # [b]
            out[idx] = pred.double().cpu() * self.scale + self.mean
        return out


def property_errors(pred: Tensor, target: Tensor, seed: int = 0, by_size: Optional[Tensor] = None) -> dict[str, float]:
    """EDM's property MAE of ``pred [M]`` against ``target [M]``; against the targets shuffled among the molecules
    (the upper bound: a property unrelated to the molecule); and, given ``by_size [M]`` (the training mean of the
    property at each molecule's atom count), EDM's "#Atoms" baseline. Molecules asked for no value (NaN target)
    are left out, and so are those with no prediction (NaN coordinates): ``property_scored`` is the fraction of
    the asked-for molecules that were scored."""
    asked = ~target.isnan()
    ok = asked & ~pred.isnan()
    if not bool(asked.any()):
        return {}
    out = {"property_scored": float(ok.sum()) / float(asked.sum())}
    if not bool(ok.any()):
        return out
    pred, target = pred[ok].double(), target[ok].double()
    perm = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    out["property_mae"] = float((pred - target).abs().mean())
    out["property_mae_shuffled"] = float((pred - target[perm]).abs().mean())
    if by_size is not None:
        out["property_mae_num_atoms"] = float((by_size[ok].double() - target).abs().mean())
    return out
