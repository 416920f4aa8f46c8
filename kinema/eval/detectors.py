"""Frame detectors for `kinema eval`: the colour, shape and motion of the one shape in a synthetic-style clip.

The clips look like `kinema data synth` renders (kinema.data.synth): one bright, saturated shape over a muted,
darker background (plain, gradient, noise or checker). The detectors use numpy only and read frames as

- numpy uint8 `(F, H, W, 3)` (as `synth_clip` renders them), or
- torch float `(F, 3, H, W)` in [0, 1] (a `read_video` clip maps to this with `(frames + 1) / 2`).

A single frame is `(H, W, 3)` uint8 or `(3, H, W)` float in [0, 1].

Segmentation thresholds the per-pixel brightest channel (HSV "value") midway between the background's level and
the shape's (`_masks`): every shape colour has a channel at 205 or more while every background stays below about
145 even where gradient, noise or checker push it up, whereas plain luma would not separate a purple shape
(luma 103) from a grey background (luma 105).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kinema.data.synth import COLOURS, SHAPES
from kinema.errors import KinemaError

FrameInput = np.ndarray | torch.Tensor

# Motion thresholds, each relative so they hold at any resolution and clip length (whole-clip changes):
# the centre moves by more than this fraction of the frame side; synth translations cover at least 0.3.
TRANSLATION_FRACTION = 0.08
# |log(size_last / size_first)| above this (about x1.22); synth grow/shrink change the size by x1.8 or more.
SCALE_LOG_RATIO = math.log(1.22)
# Total rotation in degrees; synth rotations turn at least 4 deg/frame, 60 deg over 16 frames.
ROTATION_DEGREES = 15.0
# Rotational symmetry period of each shape's outline, in degrees (a circle has no orientation).
SYMMETRY_DEGREES = {"square": 90.0, "triangle": 120.0}
_SIDES = {"square": 4, "triangle": 3}
# Shape thresholds on the normalised angular moments (see detect_shape for the measured ranges).
TRIANGLE_STRENGTH = 0.35
SQUARE_STRENGTH = 0.2
# Percentile of the brightest channel taken as the shape's level: the smallest synth shape (a triangle of
# circumradius 6.4 px) covers 1.3% of a 64 px frame, so the top 0.5% lies inside it.
OBJECT_PERCENTILE = 99.5
# Objects smaller than this many pixels are treated as missing: nothing to measure.
_MIN_PIXELS = 4


def _frame_to_array(frame: FrameInput) -> np.ndarray:
    """One frame `(H, W, 3)` uint8 or `(3, H, W)` float in [0, 1] -> float64 numpy `(H, W, 3)` in [0, 255]."""
    if not isinstance(frame, (np.ndarray, torch.Tensor)) or frame.ndim != 3:
        raise KinemaError(f"expected one frame shaped (H, W, 3) uint8 or (3, H, W) float in [0, 1], got "
                          f"{getattr(frame, 'shape', type(frame).__name__)}")
    return _frames_to_array(frame[None])[0]


def _frames_to_array(frames: FrameInput) -> np.ndarray:
    """`(F, H, W, 3)` uint8 or `(F, 3, H, W)` float in [0, 1] -> float64 numpy `(F, H, W, 3)` in [0, 255]."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype == torch.uint8:
            frames = frames.numpy()
        else:
            if frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point():
                raise KinemaError(f"expected float frames shaped (F, 3, H, W) in [0, 1], got a {frames.dtype} "
                                  f"tensor of shape {tuple(frames.shape)}")
            if not torch.isfinite(frames).all():
                raise KinemaError("expected float frames in [0, 1], got NaN or infinity, which no video has")
            low, high = float(frames.min()), float(frames.max())
            if low < -0.02 or high > 1.02:
                raise KinemaError(f"expected float frames in [0, 1], got values in [{low:.3f}, {high:.3f}]; "
                                  "frames from read_video are in [-1, 1]: pass (frames + 1) / 2")
            return frames.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float64) * 255
    if not isinstance(frames, np.ndarray):
        raise KinemaError(f"expected frames as a numpy uint8 array (F, H, W, 3) or a float tensor (F, 3, H, W), "
                          f"got {type(frames).__name__}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise KinemaError(f"expected uint8 frames shaped (F, H, W, 3), got {frames.dtype} of shape {frames.shape}; "
                          "float frames go in as a torch tensor (F, 3, H, W) in [0, 1]")
    if 0 in frames.shape:
        raise KinemaError(f"no frames to measure: shape {frames.shape}")
    return frames.astype(np.float64)


def segment_object(frame: FrameInput) -> np.ndarray:
    """The foreground shape's mask, bool numpy `(H, W)`, of one frame `(H, W, 3)` uint8 or `(3, H, W)` float in [0, 1].

    Pixels whose brightest channel lies above the midpoint between the frame's median and its
    OBJECT_PERCENTILE-th percentile of that channel (see the module docstring for why the brightest channel,
    not luma).
    """
    return _masks(_frame_to_array(frame)[None])[0]


def _masks(images: np.ndarray) -> np.ndarray:
    """Bool `(F, H, W)` masks of float `(F, H, W, 3)` frames in [0, 255].

    The threshold lies midway between the background level (the median: the shape covers well under half the
    frame) and the shape's (a high percentile rather than the maximum, so a few overshooting pixels of a lossy
    codec don't count). Otsu's threshold was tried first: on a checker or noise background with a small shape it
    splits the background's two tones instead of separating the shape.
    """
    value = images.max(axis=-1)
    flat = value.reshape(len(value), -1)
    threshold = 0.5 * (np.median(flat, axis=1) + np.percentile(flat, OBJECT_PERCENTILE, axis=1))
    return value > threshold[:, None, None]


def _erode(mask: np.ndarray) -> np.ndarray:
    """Keep pixels whose 4 neighbours are all in `mask` (bool `(H, W)`): drops the blended edge ring."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _median_colour(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Median RGB `(3,)` over the eroded masks of all frames (the full mask where erosion leaves too little)."""
    pixels = []
    for image, mask in zip(images, masks, strict=True):
        inner = _erode(mask)
        chosen = inner if inner.sum() >= _MIN_PIXELS else mask
        pixels.append(image[chosen])
    stacked = np.concatenate(pixels)
    if len(stacked) == 0:
        raise KinemaError("no object found in any frame: the clip has no shape brighter than its background")
    return np.median(stacked, axis=0)


def detect_colour(frames: FrameInput) -> str:
    """The `COLOURS` name nearest (RGB distance) to the object's median colour over frames.

    `frames`: `(F, 3, H, W)` float in [0, 1] or `(F, H, W, 3)` uint8.
    """
    images = _frames_to_array(frames)
    return _nearest_colour(images, _masks(images))


def _nearest_colour(images: np.ndarray, masks: np.ndarray) -> str:
    median = _median_colour(images, masks)
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - median) ** 2)))


def _symmetry_strengths(mask: np.ndarray) -> tuple[float, float] | None:
    """Normalised 3- and 4-fold angular moments |sum z^n| / sum |z|^n of the mask (z: pixel offset from the
    centroid as a complex number); None if the mask is too small.

    A shape with n-fold symmetry has zero moments of every order not a multiple of n, so an equilateral triangle
    has a strong 3-fold and no 4-fold moment, a square the reverse, and a disc neither; rotation changes only
    their phase and scale cancels in the ratio.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) < _MIN_PIXELS:
        return None
    offsets = (xs - xs.mean()) + 1j * (ys - ys.mean())
    three, four = (float(abs(np.sum(offsets ** n)) / max(float(np.sum(np.abs(offsets) ** n)), 1e-12))
                   for n in (3, 4))
    return three, four


def detect_shape(frames: FrameInput) -> str:
    """`circle`, `square` or `triangle` for `frames` `(F, 3, H, W)` float in [0, 1] or `(F, H, W, 3)` uint8.

    From the medians over frames of the mask's normalised 3- and 4-fold angular moments (`_symmetry_strengths`).
    Per frame a triangle's 3-fold strength measured 0.56-0.73 and a square's 4-fold one 0.28-0.58, while the
    others stay at or under 0.14 (64 px synth clips, raw and through H.264), so TRIANGLE_STRENGTH and
    SQUARE_STRENGTH sit in the gaps; neither passing means a circle. Independent of rotation, scale and position.
    """
    return _shape_of(_masks(_frames_to_array(frames)))


def _shape_of(masks: np.ndarray) -> str:
    strengths = [found for found in (_symmetry_strengths(mask) for mask in masks) if found is not None]
    if not strengths:
        raise KinemaError("no object found in any frame: the clip has no shape brighter than its background")
    three_fold, four_fold = np.median(np.asarray(strengths), axis=0)
    if three_fold / TRIANGLE_STRENGTH >= max(1.0, four_fold / SQUARE_STRENGTH):
        return "triangle"
    return "square" if four_fold >= SQUARE_STRENGTH else "circle"


def _orientation(mask: np.ndarray, centre: tuple[float, float], shape: str) -> float:
    """Angle in degrees, modulo the shape's symmetry, in kinema.data.synth's convention (clockwise, 0 = level).

    The n-fold angular moment sum(r^n e^{i n theta}) over the mask points along the corners of an n-gon.
    """
    sides = _SIDES[shape]
    ys, xs = np.nonzero(mask)
    dx, dy = xs + 0.5 - centre[0], ys + 0.5 - centre[1]
    moment = np.sum((dx + 1j * dy) ** sides)
    # At angle 0 a square's corners point at 45 deg and a triangle's top corner at -90 deg (y grows downward).
    reference = {"square": 45.0, "triangle": -90.0}[shape]
    period = SYMMETRY_DEGREES[shape]
    return float((math.degrees(np.angle(moment)) / sides - reference) % period)


def track(frames: FrameInput, shape: str | None = None) -> dict:
    """Per-frame object measurements of `frames` `(F, 3, H, W)` float in [0, 1] or `(F, H, W, 3)` uint8.

    Returns `{"shape", "centre": [[x, y]] * F (pixels from the top-left corner, pixel centres at +0.5),
    "size": [sqrt(area)] * F (pixels), "angle": [deg] * F (square: mod 90, triangle: mod 120, circle: 0),
    "found": [bool] * F, "frame_size": (H, W)}`. Frames where no object is found repeat the previous
    measurement (the next one for leading frames). `shape` skips shape detection when known.
    """
    if shape is not None and shape not in SHAPES:
        raise KinemaError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return _track_of(_masks(_frames_to_array(frames)), shape)


def _track_of(masks: np.ndarray, shape: str | None) -> dict:
    if shape is None:
        shape = _shape_of(masks)
    centres: list[list[float] | None] = []
    sizes: list[float | None] = []
    angles: list[float | None] = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        if len(xs) < _MIN_PIXELS:
            centres.append(None)
            sizes.append(None)
            angles.append(None)
            continue
        centre = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
        centres.append([centre[0], centre[1]])
        sizes.append(math.sqrt(len(xs)))
        angles.append(0.0 if shape == "circle" else _orientation(mask, centre, shape))
    found = [c is not None for c in centres]
    if not any(found):
        raise KinemaError("no object found in any frame: the clip has no shape brighter than its background")
    return {"shape": shape, "centre": _fill_gaps(centres), "size": _fill_gaps(sizes), "angle": _fill_gaps(angles),
            "found": found, "frame_size": (masks.shape[1], masks.shape[2])}


def _fill_gaps(values: list) -> list:
    first = next(v for v in values if v is not None)
    filled, last = [], first
    for value in values:
        last = value if value is not None else last
        filled.append(last)
    return filled


def _slope_span(values: np.ndarray) -> float:
    """Least-squares change of `values` `(F,)` from the first to the last frame (less noisy than last - first)."""
    count = len(values)
    t = np.arange(count, dtype=np.float64)
    t -= t.mean()
    return float(np.sum(t * (values - values.mean())) / np.sum(t * t) * (count - 1))


def _total_rotation(angles: list[float], period: float) -> float:
    """Sum of frame-to-frame angle steps, each wrapped into (-period/2, period/2]: a turn unwrapped across symmetry."""
    steps = np.diff(np.asarray(angles, dtype=np.float64))
    wrapped = -((-steps + period / 2) % period - period / 2)
    return float(np.sum(wrapped))


def motion_scores(measured: dict) -> dict[str, float]:
    """Whole-clip translation, scale and rotation of a `track` result, each divided by its threshold.

    Returns `{"x", "y", "scale", "rotation"}` signed (x > 0 right, y > 0 down, scale > 0 grows, rotation > 0
    clockwise): |score| > 1 means that cue passes its threshold (TRANSLATION_FRACTION of the frame side,
    SCALE_LOG_RATIO, ROTATION_DEGREES).
    """
    height, width = measured["frame_size"]
    centres = np.asarray(measured["centre"], dtype=np.float64)
    if len(centres) < 2:
        return {"x": 0.0, "y": 0.0, "scale": 0.0, "rotation": 0.0}
    sizes = np.log(np.maximum(np.asarray(measured["size"], dtype=np.float64), 1e-6))
    period = SYMMETRY_DEGREES.get(measured["shape"])
    rotation = 0.0 if period is None else _total_rotation(measured["angle"], period)
    return {"x": _slope_span(centres[:, 0]) / (TRANSLATION_FRACTION * width),
            "y": _slope_span(centres[:, 1]) / (TRANSLATION_FRACTION * height),
            "scale": _slope_span(sizes) / SCALE_LOG_RATIO,
            "rotation": rotation / ROTATION_DEGREES}


def detect_motion(frames: FrameInput, measured: dict | None = None) -> str:
    """One of kinema.data.synth's `MOTIONS` for `frames` `(F, 3, H, W)` float in [0, 1] or `(F, H, W, 3)` uint8.

    The cue (x or y displacement of the centre, log size change, rotation) with the largest score from
    `motion_scores` wins if that score passes its threshold (|score| > 1); its sign picks the direction;
    otherwise `still`. Pass a `track` result as `measured` to reuse it.
    """
    if measured is None:
        measured = track(frames)
    scores = motion_scores(measured)
    cue = max(scores, key=lambda name: abs(scores[name]))
    value = scores[cue]
    if abs(value) <= 1.0:
        return "still"
    names = {"x": ("right", "left"), "y": ("down", "up"), "scale": ("grow", "shrink"),
             "rotation": ("rotate_cw", "rotate_ccw")}[cue]
    return names[0] if value > 0 else names[1]


def detect(frames: FrameInput) -> dict:
    """`{"color", "shape", "motion"}` (the issue's spelling) of the object in `frames`.

    `frames`: `(F, 3, H, W)` float in [0, 1] or `(F, H, W, 3)` uint8.
    """
    images = _frames_to_array(frames)
    masks = _masks(images)
    measured = _track_of(masks, None)
    return {"color": _nearest_colour(images, masks), "shape": measured["shape"],
            "motion": detect_motion(frames, measured)}
