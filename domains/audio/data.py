"""Audio data sets: the shipped spoken digits, any folder of WAV/FLAC files, and Speech Commands SC09.

Each source is first an *index* (a list of ``(path, label name)`` for one split); then
:func:`load_clips` decodes every file into one in-memory tensor ``[N, C, L]`` at the domain's
sample rate, channel count and length, logging each conversion it makes.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from domains.files import log_other_files, split_by_suffix, visible_files

from .io import AUDIO_SUFFIXES, AudioFileError, Conversions, load_clip

__all__ = [
    "DIGITS",
    "SPOKEN_DIGITS_DIR",
    "METADATA_COLUMNS",
    "label_slug",
    "ClipSet",
    "normalise_split",
    "spoken_digits_index",
    "sample_index",
    "folder_index",
    "sc09_index",
    "SC09_DELETE_NOTE",
    "load_clips",
    "AudioSource",
    "DATASETS",
    "dataset_of",
]

log = logging.getLogger(__name__)

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPOKEN_DIGITS_DIR = Path(__file__).resolve().parent / "data" / "spoken_digits"
#: Columns of a spoken-digits folder's ``metadata.csv`` (:mod:`.make_spoken_digits` writes them); the first three
#: are read.
METADATA_COLUMNS = ("file", "label", "split", "voice", "speed", "pitch")
_SPLITS = {
    "train": "train",
    "training": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "test": "test",
    "testing": "test",
}

_SC09_LISTS = ("validation_list.txt", "testing_list.txt")  # Speech Commands' split lists (Warden 2018, Sec. 7)
#: What deleting a bad SC09 clip does (appended to the errors that name one).
SC09_DELETE_NOTE = (
    "deleting a Speech Commands clip is safe: a file that validation_list.txt or testing_list.txt "
    "names but that is missing is skipped (with a warning)"
)

Index = list[tuple[Path, Optional[str]]]


def label_slug(name: str) -> str:
    """A label as it appears in sample file names (characters other than letters, digits, ``-``, ``_`` as ``-``)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def normalise_split(split: str) -> str:
    """``train``/``valid``/``test`` from a split name or a common alias."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of 'train', 'valid', 'test'")
    return _SPLITS[split]


@dataclass
class ClipSet(Dataset):
    """Decoded clips ``waves [N, C, L]`` with label indices ``labels [N]`` (``-1`` when unlabelled)."""

    waves: Tensor
    labels: Tensor
    class_names: list[str]
    files: list[Path]

    def __len__(self) -> int:
        return self.waves.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.waves[i], int(self.labels[i])


# ------------------------------------------------------------------ indexes
def spoken_digits_index(root: Path, split: str) -> Index:
    """The split of a spoken-digits folder, read from its ``metadata.csv``."""
    root = Path(root)
    split = normalise_split(split)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta} is missing: {root} is not a spoken-digits folder; build one with "
            f"`python -m domains.audio.make_spoken_digits --out {root}`"
        )
    if split == "valid":
        raise ValueError("the spoken-digits set has only 'train' and 'test' splits")
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(METADATA_COLUMNS[:3]) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{meta} lacks the column(s) {sorted(missing)}; expected {','.join(METADATA_COLUMNS)}")
        index: Index = []
        for line, row in enumerate(reader, start=2):
            if row["label"] not in DIGITS:
                raise ValueError(f"{meta} line {line}: unknown label {row['label']!r}; expected one of {DIGITS}")
            if row["split"] not in ("train", "test"):
                raise ValueError(f"{meta} line {line}: unknown split {row['split']!r}; expected 'train' or 'test'")
            if row["split"] == split:
                index.append((root / row["file"], row["label"]))
    if not index:
        raise ValueError(f"{meta} lists no clips in the {split!r} split")
    return index


def _audio_files(folder: Path) -> list[Path]:
    """WAV/FLAC files under ``folder`` (symlinked sub-folders followed); other visible files are named in a log line.

    Hidden files and everything inside hidden folders (``.git/``, ``.ipynb_checkpoints/``) are skipped.
    """
    audio, other = split_by_suffix(visible_files(folder), AUDIO_SUFFIXES)
    log_other_files(folder, other, AUDIO_SUFFIXES, "convert them to WAV or FLAC to use them", verb="ignored")
    return audio


def sample_index(path: Path, label_names: Sequence[str]) -> Index:
    """Generated clips to score: a WAV/FLAC file or the files under a folder, with the label each
    file's name gives (the parent folder's name, or a label ending the name after ``_`` as ``polydiff sample``
    writes it: ``samples_007_seven.wav``), ``None`` where neither is a known label."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _audio_files(path)
    else:
        raise FileNotFoundError(f"no samples at {path}: give a WAV/FLAC file or a folder of them")
    if not files:
        raise ValueError(f"{path} holds no WAV/FLAC files")
    # Longest first: a name's ending "_left_hand" is the label "left_hand", not "hand" (slugs may hold "_").
    slugs = sorted(((label_slug(name), name) for name in label_names), key=lambda pair: -len(pair[0]))
    index: Index = []
    for f in files:
        label = f.parent.name if f.parent != path and f.parent.name in label_names else None
        if label is None:
            label = next((name for slug, name in slugs if f.stem.endswith(f"_{slug}")), None)
        index.append((f, label))
    return index


def _test_files(files: list[Path], root: Path, test_fraction: float) -> set[Path]:
    """A fixed, per-label test split: in each label folder the ``test_fraction`` of files with the
    smallest hash of their relative path (at least one when the folder has two or more files)."""
    groups: dict[Path, list[Path]] = {}
    for p in files:
        groups.setdefault(p.parent, []).append(p)
    test: set[Path] = set()
    for group in groups.values():
        group.sort(key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).digest())
        n_test = max(1, round(test_fraction * len(group))) if len(group) > 1 else 0
        test.update(group[:n_test])
    return test


def folder_index(root: Path, split: str, test_fraction: float = 0.1) -> Index:
    """WAV/FLAC files under ``root``; sub-folder names are labels (no sub-folders: unlabelled).

    ``root/train`` and ``root/test`` (each with label sub-folders) are used as the splits when
    present; otherwise a fixed ``test_fraction`` of each label's files, chosen by a hash of their
    path, is the test split.
    """
    root = Path(root)
    split = normalise_split(split)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"audio folder {root} {what}: point domain.root at the folder holding the audio")
    if (root / "train").is_dir() and (root / "test").is_dir():
        if split == "valid":
            raise ValueError(f"{root} has only 'train' and 'test' sub-folders")
        base, files = root / split, _audio_files(root / split)
    else:
        if split == "valid":
            raise ValueError(f"{root} has no validation split; use 'train' or 'test'")
        base, files = root, _audio_files(root)
        test = _test_files(files, root, test_fraction)
        files = [p for p in files if (p in test) == (split == "test")]
    if not files:
        if base == root and _audio_files(root):  # the fraction drawn for the test split took none (or all)
            raise ValueError(
                f"the {split!r} split of {root} is empty: domain.test_fraction={test_fraction} of each label's files "
                f"leaves it no file. Add files, change domain.test_fraction, or give {root}/train and {root}/test"
            )
        raise ValueError(
            f"no {'/'.join(AUDIO_SUFFIXES)} files for split {split!r} under {base}; "
            "put audio files (optionally in one sub-folder per label) there"
        )
    nested = [p for p in files if len(p.relative_to(base).parts) > 2]
    if nested:
        raise ValueError(f"{nested[0]} is nested too deep: use {base}/LABEL/FILE (or {base}/FILE for unlabelled audio)")
    labels = {len(p.relative_to(base).parts) == 2 for p in files}
    if len(labels) > 1:
        loose = next(p for p in files if len(p.relative_to(base).parts) == 1)
        raise ValueError(f"{loose} is not in a label sub-folder while other files are; move it into one")
    return [(p, p.parent.name if len(p.relative_to(base).parts) == 2 else None) for p in files]


def _sc09_folder(root: Path) -> Path:
    """The folder holding the word sub-folders and the split lists, from its parent or itself (any name)."""
    root = Path(root)
    candidates = (root / "SpeechCommands" / "speech_commands_v0.02", root / "speech_commands_v0.02", root)
    for candidate in candidates:
        if all((candidate / name).is_file() for name in _SC09_LISTS):
            return candidate
    for candidate in candidates:  # a copy that lacks a split list: name the missing file
        found = [name for name in _SC09_LISTS if (candidate / name).is_file()]
        words = [f"{word}/" for word in DIGITS if (candidate / word).is_dir()]
        if found or words:
            missing = [name for name in _SC09_LISTS if name not in found]
            held = ", ".join(found + words[:3] + (["..."] if len(words) > 3 else []))
            raise FileNotFoundError(
                f"{candidate} holds part of a Speech Commands v0.02 copy ({held}) but not {' or '.join(missing)}: "
                f"looked for {' and '.join(str(candidate / name) for name in missing)}. Copy the missing list(s) from "
                "the top level of speech_commands_v0.02.tar.gz (http://download.tensorflow.org/data/"
                "speech_commands_v0.02.tar.gz) into that folder; they define the validation and test splits"
            )
    raise FileNotFoundError(
        f"no Speech Commands v0.02 copy under {root}. Extract speech_commands_v0.02.tar.gz "
        f"(http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz) into "
        f"{root / 'SpeechCommands' / 'speech_commands_v0.02'} so that it holds zero/, one/, ..., "
        "validation_list.txt and testing_list.txt, or point domain.root at that folder"
    )


def _missing_listed(index: Index, folder: Path, list_name: str) -> list[Path]:
    """Files of ``index`` that ``list_name`` names but ``folder`` lacks (deleted bad clips), named in one warning."""
    gone = [p for p, _ in index if not p.is_file()]
    if gone:
        named = ", ".join(os.path.relpath(p, folder) for p in gone[:3]) + (", ..." if len(gone) > 3 else "")
        log.warning(
            "%s: skipped %d file(s) that %s names but that are missing (deleted?): %s",
            folder,
            len(gone),
            list_name,
            named,
        )
    return gone


def _sc09_missing_digits(folder: Path, split: str, absent: list[str], gone: list[Path]) -> ValueError:
    """The error for a copy whose ``split`` has no clips of the digit words ``absent`` (``gone``: listed, missing)."""
    lost = [word for word in absent if not (folder / word).is_dir()]
    folders = ", ".join(f"{folder / word}/" for word in absent)
    listed = {"train": " or ".join(_SC09_LISTS), "valid": "validation_list.txt", "test": "testing_list.txt"}[split]
    deleted = [p for p in gone if p.parent.name in absent]
    if lost:
        fix = (
            f"the folder(s) {', '.join(f'{folder / word}/' for word in lost)} are missing: extract them from "
            "speech_commands_v0.02.tar.gz (http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz) "
            f"into {folder}"
        )
    elif split == "train":
        fix = f"every file in {folders} is named in {listed}, which hold the other splits"
    elif deleted:
        fix = (
            f"{listed} names {len(deleted)} file(s) of these words, but they are missing from {folders} (deleted?); "
            "put back at least one clip of each word from the archive"
        )
    else:
        fix = f"{folder / listed} names none of the files in {folders}; restore the list from the archive"
    return ValueError(
        f"SC09 needs clips of all ten digit words, but the {split!r} split of {folder} has none of {absent}: {fix}"
    )


def sc09_index(root: Path, split: str) -> Index:
    """The SC09 subset (the ten digit words) of Speech Commands v0.02, with the data set's own split lists.

    A file that a split list names but that is missing (deleted as bad) is skipped with a warning; a split
    without clips of every digit word is an error naming the missing words.
    """
    from torchaudio.datasets import SPEECHCOMMANDS

    folder = _sc09_folder(root)
    split = normalise_split(split)
    subset = {"train": "training", "valid": "validation", "test": "testing"}[split]
    # torchaudio's class finds the files and applies the official lists; decoding is ours (soundfile). It
    # derives the folder from an archive name by cutting two suffixes, so any folder name is passed as one.
    ds = SPEECHCOMMANDS(folder.parent, url=f"{folder.name}.tar.gz", folder_in_archive="", download=False, subset=subset)
    index: Index = []
    for walked in ds._walker:
        path = Path(walked)
        if path.parent.name in DIGITS:
            index.append((path, path.parent.name))
    gone = _missing_listed(index, folder, f"{subset}_list.txt") if split != "train" else []  # train: files found
    skipped = set(gone)
    index = [(p, label) for p, label in index if p not in skipped]
    if not index:
        raise ValueError(f"no digit clips (zero/ .. nine/) for split {split!r} in {folder}")
    absent = [word for word in DIGITS if word not in {label for _, label in index}]
    if absent:
        raise _sc09_missing_digits(folder, split, absent, gone)
    return index


# ------------------------------------------------------------------ decoding
def load_clips(
    index: Index,
    sample_rate: int,
    channels: int,
    length: int,
    class_names: Optional[Sequence[str]] = None,
    crop: str = "start",
    limit: Optional[int] = None,
    what: str = "audio",
    note: str = "",
) -> ClipSet:
    """Decode an index into a :class:`ClipSet` ``[N, channels, length]``; logs every conversion.

    ``class_names`` fixes the label order (labels outside it are an error); by default the
    sorted label names of the index. ``limit`` keeps an evenly strided subset of the index.
    ``note`` is appended to the error about a bad file (what deleting it does for this source).
    """
    if crop not in ("start", "center"):
        raise ValueError(f"domain.crop={crop!r} must be 'start' or 'center'")
    names = {label for _, label in index}
    labelled = None not in names
    if class_names is None:
        class_names = sorted(names) if labelled else []
    elif labelled:
        unknown = sorted(names - set(class_names))
        if unknown:
            raise ValueError(f"{what}: label(s) {unknown} are not among the known labels {list(class_names)}")
    if limit is not None and limit < len(index):
        step = len(index) / limit
        index = [index[int(i * step)] for i in range(limit)]
    conv = Conversions()
    waves = torch.empty(len(index), channels, length)
    labels = torch.full((len(index),), -1, dtype=torch.long)
    for i, (path, label) in enumerate(index):
        try:
            waves[i] = load_clip(path, sample_rate, channels, length, conv, crop)
        except AudioFileError as err:
            if not note:
                raise
            raise AudioFileError(f"{err} ({note})") from err
        if labelled and class_names:
            labels[i] = list(class_names).index(label)
    conv.report(what, sample_rate, channels, length)
    silent = (waves.abs().amax(dim=(1, 2)) == 0).nonzero().flatten()
    if len(silent):
        bad = [str(index[int(k)][0]) for k in silent]
        if len(bad) > 3:
            log.error("%s: %d silent file(s) (all zeros): %s", what, len(bad), ", ".join(bad))
        named = ", ".join(bad[:3]) + (f", ... (all {len(bad)} in the log above)" if len(bad) > 3 else "")
        raise AudioFileError(
            f"{named} {'is' if len(bad) == 1 else 'are'} silent after loading (all zeros): delete "
            f"{'it' if len(bad) == 1 else 'them'} (or replace with clips that hold sound) and run again"
            + (f" ({note})" if note else "")
        )
    return ClipSet(waves, labels, list(class_names) if labelled else [], [p for p, _ in index])


# ------------------------------------------------------------------ the table of data sets
class AudioSource(NamedTuple):
    """A ``domain.dataset``: the index of a split given ``(root, split, test_fraction)``, the label names it fixes
    (else those of the training split, in order), a note for errors naming a bad clip, and whether it needs
    ``domain.root``."""

    index: Callable[[Path, str, float], Index]
    labels: tuple[str, ...] = ()
    note: str = ""
    needs_root: bool = True


#: ``domain.dataset`` -> :class:`AudioSource`. To add a data set, write its index function and add a row.
DATASETS: dict[str, AudioSource] = {
    "spoken_digits": AudioSource(
        lambda root, split, _: spoken_digits_index(root, split), tuple(DIGITS), needs_root=False
    ),
    "folder": AudioSource(folder_index),
    "sc09": AudioSource(lambda root, split, _: sc09_index(root, split), tuple(DIGITS), SC09_DELETE_NOTE),
}


def dataset_of(name: str) -> AudioSource:
    """The :class:`AudioSource` named ``name``; the error lists the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown domain.dataset {name!r}; choose one of {list(DATASETS)}")
    return DATASETS[name]
