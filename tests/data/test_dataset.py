import json
import logging
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kinema.data.dataset import TrainBatches, VideoTextDataset, collate
from kinema.data.sampler import BatchOrder
from kinema.data.synth import write_synth_dataset
from kinema.data.video_io import read_video, write_video
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


# ---------------------------------------------------------------- load_item, groups, buckets, timeouts, batches


def test_load_item_equals_getitem_after_set_epoch(synth_root):
    dataset = VideoTextDataset(synth_root, frames=3, stride=2, size=(16, 24), random_crop=True, flip=True,
                               text_dropout=0.5, seed=4)
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        for i in range(N):
            item, loaded = dataset[i], dataset.load_item(i, epoch)
            assert torch.equal(item["pixels"], loaded["pixels"])
            assert (item["text"], item["type"], item["index"]) == (loaded["text"], loaded["type"], loaded["index"])
            explicit = dataset.load_item(i, epoch, size=(16, 24), frames=3 if item["type"] == "video" else 1)
            assert torch.equal(explicit["pixels"], item["pixels"])
    assert dataset.groups() == [(e["type"], None) for e in metadata(synth_root)]
    assert dataset.bucket_shape(("video", None)) == ((16, 24), 3)
    assert dataset.bucket_shape(("image", None)) == ((16, 24), 1)
    with pytest.raises(KinemaError, match=r"unknown group \('video', 0\)"):
        dataset.bucket_shape(("video", 0))


def test_load_item_at_another_shape(synth_root):
    dataset = VideoTextDataset(synth_root, frames=3, size=(16, 24))
    video = next(i for i, e in enumerate(metadata(synth_root)) if e["type"] == "video")
    image = next(i for i, e in enumerate(metadata(synth_root)) if e["type"] == "image")
    # No resize needed at (32, 32): the clip is an exact strided window of the decoded file.
    clip = dataset.load_item(video, 1, size=(32, 32), frames=5)["pixels"]
    assert clip.shape == (5, 3, 32, 32)
    assert matching_start(read_video(synth_root / metadata(synth_root)[video]["file_path"]).frames, clip, 1) is not None
    still = dataset.load_item(image, 1, size=(32, 32), frames=4)["pixels"]
    full = read_video(synth_root / metadata(synth_root)[image]["file_path"]).frames
    assert still.shape == (4, 3, 32, 32) and all(torch.equal(still[k], full[0]) for k in range(4))


def test_replacement_stays_in_the_group(data_copy, caplog):
    entries = metadata(data_copy)
    videos = [i for i, e in enumerate(entries) if e["type"] == "video"]
    # The first video whose next entry is an image: dataset[i] takes that image, load_item the next video.
    bad = next(i for i in videos if entries[i + 1]["type"] == "image")
    (data_copy / entries[bad]["file_path"]).write_bytes(b"\x00garbage" * 100)
    dataset = VideoTextDataset(data_copy, frames=2, size=(16, 16))
    with caplog.at_level(logging.WARNING, logger="kinema"):
        replaced = dataset.load_item(bad, 0)
    assert replaced["index"] == videos[(videos.index(bad) + 1) % len(videos)] and replaced["type"] == "video"
    assert dataset[bad]["index"] == bad + 1 and dataset.skipped == 1


def write_clip(root, name, height, width, frames, seed):
    """A small random clip (or a PNG still when frames is None) under root; returns its metadata entry."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(frames or 1, 3, height, width, generator=generator) * 2 - 1
    write_video(pixels, root / name)
    return {"file_path": name, "text": f"caption {name}", "type": "image" if frames is None else "video"}


BUCKETS = [(8, 16, 4), (16, 8, 4), (8, 16, 8)]


@pytest.fixture(scope="module")
def bucket_root(tmp_path_factory):
    """Wide (16 x 32) and tall (32 x 16) videos and stills, a square video, and one video too short for any bucket."""
    root = tmp_path_factory.mktemp("buckets")
    entries = [
        write_clip(root, "wide_long.mp4", 16, 32, 12, 0),   # 0.5: buckets 0 and 2; 12 frames fit 8 -> bucket 2
        write_clip(root, "wide_short.mp4", 16, 32, 6, 1),   # 0.5, 6 frames: only bucket 0 (4)
        write_clip(root, "tall.webm", 32, 16, 6, 2),        # 2.0 -> bucket 1 (no frame count in a webm header)
        write_clip(root, "tall_tiny.mp4", 32, 16, 3, 3),    # 3 frames: shorter than every bucket
        write_clip(root, "wide.png", 16, 32, None, 4),      # still, 0.5 -> first listed: bucket 0
        write_clip(root, "tall.png", 32, 16, None, 5),      # still, 2.0 -> bucket 1
        write_clip(root, "square.mp4", 24, 24, 10, 6),      # 1.0: as near 0.5 as 2.0 -> most frames: bucket 2
        write_clip(root, "wide_long2.mp4", 16, 32, 9, 7),   # 0.5, 9 frames -> bucket 2
    ]
    write_metadata(root, entries)
    return root


def test_entries_go_to_the_nearest_bucket_that_fits(bucket_root, caplog):
    with caplog.at_level(logging.WARNING, logger="kinema"):
        dataset = VideoTextDataset(bucket_root, buckets=BUCKETS, max_missing_fraction=0.2)
    assert "1 of 8 entries fit no bucket" in caplog.text and "tall_tiny.mp4 has 3 frames" in caplog.text
    assert [e["file_path"] for e in dataset.entries] == [
        "wide_long.mp4", "wide_short.mp4", "tall.webm", "wide.png", "tall.png", "square.mp4", "wide_long2.mp4"]
    assert dataset.groups() == [("video", 2), ("video", 0), ("video", 1), ("image", 0), ("image", 1), ("video", 2),
                                ("video", 2)]
    assert dataset.bucket_shape(("video", 2)) == ((8, 16), 8)
    assert dataset.bucket_shape(("image", 1)) == ((16, 8), 1)
    shapes = [tuple(dataset.load_item(i, 0)["pixels"].shape) for i in range(len(dataset))]
    assert shapes == [(8, 3, 8, 16), (4, 3, 8, 16), (4, 3, 16, 8), (1, 3, 8, 16), (1, 3, 16, 8), (8, 3, 8, 16),
                      (8, 3, 8, 16)]
    # At stride 2 bucket 2 needs 15 source frames and bucket 0/1 need 7: the long wide clip drops to bucket 0,
    # the 6-frame clips fit nothing.
    with caplog.at_level(logging.WARNING, logger="kinema"):
        strided = VideoTextDataset(bucket_root, buckets=BUCKETS, stride=2, max_missing_fraction=0.5)
    assert strided.groups() == [("video", 0), ("image", 0), ("image", 1), ("video", 0), ("video", 0)]



def test_entries_fitting_no_bucket_count_with_missing_files(bucket_root, tmp_path):
    root = shutil.copytree(bucket_root, tmp_path / "set")
    write_metadata(root, metadata(root) + [{"file_path": "absent.mp4", "text": "x"}])
    # 1 missing of 9 is allowed at 0.2 on its own; with the entry that fits no bucket 2 of 9 are not.
    with pytest.raises(KinemaError, match=r"1 entries fit no bucket .*; with the missing files 2 of 9 are "
                                          r"unusable, more than max_missing_fraction=0\.2") as caught:
        VideoTextDataset(root, buckets=BUCKETS, max_missing_fraction=0.2)
    assert "\n" not in str(caught.value)
    assert len(VideoTextDataset(root, buckets=BUCKETS, max_missing_fraction=0.25)) == 7


@pytest.mark.parametrize(("buckets", "message"), [
    ([], "buckets is an empty list"),
    ([(8, 16)], r"got \(8, 16\)"),
    ([(8, 16, 0)], r"got \(8, 16, 0\)"),
])
def test_bad_buckets(synth_root, buckets, message):
    with pytest.raises(KinemaError, match=message):
        VideoTextDataset(synth_root, buckets=buckets)


def test_slow_decode_is_skipped_after_the_timeout(synth_root, monkeypatch, caplog):
    import kinema.data.dataset as dataset_module

    entries = metadata(synth_root)
    slow = next(i for i, e in enumerate(entries) if e["type"] == "video")
    real_read = dataset_module.read_video
    wait = {"seconds": 5.0}
    release = threading.Event()
    slow_reads = []

    def slow_read(path, *args, **kwargs):
        if path.name == Path(entries[slow]["file_path"]).name:
            slow_reads.append(path)
            release.wait(wait["seconds"])
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "read_video", slow_read)
    dataset = VideoTextDataset(synth_root, frames=2, size=(16, 16), decode_timeout=0.2)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kinema"):
        item = dataset.load_item(slow, 0)
    # Far below the reader's 5 s, with room for a loaded machine.
    assert time.monotonic() - began < 3.0
    assert item["index"] != slow and item["type"] == "video"
    assert "longer than decode_timeout=0.2 s" in caplog.text and dataset.skipped == 1 and slow in dataset.bad
    # Known slow now: skipped without trying the file again.
    assert dataset.load_item(slow, 1)["index"] != slow and len(slow_reads) == 1
    release.set()
    # Without a limit the same file is read, however long it takes.
    release.clear()
    wait["seconds"] = 0.5
    patient = VideoTextDataset(synth_root, frames=2, size=(16, 16), decode_timeout=None)
    assert patient.load_item(slow, 0)["index"] == slow and patient.skipped == 0
    with pytest.raises(KinemaError, match="decode_timeout must be a positive number"):
        VideoTextDataset(synth_root, decode_timeout=0)


def test_slow_header_drops_the_entry_at_construction(bucket_root, monkeypatch, caplog):
    import kinema.data.dataset as dataset_module

    real_probe = dataset_module.probe

    def slow_probe(path):
        if path.name == "tall.png":
            time.sleep(1.0)
        return real_probe(path)

    monkeypatch.setattr(dataset_module, "probe", slow_probe)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        dataset = VideoTextDataset(bucket_root, buckets=BUCKETS, max_missing_fraction=0.5, decode_timeout=0.2)
    assert "tall.png" not in [e["file_path"] for e in dataset.entries]
    assert "2 of 8 entries fit no bucket or cannot be read" in caplog.text


def test_collate_stacks_one_shape(synth_root):
    dataset = VideoTextDataset(synth_root, frames=3, size=(16, 24))
    videos = [i for i, e in enumerate(metadata(synth_root)) if e["type"] == "video"]
    items = [dataset.load_item(i, 0) for i in videos]
    batch = collate(items)
    assert batch["pixels"].shape == (len(videos), 3, 3, 16, 24)
    assert all(torch.equal(batch["pixels"][k], items[k]["pixels"]) for k in range(len(videos)))
    assert batch["text"] == [item["text"] for item in items] and batch["type"] == ["video"] * len(videos)
    assert batch["index"] == videos
    with pytest.raises(KinemaError, match="cannot batch items of different shapes"):
        collate(items + [dataset.load_item(0 if 0 not in videos else 1, 0)])
    with pytest.raises(KinemaError, match="no items"):
        collate([])


def test_train_batches_in_workers_equal_a_direct_loop(bucket_root):
    dataset = VideoTextDataset(bucket_root, buckets=BUCKETS, max_missing_fraction=0.2, flip=True, random_crop=True,
                               text_dropout=0.3, seed=1)
    order = BatchOrder(dataset.groups(), batch_size=2, seed=6, world_size=2, image_ratio=0.3,
                       image_groups=[g for g in dataset.groups() if g[0] == "image"])
    batches = TrainBatches(dataset, order, start=5, rank=1, steps=7)
    loader = DataLoader(batches, batch_size=None, num_workers=2)
    got = list(loader)
    assert len(got) == 7
    for step, batch in zip(range(5, 12), got, strict=True):
        indices, group, epoch = order.batch(step, 1)
        size, frames = dataset.bucket_shape(group)
        items = [dataset.load_item(i, epoch, size, frames) for i in indices]
        assert batch["index"] == indices and batch["text"] == [item["text"] for item in items]
        assert batch["type"] == [group[0]] * 2
        assert batch["pixels"].shape == (2, frames, 3, *size)
        assert torch.equal(batch["pixels"], torch.stack([item["pixels"] for item in items]))
    # Without steps the batches go on, and a later start continues the same sequence.
    endless = TrainBatches(dataset, order, start=8, rank=1)
    assert len(endless) > 10**9
    assert torch.equal(endless[3]["pixels"], got[6]["pixels"]) and endless[3]["index"] == got[6]["index"]
    with pytest.raises(KinemaError, match="built on other groups"):
        TrainBatches(dataset, BatchOrder(dataset.groups()[1:], 1, 0), steps=1)
    with pytest.raises(KinemaError, match="rank 2 is outside"):
        TrainBatches(dataset, order, steps=1, rank=2)


@pytest.mark.parametrize("name", ["frames", "clip.webp", "clip.gif"])
def test_frame_folders_and_animations_are_read_without_buckets(tmp_path, name):
    # Without buckets the frame count comes from frame_count, which opened every path with PyAV: a folder of PNG
    # frames failed ("Is a directory") and was skipped for another clip.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    write_video(pixels, tmp_path / name)
    write_metadata(tmp_path, [{"file_path": name, "text": "a clip", "type": "video"}])
    dataset = VideoTextDataset(tmp_path, frames=4, stride=2, size=(16, 16), text_dropout=0.0)
    item = dataset[0]
    assert not dataset.bad
    assert matching_start(read_video(tmp_path / name).frames, item["pixels"], stride=2) is not None
