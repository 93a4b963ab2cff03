"""GeoLDM's equivariant first stage for molecules (Xu et al. 2023, "Geometric Latent Diffusion Models for 3D Molecule
Generation"), trained by ``objective.name=autoencoder`` (recipes/molecule_autoencoder.yaml).

An EGNN encoder maps each atom (its zero-centre-of-mass position and EDM features) to a latent row of 3 equivariant
coordinates (kept at zero centre of mass) and ``latent_features`` invariant features (GeoLDM uses 1), with a
Gaussian posterior on the invariant part (``variational=false``: a plain autoencoder); an EGNN decoder maps latent
rows back to positions and atom-type logits. Loss: the position MSE plus the cross-entropy of the types. The charge
column (the atomic number, EDM's "charge") follows from the decoded type. Both networks are
:class:`.egnn.EGNN` with t = 0, no time embedding and an invariant head of the width the stage needs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polydiff.first_stage import RaggedFirstStage, segment_mean

from .egnn import EGNN

__all__ = ["MoleculeAutoencoder"]


def _egnn(in_features: int, out_features: int, hidden: int, layers: int, **egnn: float | bool) -> EGNN:
    """An :class:`EGNN` of ``in_features`` invariant inputs with an invariant head of ``out_features`` (t fixed)."""
    net = EGNN(in_features, hidden=hidden, layers=layers, time_embedding_dim=0, **egnn)
    net.out = nn.Linear(hidden, out_features)  # the head's width is the stage's, not the input's
    return net


def _centred(pos: Tensor, batch: Tensor, num_samples: int) -> Tensor:
    """``pos [N, 3]`` less each molecule's centre of mass (equal masses, as EDM)."""
    return pos - segment_mean(pos, batch, num_samples)[batch]


class MoleculeAutoencoder(RaggedFirstStage):
    """Atoms ``[N, 3 + F]`` (positions | one-hot / ``one_hot_scale`` | atomic number / ``charge_scale``) <-> latent
    rows ``[N, 3 + latent_features]``.

    Args (the recipe's ``model`` section; ``atomic_numbers`` and the scales come from the domain): ``latent_features``
    (k), ``hidden``, ``encoder_layers``, ``decoder_layers``, ``attention``, ``coords_range``, ``aggregation_norm`` of
    both EGNNs, ``coordinate_noise`` (the fixed std of the coordinates' posterior, in Angstrom; 0: deterministic) and
    the loss weights ``position_weight`` and ``type_weight``.
    """

    def __init__(
        self,
        atomic_numbers: Sequence[int],
        one_hot_scale: float = 4.0,
        charge_scale: float = 10.0,
        latent_features: int = 1,
        hidden: int = 256,
        encoder_layers: int = 1,
        decoder_layers: int = 9,
        attention: bool = True,
        coords_range: float = 15.0,
        aggregation_norm: float = 1.0,
        coordinate_noise: float = 0.0,
        position_weight: float = 1.0,
        type_weight: float = 1.0,
        variational: bool = True,
    ) -> None:
        super().__init__(variational, coordinate_noise)
        if latent_features < 1 or hidden < 1 or encoder_layers < 1 or decoder_layers < 1:
            raise ValueError(
                f"model.latent_features={latent_features}, model.hidden={hidden}, model.encoder_layers="
                f"{encoder_layers} and model.decoder_layers={decoder_layers} must each be >= 1"
            )
        self.latent_features = int(latent_features)
        self.num_types = len(atomic_numbers)
        self.one_hot_scale, self.charge_scale = float(one_hot_scale), float(charge_scale)
        self.position_weight, self.type_weight = float(position_weight), float(type_weight)
        self.register_buffer("charges", torch.tensor([float(z) for z in atomic_numbers]), persistent=False)  # [T]
        egnn = dict(attention=attention, coords_range=coords_range, aggregation_norm=aggregation_norm)
        k = self.latent_features * (2 if self.variational else 1)
        self.enc = _egnn(self.num_types + 1, k, hidden, encoder_layers, **egnn)
        self.dec = _egnn(self.latent_features, self.num_types, hidden, decoder_layers, **egnn)

    def encoder(self, x: Tensor, batch: Tensor) -> Tensor:  # [N, 3 + F] -> [N, 3 + k * (1 or 2)]
        b = int(batch.max()) + 1 if len(batch) else 0
        pos = _centred(x[:, :3], batch, b)  # [N, 3]: translation removed, so the latent is zero-CoM
        out = self.enc(torch.cat([pos, x[:, 3:]], dim=1), x.new_zeros(b), batch)  # [N, 3 + k']
        return torch.cat([pos + out[:, :3], out[:, 3:]], dim=1)

    def decoder(self, z: Tensor, batch: Tensor) -> Tensor:  # [N, 3 + k] -> [N, 3 + T]: positions | type logits
        b = int(batch.max()) + 1 if len(batch) else 0
        coords = _centred(z[:, :3], batch, b)  # [N, 3]
        out = self.dec(torch.cat([coords, z[:, 3:]], dim=1), z.new_zeros(b), batch)  # [N, 3 + T]
        return torch.cat([coords + out[:, :3], out[:, 3:]], dim=1)

    def reconstruction(self, x: Tensor, out: Tensor, batch: Tensor) -> Tensor:
        """``position_weight`` x the mean squared position error (per coordinate, Angstrom^2) + ``type_weight`` x
        the types' cross-entropy (nats per atom), per molecule ``[B]``."""
        b = int(batch.max()) + 1 if len(batch) else 0
        pos = _centred(x[:, :3], batch, b)  # [N, 3]
        types = x[:, 3 : 3 + self.num_types].argmax(-1)  # [N]
        per_atom = self.position_weight * (out[:, :3] - pos).square().mean(1)  # [N]
        per_atom = per_atom + self.type_weight * F.cross_entropy(out[:, 3:].float(), types, reduction="none")
        return segment_mean(per_atom, batch, b)

    def render(self, out: Tensor) -> Tensor:  # [N, 3 + T] -> data rows [N, 3 + T + 1]: argmax types, their charges
        types = out[:, 3:].argmax(-1)  # [N]
        one_hot = F.one_hot(types, self.num_types).to(out.dtype) / self.one_hot_scale  # [N, T]
        charge = self.charges.to(out)[types].unsqueeze(1) / self.charge_scale  # [N, 1]
        return torch.cat([out[:, :3], one_hot, charge], dim=1)
