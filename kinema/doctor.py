"""What kinema sees on this machine (versions, device, video encoders, model folder, free memory), as plain data.

`kinema doctor` prints it; the web UI and the HTTP API show the same report.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from kinema import __version__

# The encoders the report looks for, in the order it lists them (kinema writes .mp4 with libx264).
VIDEO_ENCODERS = ("libx264", "h264", "mpeg4", "gif", "libwebp", "webp", "png", "vp9", "libvpx-vp9")


def free_memory_bytes() -> int | None:
    """Memory available to a new process, in bytes: MemAvailable on Linux (MemFree leaves out the page cache the
    kernel would give back), free pages elsewhere; None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def doctor_report() -> dict[str, Any]:
    """What kinema sees on this machine: kinema, python, torch and PyAV versions, torch's threads, the device it
    would use, the CUDA devices by name, the video encoders available, the models folder and free memory in GiB."""
    import av
    import torch

    from kinema.paths import models_dir

    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    encoders = [name for name in VIDEO_ENCODERS if name in av.codecs_available]
    free = free_memory_bytes()
    return {
        "kinema": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "pyav": av.__version__,
        "video_codecs": encoders,
        "models_dir": str(models_dir()),
        "free_memory_gib": round(free / 2**30, 2) if free is not None else None,
    }
