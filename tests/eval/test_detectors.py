"""kinema/eval/detectors.py against the exact ground truth of kinema.data.synth clips, raw and through H.264."""

import numpy as np
import pytest
import torch

from kinema.data.synth import COLOURS, MOTIONS, SHAPES, SynthMotionDataset, shape_distance, synth_clip
from kinema.data.video_io import read_video, write_video
from kinema.errors import KinemaError
from kinema.eval import detect, detect_colour, detect_motion, detect_shape, segment_object, track

RAW_CLIPS = 200
H264_CLIPS = 40
PERIOD = {"square": 90.0, "triangle": 120.0}


def accuracies(clips, frames_of) -> dict[str, float]:
    """Fraction of clips whose detected colour, shape and motion equal the ground truth."""
    hits = {"color": 0, "shape": 0, "motion": 0}
    for clip in clips:
        found, truth = detect(frames_of(clip)), clip.ground_truth
        hits["color"] += found["color"] == truth["colour"]
        hits["shape"] += found["shape"] == truth["shape"]
        hits["motion"] += found["motion"] == truth["motion"]
    return {name: count / len(clips) for name, count in hits.items()}


@pytest.fixture(scope="module")
def raw_clips():
    return [synth_clip(0, index) for index in range(RAW_CLIPS)]


def test_the_clips_cover_every_colour_shape_and_motion(raw_clips):
    # Otherwise an accuracy over them would say nothing about the missing classes.
    assert {c.ground_truth["colour"] for c in raw_clips} == set(COLOURS)
    assert {c.ground_truth["shape"] for c in raw_clips} == set(SHAPES)
    assert {c.ground_truth["motion"] for c in raw_clips} == set(MOTIONS)


def test_detectors_match_the_ground_truth_on_rendered_clips(raw_clips):
    measured = accuracies(raw_clips, lambda clip: clip.frames)
    print(f"raw accuracy over {RAW_CLIPS} clips: {measured}")
    assert all(value >= 0.99 for value in measured.values()), measured


def test_detectors_match_the_ground_truth_after_an_h264_round_trip(tmp_path):
    clips = [synth_clip(1, index) for index in range(H264_CLIPS)]

    def decoded(clip):
        path = write_video(clip.frames, tmp_path / f"{id(clip)}.mp4", fps=8)
        return (read_video(path).frames + 1) / 2  # read_video gives [-1, 1]; detectors take [0, 1]

    measured = accuracies(clips, decoded)
    print(f"H.264 accuracy over {H264_CLIPS} clips: {measured}")
    assert all(value >= 0.97 for value in measured.values()), measured


def test_track_measures_centre_size_and_angle(raw_clips):
    for clip in raw_clips[:40]:
        truth = clip.ground_truth
        measured = track(clip.frames)
        centre_error = np.abs(np.asarray(measured["centre"]) - np.asarray(truth["centre"]))
        assert centre_error.max() < 0.35, (truth["shape"], centre_error.max())
        # sqrt(area) of the pure shape from its circumradius: pi r^2 for a circle, n/2 r^2 sin(2 pi / n) for n-gons.
        area_per_r2 = {"circle": np.pi, "square": 2.0, "triangle": 1.5 * np.sin(2 * np.pi / 3)}[truth["shape"]]
        expected = np.sqrt(area_per_r2) * np.asarray(truth["scale"])
        assert np.abs(np.asarray(measured["size"]) / expected - 1).max() < 0.08
        if truth["shape"] in PERIOD:
            period = PERIOD[truth["shape"]]
            gap = (np.asarray(measured["angle"]) - np.asarray(truth["angle"])) % period
            assert np.minimum(gap, period - gap).max() < 3.0, (truth["shape"], gap)


def test_segment_object_matches_the_rendered_shape_for_both_input_forms(raw_clips):
    for clip in raw_clips[:30]:
        truth = clip.ground_truth
        inside = shape_distance(truth["shape"], truth["centre"][0], truth["scale"][0], truth["angle"][0],
                                truth["size"]) < 0
        as_uint8 = segment_object(clip.frames[0])
        as_float = segment_object(torch.from_numpy(clip.frames[0]).permute(2, 0, 1).float() / 255)
        # float32 rounding may move the few edge pixels sitting exactly on the threshold, nothing more.
        assert (as_uint8 != as_float).sum() <= max(4, 0.03 * inside.sum())
        for mask in (as_uint8, as_float):
            iou = (mask & inside).sum() / (mask | inside).sum()
            assert iou > 0.85, (truth, iou)


def test_single_detectors_agree_with_detect_on_dataset_tensors():
    dataset = SynthMotionDataset(12, seed=3)
    for index in range(len(dataset)):
        item = dataset[index]
        frames = (item["frames"] + 1) / 2
        truth = item["ground_truth"]
        assert detect_colour(frames) == truth["colour"]
        assert detect_shape(frames) == truth["shape"]
        assert detect_motion(frames) == truth["motion"]
        assert track(frames, truth["shape"])["shape"] == truth["shape"]


def test_bad_input_raises_one_clear_error():
    clip = synth_clip(0, 0)
    minus_one_to_one = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    with pytest.raises(KinemaError, match=r"\(frames \+ 1\) / 2"):
        detect(minus_one_to_one)
    with pytest.raises(KinemaError, match="uint8 frames shaped"):
        detect(clip.frames.astype(np.float32))
    with pytest.raises(KinemaError, match="got NaN or infinity"):
        detect(torch.full((4, 3, 16, 16), float("nan")))
    with pytest.raises(KinemaError, match="no object found"):
        detect(np.full((4, 16, 16, 3), 90, dtype=np.uint8))
    with pytest.raises(KinemaError, match="one frame shaped"):
        segment_object(clip.frames)
    with pytest.raises(KinemaError, match="unknown shape"):
        track(clip.frames, "hexagon")
