"""kinema: text-to-video and image-to-video diffusion (AnimateDiff and EasyAnimate V3) on one motion-module core.

The front door for weights is `kinema.describe(path)`, `kinema.load(path, **options)` and
`kinema.convert(source, target, to)`; the models are `VideoUNet` (AnimateDiff), `VideoDiT` (EasyAnimate V3) and
`SliceVAE`. Everything but `__version__` and `KinemaError` is imported on first use: `import kinema` must not import
torch, because the CLI reads `kinema.__version__` before it parses `--help`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError

try:
    __version__ = version("kinema")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

if TYPE_CHECKING:
    from kinema.loaders import convert, describe, load
    from kinema.models.slice_vae import SliceVAE
    from kinema.models.video_dit import VideoDiT
    from kinema.models.video_unet import VideoUNet

# name -> the module defining it.
_LAZY = {
    "describe": "kinema.loaders",
    "load": "kinema.loaders",
    "convert": "kinema.loaders",
    "VideoUNet": "kinema.models.video_unet",
    "VideoDiT": "kinema.models.video_dit",
    "SliceVAE": "kinema.models.slice_vae",
}

__all__ = ["KinemaError", "SliceVAE", "VideoDiT", "VideoUNet", "__version__", "convert", "describe", "load"]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562) and keep it, so later lookups are plain attribute reads."""
    if name not in _LAZY:
        raise AttributeError(f"module 'kinema' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
