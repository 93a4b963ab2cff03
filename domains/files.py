"""Data folders as the domains read them: visible files only, sorted by suffix, the others named in one log line.

Hidden files and everything inside hidden folders (``.git/``, ``.ipynb_checkpoints/``, macOS ``._x``
resource forks) are never data. Symlinked folders are followed on request, with loops skipped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Collection, Iterable, Sequence

__all__ = ["visible_files", "split_by_suffix", "log_other_files"]

log = logging.getLogger(__name__)


def visible_files(folder: Path, recursive: bool = True, follow_links: bool = True) -> list[Path]:
    """Sorted visible files in ``folder`` (and below it when ``recursive``); hidden files and folders are left out.

    ``follow_links`` enters symlinked sub-folders (``Path.rglob`` does not, in Python 3.11); a link back to a
    folder above it (a loop) is skipped with a warning. Symlinked files count either way.
    """
    folder = Path(folder)
    chains = {str(folder): {os.path.realpath(folder)}}  # each folder walked: the real folders from folder down to it
    files: list[Path] = []
    for top, dirs, names in os.walk(folder, followlinks=follow_links):
        kept = []
        for d in sorted(d for d in dirs if recursive and not d.startswith(".")):
            if follow_links:
                real = os.path.realpath(os.path.join(top, d))
                if real in chains[top]:
                    log.warning(
                        "%s: skipped %s: it links back to %s, which holds it (a loop)",
                        folder,
                        os.path.join(top, d),
                        real,
                    )
                    continue
                chains[os.path.join(top, d)] = chains[top] | {real}
            kept.append(d)
        dirs[:] = kept
        files += [Path(top) / n for n in names if not n.startswith(".") and os.path.isfile(os.path.join(top, n))]
    return sorted(files)


def split_by_suffix(files: Iterable[Path], suffixes: Collection[str]) -> tuple[list[Path], list[Path]]:
    """``(matching, other)``: the files whose lower-cased suffix is in ``suffixes``, and the rest, in order."""
    matching: list[Path] = []
    other: list[Path] = []
    for p in files:
        (matching if p.suffix.lower() in suffixes else other).append(p)
    return matching, other


def log_other_files(
    folder: Path, other: Sequence[Path], suffixes: Sequence[str], advice: str, verb: str = "skipped"
) -> None:
    """One INFO line naming (the first three of) the ``other`` files under ``folder`` left out for their suffix."""
    if other:
        log.info(
            "%s: %s %d file(s) that are not %s, e.g. %s (%s)",
            folder,
            verb,
            len(other),
            "/".join(suffixes),
            [str(p.relative_to(folder)) for p in other[:3]],
            advice,
        )
