"""Video files and datasets: reading and writing videos with their generation settings (PyAV), the synthetic motion
dataset, and the training dataset over a metadata.json with its batch order. Each name is imported from its module
on first use (kinema.lazy)."""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".video_io": ("VideoClip", "generation_settings", "read_video", "write_video"),
    ".probe": ("read_sidecar", "stored_settings"),
    ".synth": ("SynthMotionDataset", "synth_clip", "write_synth_dataset"),
    ".dataset": ("VideoTextDataset", "load_metadata", "TrainBatches", "collate"),
    ".sampler": ("BatchOrder",),
})
