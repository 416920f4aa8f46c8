"""kinema: text-to-video and image-to-video diffusion (AnimateDiff and EasyAnimate V3) on one motion-module core.

The front door for weights is `kinema.describe(path)`, `kinema.load(path, **options)` and
`kinema.convert(source, target, to)`; the models are `VideoUNet` (AnimateDiff), `VideoDiT` (EasyAnimate V3) and
`SliceVAE`. Everything but `__version__` and `KinemaError` is imported on first use: `import kinema` must not import
torch, because the CLI reads `kinema.__version__` before it parses `--help`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from kinema.errors import KinemaError
from kinema.lazy import lazy_exports

try:
    __version__ = version("kinema")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

if TYPE_CHECKING:
    from kinema.loaders import convert, describe, load
    from kinema.models.slice_vae import SliceVAE
    from kinema.models.video_dit import VideoDiT
    from kinema.models.video_unet import VideoUNet

__all__ = ["KinemaError", "SliceVAE", "VideoDiT", "VideoUNet", "__version__", "convert", "describe", "load"]
# The others are imported on first use (kinema.lazy), so `import kinema` imports no torch.
_, __getattr__, __dir__ = lazy_exports(__name__, {
    ".loaders": ("convert", "describe", "load"),
    ".models.video_unet": ("VideoUNet",),
    ".models.video_dit": ("VideoDiT",),
    ".models.slice_vae": ("SliceVAE",),
})
