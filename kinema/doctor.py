"""What kinema sees on this machine (versions, device, video encoders, model folder, free memory), as plain data.

`kinema doctor` prints it; the web UI and the HTTP API show the same report.
"""

from __future__ import annotations

import sys
from typing import Any

from kinema import __version__
from kinema.errors import KinemaError
from kinema.memory import available_memory

# The encoders the report looks for, in the order it lists them (kinema writes .mp4 with libx264).
VIDEO_ENCODERS = ("libx264", "h264", "mpeg4", "gif", "libwebp", "webp", "png", "vp9", "libvpx-vp9")


def free_memory_bytes() -> int | None:
    """Memory free for kinema on the CPU, in bytes, as generation and training read it (MemAvailable capped by the
    memory cgroup, `kinema.memory.available_memory`); None where it cannot be read."""
    try:
        return available_memory("cpu")
    except KinemaError:
        return None


def doctor_report() -> dict[str, Any]:
    """What kinema sees on this machine: kinema, python, torch and PyAV versions, torch's threads, the device it
    would use and whether it runs bfloat16 natively (what `--speed fast` takes there), the CUDA devices by name, the
    video encoders available, the models folder and free memory in GiB."""
    import av
    import torch

    from kinema.devices import resolve_device
    from kinema.paths import models_dir
    from kinema.pipelines.speed import native_bfloat16

    device = resolve_device("auto")  # where `--device auto` runs the models
    from kinema.data.probe import missing_encoder
    from kinema.pipelines.outputs import VIDEO_SUFFIXES

    encoders = [name for name in VIDEO_ENCODERS if name in av.codecs_available]
    free = free_memory_bytes()
    return {
        "kinema": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "bfloat16_native": native_bfloat16(device),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "pyav": av.__version__,
        "video_codecs": encoders,
        # What outputs this machine writes; .mp4 is every command's default.
        "cannot_write": [suffix for suffix in VIDEO_SUFFIXES if suffix and missing_encoder(suffix) is not None],
        "models_dir": str(models_dir()),
        "free_memory_gib": round(free / 2**30, 2) if free is not None else None,
    }
