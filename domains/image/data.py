"""Image data sources: scikit-learn's 8x8 digits, a folder of PNG/JPEG files, and CIFAR-10.

Every source yields the same thing: ``uint8`` pixels ``[N, C, H, W]`` with their value range,
integer labels ``[N]`` (or none) and class names. :class:`ImageSet` turns them into
``(image [C, H, W] in [-1, 1], label)`` items on the fly, so a 50,000-image set stays 150 MB.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from domains.files import log_other_files, split_by_suffix, visible_files
from polydiff.data import item_generator

if TYPE_CHECKING:
    import PIL.Image

__all__ = [
    "ImageArrays",
    "ImageSet",
    "IMAGE_SUFFIXES",
    "load_digits_split",
    "load_folder",
    "load_cifar10",
    "stratified_split",
    "find_cifar10",
    "read_sample_images",
    "list_images",
    "ImageSource",
    "SOURCES",
    "source_of",
]

#: File suffixes read by :func:`load_folder` (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

log = logging.getLogger(__name__)


@dataclass
class ImageArrays:
    """Raw pixels of one split: ``images`` uint8 ``[N, C, H, W]`` in ``0..max_value``."""

    images: np.ndarray
    labels: Optional[np.ndarray]  # int64 [N], None when the source has no labels
    class_names: list[str]
    max_value: int

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {self.images.shape}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def subset(self, index: np.ndarray) -> "ImageArrays":
        labels = None if self.labels is None else self.labels[index]
        return ImageArrays(self.images[index], labels, self.class_names, self.max_value)

    def to_tensor(self) -> Tensor:
        """All images as floats in ``[-1, 1]``: ``[N, C, H, W]``."""
        return to_unit_range(torch.from_numpy(self.images), self.max_value)


def to_unit_range(pixels: Tensor, max_value: int) -> Tensor:
    """Map integer pixels ``0..max_value`` linearly onto ``[-1, 1]``."""
    return pixels.float() * (2.0 / max_value) - 1.0


class ImageSet(Dataset):
    """``(image [C, H, W] in [-1, 1], label)`` items; ``label`` is -1 for unlabelled sources.

    ``hflip`` mirrors each image left-right with probability 1/2 (natural photos; never digits), drawn from
    the seed of the training sampler's draw (:func:`polydiff.data.item_generator`): the same flips with any
    number of DataLoader workers and after a resume, new ones each epoch; torch's global stream for a plain index.
    """

    def __init__(self, arrays: ImageArrays, hflip: bool = False) -> None:
        self.arrays = arrays
        self.hflip = hflip
        self._pixels = torch.from_numpy(arrays.images)  # uint8 [N, C, H, W], shares memory

    def __len__(self) -> int:
        return len(self._pixels)

    def _flip(self, i: int) -> bool:
        return bool(torch.rand((), generator=item_generator(i)) < 0.5)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = to_unit_range(self._pixels[i], self.arrays.max_value)  # [C, H, W]
        if self.hflip and self._flip(i):
            x = x.flip(-1)
        label = -1 if self.arrays.labels is None else int(self.arrays.labels[i])
        return x, label

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """A batch's items at once (the DataLoader's batched fetch): the items ``__getitem__`` gives, converted
        in one operation rather than one per image."""
        idx = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        x = to_unit_range(self._pixels[idx], self.arrays.max_value)  # [B, C, H, W]
        if self.hflip:
            flip = torch.tensor([self._flip(i) for i in indices], dtype=torch.bool)
            x = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
        labels = [-1] * len(indices) if self.arrays.labels is None else self.arrays.labels[idx.numpy()].tolist()
        return list(zip(x.unbind(0), labels))


def stratified_split(
    labels: Optional[np.ndarray], n: int, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test indices holding ``test_fraction`` of every class out (of all items if unlabelled)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    train, test = [], []
    for idx in groups:
        idx = rng.permutation(idx)
        # Round, but keep at least one training item per class.
        k = min(int(round(len(idx) * test_fraction)), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------------------- digits
def load_digits_split(split: str, test_fraction: float = 0.2, seed: int = 0) -> ImageArrays:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16), split seeded and stratified."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]  # [1797, 1, 8, 8], integers 0..16
    labels = digits.target.astype(np.int64)
    full = ImageArrays(images, labels, [str(c) for c in range(10)], max_value=16)
    train, test = stratified_split(labels, len(labels), test_fraction, seed)
    return full.subset(train if _split_kind(split, "digits") == "train" else test)


def _split_kind(split: str, source: str) -> str:
    """``"train"`` or ``"test"`` (``val``/``validation`` read the held-out split too)."""
    if split == "train":
        return "train"
    if split in ("test", "val", "valid", "validation"):
        return "test"
    raise ValueError(f"unknown split {split!r} for image source {source!r}: expected 'train' or 'test'")


# ---------------------------------------------------------------------------- folder
#: Names of a folder's held-out split beside ``train/`` (the first found is used).
_HELD_OUT_NAMES = ("test", "val", "valid", "validation")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and its sub-folders when ``recursive``; symlinked sub-folders are not entered);
    hidden ones such as macOS ``._x.png`` and everything in hidden folders are not images."""
    return split_by_suffix(visible_files(folder, recursive, follow_links=False), IMAGE_SUFFIXES)[0]


def _scan_folder(root: Path) -> tuple[list[Path], Optional[list[int]], list[str]]:
    """Image paths with labels from sub-folder names (images anywhere below a class folder count
    for it); images directly in ``root``, with no sub-folders, are unlabelled."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (set domain.root to a folder of PNG/JPEG images)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = list_images(root)
    if classes and loose:
        raise ValueError(
            f"image folder {root} mixes images ({loose[0].name}, ...) with class sub-folders {classes[:5]}: "
            f"put every image in a class sub-folder, or use a folder without sub-folders for unlabelled images"
        )
    if not classes:
        if not loose:
            raise ValueError(
                f"image folder {root} holds no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})"
            )
        return loose, None, []
    paths: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        found = list_images(root / name, recursive=True)  # nested folders too, as in torchvision's ImageFolder
        if not found:
            raise ValueError(
                f"class folder {root / name} holds no images (expected files ending in {', '.join(IMAGE_SUFFIXES)}); "
                f"remove it or add images"
            )
        paths += found
        labels += [k] * len(found)
    return paths, labels, classes


def _sample_label(file: Path, root: Path, class_names: Sequence[str]) -> int:
    """The class of ``file`` as training counts it: the first folder level under ``root`` (``cat/seed0/x.png`` is
    ``cat``), -1 when that folder is not a class name or the file lies directly in ``root``."""
    parts = file.relative_to(root).parts if file != root else ()
    return list(class_names).index(parts[0]) if len(parts) > 1 and parts[0] in class_names else -1


def read_sample_images(path: Path, size: int, mode: str, class_names: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
    """Generated images to score: an image file or the images under a folder, as ``[N, C, size, size]``
    in ``[-1, 1]``, with labels ``[N]`` from the first sub-folder level under ``path`` when it is a class
    name, as training reads class folders (-1 elsewhere; ``None`` when no file has one)."""
    path = Path(path)
    files = [path] if path.is_file() else list_images(path, recursive=True) if path.is_dir() else None
    if files is None:
        raise FileNotFoundError(f"no samples at {path}: give an image file or a folder of images")
    if not files:
        raise ValueError(f"{path} holds no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    read = [read_image(f, size, mode) for f in files]
    _log_folder(
        path if path.is_dir() else path.parent,
        "samples",
        [],
        [source for _, source in read],
        "RGB" if mode == "rgb" else "L",
    )
    x = to_unit_range(torch.from_numpy(np.stack([arr for arr, _ in read])), 255)  # [N, C, size, size]
    labels = [_sample_label(f, path, class_names) for f in files]
    return x, (torch.tensor(labels) if any(k >= 0 for k in labels) else None)


def _to_8bit(img: "PIL.Image.Image") -> "PIL.Image.Image":
    """A 16- or 32-bit grayscale image (modes ``I;16*``, ``I``) as mode ``L``, scaled by its full range.

    ``convert("L")`` would clip every value above 255, turning such images white.
    """
    from PIL import Image

    raw = np.asarray(img)  # [H, W], uint16 or int32
    # PNG holds at most 16 bits a sample (older Pillow opens 16-bit PNGs as mode "I"); else the dtype's range.
    top = 65535 if img.format == "PNG" else int(np.iinfo(raw.dtype).max)
    if raw.min() < 0 or raw.max() > top:
        raise ValueError(f"mode {img.mode} pixel values span {raw.min()}..{raw.max()}, outside 0..{top}")
    return Image.fromarray(np.round(raw.astype(np.float64) * (255.0 / top)).astype(np.uint8))


def read_image(path: Path, size: int, mode: str) -> tuple[np.ndarray, str]:
    """One image as uint8 ``[C, size, size]`` and the file's PIL mode: shorter side resized to ``size``,
    then centre-cropped.

    ``mode`` is ``"rgb"`` or ``"grayscale"``; an alpha channel is dropped (not composited);
    16- and 32-bit grayscale is scaled to 8 bits; an EXIF orientation is applied first.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            source = img.mode
            img = ImageOps.exif_transpose(img)  # a camera's EXIF orientation: pixels as they are displayed
            if source.startswith("I"):
                img = _to_8bit(img)
            img = img.convert("RGB" if mode == "rgb" else "L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}. Remove or replace the file.") from err
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), source  # [C, H, W]


def _describe_mode(source: str) -> str:
    """How a PIL mode is converted, for the log: ``"RGBA (alpha dropped)"``, ``"I;16 (16-bit, ...)"``."""
    if source.startswith("I;16"):
        return f"{source} (16-bit, scaled to 8 bits)"
    if source == "I":
        return "I (32-bit, scaled to 8 bits)"
    return f"{source} (alpha dropped)" if "A" in source else source


def _log_folder(folder: Path, split: str, classes: list[str], sources: list[str], target: str) -> None:
    """One log line for the files skipped as not images (in ``folder`` and under its ``classes`` folders, as
    :func:`list_images` reads them) and one for the images converted to ``target``."""
    files = visible_files(folder, recursive=False) + [
        p for c in classes for p in visible_files(folder / c, follow_links=False)
    ]
    log_other_files(
        folder, split_by_suffix(files, IMAGE_SUFFIXES)[1], IMAGE_SUFFIXES, "convert them to PNG to use them"
    )
    counts = Counter(m for m in sources if m != target)
    if counts:
        detail = ", ".join(f"{n} {_describe_mode(m)}" for m, n in sorted(counts.items()))
        log.info(
            "%s (%s split): converted %d of %d images to %s: %s",
            folder,
            split,
            sum(counts.values()),
            len(sources),
            target,
            detail,
        )


def load_folder(
    root: str | Path, split: str, size: int, mode: str = "rgb", test_fraction: float = 0.1, seed: int = 0
) -> ImageArrays:
    """A folder of PNG/JPEG images, labels from sub-folder names.

    ``root/train`` and ``root/test`` (or ``val``/``valid``/``validation``) are the splits when
    present; otherwise the images are split seeded and stratified with ``test_fraction`` held out.
    """
    if mode not in ("rgb", "grayscale"):
        raise ValueError(f"domain.mode must be 'rgb' or 'grayscale', got {mode!r}")
    root = Path(root).expanduser()
    held_out = [root / name for name in _HELD_OUT_NAMES if (root / name).is_dir()]
    if (root / "train").is_dir() and held_out:  # train/val/test: the test split is held out
        kind = _split_kind(split, "folder")
        folder = root / "train" if kind == "train" else held_out[0]
        paths, labels, classes = _scan_folder(folder)
        index = np.arange(len(paths))
        if kind == "train":
            # Class names must agree between the two splits, or labels would mean different things.
            test_classes = _scan_folder(held_out[0])[2]
            if test_classes != classes:
                raise ValueError(
                    f"class folders differ between {root / 'train'} {classes} and {held_out[0]} {test_classes}"
                )
    elif (root / "train").is_dir() or held_out:
        found = [p.name for p in [root / "train", *held_out] if p.is_dir()]
        raise ValueError(
            f"image folder {root} holds split folders {found}: give it train/ and one held-out folder "
            f"(one of {', '.join(_HELD_OUT_NAMES)}), each with the same class sub-folders; or put the class "
            f"folders directly in {root} to split them with domain.test_fraction"
        )
    else:
        folder = root
        paths, labels, classes = _scan_folder(root)
        lab = None if labels is None else np.asarray(labels)
        train, test = stratified_split(lab, len(paths), test_fraction, seed)
        index = train if _split_kind(split, "folder") == "train" else test
    if len(index) == 0:
        raise ValueError(f"split {split!r} of image folder {root} is empty: add images or change domain.test_fraction")
    read = [read_image(paths[i], size, mode) for i in index]
    _log_folder(folder, split, classes, [source for _, source in read], "RGB" if mode == "rgb" else "L")
    images = np.stack([arr for arr, _ in read])  # [N, C, size, size]
    lab_arr = None if labels is None else np.asarray(labels, dtype=np.int64)[index]
    return ImageArrays(images, lab_arr, classes, max_value=255)


# ---------------------------------------------------------------------------- CIFAR-10
def find_cifar10(root: str | Path) -> Path:
    """The ``cifar-10-batches-py`` folder at or under ``root``; a clear error when missing."""
    root = Path(root).expanduser()
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "batches.meta").is_file():
            return cand
    raise FileNotFoundError(
        f"CIFAR-10 not found at {root}: polydiff never downloads data. Download {CIFAR10_URL} and extract it "
        f"with `tar -xzf cifar-10-python.tar.gz -C {root}`, so that {root / 'cifar-10-batches-py' / 'data_batch_1'} "
        f"(data_batch_1..5, test_batch, batches.meta) exists; or set domain.root to that folder."
    )


# The only globals a CIFAR-10 Python batch names: numpy arrays, their dtypes and scalars (numpy 1 and 2 paths), and
# _codecs.encode, which protocol 2 uses for bytes written by Python 3.
_CIFAR_GLOBALS = {
    (module, name)
    for package in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{package}.multiarray", "_reconstruct"),
        (f"{package}.multiarray", "scalar"),
        (f"{package}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain values only: a data file never names code to run."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds (code)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file {path} is missing: re-extract {CIFAR10_URL} into {path.parent.parent}")
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:
        raise ValueError(f"cannot read CIFAR-10 file {path} ({type(err).__name__}: {err}); re-extract it") from err


def _key(d: dict, name: str, path: Path):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise ValueError(f"CIFAR-10 file {path} has no {name!r} entry: is it a CIFAR-10 Python batch?")


def load_cifar10(root: str | Path, split: str) -> ImageArrays:
    """CIFAR-10 from a local copy of its Python batches (50,000 train / 10,000 test, 32x32 RGB)."""
    folder = find_cifar10(root)
    if _split_kind(split, "cifar10") == "train":
        files = [f"data_batch_{i}" for i in range(1, 6)]
    else:
        files = ["test_batch"]
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path)
        data = np.asarray(_key(batch, "data", path), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"CIFAR-10 file {path}: 'data' has shape {data.shape}, expected [N, 3072]")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32
        labels.append(np.asarray(_key(batch, "labels", path), dtype=np.int64))
    meta_path = folder / "batches.meta"
    names = [
        n.decode() if isinstance(n, bytes) else str(n) for n in _key(_unpickle(meta_path), "label_names", meta_path)
    ]
    return ImageArrays(np.concatenate(images), np.concatenate(labels), names, max_value=255)


# ---------------------------------------------------------------------------- the table of sources
class ImageSource(NamedTuple):
    """A ``domain.source``: the loader of a split's arrays given ``(root, split, size, mode, test_fraction, seed)``,
    its fixed image side (``None``: ``domain.size`` sets it), whether it needs ``domain.root`` and whether it takes
    ``domain.mode``."""

    load: Callable[[Optional[str], str, Optional[int], Optional[str], float, int], ImageArrays]
    size: Optional[int] = None
    needs_root: bool = True
    takes_mode: bool = False


#: ``domain.source`` -> :class:`ImageSource`. To add a source, write its loader and add a row.
SOURCES: dict[str, ImageSource] = {
    "digits": ImageSource(
        lambda root, split, size, mode, fraction, seed: load_digits_split(split, fraction, seed),
        size=8,
        needs_root=False,
    ),
    "folder": ImageSource(load_folder, takes_mode=True),
    "cifar10": ImageSource(lambda root, split, *_: load_cifar10(root, split), size=32),
}


def source_of(name: str) -> ImageSource:
    """The :class:`ImageSource` named ``name``; the error lists the known ones."""
    if name not in SOURCES:
        raise ValueError(f"domain.source={name!r} is unknown; choose one of {list(SOURCES)}")
    return SOURCES[name]
