"""Conditioning molecules on one property (EDM, Hoogeboom et al. 2022, Sec. 3.5): its training statistics, the values
drawn for new molecules, and the predictor fitted to score what the samples hold (EDM Sec. 5.3).

The network sees the property normalised by the training mean and mean absolute deviation (EDM's scaling);
sampling draws (atom count, property) pairs of training molecules jointly, or the property given the atom count
(EDM's p(c | N)), unless ``prior.context`` sets it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .properties import PropertyPredictor
from .qm9 import QM9_UNITS

__all__ = ["PropertyConditioning", "fit_predictor", "property_units"]

log = logging.getLogger(__name__)

#: A ``prior.context`` value further than this many mean absolute deviations from the training
#: mean is far outside the training distribution (warned: the model extrapolates).
CONTEXT_FAR_MADS = 4.0
#: (atom count, property) pairs of training molecules kept in the checkpoint to draw from.
MAX_PAIRS = 2000


def property_units(name: Optional[str], source: str, path: Optional[str]) -> str:
    """The units, in words, of the property ``name`` of a source: torch_geometric's for QM9, else the SD tag's."""
    if name is None:
        return "no property: domain.condition_on is not set"
    if source == "qm9" and name in QM9_UNITS:
        meV = " (EDM's tables give meV: divide by 1000)" if name in ("homo", "lumo", "gap") else ""
        hartree = ", not the csv's Hartree" if QM9_UNITS[name] == "eV" else ""
        return f"{QM9_UNITS[name]}, torch_geometric's QM9 units{hartree}{meV}"
    return f"the units of the SD tag {name!r} in {path}"


class PropertyConditioning:
    """The training distribution of the conditioning property ``name`` and the values drawn from it for sampling."""

    def __init__(self, name: Optional[str], units: str, seed: int = 0) -> None:
        self.name, self.units, self.seed = name, units, seed
        self.stats: Optional[tuple[float, float]] = None  # (mean, mean absolute deviation), EDM
        self.range: Optional[tuple[float, float]] = None  # (min, max) of the training property
        self.pairs: list[tuple[int, float]] = []  # (num_atoms, property in its data units) to sample context jointly

    def fit(self, sizes: Sequence[int], values: np.ndarray) -> None:
        """Statistics and a seeded sample of (atom count, property) pairs of the training molecules."""
        mean = float(values.mean())
        mad = float(np.abs(values - mean).mean()) or 1.0
        self.stats = (mean, mad)
        self.range = (float(values.min()), float(values.max()))
        pick = np.random.RandomState(self.seed).choice(len(values), size=min(len(values), MAX_PAIRS), replace=False)
        self.pairs = [(sizes[i], float(values[i])) for i in pick]

    def normalise(self, y: Tensor) -> Tensor:
        """The property in the network's scale (EDM: minus the training mean, over the mean absolute deviation)."""
        mean, mad = self.stats  # type: ignore[misc]
        return (y - mean) / mad

    def denormalise(self, y: Tensor) -> Tensor:
        """The property back in its units, from the network's scale (NaN, a null condition, stays NaN)."""
        mean, mad = self.stats  # type: ignore[misc]
        return y * mad + mean

    def asked(self, context: float | Sequence[float], n: int) -> Tensor:
        """``prior.context`` (one value or ``n``) as ``[n, 1]``, warned when far outside the training distribution."""
        vals = [float(context)] * n if isinstance(context, (int, float)) else [float(c) for c in context]
        if len(vals) != n:
            raise ValueError(f"prior.context must be one value or {n} values, got {len(vals)}")
        self._warn_far(vals)
        return torch.tensor(vals).unsqueeze(-1)

    def draw_pairs(self, n: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Atom counts ``[n]`` and property values ``[n, 1]`` of ``n`` training pairs drawn with replacement."""
        pick = torch.randint(len(self.pairs), (n,), generator=generator).tolist()
        counts = torch.tensor([self.pairs[i][0] for i in pick], dtype=torch.long)
        return counts, torch.tensor([[self.pairs[i][1]] for i in pick])

    def given_counts(self, counts: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """A training property value per molecule, drawn among training molecules of its atom count (EDM's
        p(c | N)), or of the nearest count seen: ``[n, 1]``."""
        pools = self._pools()
        nearest = {c: _nearest(pools, c) for c in set(counts.tolist())}
        if any(k != c for c, k in nearest.items()):
            log.warning(
                "no training molecule has %s atoms: their property values are drawn from the nearest atom "
                "count seen in training (give prior.context=VALUE to choose them)",
                sorted(c for c, k in nearest.items() if k != c),
            )
        picks = torch.rand(len(counts), generator=generator)
        values = [pools[nearest[c]][int(u * len(pools[nearest[c]]))] for c, u in zip(counts.tolist(), picks.tolist())]
        return torch.tensor(values).unsqueeze(-1)

    def mean_by_size(self, sizes: Sequence[int]) -> Optional[Tensor]:
        """The training property's mean among molecules of each atom count (the nearest count seen), ``[M]``:
        what the atom count alone tells of the property (EDM's "#Atoms" row); ``None`` without training pairs."""
        means = {k: float(np.mean(v)) for k, v in self._pools().items()}
        if not means:
            return None
        return torch.tensor([means[_nearest(means, n)] for n in sizes], dtype=torch.float64)

    def _pools(self) -> dict[int, list[float]]:
        """The sampled training property values by atom count."""
        pools: dict[int, list[float]] = {}
        for size, value in self.pairs:
            pools.setdefault(size, []).append(value)
        return pools

    def _bounds(self) -> tuple[float, float]:
        """(min, max) of the training property: recorded by :meth:`fit`, else the sampled pairs' (older checkpoints)."""
        if self.range is not None:
            return self.range
        ys = [y for _, y in self.pairs]
        return (min(ys), max(ys)) if ys else (float("nan"), float("nan"))

    def _warn_far(self, values: Sequence[float]) -> None:
        """Warn when a ``prior.context`` value lies far outside the training property's distribution."""
        if self.stats is None:
            return
        mean, mad = self.stats
        far = sorted({v for v in values if abs(v - mean) > CONTEXT_FAR_MADS * mad}, key=lambda v: -abs(v - mean))
        if not far:
            return
        lo, hi = self._bounds()
        log.warning(
            "prior.context=%g is far outside the training distribution of %s (%s): training mean %.4g, range "
            "[%.4g, %.4g], mean absolute deviation %.4g, so %g is %.1f deviations from the mean (warned beyond %g)%s. "
            "The model will extrapolate: give a value inside the training range, in those units",
            far[0],
            self.name,
            self.units,
            mean,
            lo,
            hi,
            mad,
            far[0],
            abs(far[0] - mean) / mad,
            CONTEXT_FAR_MADS,
            f"; {len(far) - 1} more value(s) as far" if len(far) > 1 else "",
        )

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's conditioning keys (as the domain state has held them since the first release)."""
        return {
            "condition_on": self.name,
            "context_stats": list(self.stats) if self.stats else None,
            "context_range": list(self.range) if self.range else None,
            "context_pairs": [list(p) for p in self.pairs],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        stats = state.get("context_stats")
        self.stats = (float(stats[0]), float(stats[1])) if stats else None
        bounds = state.get("context_range")  # absent from older checkpoints: the sampled pairs' range
        self.range = (float(bounds[0]), float(bounds[1])) if bounds else None
        self.pairs = [(int(a), float(b)) for a, b in state.get("context_pairs", [])]


def _nearest(pools: Mapping[int, Any], n: int) -> int:
    """The atom count of ``pools`` nearest ``n`` (the smaller on a tie)."""
    return min(pools, key=lambda k: (abs(k - n), k))


def fit_predictor(fit_set: Dataset, cache: Path, epochs: int, seed: int) -> Optional[PropertyPredictor]:
    """The predictor of the property behind EDM's property MAE, fitted on ``fit_set`` (the validation split, which
    the generative model never trains on) or read from ``cache``; ``None``, warned, with fewer than 2 molecules."""
    if len(fit_set) < 2:
        log.warning(
            "property MAE not computed: %d validation molecule(s) to fit its predictor on; enlarge the "
            "validation part of domain.split",
            len(fit_set),
        )
        return None
    items = [fit_set[i] for i in range(len(fit_set))]
    return PropertyPredictor(
        [(it["z"], it["pos"]) for it in items],
        torch.tensor([float(it["y"][0]) for it in items]),
        cache=cache,
        epochs=epochs,
        seed=seed,
    )
