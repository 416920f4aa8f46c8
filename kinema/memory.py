"""Memory of a stage of work: its peak (the process's resident memory on the CPU, allocated memory on CUDA), and
what a device has free before it starts."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kinema.errors import KinemaError

if TYPE_CHECKING:
    import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def memory_words(size: int | None) -> str:
    """Bytes as people read them: GiB with two decimals from 1 GiB up, whole MiB below; "unknown" for None."""
    if size is None:
        return "unknown"
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


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
    import torch

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
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _rss_high_water()


# What is free: the host's MemAvailable, capped by the memory cgroup's room.
_MEMINFO = Path("/proc/meminfo")
_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a huge page-rounded number.
_NO_LIMIT = 1 << 60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_field(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == field and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_room() -> int | None:
    """Bytes the process's memory cgroup may still take (its limit less what it holds, less file cache the kernel
    would reclaim); None without a limit."""
    own_v2, own_v1 = "", ""
    try:
        for line in _PROC_CGROUP.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                own_v2 = path.strip("/")
            elif "memory" in controllers.split(","):
                own_v1 = path.strip("/")
    except (OSError, ValueError):
        pass
    candidates = [(_CGROUP_ROOT / own_v2, "memory.max", "memory.current", "inactive_file"),
                  (_CGROUP_ROOT, "memory.max", "memory.current", "inactive_file"),
                  (_CGROUP_ROOT / "memory" / own_v1, "memory.limit_in_bytes", "memory.usage_in_bytes",
                   "total_inactive_file"),
                  (_CGROUP_ROOT / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")]
    for folder, limit_file, usage_file, cache_field in candidates:
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is None or usage is None:
            continue  # "max" (v2's no limit) reads as None too
        if limit >= _NO_LIMIT:
            return None
        return max(limit - max(usage - _stat_field(folder / "memory.stat", cache_field), 0), 0)
    return None


def _host_available() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the free pages sysconf reports."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return int(os.sysconf(name)) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # AttributeError: no os.sysconf (Windows)
            continue
    raise KinemaError("cannot tell how much memory this machine has free (no /proc/meminfo or sysconf)")


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free for this process on `device`: for the CPU (and Apple's unified memory) the host's MemAvailable,
    capped by the memory cgroup's room; for CUDA the driver's free memory plus what this process's caching allocator
    holds unused."""
    if str(device).partition(":")[0] in ("cpu", "mps"):  # torch-free: asked before a model loads (check_frames_fit)
        host = _host_available()
        room = _cgroup_room()
        return host if room is None else min(host, room)
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    raise KinemaError(f"cannot tell the free memory of device {device}; train on cpu or cuda")


def video_bytes(videos: int, frames: int, height: int, width: int) -> int:
    """Bytes of `videos` finished videos `(B, F, 3, H, W)` in float32."""
    return videos * frames * 3 * height * width * 4


def check_frames_fit(videos: int, frames: int, height: int, width: int, fix: str) -> None:
    """Refuse, before any sampling, videos whose finished frames `(videos, frames, 3, height, width)` float32 alone
    need more memory than the machine has free (left unchecked where that cannot be read); `fix` is the front end's
    way to fewer frames, a smaller size or fewer seeds."""
    needed = video_bytes(videos, frames, height, width)
    try:
        free = available_memory("cpu")  # the finished frames are gathered on the CPU, whatever the device
    except KinemaError:
        return
    if needed > free:
        count = f"{videos} videos of " if videos > 1 else ""
        raise KinemaError(f"{count}{frames} frames at {width}x{height} need {memory_words(needed)} of memory for "
                          f"the finished frames alone, and {memory_words(free)} is free; {fix}")
