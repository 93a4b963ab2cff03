"""Couplings of noise and data for flow matching: which noise sample each data sample is paired with.

Every coupling here permutes or rotates draws of an isotropic Gaussian, so each noise sample keeps its law and
the learned flow still starts from the prior; the paths it pairs are shorter and cross less.

* ``independent``: the noise as drawn (conditional flow matching, Lipman et al. 2023).
* ``ot``: minibatch optimal transport on dense states, the noise samples permuted to minimise the summed squared
  distance to the data (OT-CFM, Tong et al. 2024, Alg. 3).
* ``aligned``: per sample of a ragged state, the noise's rows permuted within groups of equal data features (atoms
  of one element) and its centred columns rotated onto the data by Kabsch's method (EquiFM, Song et al. 2023).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .space import DenseSpace, RaggedSpace, Space

__all__ = ["COUPLINGS", "couple", "kabsch_rotation"]

COUPLINGS = ("independent", "ot", "aligned")


def couple(kind: str, x0: Tensor, eps: Tensor, space: Space) -> Tensor:
    """The noise ``eps`` re-paired with the data ``x0`` by coupling ``kind`` (same shape and law as ``eps``)."""
    if kind == "independent":
        return eps
    if kind == "ot":
        return _minibatch_ot(x0, eps, space)
    if kind == "aligned":
        return _aligned(x0, eps, space)
    raise KeyError(f"unknown objective.coupling {kind!r}; choose one of {list(COUPLINGS)}")


def _assignment(cost: Tensor) -> Tensor:
    """The column matched to each row by the Hungarian method (SciPy), minimising the summed cost ``[n, n]``."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
    order = torch.empty(len(rows), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return order


def _minibatch_ot(x0: Tensor, eps: Tensor, space: Space) -> Tensor:
    if not isinstance(space, DenseSpace):
        raise ValueError(
            "objective.coupling=ot pairs whole samples of a dense state; a ragged state (molecules) has samples of "
            "different sizes: use objective.coupling=aligned"
        )
    if space.mask is not None and space.mask.dim() == len(space.shape) and space.mask.shape[0] > 1:
        raise ValueError(
            "objective.coupling=ot would move noise between samples with different masks (padding would get "
            "noise): use objective.coupling=independent for masked states"
        )
    cost = torch.cdist(x0.flatten(1).double(), eps.flatten(1).double()) ** 2  # [B, B]
    return eps[_assignment(cost).to(eps.device)]


def kabsch_rotation(source: Tensor, target: Tensor) -> Tensor:
    """The proper rotation ``R`` ``[d, d]`` minimising ``|source R^T - target|`` for centred rows ``[n, d]``
    (Kabsch 1976), with the reflection removed."""
    h = source.double().T @ target.double()  # [d, d]
    u, _, vt = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(vt.T @ u.T))
    fix = torch.ones(h.shape[0], dtype=h.dtype, device=h.device)
    fix[-1] = d
    return (vt.T * fix) @ u.T


def _aligned(x0: Tensor, eps: Tensor, space: Space) -> Tensor:
    if not isinstance(space, RaggedSpace) or not space.centered:
        raise ValueError(
            "objective.coupling=aligned rotates the noise onto each sample's centred columns (atom positions): it "
            "needs a ragged state with centred columns; use objective.coupling=ot for dense states"
        )
    cols = list(space.centered)
    rest = [c for c in range(space.num_features) if c not in cols]
    out = eps.clone()
    batch = space.batch.cpu()
    for b in range(space.num_samples):
        rows = (batch == b).nonzero().flatten().to(eps.device)  # [n]
        if rows.numel() < 2:
            continue
        data, noise = x0[rows], out[rows]
        # Permute within groups of identical data features (an element's atoms), by position distance.
        features = data[:, rest].cpu()
        keys = {tuple(f.tolist()) for f in features} if rest else {()}
        order = torch.arange(rows.numel())
        for key in keys:
            group = torch.arange(rows.numel())[(features == torch.tensor(key)).all(dim=1)] if rest else order.clone()
            if group.numel() > 1:
                cost = torch.cdist(data[group][:, cols].double(), noise[group][:, cols].double()) ** 2
                order[group] = group[_assignment(cost)]
        noise = noise[order.to(eps.device)]
        rot = kabsch_rotation(noise[:, cols], data[:, cols]).to(eps.dtype)
        noise[:, cols] = noise[:, cols] @ rot.T
        out[rows] = noise
    return out
