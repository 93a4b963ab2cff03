"""Latent diffusion: a dense domain seen through an autoencoder (Rombach et al. 2022; AudioLDM, Liu et al. 2023).

The recipe's top-level ``latent`` section (``latent.autoencoder=mel`` or ``=RUN_DIR``) wraps the domain in a
:class:`LatentDomain`: training data are encoded once (cached on disk, keyed by the autoencoder's identity and the
data), normalised by the training latents' mean and standard deviation (Stable Diffusion's scale factor, with a
shift), and the diffusion network is the inner domain's own, built for the latent shape. Samplers, guidance and
chunking see a dense latent tensor; samples are decoded before they are saved or scored, so files and metrics stay
in the data's space. The inner domain supplies its autoencoder with ``autoencoder(spec)`` and its network for a
latent shape with ``latent_network(shape, **model)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .checkpoint import atomic_save
from .domain import Domain
from .latent_outputs import (
    LatentOutputs,
    RaggedLatentOutputs,
    RaggedLatentSet,
    encode_rows,
    first_stage_row,
    latent_mask,
    ragged_rows,
    stacked,
)
from .space import DenseSpace, RaggedSpace, Space
from .state import Batch

__all__ = [
    "Autoencoder",
    "LatentDomain",
    "LatentOutputs",
    "RaggedLatentDomain",
    "LatentSet",
    "latent_domain",
    "latent_mask",
    "latent_cache_dir",
    "reconstruction_row",
    "first_stage_row",
    "stacked",
]

log = logging.getLogger(__name__)

# Bump when the cached latents' layout or their encoding pipeline changes.
CACHE_VERSION = 1


class Autoencoder(Protocol):
    """What a domain's ``autoencoder(spec)`` returns: a fixed or trained first stage."""

    #: A hash of everything that shapes the latents (settings, weights): the cache key and the checkpoint's check.
    identity: str

    def encode(self, x: Tensor) -> Tensor:  # [B, *data] -> [B, *latent]
        ...

    def decode(self, z: Tensor) -> Tensor:  # [B, *latent] -> [B, *data]
        ...


def latent_cache_dir() -> Path:
    """Where encoded training sets are cached (``$POLYDIFF_CACHE/latent`` or ``~/.cache/polydiff/latent``)."""
    return Path(os.environ.get("POLYDIFF_CACHE", Path.home() / ".cache" / "polydiff")) / "latent"


def is_run_path(spec: str) -> bool:
    """Whether ``latent.autoencoder`` names a run folder or checkpoint (a path) rather than a fixed stage (a name)."""
    return os.sep in spec or "/" in spec or spec.endswith(".pt") or Path(spec).expanduser().exists()


def with_absolute_autoencoder(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with a run-folder ``latent.autoencoder`` made absolute, as the run saves it: its samples and
    evaluations then find the first stage from any working folder."""
    spec = (cfg.get("latent") or {}).get("autoencoder")
    if not isinstance(spec, str) or not spec.strip() or not is_run_path(spec):
        return cfg
    return {**cfg, "latent": {**cfg["latent"], "autoencoder": str(Path(spec).expanduser().resolve())}}


def latent_domain(
    domain: Domain, latent: Optional[Mapping[str, Any]], load_run: Optional[Callable[[str, Domain], Any]] = None
) -> Domain:
    """``domain`` in its latent version when the recipe's ``latent.autoencoder`` names a first stage, else as it is:
    a fixed stage the domain names (``domain.autoencoder(spec)``, e.g. ``mel``), or a trained autoencoder run
    (a path; ``load_run(spec, domain)`` loads and checks it)."""
    spec = (latent or {}).get("autoencoder")
    if spec is None:
        return domain
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"latent.autoencoder={spec!r}: give 'mel' (audio) or the run folder of a trained autoencoder")
    if is_run_path(spec) and load_run is not None:
        stage = load_run(spec, domain)
        return (RaggedLatentDomain if getattr(stage, "ragged", False) else LatentDomain)(domain, stage, spec)
    make = getattr(domain, "autoencoder", None)
    if make is None:
        raise ValueError(
            f"latent.autoencoder={spec!r}: domain {domain.name!r} ({type(domain).__name__}) supplies no fixed first "
            "stage of that name; give the run folder of an autoencoder trained on it (objective.name=autoencoder), "
            "or remove the latent section"
        )
    return LatentDomain(domain, make(spec), spec)


def reconstruction_row(domain: Domain, n: int) -> dict[str, Any]:
    """``{"reconstruction": metrics}`` of a latent domain's first stage on ``n`` held-out items (``{}`` for a
    data-space domain, or ``None`` with a warning where the data cannot be read)."""
    if not isinstance(domain, LatentDomain):
        return {}
    try:
        return {"reconstruction": domain.outputs.reconstruction_metrics(n)}
    except (FileNotFoundError, ValueError, OSError) as err:
        log.warning("no first-stage reconstruction row: the held-out data could not be read (%s)", err)
        return {"reconstruction": None}


class LatentSet(Dataset):
    """Encoded items: ``(z [*latent], label)`` pairs, or ``z`` alone for unlabelled data."""

    def __init__(self, z: Tensor, labels: Optional[Tensor]) -> None:
        self.z, self.labels = z, labels  # [N, *latent], [N] or None

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> Any:
        return self.z[i] if self.labels is None else (self.z[i], int(self.labels[i]))


class LatentDomain(Domain):
    """A dense domain diffused in an autoencoder's latent space; data, labels, files and metrics are the inner one's."""

    def __init__(self, inner: Domain, autoencoder: Autoencoder, spec: str) -> None:
        # Domain.__init__ is not called: class names belong to the inner domain (a property here).
        self.inner, self.autoencoder, self.spec = inner, autoencoder, spec
        self.name = inner.name
        self.guidance_keys = inner.guidance_keys
        self.sample_shape: Optional[tuple[int, ...]] = None  # the latent shape, once known
        self.shift, self.scale = 0.0, 1.0  # z = (encode(x) - shift) / scale
        # Per channel of the latent: the normalised training latents' range, which decode clamps to (None: no clamp).
        self.low: Optional[Tensor] = None  # [C']
        self.high: Optional[Tensor] = None  # [C']
        self._sets: dict[str, LatentSet] = {}
        self._measured = False  # shift and scale measured on the training latents, or loaded from a checkpoint

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return self.inner.class_names

    @class_names.setter
    def class_names(self, names: list[str]) -> None:
        self.inner.class_names = names

    def default_labels(self, n: int, device: torch.device | str = "cpu") -> Optional[Tensor]:
        return self.inner.default_labels(n, device)

    def can_guide(self) -> bool:
        return self.inner.can_guide()

    # ------------------------------------------------------------------ data
    def encode(self, x: Tensor) -> Tensor:
        """Data ``[B, *data]`` -> normalised latents ``[B, *latent]``."""
        return (self.autoencoder.encode(x) - self.shift) / self.scale

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents ``[B, *latent]`` -> data ``[B, *data]``, each channel first clamped to the training
        latents' range (logged): a sampled latent beyond it is no data the first stage has seen, and the mel stage's
        exponential turns an overshoot into clipped noise."""
        if self.low is not None and self.high is not None:
            view = (1, -1) + (1,) * (z.dim() - 2)
            low, high = self.low.to(z).view(view), self.high.to(z).view(view)  # [1, C', 1, ...]
            outside = int(((z < low) | (z > high)).sum())
            if outside:
                log.info(
                    "decode: %d of %d latent values (%.2f%%) clamped to the training latents' per-channel range",
                    outside,
                    z.numel(),
                    100.0 * outside / z.numel(),
                )
                z = torch.maximum(torch.minimum(z, high), low)
        return self.autoencoder.decode(z * self.scale + self.shift)

    def _raw(self, split: str) -> tuple[Tensor, Optional[Tensor]]:
        """The split's un-normalised latents and labels, encoded once and cached by the autoencoder and data."""
        x, labels = stacked(self.inner, split)

        def encode() -> Tensor:  # [N, *latent]
            return torch.cat([self.autoencoder.encode(x[i : i + 64]) for i in range(0, len(x), 64)])

        return self._cached(split, [x.detach().float()] + ([labels] if labels is not None else []), encode), labels

    def _cached(self, split: str, data: Sequence[Tensor], encode: Callable[[], Tensor]) -> Tensor:
        """``encode()`` (latents ``[N, *latent]``) once, cached by the autoencoder's identity and the ``data``."""
        h = hashlib.sha1(json.dumps([CACHE_VERSION, self.autoencoder.identity, self.inner.name, split]).encode())
        for t in data:
            h.update(t.cpu().contiguous().numpy().tobytes())
        owner = self.inner.name or type(self.inner).__name__
        path = latent_cache_dir() / f"{owner}_{split}_{h.hexdigest()[:16]}.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("identity") == self.autoencoder.identity:
                log.info("latent %s split: %d encoded items read from %s", split, len(saved["z"]), path)
                return saved["z"]
            log.warning("%s was encoded by another autoencoder: encoding again", path)
        with torch.no_grad():
            z = encode()  # [N, *latent]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"z": z, "identity": self.autoencoder.identity}, path)
        log.info("latent %s split: %d items encoded to %s, cached in %s", split, len(z), tuple(z.shape[1:]), path)
        return z

    def dataset(self, split: str) -> LatentSet:
        if split not in self._sets:
            if split != "train" and not self._measured:
                self.dataset("train")  # the training latents fix the shift and scale
            if split == "train" and not self._measured:
                self.inner.setup(self.inner.dataset("train"))
            z, labels = self._raw(split)
            if split == "train" and not self._measured:
                self._measure(z)
                self._measured = True
            self._sets[split] = self._latent_set(split, z, labels)
        return self._sets[split]

    def _measure(self, z: Tensor) -> None:
        """Shift, scale and per-channel range from the training latents ``z [N, C', ...]``."""
        self.shift, self.scale = float(z.mean()), float(z.std())
        per_channel = ((z - self.shift) / self.scale).transpose(0, 1).flatten(1)  # [C', N * ...]
        self.low, self.high = per_channel.amin(1), per_channel.amax(1)

    def _latent_set(self, split: str, z: Tensor, labels: Optional[Tensor]) -> Dataset:
        return LatentSet((z - self.shift) / self.scale, labels)

    def collate(self, items: Sequence[Any]) -> Batch:
        """Latents stacked densely; labels only where the inner domain is conditional."""
        batch = Domain.collate(self, items)
        if not self.inner.num_classes:
            batch.cond.pop("label", None)
        return batch

    def setup(self, train_set: Dataset) -> None:
        if not isinstance(train_set, LatentSet):
            train_set = self.dataset("train")
        self.sample_shape = tuple(train_set.z.shape[1:])
        log.info(
            "latent %r (%s): %s -> %s, shift %.4g, scale %.4g, decoded latents clamped to %s",
            self.spec,
            self.inner.name,
            self.inner.sample_shape,
            self.sample_shape,
            self.shift,
            self.scale,
            "nothing"
            if self.low is None or self.high is None
            else f"[{float(self.low.min()):.3g}, {float(self.high.max()):.3g}] (per channel)",
        )

    # --------------------------------------------------------------- network
    def build_network(self, **model: Any) -> nn.Module:
        """The inner domain's network for the latent shape (``inner.latent_network(shape, **model)``)."""
        build = getattr(self.inner, "latent_network", None)
        if build is None:
            raise ValueError(
                f"latent.autoencoder={self.spec!r}: domain {self.inner.name!r} cannot build a network for a latent "
                "shape (it has no latent_network(shape, **model) method)"
            )
        if self.sample_shape is None:
            raise RuntimeError("the latent shape is unknown: call setup(train_set) or load_state_dict first")
        return build(self.sample_shape, **model)

    # -------------------------------------------------------------- sampling
    def prior(
        self,
        n: int,
        labels: Optional[Tensor] = None,
        device: torch.device | str = "cpu",
        generator: Optional[torch.Generator] = None,
        **options: Any,
    ) -> tuple[Space, dict[str, Tensor]]:
        """``n`` latents; the conditions are the inner domain's."""
        if options:
            raise KeyError(f"prior option(s) {sorted(options)} do not apply to a latent model (latent.autoencoder)")
        _, cond = self.inner.prior(n, labels=labels, device=device, generator=generator)
        return DenseSpace((n, *self.sample_shape), device_=torch.device(device)), cond

    # --------------------------------------------------------------- outputs
    def make_outputs(self) -> LatentOutputs:
        return LatentOutputs(self)

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The inner domain's state (so the plain domain loads it: ``polydiff eval RUN``) plus the latent's."""
        latent = {
            "autoencoder": self.spec,
            "identity": self.autoencoder.identity,
            "shape": list(self.sample_shape) if self.sample_shape else None,
            "shift": self.shift.tolist() if isinstance(self.shift, Tensor) else self.shift,
            "scale": self.scale.tolist() if isinstance(self.scale, Tensor) else self.scale,
            "low": self.low.tolist() if self.low is not None else None,
            "high": self.high.tolist() if self.high is not None else None,
        }
        return {**self.inner.state_dict(), "latent": latent}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        latent = state.get("latent")
        if latent is None:
            raise ValueError(
                "this checkpoint holds a data-space model, not a latent one: drop the latent section "
                f"(latent.autoencoder={self.spec!r})"
            )
        self.inner.load_state_dict({k: v for k, v in state.items() if k != "latent"})
        if latent["identity"] != self.autoencoder.identity:
            raise ValueError(
                f"latent.autoencoder={self.spec!r} has changed since this model was trained (identity "
                f"{latent['identity']} then, {self.autoencoder.identity} now): its latents would not match; restore "
                "that autoencoder or train the latent model again"
            )
        self.sample_shape = tuple(latent["shape"])
        self.shift, self.scale = (
            torch.tensor(v) if isinstance(v, list) else float(v) for v in (latent["shift"], latent["scale"])
        )  # a ragged latent's are per column
        # Checkpoints from before the clamp (no "low"/"high") decode unclamped, as they were trained and scored.
        low, high = latent.get("low"), latent.get("high")
        self.low = torch.tensor(low, dtype=torch.float32) if low is not None else None
        self.high = torch.tensor(high, dtype=torch.float32) if high is not None else None
        self._measured = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r}, autoencoder={self.spec!r})"


class RaggedLatentDomain(LatentDomain):
    """A ragged domain (rows grouped by a batch index: molecules) diffused in the latent rows of a trained
    :class:`polydiff.first_stage.RaggedFirstStage` (GeoLDM, Xu et al. 2023). The centred columns (coordinates) share
    one scale and no shift, every other column has a shift and scale of its own, so a zero centre of mass and E(3)
    equivariance survive (no clamp); layouts, conditions and prior options (``prior.num_atoms``) are the inner's."""

    def encode(self, x: Tensor, batch: Tensor) -> Tensor:  # data rows [N, D] -> normalised latent rows [N, D']
        return (self.autoencoder.encode(x, batch=batch) - self.shift.to(x)) / self.scale.to(x)

    def decode(self, z: Tensor, batch: Tensor) -> Tensor:  # latent rows [N, D'] -> data rows [N, D]
        return self.autoencoder.decode(z * self.scale.to(z) + self.shift.to(z), batch=batch)

    def _raw(self, split: str) -> tuple[Tensor, Tensor]:  # latent rows [N, D'], rows per item [M]
        x, counts, self.centered = ragged_rows(self.inner, split)
        return self._cached(split, [x.float(), counts], lambda: encode_rows(self.autoencoder.encode, x, counts)), counts

    def _measure(self, z: Tensor) -> None:
        cols = torch.zeros(z.shape[1], dtype=torch.bool)
        cols[list(self.centered)] = True  # [D']: the coordinates
        self.shift = torch.where(cols, 0.0, z.mean(0))  # [D']
        self.scale = torch.where(cols, z[:, cols].square().mean().sqrt(), z.std(0)).clamp(min=1e-6)  # [D']

    def _latent_set(self, split: str, z: Tensor, counts: Tensor) -> RaggedLatentSet:
        return RaggedLatentSet((z - self.shift) / self.scale, counts, self.inner.dataset(split))

    def collate(self, items: Sequence[tuple[Tensor, Any]]) -> Batch:
        """Latent rows ``[N, D']`` in the inner domain's layout and with its conditions."""
        inner, z = self.inner.collate([item for _, item in items]), torch.cat([z for z, _ in items])
        space = inner.space
        return Batch(z, RaggedSpace(space.batch, space.num_samples, z.shape[1], centered=space.centered), inner.cond)

    def setup(self, train_set: Dataset) -> None:
        z = train_set.z if isinstance(train_set, RaggedLatentSet) else self.dataset("train").z  # [N, D']
        self.sample_shape = (int(z.shape[1]),)
        log.info("latent %r (%s): rows of %d columns, shift %s, scale %s", self.spec, self.inner.name,
                 self.sample_shape[0], self.shift.tolist(), self.scale.tolist())  # fmt: skip

    def prior(
        self,
        n: int,
        labels: Optional[Tensor] = None,
        device: torch.device | str = "cpu",
        generator: Optional[torch.Generator] = None,
        **options: Any,
    ) -> tuple[Space, dict[str, Tensor]]:
        """The inner prior's layout (its options: ``prior.num_atoms``) and conditions, with latent rows."""
        space, cond = self.inner.prior(n, labels=labels, device=device, generator=generator, **options)
        return RaggedSpace(space.batch, n, self.sample_shape[0], centered=space.centered), cond

    def make_outputs(self) -> RaggedLatentOutputs:
        return RaggedLatentOutputs(self)
