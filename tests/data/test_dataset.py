import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from kinema.data.dataset import VideoTextDataset
from kinema.data.synth import write_synth_dataset
from kinema.data.video_io import read_video
from kinema.errors import KinemaError

N = 8


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "set"
    write_synth_dataset(root, n=N, seed=3, frames=16, size=32, fps=8, image_fraction=0.3, progress=False)
    return root


@pytest.fixture
def data_copy(synth_root, tmp_path):
    """A copy of the synth set that a test may damage."""
    return shutil.copytree(synth_root, tmp_path / "set")


def metadata(root):
    return json.loads((root / "metadata.json").read_text())


def write_metadata(root, entries):
    (root / "metadata.json").write_text(json.dumps(entries))


def matching_start(full, clip, stride):
    """The start s with full[s::stride][:len(clip)] == clip, or None; full and clip are (F, 3, H, W)."""
    for start in range(full.shape[0]):
        window = full[start::stride][:clip.shape[0]]
        if window.shape == clip.shape and torch.equal(window, clip):
            return start
    return None


def test_synth_has_both_types(synth_root):
    assert {e["type"] for e in metadata(synth_root)} == {"video", "image"}


def test_items_are_strided_centre_crops_of_the_files(synth_root):
    # (32, 16) from 32 x 32 needs no scaling, so the item must be exact columns 8:24 of decoded frames.
    dataset = VideoTextDataset(synth_root, frames=4, stride=3, size=(32, 16))
    entries = metadata(synth_root)
    assert len(dataset) == N
    for i, entry in enumerate(entries):
        item = dataset[i]
        full = read_video(synth_root / entry["file_path"]).frames[..., 8:24]
        assert item["type"] == entry["type"] and item["text"] == entry["text"] and item["index"] == i
        assert item["pixels"].dtype == torch.float32
        if entry["type"] == "video":
            assert item["pixels"].shape == (4, 3, 32, 16)
            start = matching_start(full, item["pixels"], 3)
            assert start is not None and start + 9 < 16
        else:
            assert item["pixels"].shape == (1, 3, 32, 16)
            assert torch.equal(item["pixels"], full)
    assert dataset.skipped == 0


def pil_cover_resize(path, side):
    """An independent reference: the still scaled by Pillow (bilinear, antialiased) to side x side, (3, H, W)."""
    with Image.open(path) as image:
        scaled = np.array(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR))
    return torch.from_numpy(scaled).permute(2, 0, 1).float() / 127.5 - 1


@pytest.mark.parametrize("random_crop", [False, True])
def test_resized_items_match_pillow(synth_root, random_crop):
    # 32 x 32 -> (16, 24): scaled to 24 x 24 to cover the width, then 16 of the 24 rows kept.
    dataset = VideoTextDataset(synth_root, frames=5, size=(16, 24), image_frames=3, random_crop=random_crop)
    tops = set()
    for i, entry in enumerate(metadata(synth_root)):
        pixels = dataset[i]["pixels"]
        assert pixels.shape == ((5 if entry["type"] == "video" else 3), 3, 16, 24)
        assert pixels.min() >= -1 and pixels.max() <= 1
        if entry["type"] != "image":
            continue
        assert torch.equal(pixels[0], pixels[2])
        reference = pil_cover_resize(synth_root / entry["file_path"], 24)
        # Pillow rounds to uint8, so one grey level apart at most.
        fits = [top for top in range(9) if (pixels[0] - reference[:, top:top + 16]).abs().max() <= 1.01 / 127.5]
        assert fits
        tops.add(fits[0])
    assert tops == {4} if not random_crop else len(tops) >= 1


def test_same_seed_and_epoch_give_identical_items_and_epochs_differ(synth_root):
    settings = dict(frames=4, stride=2, size=(16, 24), random_crop=True, flip=True, text_dropout=0.5, seed=7)
    a, b = VideoTextDataset(synth_root, **settings), VideoTextDataset(synth_root, **settings)
    first = [a[i] for i in range(N)]
    for i in range(N):
        again = b[i]
        assert torch.equal(first[i]["pixels"], again["pixels"]) and first[i]["text"] == again["text"]
    a.set_epoch(1)
    later = [a[i] for i in range(N)]
    assert sum(not torch.equal(x["pixels"], y["pixels"]) for x, y in zip(first, later, strict=True)) >= N // 2
    assert any(x["text"] != y["text"] for x, y in zip(first, later, strict=True))
    a.set_epoch(0)
    assert all(torch.equal(a[i]["pixels"], first[i]["pixels"]) for i in range(N))
    other_seed = VideoTextDataset(synth_root, **{**settings, "seed": 8})
    assert any(not torch.equal(other_seed[i]["pixels"], first[i]["pixels"]) for i in range(N))


def test_text_dropout_rate(synth_root):
    captions = [e["text"] for e in metadata(synth_root)]
    dataset = VideoTextDataset(synth_root, frames=1, size=(8, 8), text_dropout=0.3)
    dropped = draws = 0
    for epoch in range(40):
        dataset.set_epoch(epoch)
        for i in range(N):
            text = dataset[i]["text"]
            assert text in ("", captions[i])
            dropped += text == ""
            draws += 1
    bound = 4 * math.sqrt(0.3 * 0.7 / draws)
    assert abs(dropped / draws - 0.3) < bound
    never = VideoTextDataset(synth_root, frames=1, size=(8, 8), text_dropout=0.0)
    always = VideoTextDataset(synth_root, frames=1, size=(8, 8), text_dropout=1.0)
    assert [never[i]["text"] for i in range(N)] == captions
    assert [always[i]["text"] for i in range(N)] == [""] * N


def test_flip_is_a_mirror_of_the_unflipped_item(synth_root):
    plain = VideoTextDataset(synth_root, frames=3, size=(16, 16), seed=2)
    flipped = VideoTextDataset(synth_root, frames=3, size=(16, 16), seed=2, flip=True)
    mirrored = 0
    for epoch in range(2):
        plain.set_epoch(epoch)
        flipped.set_epoch(epoch)
        for i in range(N):
            a, b = plain[i]["pixels"], flipped[i]["pixels"]
            if torch.equal(b, torch.flip(a, dims=(-1,))):
                mirrored += 1
            else:
                assert torch.equal(a, b)
    assert 0 < mirrored < 2 * N


@pytest.mark.parametrize(("entries", "message"), [
    ({"file_path": "a.mp4", "text": "x"}, "must hold a non-empty JSON list of entries, got dict"),
    ([], "got an empty list"),
    ([{"file_path": "a.mp4", "text": "x"}, "b.mp4"], "1 entries are not JSON objects .first at index 1"),
    ([{"text": "x"}, {"file_path": "", "text": "y"}], "2 entries have no file_path .first at index 0"),
    ([{"file_path": "a.mp4", "text": "x"}, {"file_path": "b.mp4"}, {"file_path": "c.mp4", "text": None}],
     "captions missing: 2 entries have no text string .first at index 1"),
    ([{"file_path": "a.mp4", "text": "x", "type": "audio"}], "entry 0 has unknown type 'audio'; use one of video"),
])
def test_bad_metadata_is_one_line(tmp_path, entries, message):
    write_metadata(tmp_path, entries)
    with pytest.raises(KinemaError, match=message) as caught:
        VideoTextDataset(tmp_path)
    assert "\n" not in str(caught.value)


def test_bad_files_and_settings(tmp_path, synth_root):
    with pytest.raises(KinemaError, match="no metadata file"):
        VideoTextDataset(tmp_path)
    (tmp_path / "metadata.json").write_text("[{")
    with pytest.raises(KinemaError, match="is not valid JSON"):
        VideoTextDataset(tmp_path)
    with pytest.raises(KinemaError, match="is not a folder"):
        VideoTextDataset(tmp_path / "nowhere")
    with pytest.raises(KinemaError, match="text_dropout is a probability"):
        VideoTextDataset(synth_root, text_dropout=1.5)
    with pytest.raises(KinemaError, match="stride=0"):
        VideoTextDataset(synth_root, stride=0)
    with pytest.raises(IndexError):
        VideoTextDataset(synth_root, frames=1)[N]


def test_missing_files_below_and_above_the_threshold(data_copy, caplog):
    entries = metadata(data_copy)
    (data_copy / entries[2]["file_path"]).unlink()
    (data_copy / entries[5]["file_path"]).unlink()
    with pytest.raises(KinemaError, match=r"2 of 8 files are missing, more than max_missing_fraction=0\.2"):
        VideoTextDataset(data_copy, max_missing_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        dataset = VideoTextDataset(data_copy, frames=2, size=(16, 16), max_missing_fraction=0.25)
    assert "2 of 8 files are missing" in caplog.text
    assert len(dataset) == 6
    assert [e["text"] for e in dataset.entries] == [e["text"] for i, e in enumerate(entries) if i not in (2, 5)]


def test_corrupt_file_is_skipped_counted_and_replaced(data_copy, caplog):
    entries = metadata(data_copy)
    bad = next(i for i, e in enumerate(entries) if e["type"] == "video")
    (data_copy / entries[bad]["file_path"]).write_bytes(b"\x00garbage" * 100)
    dataset = VideoTextDataset(data_copy, frames=2, size=(16, 16))
    with caplog.at_level(logging.WARNING, logger="kinema"):
        item = dataset[bad]
    assert item["index"] == bad + 1 and item["text"] == entries[bad + 1]["text"]
    assert torch.equal(item["pixels"], dataset[bad + 1]["pixels"])
    assert dataset.skipped == 1 and entries[bad]["file_path"] in caplog.text
    assert dataset[bad]["index"] == bad + 1 and dataset.skipped == 1


def test_too_short_videos_are_skipped(synth_root, caplog):
    entries = metadata(synth_root)
    videos = [i for i, e in enumerate(entries) if e["type"] == "video"]
    # 16 frames at stride 2 span 31 source frames; the clips have 16.
    dataset = VideoTextDataset(synth_root, frames=16, stride=2, size=(16, 16))
    with caplog.at_level(logging.WARNING, logger="kinema"):
        items = [dataset[i] for i in range(N)]
    assert all(item["type"] == "image" for item in items)
    assert dataset.skipped == len(videos) and "fewer than the 31" in caplog.text
    assert VideoTextDataset(synth_root, frames=16, stride=1, size=(16, 16))[videos[0]]["pixels"].shape[0] == 16
