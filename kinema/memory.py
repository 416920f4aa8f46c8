"""Peak memory of a stage of work: the process's resident memory on the CPU, allocated memory on CUDA."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    """A memory line of Linux's /proc/self/status (`VmRSS`, `VmHWM`) in bytes; None elsewhere."""
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def _rss_high_water() -> int:
    """Resident-memory high-water mark in bytes: Linux's VmHWM (resettable), else getrusage's lifetime peak."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def resident_bytes() -> int:
    """The process's resident memory now, in bytes (Linux; the peak so far elsewhere)."""
    now = _status_bytes("VmRSS")
    return now if now is not None else _rss_high_water()


def reset_peak_memory(device: torch.device | str = "cpu") -> bool:
    """Start a new peak measurement; False where the platform cannot reset it (the peak then covers the process's
    whole life)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # Linux: "5" resets the resident-set high-water mark (VmHWM)
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory since the last `reset_peak_memory`: CUDA's allocated peak, or the process's peak resident set."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _rss_high_water()
