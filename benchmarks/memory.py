"""Peak resident memory of this process on Linux (``VmHWM``), resettable per measured phase, and a
runner that measures a function in a fresh process (so one model's peak never hides another's)."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import resource
from pathlib import Path
from queue import Empty
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


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``) before a reset: else the resident
    set, and so the next phase's peak, still holds what an earlier phase freed but the heap kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    while True:  # a process killed outright (the kernel's OOM killer, a crash) puts nothing: never wait for it forever
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if proc.is_alive():
                continue
            try:  # it may have put its result just before it exited
                result = queue.get(timeout=1.0)
            except Empty:
                code = proc.exitcode
                how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
                result = {"error": f"the measuring process {how} without a result (out of memory?)"}
            break
    proc.join()
    return result
