"""The image domain: dense ``[B, C, H, W]`` states in ``[-1, 1]`` denoised by the shared 2-D U-Net.

It is the reference adapter showing that the domain-agnostic core serves images as well:
everything image-specific (data sources, the PNG grid, classifier metrics) lives here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from polydiff.domain import Batch, Domain
from polydiff.samplers import Known
from polydiff.space import DenseSpace

from domains.classifier import enough_to_score

from .data import ImageArrays, ImageSet, list_images, load_cifar10, load_digits_split, load_folder, read_sample_images
from .outputs import grid_layout, make_grid, save_grid

__all__ = ["ImageDomain", "SOURCES"]

log = logging.getLogger(__name__)

SOURCES = ("digits", "folder", "cifar10")
_FIXED_SIZE = {"digits": 8, "cifar10": 32}


def _own_sample_files(folder: Path) -> list[Path]:
    """The sample files :meth:`ImageDomain.save_samples` wrote under ``folder``: each ``NAME.pt`` beside its grid ``NAME.png``."""
    return sorted(p for p in folder.rglob("*.pt") if p.with_suffix(".png").is_file())


class ImageDomain(Domain):
    """Images from scikit-learn's digits, a folder of PNG/JPEG files, or a local CIFAR-10 copy.

    Args:
        source: ``"digits"`` (built in, 8x8 grayscale, 10 labels), ``"folder"`` (``root`` holds
            one sub-folder of images per class, or only images for an unlabelled set) or
            ``"cifar10"`` (``root`` holds ``cifar-10-batches-py``).
        root: data folder for ``folder`` and ``cifar10``.
        size: image side for ``folder`` (shorter side resized, then centre-cropped); the fixed
            sources accept only their own size (8 and 32).
        mode: ``"rgb"`` or ``"grayscale"`` for ``folder``.
        conditional: train a class-conditional model (needs labels).
        test_fraction, split_seed: the seeded stratified held-out split of ``digits`` and of
            folders without ``train``/``test`` sub-folders.
        hflip: random left-right flips in training (photos, not digits).
        grid_upscale: integer nearest-neighbour zoom of the PNG grid (``None``: tiles >= 32 px).
        metric_epochs: epochs of the metric classifier's fit.
    """

    def __init__(
        self,
        source: str = "digits",
        root: Optional[str] = None,
        size: Optional[int] = None,
        mode: Optional[str] = None,
        conditional: bool = True,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        hflip: bool = False,
        grid_upscale: Optional[int] = None,
        metric_epochs: int = 15,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"domain.source={source!r} is unknown; choose one of {list(SOURCES)}")
        if source in _FIXED_SIZE and size is not None and int(size) != _FIXED_SIZE[source]:
            raise ValueError(
                f"domain.size={size} is not available for source {source!r}: its images are "
                f"{_FIXED_SIZE[source]}x{_FIXED_SIZE[source]}; leave domain.size unset (null)"
            )
        if source != "folder" and mode is not None:
            raise ValueError(f"domain.mode applies to source 'folder' only; remove it for source {source!r}")
        if source in ("folder", "cifar10") and not root:
            raise ValueError(f"domain.root must be set for source {source!r} (the folder holding the images)")
        if source == "folder" and (size is None or int(size) < 1):
            raise ValueError(f"domain.size must be a positive integer for source 'folder', got {size!r}")
        if grid_upscale is not None and int(grid_upscale) < 1:
            raise ValueError(f"domain.grid_upscale must be >= 1 or null, got {grid_upscale}")
        self.source = source
        self.root = root
        self.size = int(size) if size is not None else _FIXED_SIZE.get(source)
        self.mode = (mode or "rgb") if source == "folder" else None
        self.conditional = bool(conditional)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.hflip = bool(hflip)
        self.grid_upscale = grid_upscale
        if int(metric_epochs) < 1:
            raise ValueError(f"domain.metric_epochs must be at least 1 (epochs of the metric classifier's fit), got {metric_epochs}")
        self.metric_epochs = int(metric_epochs)
        self._arrays: dict[str, ImageArrays] = {}
        self._scorer = None

    # ------------------------------------------------------------------ data
    def arrays(self, split: str) -> ImageArrays:
        """Raw uint8 pixels, labels and class names of ``split`` (read once, then kept)."""
        if split not in self._arrays:
            if self.source == "digits":
                arr = load_digits_split(split, self.test_fraction, self.split_seed)
            elif self.source == "folder":
                arr = load_folder(self.root, split, self.size, self.mode, self.test_fraction, self.split_seed)
            else:
                arr = load_cifar10(self.root, split)
            if self.conditional and arr.labels is None:
                raise ValueError(
                    f"domain.conditional=true but {self.root} has no class sub-folders: put images in one "
                    f"sub-folder per class, or set domain.conditional=false"
                )
            self._arrays[split] = arr
        return self._arrays[split]

    def dataset(self, split: str) -> ImageSet:
        return ImageSet(self.arrays(split), hflip=self.hflip and split == "train")

    def collate(self, items: Sequence[tuple[Tensor, int]]) -> Batch:
        """Images ``[B, C, H, W]`` stacked as :meth:`Domain.collate` does; labels ``[B]`` only when conditional."""
        batch = super().collate(items)
        if not self.conditional:
            batch.cond.pop("label")
        return batch

    def setup(self, train_set: Any) -> None:
        arr = train_set.arrays if isinstance(train_set, ImageSet) else self.arrays("train")
        self.sample_shape = tuple(int(s) for s in arr.images.shape[1:])
        self.class_names = list(arr.class_names) if self.conditional else []

    # --------------------------------------------------------------- network
    def build_network(self, **model: Any) -> nn.Module:
        """The shared U-Net with ``dims=2``; channels and classes come from the data."""
        from domains.unet import build_unet

        if self.sample_shape is None:
            raise RuntimeError("ImageDomain.build_network needs the sample shape: call setup(train_set) or load_state_dict first")
        return build_unet(2, self.sample_shape[0], self.num_classes, model, "image")

    # --------------------------------------------------------------- outputs
    def save_samples(self, batch: Batch, out_dir: Path, prefix: str = "samples") -> list[Path]:
        """``prefix.png`` (a grid, one row per label when conditional) and ``prefix.pt`` (raw tensors)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        x = batch.x.detach().float().cpu()  # [B, C, H, W]
        labels = batch.cond.get("label")
        rows = grid_layout(labels, len(x))
        up = self.grid_upscale or max(1, 32 // max(x.shape[-2:]))
        png = save_grid(make_grid(x, rows, upscale=up), out_dir / f"{prefix}.png")
        pt = out_dir / f"{prefix}.pt"
        saved = {"x": x, **{k: v.detach().cpu() for k, v in batch.cond.items()}, "class_names": list(self.class_names)}
        torch.save(saved, pt)
        return [png, pt]

    def read_samples(self, path: Path) -> Batch:
        """Images generated elsewhere (a file or a folder of PNG/JPEG, resized and centre-cropped to the
        trained size; labels from the first sub-folder level when it is a class name), or the ``.pt`` that
        :meth:`save_samples` writes (a folder holding such ``NAME.pt`` beside its grid ``NAME.png`` is read as those;
        other ``.pt`` files in a folder of images are ignored)."""
        path = Path(path)
        if path.suffix == ".pt":
            return super().read_samples(path)
        own = _own_sample_files(path) if path.is_dir() else []
        if own:  # polydiff's sample files: the tensors, not their grid PNGs
            other = [p for p in list_images(path, recursive=True) if p.with_suffix(".pt") not in own]
            if other:
                log.warning("%s: scored polydiff's sample files (%s); ignored %d other image(s), e.g. %s: give their "
                            "folder on its own to score them", path, ", ".join(f.name for f in own[:3]), len(other), other[0])
            read = super().read_samples
            return self.concat([read(f) for f in own])
        if path.is_dir() and not list_images(path, recursive=True) and any(path.rglob("*.pt")):  # only .pt files
            return super().read_samples(path)
        if self.sample_shape is None:
            raise RuntimeError("the image domain's sample shape is unknown: call setup(train_set) or load_state_dict first")
        channels, size = self.sample_shape[0], self.sample_shape[-1]
        x, labels = read_sample_images(path, size, "rgb" if channels == 3 else "grayscale", self.class_names)
        return Batch(x, DenseSpace(tuple(x.shape)), {} if labels is None else {"label": labels})

    def known_values(self, path: Path, n: int, box: Optional[Sequence[int]] = None) -> Known:
        """Inpainting: the image at ``path`` (resized and cropped to the trained size) is kept outside
        ``box = [left, top, right, bottom]`` (pixels of the trained size, right and bottom excluded),
        which is generated."""
        batch = self.read_samples(Path(path))
        if batch.num_samples != 1:
            raise ValueError(f"--known {path} holds {batch.num_samples} images: give one image file")
        _, height, width = self.sample_shape
        if box is None or len(box) != 4 or not all(isinstance(v, int) for v in box):
            raise ValueError(f"known.box=[left,top,right,bottom] (integer pixels of the {width}x{height} images) "
                             "must mark the part to generate")
        left, top, right, bottom = box
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise ValueError(f"known.box={list(box)} lies outside the {width}x{height} images or is empty")
        mask = torch.ones(1, 1, height, width, dtype=torch.bool)  # [1, 1, H, W], broadcast over samples and channels
        mask[..., top:bottom, left:right] = False
        return Known(batch.x[:1], mask)

    def _get_scorer(self):
        if self._scorer is None:
            from .metrics import build_scorer

            train = self.arrays("train")
            if train.labels is None:
                return None
            test = self.arrays("test")
            heldout = (test.to_tensor(), torch.from_numpy(test.labels))
            train_xy = (train.to_tensor(), torch.from_numpy(train.labels))
            self._scorer = build_scorer(train_xy, heldout, len(train.class_names), self.metric_epochs)
        return self._scorer

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """FID / IS / mIS / AM (and label accuracy when conditional) from the metric classifier."""
        scorer = self._get_scorer()
        if scorer is None:
            return {}
        if not enough_to_score(batch.num_samples, "image", "images"):
            return {}
        labels = batch.cond.get("label")
        return scorer.score(batch.x.detach().float().cpu(), None if labels is None else labels.cpu())

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same metrics on ``n`` held-out real images (the test split, at most its size)."""
        scorer = self._get_scorer()
        return {} if scorer is None else scorer.reference_row(n, labelled=self.conditional)

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "source": self.source, "conditional": self.conditional}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "conditional" in state:
            self.conditional = bool(state["conditional"])
