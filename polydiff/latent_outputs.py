"""A latent domain's outputs in the data's space: samples decoded before they are saved, scored, shown or held in
part (``polydiff sample --known``), and the first stage's reconstruction row, the ceiling the latent sets. A ragged
latent's rows (GeoLDM's per-atom latents, Xu et al. 2023) are read, encoded, held and decoded by the helpers at the end.

:class:`polydiff.latent.LatentDomain` makes its outputs here; nothing here imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .domain import Domain
from .outputs import Outputs
from .space import DenseSpace, RaggedSpace
from .state import Batch, Known

__all__ = [
    "LatentOutputs",
    "RaggedLatentOutputs",
    "latent_mask",
    "first_stage_row",
    "stacked",
    "ragged_rows",
    "encode_rows",
]


def stacked(domain: Domain, split: str, chunk: int = 256) -> tuple[Tensor, Optional[Tensor]]:
    """The whole ``split`` of ``domain`` collated: ``x [N, *data]``, labels ``[N]`` or ``None``."""
    data = domain.dataset(split)
    xs, ys = [], []
    for start in range(0, len(data), chunk):
        batch = domain.collate([data[i] for i in range(start, min(len(data), start + chunk))])
        if not isinstance(batch.space, DenseSpace):
            raise ValueError(
                f"a dense first stage needs a dense domain, and {domain.name!r} collates a {type(batch.space).__name__}"
                ": give the run of a ragged first stage (polydiff.first_stage.RaggedFirstStage, e.g. "
                "recipes/molecule_autoencoder.yaml), or remove the latent section"
            )
        xs.append(batch.x)
        if "label" in batch.cond:
            ys.append(batch.cond["label"])
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def latent_mask(mask: Tensor, data_shape: Sequence[int], latent_shape: Sequence[int], margin: int = 1) -> Tensor:
    """Where a latent is known, from where the data are (``mask`` broadcastable to ``[B, *data_shape]``): a latent
    position whose stretch of the data (the data's axes after the channels, pooled proportionally onto the latent's)
    is known in every channel, less ``margin`` positions at each border with the unknown part, since an encoder's
    receptive field reaches beyond its own stretch. Returns ``[B, 1, *latent_shape[1:]]`` (bool, over the latent's
    channels), the part of the latent that a replacement sampler holds to the encoded clip."""
    data_shape, latent_shape = tuple(data_shape), tuple(latent_shape)
    if len(data_shape) != len(latent_shape) or not 2 <= len(data_shape) <= 4:
        raise ValueError(
            f"--known maps a data mask of shape {data_shape} to latents of shape {latent_shape}: both need channels "
            "and the same 1 to 3 axes after them"
        )
    full = torch.broadcast_to(mask.bool(), (mask.shape[0], *data_shape))  # [B, *data]
    unknown = (~full.all(dim=1, keepdim=True)).float()  # [B, 1, *data axes]
    axes = len(data_shape) - 1
    pool = (nn.functional.adaptive_max_pool1d, nn.functional.adaptive_max_pool2d, nn.functional.adaptive_max_pool3d)
    unknown = pool[axes - 1](unknown, latent_shape[1:])  # [B, 1, *latent axes]: 1 where any of its stretch is
    if margin > 0:
        grow = (nn.functional.max_pool1d, nn.functional.max_pool2d, nn.functional.max_pool3d)[axes - 1]
        unknown = grow(unknown, 2 * margin + 1, stride=1, padding=margin)
    return unknown < 0.5


class LatentOutputs(Outputs):
    """The inner domain's outputs on decoded samples: files, metrics and reports stay in the data's space."""

    domain: Any  # a polydiff.latent.LatentDomain: its inner domain, encode, decode, sample_shape and spec

    def __init__(self, domain: Domain) -> None:
        super().__init__(domain)
        self._memo: Optional[tuple[Tensor, Batch]] = None  # the last batch decoded (saved, scored, shown in turn)
        self._kept: Optional[Known] = None  # the data a --known draw keeps, pasted back into its decoded samples

    def decoded(self, batch: Batch) -> Batch:
        """``batch`` in the data's space: latents are decoded, data (samples read back from files) kept as it is."""
        if tuple(batch.x.shape[1:]) != tuple(self.domain.sample_shape or ()):
            return batch
        if self._memo is not None and self._memo[0] is batch.x:
            return self._memo[1]
        with torch.no_grad():
            x = self.domain.decode(batch.x.float())  # [B, *data]
        if self._kept is not None:  # the kept stretch exactly as in the file, not its encoder-decoder rendering
            values, mask = (torch.broadcast_to(t.to(x.device), x.shape) for t in self._kept)
            x = torch.where(mask, values.to(x.dtype), x)
        out = Batch(x, DenseSpace(tuple(x.shape), device_=x.device), dict(batch.cond))
        self._memo = (batch.x, out)
        return out

    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        return self.domain.inner.save_samples(self.decoded(batch), out_dir, prefix)

    def read_samples(self, path: Path) -> Batch:
        return self.domain.inner.read_samples(path)

    def known_values(self, path: Path, n: int, **options: Any) -> Known:
        """The inner domain's kept part of the file at ``path``, in latent space: the clip encoded, and the latent
        positions whose stretch of the data is kept (:func:`latent_mask`, one position of margin). The samples
        drawn with it are decoded with the kept data pasted back exactly (the positions in the margin are generated,
        so the seam is the model's, not a cut). The outputs hold the kept data for every later decode (what
        ``polydiff sample --known`` saves and scores): draw unconditioned samples from another latent domain."""
        kept = self.domain.inner.known_values(path, n, **options)
        data_shape = tuple(kept.values.shape[1:])
        with torch.no_grad():
            z = self.domain.encode(kept.values.float())  # [1 or n, *latent]
        mask = latent_mask(kept.mask, data_shape, tuple(z.shape[1:]))  # [1 or n, 1, *latent axes]
        if not mask.any():
            raise ValueError(
                f"--known {path}: no latent position lies wholly in the kept part ({len(z.shape) - 2}-axis latents of "
                f"shape {tuple(z.shape[1:])}, one position of margin): keep a longer stretch of the clip"
            )
        self._kept = Known(kept.values.float(), kept.mask.bool())
        self._memo = None
        return Known(z, mask)

    def evaluate(self, batch: Batch) -> dict[str, float]:
        return self.domain.inner.evaluate(self.decoded(batch))

    def reference_metrics(self, n: int) -> dict[str, float]:
        return self.domain.inner.reference_metrics(n)

    def report_items(self, samples: Batch | Sequence[Path], limit: Optional[int] = None) -> list:
        if isinstance(samples, Batch):
            samples = self.decoded(samples)
        return self.domain.inner.outputs.report_items(samples, limit)

    def reconstruction_metrics(self, n: int, seed: int = 0) -> dict[str, float]:
        """The first stage's ceiling: :func:`first_stage_row` of the latent domain's encode-decode."""
        return first_stage_row(self.domain.inner, lambda x: self.domain.decode(self.domain.encode(x)), n, seed)


def first_stage_row(inner: Domain, reconstruct: Callable[..., Tensor], n: int, seed: int = 0) -> dict[str, float]:
    """A first stage's row: ``inner``'s metrics on ``n`` reconstructed held-out items (the reference row's subset:
    a seeded permutation), plus the inner outputs' ``reconstruction_distances(x, x_hat)`` where it has one. A ragged
    domain's ``reconstruct(x, batch)`` takes the rows' batch index (:func:`ragged_row`)."""
    split = getattr(inner, "reference_split", "test")
    data = inner.dataset(split)
    if len(data) and isinstance(inner.collate([data[0]]).space, RaggedSpace):
        return ragged_row(inner, split, reconstruct, n, seed)
    x, labels = stacked(inner, split)
    count = max(2, min(int(n), len(x)))
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count]
    x = x[idx]  # [n, *data]
    with torch.no_grad():
        x_hat = torch.cat([reconstruct(x[i : i + 64]).float().cpu() for i in range(0, count, 64)])  # [n, *data]
    cond = {"label": labels[idx]} if labels is not None and inner.num_classes else {}
    row = dict(inner.evaluate(Batch(x_hat, DenseSpace(tuple(x_hat.shape)), cond)))
    distances = getattr(inner.outputs, "reconstruction_distances", None)
    if distances is not None:
        row.update(distances(x, x_hat))
    return {**row, "num_samples": count}


# ------------------------------------------------------------------ ragged (GeoLDM: per-row latents of molecules)
def ragged_rows(domain: Domain, split: str, chunk: int = 256) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """The whole ``split`` of a ragged ``domain`` collated: rows ``x [N, D]`` (each item's rows together, in item
    order), rows per item ``counts [M]`` and the space's centred columns."""
    data = domain.dataset(split)
    xs, counts, centered = [], [], ()
    for start in range(0, len(data), chunk):
        batch = domain.collate([data[i] for i in range(start, min(len(data), start + chunk))])
        space = batch.space
        if not isinstance(space, RaggedSpace):
            raise ValueError(f"{domain.name!r} collates a {type(space).__name__}, not a RaggedSpace")
        count = torch.bincount(space.batch, minlength=space.num_samples)  # [b]
        if not torch.equal(space.batch, segments(count)):
            raise ValueError(f"{domain.name!r} collates rows out of item order: a ragged latent needs them in order")
        xs.append(batch.x)
        counts.append(count)
        centered = tuple(space.centered)
    return torch.cat(xs), torch.cat(counts), centered


def segments(counts: Tensor) -> Tensor:
    """The item index of each row ``[N]`` from rows per item ``counts [M]`` (items' rows together, in order)."""
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)


def encode_rows(encode: Callable[..., Tensor], x: Tensor, counts: Tensor, chunk: int = 64) -> Tensor:
    """``encode(rows, batch=...)`` over ``chunk`` items at a time: rows ``x [N, D]`` -> ``[N, D']``."""
    ends = torch.cumsum(counts, 0).tolist()  # [M]
    out = []
    for start in range(0, len(counts), chunk):
        stop = min(len(counts), start + chunk)
        lo, hi = (ends[start - 1] if start else 0), ends[stop - 1]
        out.append(encode(x[lo:hi], batch=segments(counts[start:stop])))
    return torch.cat(out) if out else x.new_zeros((0, 0))


class RaggedLatentSet(Dataset):
    """Encoded rows of ragged items: ``(z_i [n_i, D'], the inner item)`` pairs; the inner item gives the conditions."""

    def __init__(self, z: Tensor, counts: Tensor, items: Dataset) -> None:
        self.z, self.items, self.ends = z, items, torch.cumsum(counts, 0).tolist()  # [N, D'], inner split, [M]

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        return self.z[(self.ends[i - 1] if i else 0) : self.ends[i]], self.items[i]


def ragged_row(inner: Domain, split: str, reconstruct: Callable[..., Tensor], n: int, seed: int) -> dict[str, float]:
    """:func:`first_stage_row` of a ragged domain: its metrics on ``n`` reconstructed held-out items (a seeded
    permutation), the RMSE of the centred columns (``coordinate_rmse``: positions) and the share of rows whose other
    columns are reconstructed to 1e-4 (``feature_match``: the atom types and charges of a molecule)."""
    data = inner.dataset(split)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: max(2, min(int(n), len(data)))]
    count = len(idx)
    batch = inner.collate([data[int(i)] for i in idx])
    counts = torch.bincount(batch.space.batch, minlength=count)  # [count]
    with torch.no_grad():
        x_hat = encode_rows(lambda x, batch: reconstruct(x, batch=batch).float().cpu(), batch.x, counts)  # [N, D]
    row = dict(inner.evaluate(Batch(x_hat, batch.space, batch.cond)))
    cols = torch.zeros(x_hat.shape[1], dtype=torch.bool)
    cols[list(batch.space.centered)] = True
    err = x_hat - batch.x.float()  # [N, D]
    row["coordinate_rmse"] = float(err[:, cols].square().mean().sqrt()) if cols.any() else float("nan")
    row["feature_match"] = float((err[:, ~cols].abs() < 1e-4).all(1).float().mean()) if (~cols).any() else 1.0
    return {**row, "num_samples": count}


class RaggedLatentOutputs(LatentOutputs):
    """:class:`LatentOutputs` of a ragged latent (a ``polydiff.latent.RaggedLatentDomain``): latent rows decoded
    with their batch index into the data's rows before they are saved, scored or shown."""

    def decoded(self, batch: Batch) -> Batch:
        """``batch`` in the data's space: latent rows ``[N, D']`` decoded, data rows (read from files) kept."""
        if tuple(batch.x.shape[1:]) != tuple(self.domain.sample_shape or ()):
            return batch
        if self._memo is not None and self._memo[0] is batch.x:
            return self._memo[1]
        space = batch.space
        with torch.no_grad():
            x = self.domain.decode(batch.x.float(), space.batch)  # [N, D]
        out = Batch(
            x, RaggedSpace(space.batch, space.num_samples, x.shape[1], centered=space.centered), dict(batch.cond)
        )
        self._memo = (batch.x, out)
        return out

    def known_values(self, path: Path, n: int, **options: Any) -> Known:
        raise ValueError(
            f"--known {path}: a ragged latent model (latent.autoencoder={self.domain.spec}) holds no part of a sample "
            "fixed; draw without --known, or train a data-space model for it"
        )

    def reconstruction_metrics(self, n: int, seed: int = 0) -> dict[str, float]:
        """The first stage's ceiling: :func:`first_stage_row` of the encode-decode of molecules' rows."""
        domain = self.domain
        return first_stage_row(domain.inner, lambda x, batch: domain.decode(domain.encode(x, batch), batch), n, seed)
