"""Control maps made from ordinary frames, for ControlNets that read them: Canny edges (the map control_v11p_sd15_canny
and lllyasviel/sd-controlnet-canny were trained on, made by OpenCV's Canny as ControlNet's own annotator and
controlnet_aux's CannyDetector make it) and inverted images (white-on-black line art from black-on-white drawings).
The maps that need networks of their own (pose, depth, HED, ...) take weights kinema cannot fetch: give them ready-made.

A preprocessor is named as text: "canny" (thresholds 100 and 200, the annotator's defaults), "canny:LOW:HIGH",
"invert" or "none". Reading the names needs no torch (the CLI checks them first); OpenCV is needed for Canny only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError

if TYPE_CHECKING:
    import torch

PREPROCESSORS = ("canny", "invert", "none")
CANNY_THRESHOLDS = (100, 200)  # ControlNet's annotator/canny and controlnet_aux's CannyDetector defaults
_OPENCV_HINT = "Canny edges need OpenCV: pip install opencv-python-headless (or kinema[eval])"


def parse_preprocess(text: Any) -> tuple[str, tuple[int, ...]]:
    """`(method, thresholds)` of a preprocessor name ("canny", "canny:LOW:HIGH", "invert", "none"); one KinemaError
    line for anything else."""
    if not isinstance(text, str) or not text:
        raise KinemaError(f"a control preprocessor is one of {', '.join(PREPROCESSORS)} (canny:LOW:HIGH for other "
                          f"thresholds), got {text!r}")
    method, *values = text.split(":")
    if method not in PREPROCESSORS or (values and method != "canny"):
        raise KinemaError(f"unknown control preprocessor {text!r}; known: {', '.join(PREPROCESSORS)} (canny:LOW:HIGH "
                          "for other thresholds)")
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
        if name is not None and parse_preprocess(name)[0] == "canny" and importlib.util.find_spec("cv2") is None:
            raise KinemaError(_OPENCV_HINT)
    return [None if name is None or name == "none" else name for name in names]


def preprocess_control(images: torch.Tensor, name: str | None) -> torch.Tensor:
    """Control images `(K, 3, H, W)` in [0, 1] made into the map `name` asks for (None: as they are). Canny runs
    on the 8-bit RGB frames, as the annotator does, and gives white edges on black in all three channels."""
    if name is None:
        return images
    method, thresholds = parse_preprocess(name)
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

    low, high = thresholds
    frames = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    edges = np.stack([cv2.Canny(np.ascontiguousarray(frame), low, high) for frame in frames])
    return torch.from_numpy(edges).to(images).div(255)[:, None].expand(-1, 3, -1, -1).contiguous()
