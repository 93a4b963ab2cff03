"""Peak resident memory of this process on Linux (``VmHWM``), resettable per measured phase, and a
runner that measures a function in a fresh process (so one model's peak never hides another's)."""

from __future__ import annotations

import multiprocessing as mp
import resource
from pathlib import Path
from typing import Any, Callable


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS in KiB.

    Without the reset, an earlier peak (imports, a previous phase) would hide this phase's.
    Falls back to ``ru_maxrss`` where ``/proc`` is unavailable (then the peak may read high).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    """The process's peak resident set since the last :func:`reset_peak_rss`, in KiB."""
    try:
        return _status_kib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _isolated_worker(fn: Callable[[dict[str, Any]], dict[str, Any]], spec: dict[str, Any], queue: Any) -> None:
    try:
        queue.put(fn(spec))
    except Exception as err:  # noqa: BLE001 - an OOM & co. is reported, not raised, in the parent
        queue.put({"error": f"{type(err).__name__}: {err}"})


def run_isolated(fn: Callable[[dict[str, Any]], dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    """``fn(spec)`` in a freshly spawned process (``fn`` at module level); ``{"error": ...}`` if it raised."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_isolated_worker, args=(fn, spec, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result
