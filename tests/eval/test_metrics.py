"""kinema.eval.metrics against plain numpy rewrites of each formula and constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from kinema.data.synth import synth_clip
from kinema.errors import KinemaError
from kinema.eval.metrics import dynamic_degree, first_frame_psnr, optical_flow, seam_score, temporal_flicker, video_psnr


def as_float(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 `(F, H, W, 3)` -> float `(F, 3, H, W)` in [0, 1]."""
    return torch.from_numpy(frames_uint8).permute(0, 3, 1, 2).float() / 255


def texture(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random grey texture `(size, size)` float in [0, 255]: something optical flow can follow."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (8, 8)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)).clip(0, 255)


def first_clip(motion: str) -> np.ndarray:
    """Frames uint8 `(16, 64, 64, 3)` of the first synth clip (seed 0) with `motion`."""
    return next(clip.frames for clip in (synth_clip(0, i) for i in range(200)) if clip.ground_truth["motion"] == motion)


def test_temporal_flicker_is_vbench_mean_absolute_error_score():
    frames = np.random.default_rng(1).integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    errors = [np.mean(np.abs(frames[i].astype(np.float32) - frames[i + 1].astype(np.float32))) for i in range(4)]
    expected = (255.0 - np.mean(errors)) / 255.0
    assert temporal_flicker(as_float(frames)) == pytest.approx(expected, abs=1e-9)
    assert temporal_flicker(as_float(np.repeat(frames[:1], 4, axis=0))) == 1.0


def test_optical_flow_recovers_a_known_shift():
    image = texture(72)
    first = image[4:68, 4:68].astype(np.uint8)
    for dx, dy in [(3, -2), (-1, 2)]:
        # the content moves by (dx, dy): second[y, x] = first[y - dy, x - dx]
        second = image[4 - dy:68 - dy, 4 - dx:68 - dx].astype(np.uint8)
        flow = optical_flow(first, second)[16:48, 16:48]  # away from the borders, where content enters and leaves
        assert np.abs(flow - [dx, dy]).max() < 0.05


def test_dynamic_degree_of_a_steady_shift_is_its_length():
    image = texture(96)
    frames = np.stack([np.stack([image[16:80, 16 - 2 * t:80 - 2 * t]] * 3, axis=-1) for t in range(6)])
    measured = dynamic_degree(as_float(frames.astype(np.uint8)))
    # uniform flow of 2 px/frame: the top 5% of magnitudes average 2; VBench's bar at 64 px is 6 * 64 / 256 = 1.5
    assert measured.magnitude == pytest.approx(2.0, abs=0.1)
    assert measured.threshold == pytest.approx(1.5) and measured.pairs_needed == 2 and measured.dynamic
    assert len(measured.pair_magnitudes) == 5


def test_still_synth_clip_is_not_dynamic_and_moving_one_is():
    still = dynamic_degree(as_float(first_clip("still")))
    moving = dynamic_degree(as_float(first_clip("right")))
    assert not still.dynamic and still.magnitude < 0.1
    assert moving.dynamic and moving.magnitude > moving.threshold
    assert moving.pairs_needed == 4  # round(4 * 16 / 16)
    slow = dynamic_degree(as_float(first_clip("right")), fps=4.0)  # fewer frames a second: twice the bar
    assert slow.threshold == pytest.approx(2 * moving.threshold)


def test_seam_score_of_a_constructed_jump():
    # uniform grey frames brightening by 0.01 a frame, with an extra 0.05 step into frame 6
    levels = np.arange(10) * 0.01 + np.where(np.arange(10) >= 6, 0.05, 0.0)
    frames = torch.tensor(levels, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 3, 4, 4)
    assert seam_score(frames, [6]) == pytest.approx(6.0, rel=1e-4)  # 0.06 over the median step 0.01
    assert seam_score(frames, [3]) == pytest.approx(1.0, rel=1e-4)
    assert seam_score(frames, [3, 6]) == pytest.approx(3.5, rel=1e-4)
    assert seam_score(torch.full((4, 3, 2, 2), 0.5), [2]) == 1.0  # never changes: seamless


def test_seam_score_matches_a_numpy_rewrite():
    frames = np.random.default_rng(3).uniform(0, 1, (9, 3, 5, 6))
    boundaries = [2, 5, 8]
    steps = [np.mean(np.abs(frames[t + 1] - frames[t])) for t in range(8)]
    expected = np.mean([steps[b - 1] for b in boundaries]) / np.median(steps)
    assert seam_score(frames, boundaries) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(KinemaError, match="frame indices from 1 to 8"):
        seam_score(frames, [0])
    with pytest.raises(KinemaError, match="frame indices from 1 to 8"):
        seam_score(frames, [9])


def test_first_frame_psnr_known_answers():
    image = torch.full((3, 8, 8), 0.5)
    frames = torch.stack([image + 0.1, image])  # first frame off by 0.1 everywhere: MSE 0.01 -> 20 dB
    assert first_frame_psnr(frames, image) == pytest.approx(20.0, abs=1e-4)
    assert first_frame_psnr(frames[1:], image) == 100.0  # identical: capped, finite
    noisy = np.random.default_rng(0).uniform(0, 1, (1, 3, 8, 8))
    mse = np.mean((noisy[0] - 0.5) ** 2)
    assert first_frame_psnr(noisy, image.numpy()) == pytest.approx(10 * math.log10(1 / mse))
    with pytest.raises(KinemaError, match="resize the image"):
        first_frame_psnr(frames, torch.zeros(3, 4, 4))


def test_video_psnr_is_over_every_pixel_of_every_frame():
    reference = torch.full((2, 3, 8, 8), 0.5)
    frames = reference.clone()
    frames[0] += 0.2  # one frame of two off by 0.2: MSE 0.04 / 2 = 0.02
    assert video_psnr(frames, reference) == pytest.approx(10 * math.log10(1 / 0.02), abs=1e-4)
    assert video_psnr(reference, reference) == 100.0
    with pytest.raises(KinemaError, match=r"the held frames has shape \(F, 3, H, W\) \(1, 3, 8, 8\)"):
        video_psnr(frames, reference[:1], "the held frames")


def test_frames_outside_zero_one_are_refused():
    with pytest.raises(KinemaError, match=r"pass \(frames \+ 1\) / 2"):
        temporal_flicker(torch.full((2, 3, 4, 4), -1.0))
    # NaN passes a range check, and once scored as a still video (flicker 1.0).
    nan = np.full((8, 3, 16, 16), np.nan)
    for metric in (temporal_flicker, lambda v: seam_score(v, [4]), lambda v: video_psnr(v, v)):
        with pytest.raises(KinemaError, match="frames hold NaN or infinity, which no video has"):
            metric(nan)
