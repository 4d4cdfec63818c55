"""Resident memory from the operating system, for the benchmarks that measure a phase in a process of its own.

Linux only (``/proc/self/status``); elsewhere the readers return None. `reset_peak` sets the peak (VmHWM) back to
the current resident set, so the peak read afterwards is that of what ran in between.
"""

from __future__ import annotations

from pathlib import Path


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """This process's resident set now (MB = 1024^2 B)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float | None:
    """This process's peak resident set since it started or since `reset_peak` (MB)."""
    return _status_mb("VmHWM")


def reset_peak() -> bool:
    """Reset the peak resident set to the current one (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
