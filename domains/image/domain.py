"""The image domain: dense ``[B, C, H, W]`` states in ``[-1, 1]`` denoised by the shared 2-D U-Net.

It is the reference adapter showing that the domain-agnostic core serves images as well:
everything image-specific (data sources, the PNG grid, classifier metrics) lives here: the sources in
:data:`.data.SOURCES`, files, inpainting and metrics in :mod:`.outputs`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

from torch import Tensor, nn

from polydiff import Batch, Domain

from .data import SOURCES, ImageArrays, ImageSet, source_of
from .outputs import ImageOutputs

__all__ = ["ImageDomain", "SOURCES"]

log = logging.getLogger(__name__)


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
        src = source_of(source)
        if src.size is not None and size is not None and int(size) != src.size:
            raise ValueError(
                f"domain.size={size} is not available for source {source!r}: its images are "
                f"{src.size}x{src.size}; leave domain.size unset (null)"
            )
        if not src.takes_mode and mode is not None:
            raise ValueError(f"domain.mode applies to source 'folder' only; remove it for source {source!r}")
        if src.needs_root and not root:
            raise ValueError(f"domain.root must be set for source {source!r} (the folder holding the images)")
        if src.size is None and (size is None or int(size) < 1):
            raise ValueError(f"domain.size must be a positive integer for source {source!r}, got {size!r}")
        if grid_upscale is not None and int(grid_upscale) < 1:
            raise ValueError(f"domain.grid_upscale must be >= 1 or null, got {grid_upscale}")
        self.source = source
        self.root = root
        self.size = int(size) if size is not None else src.size
        self.mode = (mode or "rgb") if src.takes_mode else None
        self.conditional = bool(conditional)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.hflip = bool(hflip)
        self.grid_upscale = grid_upscale
        if int(metric_epochs) < 1:
            raise ValueError(
                f"domain.metric_epochs must be at least 1 (epochs of the metric classifier's fit), got {metric_epochs}"
            )
        self.metric_epochs = int(metric_epochs)
        self._arrays: dict[str, ImageArrays] = {}

    # ------------------------------------------------------------------ data
    def arrays(self, split: str) -> ImageArrays:
        """Raw uint8 pixels, labels and class names of ``split`` (read once, then kept)."""
        if split not in self._arrays:
            load = SOURCES[self.source].load
            arr = load(self.root, split, self.size, self.mode, self.test_fraction, self.split_seed)
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
            raise RuntimeError(
                "ImageDomain.build_network needs the sample shape: call setup(train_set) or load_state_dict first"
            )
        return build_unet(2, self.sample_shape[0], self.num_classes, model, "image")

    # --------------------------------------------------------------- outputs
    def make_outputs(self) -> ImageOutputs:
        return ImageOutputs(self)

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "source": self.source, "conditional": self.conditional}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "conditional" in state:
            self.conditional = bool(state["conditional"])
