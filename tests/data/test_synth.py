import json

import numpy as np
import pytest
import torch

from kinema.data import synth, synth_limits
from kinema.data.probe import read_sidecar
from kinema.data.synth import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    SynthMotionDataset,
    shape_distance,
    synth_clip,
    write_synth_dataset,
)
from kinema.data.video_io import read_video, to_float_frames
from kinema.errors import KinemaError


def shape_mask(clip: synth.SynthClip, frame: int) -> np.ndarray:
    """Pixels nearer the shape's colour than the background's base colour, (H, W) bool."""
    truth = clip.ground_truth
    pixels = clip.frames[frame].astype(float)
    fill = np.array(COLOURS[truth["colour"]], float)
    back = np.array(BACKGROUND_COLOURS[truth["background"]["colour"]], float)
    return np.linalg.norm(pixels - fill, axis=-1) < np.linalg.norm(pixels - back, axis=-1)


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return xs.mean() + 0.5, ys.mean() + 0.5  # pixel (i, j) has its centre at (j + 0.5, i + 0.5)


def first_clip(motion: str, shape: str | None = None, seed: int = 0) -> synth.SynthClip:
    for index in range(500):
        clip = synth_clip(seed, index)
        if clip.ground_truth["motion"] == motion and shape in (None, clip.ground_truth["shape"]):
            return clip
    raise AssertionError(f"no {motion} clip in the first 500")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# ---------------------------------------------------------------- determinism


def test_same_seed_same_clip_and_caption():
    a, b = synth_clip(3, 5), synth_clip(3, 5)
    assert np.array_equal(a.frames, b.frames)
    assert a.text == b.text and a.ground_truth == b.ground_truth
    assert a.frames.shape == (16, 64, 64, 3) and a.frames.dtype == np.uint8


def test_different_seed_or_index_differs():
    base = synth_clip(0, 0).frames.astype(int)
    assert np.abs(base - synth_clip(1, 0).frames).mean() > 5
    assert np.abs(base - synth_clip(0, 1).frames).mean() > 5


def test_clip_does_not_depend_on_dataset_length_or_image_fraction():
    small, large = SynthMotionDataset(4, seed=2), SynthMotionDataset(40, seed=2)
    assert torch.equal(small[3]["frames"], large[3]["frames"]) and small[3]["text"] == large[3]["text"]
    mixed = SynthMotionDataset(40, seed=2, image_fraction=0.3)
    videos = [i for i in range(40) if mixed[i]["type"] == "video"]
    assert 15 < len(videos) < 40
    for i in videos[:5]:
        assert torch.equal(mixed[i]["frames"], large[i]["frames"]) and mixed[i]["text"] == large[i]["text"]


def test_dataset_items_are_the_clip_in_minus_one_to_one():
    dataset = SynthMotionDataset(3, seed=1, frames=6, size=32)
    item, clip = dataset[2], dataset.clip(2)
    assert item["frames"].shape == (6, 3, 32, 32) and item["frames"].dtype == torch.float32
    assert torch.equal(item["frames"], to_float_frames(clip.frames))
    assert item["frames"].min() >= -1 and item["frames"].max() <= 1
    assert torch.equal(((item["frames"][0, :, 4, 7] + 1) * 127.5).round().to(torch.uint8),
                       torch.from_numpy(clip.frames[0, 4, 7]))
    with pytest.raises(IndexError):
        dataset[3]
    images = SynthMotionDataset(2, seed=0, image_fraction=1.0)
    assert [images[i]["type"] for i in range(2)] == ["image", "image"]
    assert images[0]["frames"].shape == (1, 3, 64, 64) and images[0]["ground_truth"]["motion"] == "still"


# ---------------------------------------------------------------- ground truth matches the pixels


def test_centroid_tracks_recorded_centre_within_one_pixel():
    worst = 0.0
    for index in range(40):
        clip = synth_clip(0, index)
        for frame in range(clip.frames.shape[0]):
            x, y = centroid(shape_mask(clip, frame))
            cx, cy = clip.ground_truth["centre"][frame]
            worst = max(worst, abs(x - cx), abs(y - cy))
    assert worst < 1.0


def test_recorded_geometry_predicts_the_shape_mask():
    for index in range(40):
        clip = synth_clip(0, index)
        truth = clip.ground_truth
        for frame in (0, len(truth["centre"]) - 1):
            predicted = shape_distance(truth["shape"], truth["centre"][frame], truth["scale"][frame],
                                       truth["angle"][frame], truth["size"]) < 0
            assert iou(shape_mask(clip, frame), predicted) > 0.85


@pytest.mark.parametrize(("motion", "axis", "sign"), [("right", 0, 1), ("left", 0, -1), ("down", 1, 1), ("up", 1, -1)])
def test_translation_direction(motion, axis, sign):
    clip = first_clip(motion)
    recorded = np.array(clip.ground_truth["centre"])[:, axis]
    assert np.all(sign * np.diff(recorded) > 0)
    measured = centroid(shape_mask(clip, -1))[axis] - centroid(shape_mask(clip, 0))[axis]
    assert sign * measured > 15
    assert abs(measured - (recorded[-1] - recorded[0])) < 1.0
    other = np.array(clip.ground_truth["centre"])[:, 1 - axis]
    assert np.ptp(other) == 0


@pytest.mark.parametrize("motion", ["grow", "shrink"])
def test_zoom_changes_area(motion):
    clip = first_clip(motion)
    areas = [shape_mask(clip, f).sum() for f in range(16)]
    scales = clip.ground_truth["scale"]
    sign = 1 if motion == "grow" else -1
    assert np.all(sign * np.diff(scales) > 0)
    assert sign * (areas[-1] - areas[0]) > 0 and max(areas) / min(areas) > 3
    assert np.ptp(np.array(clip.ground_truth["centre"]), axis=0).max() == 0


def test_angle_increases_clockwise_on_screen():
    # Angle 0 points a triangle up; a quarter turn clockwise on screen (y down) points it right.
    right = shape_distance("triangle", (32, 32), 20, 90, 64) < 0
    xs = np.nonzero(right)[1] + 0.5
    assert xs.max() - 32 > 32 - xs.min() + 5


@pytest.mark.parametrize(("motion", "shape"), [("rotate_cw", "square"), ("rotate_ccw", "triangle")])
def test_recorded_angle_is_the_best_fitting_angle(motion, shape):
    clip = first_clip(motion, shape)
    truth = clip.ground_truth
    steps = np.diff(truth["angle"])
    assert np.all(steps > 0) if motion == "rotate_cw" else np.all(steps < 0)
    for frame in (0, 7, 15):
        observed = shape_mask(clip, frame)
        candidates = truth["angle"][frame] + np.arange(-20, 20.5, 0.5)
        scores = [iou(observed, shape_distance(shape, truth["centre"][frame], truth["scale"][frame], a, 64) < 0)
                  for a in candidates]
        assert abs(candidates[int(np.argmax(scores))] - truth["angle"][frame]) <= 1.0


def test_still_clips_do_not_change():
    clip = first_clip("still")
    assert np.array_equal(clip.frames[0], clip.frames[-1])


# ---------------------------------------------------------------- vocabulary and captions


def test_vocabulary_is_covered_and_captions_name_it():
    clips = [synth_clip(0, i) for i in range(200)]
    truths = [c.ground_truth for c in clips]
    assert {t["colour"] for t in truths} == set(COLOURS)
    assert {t["shape"] for t in truths} == set(SHAPES)
    assert {t["motion"] for t in truths} == set(MOTIONS)
    assert {t["background"]["kind"] for t in truths} == set(BACKGROUND_KINDS)
    assert not any(t["shape"] == "circle" and t["motion"].startswith("rotate") for t in truths)
    for clip, truth in zip(clips, truths, strict=True):
        assert truth["colour"] in clip.text
        assert any(word in clip.text for word in synth._SHAPE_WORDS[truth["shape"]])
        assert any(phrase in clip.text for phrase in synth._MOTION_WORDS[truth["motion"]])
        assert " a o" not in clip.text and " a a" not in clip.text and not clip.text.startswith("a o")
    assert len({c.text for c in clips}) > 150


def test_bad_synth_arguments():
    with pytest.raises(KinemaError, match="multiple of 16.*got 40; try 48"):
        synth_clip(0, 0, size=40)
    with pytest.raises(KinemaError, match="at least 2 frames"):
        SynthMotionDataset(3, frames=1)
    with pytest.raises(KinemaError, match="image_fraction"):
        SynthMotionDataset(3, image_fraction=1.5)
    with pytest.raises(KinemaError, match="seed and index must be >= 0"):
        synth_clip(-1, 0)


# ---------------------------------------------------------------- dataset folder


def test_write_synth_dataset_layout(tmp_path):
    out = tmp_path / "set"
    entries = write_synth_dataset(out, n=6, seed=4, frames=4, size=32, fps=6, image_fraction=0.5, progress=False)
    assert json.loads((out / "metadata.json").read_text()) == entries
    assert sorted(p.name for p in out.iterdir()) == ["images", "kinema-output.json", "metadata.json", "synth.json",
                                                     "videos"]
    dataset = SynthMotionDataset(6, seed=4, frames=4, size=32, image_fraction=0.5)
    assert {e["type"] for e in entries} == {"video", "image"}
    for index, entry in enumerate(entries):
        kind = dataset[index]["type"]
        assert entry["type"] == kind and entry["text"] == dataset[index]["text"]
        assert entry["file_path"] == (f"videos/{index:04d}.mp4" if kind == "video" else f"images/{index:04d}.png")
        assert entry["ground_truth"] == dataset[index]["ground_truth"]
        clip = read_video(out / entry["file_path"])
        assert clip.frames.shape[0] == (4 if kind == "video" else 1)
        side = read_sidecar(out / entry["file_path"])
        assert (side["prompt"], side["seed"], side["index"], side["fps"]) == (entry["text"], 4, index, 6)
    summary = json.loads((out / "synth.json").read_text())
    assert (summary["n"], summary["seed"], summary["frames"], summary["width"], summary["image_fraction"]) == (
        6, 4, 4, 32, 0.5)
    assert list(tmp_path.iterdir()) == [out]


def test_png_clips_are_folders_of_the_rendered_frames_and_train_as_videos(tmp_path):
    from kinema.data.dataset import VideoTextDataset

    out = tmp_path / "set"
    entries = write_synth_dataset(out, n=4, seed=2, frames=4, size=32, image_fraction=0.25, progress=False,
                                  video_format="png")
    videos = [(index, e) for index, e in enumerate(entries) if e["type"] == "video"]
    assert videos and all(e["file_path"] == f"videos/{index:04d}" for index, e in videos)
    assert json.loads((out / "synth.json").read_text())["video_format"] == "png"
    for index, entry in videos:  # lossless: the frames read back are the rendered ones, bit for bit
        rendered = synth_clip(2, index, frames=4, size=32, image_fraction=0.25).frames
        assert torch.equal(read_video(out / entry["file_path"]).frames, to_float_frames(rendered))
    dataset = VideoTextDataset(out, "metadata.json", frames=4, size=(32, 32))
    assert sorted(e["type"] for e in dataset.entries) == sorted(e["type"] for e in entries)
    with pytest.raises(KinemaError, match="video_format must be one of mp4, png"):
        write_synth_dataset(tmp_path / "other", n=1, progress=False, video_format="gif")


def test_several_workers_write_the_same_dataset(tmp_path):
    one = write_synth_dataset(tmp_path / "one", n=40, seed=5, frames=3, size=16, image_fraction=0.2, progress=False,
                              video_format="png", hold_out=[("red", "circle", "left")])
    two = write_synth_dataset(tmp_path / "two", n=40, seed=5, frames=3, size=16, image_fraction=0.2, progress=False,
                              video_format="png", hold_out=[("red", "circle", "left")], workers=2)
    assert one == two
    files = {path.relative_to(tmp_path / "one"): path.read_bytes() for path in (tmp_path / "one").rglob("*")
             if path.is_file() and path.name not in ("kinema-output.json", "synth.json")}
    assert len(files) > 40 and files == {path.relative_to(tmp_path / "two"): path.read_bytes()
                                         for path in (tmp_path / "two").rglob("*") if path.relative_to(
                                             tmp_path / "two") in files}
    with pytest.raises(KinemaError, match="workers must be a whole number >= 1"):
        write_synth_dataset(tmp_path / "three", n=1, progress=False, workers=0)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(frames, path, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(frames, path, **kwargs)

    real = synth.write_video
    monkeypatch.setattr(synth, "write_video", failing)
    with pytest.raises(KeyboardInterrupt):
        write_synth_dataset(tmp_path / "set", n=5, frames=3, size=16, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_replaces_previous_output_but_not_other_folders(tmp_path):
    out = tmp_path / "set"
    write_synth_dataset(out, n=4, seed=0, frames=3, size=16, progress=False)
    with pytest.raises(KinemaError, match="already exists .an earlier kinema synth dataset.; pass --overwrite"):
        write_synth_dataset(out, n=2, seed=1, frames=3, size=16, progress=False)
    write_synth_dataset(out, n=2, seed=1, frames=3, size=16, progress=False, overwrite=True)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["0000.mp4", "0000.mp4.json", "0001.mp4",
                                                                  "0001.mp4.json"]
    assert json.loads((out / "synth.json").read_text())["seed"] == 1
    assert list(tmp_path.iterdir()) == [out]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(KinemaError, match="kinema did not write it"):
        write_synth_dataset(mine, n=2, progress=False, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(KinemaError, match="is a file"):
        write_synth_dataset(tmp_path / "file", n=2, progress=False)


def test_hold_out_leaves_out_exactly_those_combinations(tmp_path):
    n = 12
    combos = [(c.ground_truth["colour"], c.ground_truth["shape"], c.ground_truth["motion"])
              for c in (synth_clip(3, i, 4, 32) for i in range(n))]
    held = [combos[1], combos[5]]
    entries = write_synth_dataset(tmp_path / "set", n=n, seed=3, frames=4, size=32, progress=False, hold_out=held)
    kept = [i for i, combo in enumerate(combos) if combo not in held]
    assert [e["file_path"] for e in entries] == [f"videos/{i:04d}.mp4" for i in kept]
    assert all(e["text"] == synth_clip(3, i, 4, 32).text for e, i in zip(entries, kept, strict=True))
    assert json.loads((tmp_path / "set" / "synth.json").read_text())["hold_out"] == sorted(map(list, set(held)))


def test_hold_out_names_are_checked():
    with pytest.raises(KinemaError, match="unknown colour 'pink'.*known: red"):
        synth.check_combinations([("pink", "circle", "left")])
    with pytest.raises(KinemaError, match="colour:shape:motion"):
        synth.check_combinations([("red", "circle")])
    with pytest.raises(KinemaError, match="red:circle:rotate_cw holds nothing out: the synthetic world never rotates"):
        synth.check_combinations([("red", "circle", "rotate_cw")])
    every = [(c, s, m) for c in synth_limits.COLOUR_NAMES for s in synth_limits.SHAPES for m in synth_limits.MOTIONS
             if not (s == "circle" and m.startswith("rotate"))]
    with pytest.raises(KinemaError, match="every colour, shape and motion .* so no video could be drawn; hold out "
                                          "fewer"):
        synth.check_combinations(every)  # it said "draw more clips (--n)", which can never help
    assert len(synth.check_combinations(every[1:])) == len(every) - 1


def test_hold_out_on_the_command_line_takes_spaces_and_an_empty_set_is_refused(tmp_path, capsys):
    from kinema.cli import main

    combos = [(c.ground_truth["colour"], c.ground_truth["shape"], c.ground_truth["motion"])
              for c in (synth_clip(3, i, 2, 16) for i in range(2))]
    spaced = " , ".join(" : ".join(combo) for combo in combos)  # every clip drawn is held out
    assert main(["data", "synth", "--out", str(tmp_path / "set"), "--n", "2", "--seed", "3", "--frames", "2",
                 "--size", "16", "--hold-out", spaced]) == 1  # known once the clips are drawn
    err = capsys.readouterr().err
    assert "every one of the 2 clips drawn shows a held-out combination" in err and err.count("\n") == 1
    assert not (tmp_path / "set").exists()
    assert main(["data", "synth", "--out", str(tmp_path / "set"), "--n", "2", "--seed", "3", "--frames", "2",
                 "--size", "16", "--hold-out", " : ".join(combos[0])]) == 0
    assert len(json.loads((tmp_path / "set" / "metadata.json").read_text())) == 1
