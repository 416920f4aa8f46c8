"""Control maps made from ordinary frames, for ControlNets that read them: Canny edges (the map control_v11p_sd15_canny
and lllyasviel/sd-controlnet-canny were trained on, made by OpenCV's Canny as ControlNet's own annotator and
controlnet_aux's CannyDetector make it), inverted images (white-on-black line art from black-on-white drawings), and
animatediff-cli-prompt-travel's two maps for the tile ControlNet (control_v11f1e_sd15_tile): the frame at a lower
resolution (`tile_resample`: OpenCV's area resize down, as its TileResamplePreProcessor does, then Lanczos back up to
the video's size, as diffusers' control image processor resizes) and OpenCV's Gaussian blur (`blur`, its
BlurPreProcessor). The maps that need networks of their own (pose, depth, HED, ...) take weights kinema cannot
fetch: give them ready-made.

A preprocessor is named as text: "canny" (thresholds 100 and 200, the annotator's defaults), "canny:LOW:HIGH",
"invert", "tile_resample" or "tile_resample:RATE" (the short side divided by RATE >= 1, default 1: as it is),
"blur" or "blur:SIGMA" (default 5), or "none". Reading the names needs no torch (the CLI checks them first); OpenCV
is needed for Canny, tile_resample and blur.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError

if TYPE_CHECKING:
    import torch

PREPROCESSORS = ("canny", "invert", "tile_resample", "blur", "none")
CANNY_THRESHOLDS = (100, 200)  # ControlNet's annotator/canny and controlnet_aux's CannyDetector defaults
# animatediff-cli-prompt-travel's defaults: TileResamplePreProcessor's down_sampling_rate, BlurPreProcessor's sigma.
TILE_RATE, BLUR_SIGMA = 1.0, 5.0
# OpenCV's kernel grows with sigma (about 6 sigma + 1 pixels a side): past this it blurs a frame to its mean colour
# anyway, and at thousands it takes seconds a frame.
MAX_BLUR_SIGMA = 100.0
OPENCV_METHODS = ("canny", "tile_resample", "blur")
_OPENCV_HINT = "canny, tile_resample and blur need OpenCV: pip install opencv-python-headless (or kinema[eval])"
_FORMS = "canny:LOW:HIGH for other thresholds, tile_resample:RATE, blur:SIGMA"


def parse_preprocess(text: Any) -> tuple[str, tuple[float, ...]]:
    """`(method, parameters)` of a preprocessor name: "canny" / "canny:LOW:HIGH" (thresholds), "tile_resample" /
    "tile_resample:RATE" (rate), "blur" / "blur:SIGMA" (sigma), "invert", "none" (none); one KinemaError line for
    anything else."""
    if not isinstance(text, str) or not text:
        raise KinemaError(f"a control preprocessor is one of {', '.join(PREPROCESSORS)} ({_FORMS}), got {text!r}")
    method, *values = text.split(":")
    if method not in PREPROCESSORS or (values and method in ("invert", "none")):
        raise KinemaError(f"unknown control preprocessor {text!r}; known: {', '.join(PREPROCESSORS)} ({_FORMS})")
    if method in ("tile_resample", "blur"):
        return method, (_one_number(text, method, values),)
    if method != "canny":
        return method, ()
    if not values:
        return method, CANNY_THRESHOLDS
    try:
        low, high = (int(value) for value in values)
    except ValueError:
        low = high = -1
    if not 0 <= low < high:
        raise KinemaError(f"canny thresholds are two whole numbers LOW:HIGH with 0 <= LOW < HIGH (e.g. canny:100:200), "
                          f"got {text!r}")
    return method, (low, high)


def _one_number(text: str, method: str, values: list[str]) -> float:
    """tile_resample's rate (at least 1) or blur's sigma (above 0), its default when not given."""
    if not values:
        return TILE_RATE if method == "tile_resample" else BLUR_SIGMA
    try:
        value = float(values[0]) if len(values) == 1 else math.nan
    except ValueError:
        value = math.nan
    low, what = (1.0, "a rate of at least 1 (the short side divided by it)") if method == "tile_resample" else (
        0.0, f"a sigma above 0 and at most {MAX_BLUR_SIGMA:g}")
    if not (math.isfinite(value) and (value >= low if method == "tile_resample" else low < value <= MAX_BLUR_SIGMA)):
        raise KinemaError(f"{method} takes {what}, as {method}:{2 if method == 'tile_resample' else 5}; got {text!r}")
    return value


def preprocessors_for(given: str | Sequence[str | None] | None, count: int) -> list[str | None]:
    """The preprocessor of each of `count` ControlNets: one name for one ControlNet, or one per ControlNet in their
    order ("none" or None: the control images as they are); each name checked (`parse_preprocess`), and OpenCV
    found where Canny is asked for."""
    if given is None:
        return [None] * count
    names = [given] if isinstance(given, str) else list(given)
    if len(names) != count:
        raise KinemaError(f"{len(names)} control preprocessor{'s' * (len(names) != 1)} for {count} "
                          f"ControlNet{'s' * (count != 1)}; give one per ControlNet in their order (none for images "
                          "already made)")
    for name in names:
        if name is not None and parse_preprocess(name)[0] in OPENCV_METHODS and importlib.util.find_spec("cv2") is None:
            raise KinemaError(_OPENCV_HINT)
    return [None if name is None or name == "none" else name for name in names]


def preprocess_control(images: torch.Tensor, name: str | None) -> torch.Tensor:
    """Control images `(K, 3, H, W)` in [0, 1] made into the map `name` asks for (None: as they are), the same size.
    The OpenCV methods run on the 8-bit RGB frames, as the annotators do; Canny gives white edges on black in all
    three channels."""
    if name is None:
        return images
    method, parameters = parse_preprocess(name)
    if method == "invert":
        return 1 - images
    if method == "none":
        return images
    try:
        import cv2
    except ImportError:
        raise KinemaError(_OPENCV_HINT) from None
    import numpy as np
    import torch

    frames = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if method == "canny":
        low, high = (int(value) for value in parameters)
        edges = np.stack([cv2.Canny(np.ascontiguousarray(frame), low, high) for frame in frames])
        return torch.from_numpy(edges).to(images).div(255)[:, None].expand(-1, 3, -1, -1).contiguous()
    if method == "blur":
        made = np.stack([cv2.GaussianBlur(frame, (0, 0), parameters[0]) for frame in frames])
    else:
        made = np.stack([_tile_resample(frame, parameters[0]) for frame in frames])
    return torch.from_numpy(made).to(images).div(255).permute(0, 3, 1, 2).contiguous()


def _tile_resample(frame: Any, rate: float) -> Any:
    """An 8-bit `(H, W, 3)` frame at 1/`rate` of its resolution and back: OpenCV's area resize to a short side of
    short / rate (animatediff-cli-prompt-travel's TileResamplePreProcessor), then PIL's Lanczos to (H, W), as
    diffusers' control image processor brings a control image to the video's size."""
    import cv2
    import numpy as np
    from PIL import Image

    height, width = frame.shape[:2]
    scale = (min(height, width) / rate) / min(height, width)
    if scale == 1:
        return frame
    small = cv2.resize(np.ascontiguousarray(frame), (max(1, int(width * scale)), max(1, int(height * scale))),
                       interpolation=cv2.INTER_AREA)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.LANCZOS))
