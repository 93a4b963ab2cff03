"""Peak resident memory of this process on Linux (``VmHWM``), resettable per measured phase."""

from __future__ import annotations

import resource
from pathlib import Path


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
