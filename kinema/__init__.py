"""kinema: text-to-video and image-to-video diffusion (AnimateDiff and EasyAnimate V3) on one motion-module core."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kinema")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

from kinema.errors import KinemaError

__all__ = ["KinemaError", "__version__"]
