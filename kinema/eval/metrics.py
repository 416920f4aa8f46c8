"""Weight-free video metrics for `kinema eval`: temporal flicker, dynamic degree, seam score and first-frame PSNR.

Every function reads frames as float `(F, 3, H, W)` in [0, 1] (a torch tensor or a numpy array), what
`kinema.pipelines.generate()` returns per video. None of them needs model weights: flicker, seams and PSNR are pixel
arithmetic, and the dynamic degree's optical flow is OpenCV's Farneback (extra `[eval]`) where VBench runs RAFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kinema.errors import KinemaError

# VBench's dynamic degree: a frame pair moves when the mean of its top 5% flow magnitudes passes
# 6 px x (shorter side / 256) x max(1, 8 / fps), and a video is dynamic when round(4 x frames / 16) pairs move.
TOP_FLOW_FRACTION = 0.05
FLOW_THRESHOLD_PX_AT_256 = 6.0
# PSNR of identical images would be infinite; capped so every report holds a finite number.
MAX_PSNR_DB = 100.0
# A mean frame difference below this (in [0, 1] units, 1/4000 of one 8-bit level) counts as no change at all.
_STILL = 1e-6


def _frames(frames: torch.Tensor | np.ndarray, what: str = "frames") -> np.ndarray:
    """Float `(F, 3, H, W)` in [0, 1] (tensor or array) -> float64 numpy of the same shape; one KinemaError line
    for anything else."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[1] != 3 or \
            not np.issubdtype(frames.dtype, np.floating):
        raise KinemaError(f"{what} must be float (F, 3, H, W) in [0, 1]; got "
                          f"{getattr(frames, 'dtype', type(frames).__name__)} of shape {getattr(frames, 'shape', '?')}")
    if 0 in frames.shape:
        raise KinemaError(f"{what} are empty: shape {frames.shape}")
    if not np.isfinite(frames).all():  # NaN passes every range check, and would score as a still video
        raise KinemaError(f"{what} hold NaN or infinity, which no video has")
    low, high = float(frames.min()), float(frames.max())
    if low < -0.02 or high > 1.02:
        raise KinemaError(f"{what} must be in [0, 1], got values in [{low:.3f}, {high:.3f}]; frames from read_video "
                          "are in [-1, 1]: pass (frames + 1) / 2")
    return np.clip(frames.astype(np.float64), 0.0, 1.0)


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float `(F, 3, H, W)` in [0, 1] -> uint8 `(F, H, W, 3)`: the 8-bit images a written video holds."""
    return np.round(frames * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _consecutive_differences(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between frame t and t + 1 over pixels and channels, `(F - 1,)`."""
    return np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))


def temporal_flicker(frames: torch.Tensor | np.ndarray) -> float:
    """VBench's temporal flickering score of frames `(F, 3, H, W)` in [0, 1]: 1 for a frozen video, lower the more
    consecutive frames differ.

    VBench (Vchitect/VBench, vbench/temporal_flickering.py, `cal_score`) takes the mean absolute error between each
    pair of consecutive 8-bit frames, averages it over the video and scores (255 - mean) / 255. The frames are
    rounded to 8 bits first, as VBench reads them from a video file. VBench applies it to videos of static scenes
    (its prompts), where every change is flicker; on a moving object it also counts the motion.
    """
    images = _to_uint8(_frames(frames)).astype(np.float64)
    if len(images) < 2:
        raise KinemaError("temporal flicker needs at least 2 frames")
    mean_error = float(np.mean(np.abs(np.diff(images, axis=0)).mean(axis=(1, 2, 3))))
    return (255.0 - mean_error) / 255.0


@dataclass
class DynamicDegree:
    """What `dynamic_degree` measured: `dynamic` is VBench's per-video verdict; `magnitude` the mean over frame pairs
    of each pair's top-5% flow magnitude (pixels per frame); `pair_magnitudes` that value per pair `(F - 1)`;
    `threshold` the per-pair bar in pixels and `pairs_needed` how many pairs must pass it."""

    dynamic: bool
    magnitude: float
    threshold: float
    pairs_needed: int
    pair_magnitudes: list[float] = field(default_factory=list)


def optical_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Dense optical flow `(H, W, 2)` (dx, dy in pixels) from `first` to `second`, two uint8 `(H, W)` images, by
    OpenCV's Farneback: a pixel at (x, y) in `first` is at (x + dx, y + dy) in `second`."""
    try:
        import cv2
    except ImportError:
        raise KinemaError("the dynamic degree needs OpenCV's optical flow: pip install 'kinema[eval]' (or "
                          "opencv-python-headless)") from None
    # The settings of OpenCV's optical-flow tutorial (pyramid halving, 3 levels, 15 px window, 3 iterations, 5 px
    # polynomial neighbourhood with sigma 1.2): they follow a few pixels per frame at 64 px and above. OpenCV's
    # stubs type `flow` as an array, but None (allocate one) is what the function documents.
    flow = cv2.calcOpticalFlowFarneback(first, second, None, pyr_scale=0.5, levels=3,  # type: ignore[call-overload]
                                        winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
    return np.asarray(flow)


def dynamic_degree(frames: torch.Tensor | np.ndarray, fps: float = 8.0) -> DynamicDegree:
    """Whether frames `(F, 3, H, W)` in [0, 1] move, by VBench's dynamic degree with Farneback flow for RAFT.

    VBench (Vchitect/VBench, vbench/dynamic_degree.py): for each consecutive pair, the mean of the largest 5% of
    the flow magnitudes; a pair moves when that passes 6 x (min(H, W) / 256) x max(1, 8 / fps) pixels, and the
    video is dynamic once round(4 x F / 16) pairs move (at least 1 here; VBench's rounding gives 0 below 3 frames).
    The flow is computed on each frame's brightest channel (HSV value), not luma: in kinema's synthetic world a
    purple shape (luma 103) on a grey background (luma 105) would vanish in grey levels, while every shape's
    brightest channel stands far above every background's.
    """
    images = _frames(frames)
    count = len(images)
    if count < 2:
        raise KinemaError("the dynamic degree needs at least 2 frames")
    if not fps > 0:
        raise KinemaError(f"fps must be positive, got {fps}")
    value = np.round(images.max(axis=1) * 255).astype(np.uint8)  # (F, H, W)
    height, width = value.shape[1:]
    top = max(int(height * width * TOP_FLOW_FRACTION), 1)
    pair_magnitudes = []
    for first, second in zip(value[:-1], value[1:], strict=True):
        flow = optical_flow(first, second)
        magnitude = np.hypot(flow[..., 0], flow[..., 1]).ravel()
        pair_magnitudes.append(float(np.mean(np.sort(magnitude)[-top:])))
    threshold = max(1.0, 8.0 / fps) * FLOW_THRESHOLD_PX_AT_256 * min(height, width) / 256.0
    needed = max(round(4 * count / 16), 1)
    moving = sum(score > threshold for score in pair_magnitudes)
    return DynamicDegree(dynamic=moving >= needed, magnitude=float(np.mean(pair_magnitudes)), threshold=threshold,
                         pairs_needed=needed, pair_magnitudes=pair_magnitudes)


def seam_score(frames: torch.Tensor | np.ndarray, boundaries: Sequence[int]) -> float:
    """How much frames `(F, 3, H, W)` in [0, 1] jump where segments meet, relative to their ordinary change.

    The mean over `boundaries` (frame indices b, 1 <= b < F, each the first frame of a new segment or window) of
    the mean |frame[b] - frame[b - 1]|, divided by the median of all consecutive-frame differences. About 1 means
    the joins look like any other step; 2 means they jump twice as far. A video that never changes scores 1.
    """
    images = _frames(frames)
    count = len(images)
    if not boundaries:
        raise KinemaError("seam_score needs at least one boundary (the index of a segment's first frame)")
    bad = [b for b in boundaries if not (isinstance(b, (int, np.integer)) and 1 <= b < count)]
    if bad:
        raise KinemaError(f"segment boundaries must be frame indices from 1 to {count - 1} (a segment's first "
                          f"frame); got {bad[:3]}")
    differences = _consecutive_differences(images)
    jump = float(np.mean([differences[b - 1] for b in boundaries]))
    typical = float(np.median(differences))
    if typical <= _STILL:
        return 1.0 if jump <= _STILL else jump / _STILL
    return jump / typical


def video_psnr(frames: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray,
               what: str = "the reference") -> float:
    """PSNR in dB of `frames` `(F, 3, H, W)` against `reference` of the same shape, both in [0, 1], over all their
    pixels; identical frames give MAX_PSNR_DB (100)."""
    ours = _frames(frames)
    theirs = _frames(reference, what)
    if ours.shape != theirs.shape:
        raise KinemaError(f"{what} has shape (F, 3, H, W) {tuple(theirs.shape)} but the video compared with it "
                          f"{tuple(ours.shape)}; resize {what} to the video's size first")
    mse = float(np.mean((ours - theirs) ** 2))
    if mse <= 10 ** (-MAX_PSNR_DB / 10):
        return MAX_PSNR_DB
    return 10.0 * math.log10(1.0 / mse)


def first_frame_psnr(frames: torch.Tensor | np.ndarray, image: torch.Tensor | np.ndarray) -> float:
    """PSNR in dB of the first of `frames` `(F, 3, H, W)` against `image` `(3, H, W)`, both in [0, 1]: how well
    image-to-video kept its start image. Identical images give MAX_PSNR_DB (100)."""
    return video_psnr(frames[:1], image[None], "the image")
