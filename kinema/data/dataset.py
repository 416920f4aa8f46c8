"""The training dataset: captioned videos and images listed in a metadata file, in the format `kinema data synth`
writes (a JSON list of `{"file_path": path relative to the data root, "text": caption, "type": "video"|"image"}`).

The metadata is checked once at construction, so a broken list fails before training step 1. Every random choice
of item `i` (clip start, crop, flip, caption dropout) comes from a generator seeded with `(seed, epoch, i)`: an item
is the same in every run and every DataLoader worker, and changes from epoch to epoch.

For training, `groups()` and `bucket_shape()` feed `kinema.data.sampler.BatchOrder`, `load_item(i, epoch, size,
frames)` reads one entry at a batch's shape, `collate` stacks a batch, and `TrainBatches` puts the three together as
a map-style dataset of whole micro-batches that DataLoader workers prefetch deterministically.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar, cast

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from kinema.data.probe import IMAGE_SUFFIXES, PIL_FORMATS, folder_frames, frame_count, oriented_size
from kinema.data.sampler import BatchOrder
from kinema.data.video_io import PILLOW_SUFFIXES, read_errors_named, read_video
from kinema.errors import KinemaError

logger = logging.getLogger(__name__)

TYPES = ("video", "image")
# What reading a broken file can raise (PyAV's errors, Pillow's truncated-file errors, read_video's KinemaError).
_READ_ERRORS = (KinemaError, OSError, av.FFmpegError, EOFError, SyntaxError, Image.DecompressionBombError)
# A group: (type, bucket index), the bucket None when the dataset has no buckets.
Group = tuple[str, int | None]
_T = TypeVar("_T")


class DecodeTimeout(KinemaError):
    """A file took longer than `decode_timeout` to read."""


def _check_settings(frames: int, stride: int, size: tuple[int, int], image_frames: int, text_dropout: float,
                    max_missing_fraction: float, decode_timeout: float | None) -> None:
    if frames < 1 or stride < 1 or image_frames < 1:
        raise KinemaError(f"frames, stride and image_frames must be >= 1, got frames={frames}, stride={stride}, "
                          f"image_frames={image_frames}")
    if len(size) != 2 or min(size) < 1:
        raise KinemaError(f"size must be (height, width) with both >= 1, got {size!r}")
    if not 0.0 <= text_dropout <= 1.0:
        raise KinemaError(f"text_dropout is a probability and must be in [0, 1], got {text_dropout}")
    if not 0.0 <= max_missing_fraction <= 1.0:
        raise KinemaError(f"max_missing_fraction must be in [0, 1], got {max_missing_fraction}")
    if decode_timeout is not None and not decode_timeout > 0:
        raise KinemaError(f"decode_timeout must be a positive number of seconds or None (no limit), "
                          f"got {decode_timeout}")


def _check_buckets(buckets: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    checked = []
    for bucket in buckets:
        if (isinstance(bucket, str) or len(bucket) != 3
                or not all(isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 1 for n in bucket)):
            raise KinemaError(f"each bucket must be (height, width, frames) with whole numbers >= 1, got "
                              f"{bucket!r}")
        checked.append((int(bucket[0]), int(bucket[1]), int(bucket[2])))
    if not checked:
        raise KinemaError("buckets is an empty list; give at least one (height, width, frames) or None for one size")
    return checked


def _read_metadata(root: Path, metadata: str | os.PathLike) -> tuple[Path, list[dict]]:
    """`root/metadata` checked: its path and every entry, each with a `type`, whether its file exists or not."""
    path = root / metadata
    if not root.is_dir():
        raise KinemaError(f"data root {root} is not a folder; pass the folder that holds {metadata}")
    if not path.is_file():
        raise KinemaError(f"no metadata file {path}; write one with `kinema data synth` or pass metadata=")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KinemaError(f"{path} is not valid JSON ({err}); fix or rewrite it") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise KinemaError(f"{path} is JSON nested too deeply to read; a metadata file is a list of entry objects: "
                          "fix or rewrite it") from None
    if not isinstance(entries, list) or not entries:
        raise KinemaError(f"{path} must hold a non-empty JSON list of entries, got "
                          f"{type(entries).__name__ if not isinstance(entries, list) else 'an empty list'}")
    not_objects = [i for i, e in enumerate(entries) if not isinstance(e, dict)]
    if not_objects:
        raise KinemaError(f"{path}: {len(not_objects)} entries are not JSON objects (first at index "
                          f"{not_objects[0]}); each entry needs file_path and text")
    no_path = [i for i, e in enumerate(entries) if not isinstance(e.get("file_path"), str) or not e["file_path"]]
    if no_path:
        raise KinemaError(f"{path}: {len(no_path)} entries have no file_path (first at index {no_path[0]}); "
                          f"give each entry a file_path relative to {root}")
    no_text = [i for i, e in enumerate(entries) if not isinstance(e.get("text"), str)]
    if no_text:
        raise KinemaError(f"{path}: captions missing: {len(no_text)} entries have no text string (first at index "
                          f"{no_text[0]}); give each entry a caption (\"\" for none)")
    checked = []
    for index, entry in enumerate(entries):
        kind = entry.get("type")
        if kind is None:
            # Older lists have no type; the file's extension decides.
            kind = "image" if Path(entry["file_path"]).suffix.lower() in IMAGE_SUFFIXES else "video"
        if kind not in TYPES:
            raise KinemaError(f"{path}: entry {index} has unknown type {kind!r}; use one of {', '.join(TYPES)}")
        checked.append({**entry, "type": kind})
    return path, checked


def read_metadata_entries(root: Path, metadata: str | os.PathLike) -> list[dict]:
    """Every entry of `root/metadata`, checked, each with a `type`, whether its file exists or not."""
    return _read_metadata(root, metadata)[1]


def load_metadata(root: Path, metadata: str | os.PathLike, max_missing_fraction: float) -> list[dict]:
    """Read and check `root/metadata`; returns the entries whose files exist, each with a `type`.

    Missing files are counted: above `max_missing_fraction` of all entries that is an error, at or below it a
    warning, and those entries are dropped.
    """
    path, checked = _read_metadata(root, metadata)
    return _drop_missing(root, path, checked, max_missing_fraction)


def _drop_missing(root: Path, path: Path, checked: list[dict], max_missing_fraction: float) -> list[dict]:
    present = [e for e in checked if (root / e["file_path"]).exists()]
    missing = len(checked) - len(present)
    if missing / len(checked) > max_missing_fraction:
        raise KinemaError(f"{path}: {missing} of {len(checked)} files are missing, more than "
                          f"max_missing_fraction={max_missing_fraction}; restore them or raise the setting")
    if missing:
        logger.warning("%s: %d of %d files are missing; training without them", path, missing, len(checked))
    return present


def resize_and_crop(pixels: torch.Tensor, size: tuple[int, int], position: float | None = None) -> torch.Tensor:
    """Scale `(F, 3, h, w)` so it covers `size` = (H, W) and crop to `(F, 3, H, W)`: centred when `position` is
    None, else at `position` in [0, 1) along the axis with spare pixels (0: top or left edge)."""
    height, width = size
    scale = max(height / pixels.shape[-2], width / pixels.shape[-1])
    # ceil, and never below the target, so float rounding cannot leave the scaled frame one pixel short.
    scaled = (max(height, math.ceil(pixels.shape[-2] * scale - 1e-6)),
              max(width, math.ceil(pixels.shape[-1] * scale - 1e-6)))
    if scaled != tuple(pixels.shape[-2:]):
        pixels = F.interpolate(pixels, size=scaled, mode="bilinear", align_corners=False, antialias=True)
        pixels = pixels.clamp(-1.0, 1.0)
    spare_y, spare_x = scaled[0] - height, scaled[1] - width
    if position is None:
        top, left = spare_y // 2, spare_x // 2
    else:
        # Scaling to cover leaves spare pixels along one axis only, so one draw places the crop.
        top, left = min(int(position * (spare_y + 1)), spare_y), min(int(position * (spare_x + 1)), spare_x)
    return pixels[..., top:top + height, left:left + width]


def probe(path: Path) -> tuple[int, int, int]:
    """`(height, width, frames)` of a video, animation, still or frame folder, from its header where it has one.

    Stills and frame folders are read by Pillow (headers only). For PyAV files the frame count is the container's
    when it records one, else estimated from the duration and frame rate (rounded down; a file that then decodes
    fewer frames is skipped when read), else counted by decoding.
    """
    if path.is_dir():
        files = folder_frames(path)
        if not files:
            raise KinemaError(f"{path} holds no frames")
        with Image.open(files[0], formats=PIL_FORMATS) as image:
            width, height = oriented_size(image)  # as read: a phone photo's EXIF turn applied
            return height, width, len(files)
    if path.suffix.lower() in PILLOW_SUFFIXES:
        with Image.open(path, formats=PIL_FORMATS) as image:
            width, height = oriented_size(image)
            return height, width, getattr(image, "n_frames", 1)
    with read_errors_named(path), av.open(str(path)) as container:
        if not container.streams.video:
            raise KinemaError(f"{path} has no video stream")
        stream = container.streams.video[0]
        height, width = stream.codec_context.height, stream.codec_context.width
        frames = int(stream.frames or 0)
        rate = stream.average_rate or stream.guessed_rate
        if not frames and rate and container.duration:
            frames = math.floor(Fraction(container.duration, av.time_base) * Fraction(rate))
        if not frames:
            frames = sum(1 for _ in container.decode(stream))
    if height < 1 or width < 1:
        raise KinemaError(f"{path} records no frame size in its header")
    return height, width, frames


def nearest_bucket(height: int, width: int, frames: int | None, buckets: Sequence[tuple[int, int, int]],
                   stride: int = 1) -> int | None:
    """The index of the bucket for a `height` x `width` entry with `frames` frames (None: a still), or None.

    Among the buckets the entry is long enough for (`(bucket frames - 1) * stride + 1` source frames; stills fit
    every bucket), those with the aspect ratio nearest the entry's (by |log(h/w) - log(H/W)|); among those the one
    with the most frames (for a still, and between equal frame counts, the first listed).
    """
    fitting = [b for b, (_, _, count) in enumerate(buckets) if frames is None or (count - 1) * stride + 1 <= frames]
    if not fitting:
        return None
    aspect = math.log(height / width)
    distance = {b: abs(aspect - math.log(buckets[b][0] / buckets[b][1])) for b in fitting}
    # Equal ratios written differently (9/16 vs 18/32) must tie, so compare within float rounding.
    nearest = [b for b in fitting if distance[b] <= min(distance.values()) + 1e-9]
    return nearest[0] if frames is None else max(nearest, key=lambda b: buckets[b][2])


def call_with_timeout(function: Callable[[], _T], timeout: float | None, what: str) -> _T:
    """`function()`, abandoned with a DecodeTimeout after `timeout` seconds (None: no limit).

    PyAV cannot be interrupted from Python, so the call runs in a daemon thread that is left behind on a timeout: it
    keeps its CPU and file handle until the decoder returns (or the process ends) and its result is thrown away.
    A decoder that holds the GIL through one long C call also delays the timeout until that call returns.
    """
    if timeout is None:
        return function()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as err:  # handed to the caller's thread as it is
            outcome["error"] = err

    thread = threading.Thread(target=run, name="kinema-decode", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise DecodeTimeout(f"reading {what} took longer than decode_timeout={timeout:g} s; it is left to finish "
                            f"in the background")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _decode(path: Path, kind: str, frames: int, stride: int, start_draw: float, total: int | None
            ) -> tuple[torch.Tensor | None, int | None, int]:
    """(`(F, 3, h, w)` frames or None when the video is too short, its frame count, the start frame); runs in the
    timeout thread, so it only reads and returns."""
    if kind == "image":
        return read_video(path, max_frames=1).frames, None, 0
    span = (frames - 1) * stride + 1
    if total is None:
        total = frame_count(path)
    if total < span:
        return None, total, 0
    start = min(int(start_draw * (total - span + 1)), total - span)
    return read_video(path, start=start, stride=stride, max_frames=frames).frames, total, start


class VideoTextDataset(Dataset):
    """Captioned clips from `root/metadata` for training.

    Item `i` is a dict: `pixels` float `(F, 3, H, W)` in [-1, 1] with `(H, W) = size` (`F = frames` for videos,
    `image_frames` copies of the still for images), `text` (the caption, or "" with probability `text_dropout` so
    the model also learns the unconditional prediction for CFG), `type` ("video" | "image") and `index` (the entry
    actually read; it differs from `i` only when entry `i` could not be used).

    Videos read `frames` frames `stride` apart from a start drawn per item and epoch; frames are resized so the
    shorter side fits and centre-cropped (randomly cropped with `random_crop`), and flipped left-right with
    probability 1/2 when `flip`. A file that fails to decode or takes longer than `decode_timeout` seconds, or a
    video too short for the frames asked, is logged as a warning, counted in `skipped` (per process: each
    DataLoader worker counts its own) and replaced by the next usable entry, so one bad file never stops a run.

    `buckets` [(height, width, frames), ...] replace `size` and `frames`: each entry goes, once at construction
    (sizes and lengths from the file headers), to the bucket `nearest_bucket` picks; its group is then
    `(type, bucket index)` and it is read at that bucket's size and frame count (images: `image_frames`). Entries
    too short for every bucket, or whose header cannot be read, are dropped with one warning and counted with the
    missing files against `max_missing_fraction`. Without buckets the groups are `(type, None)`.
    """

    def __init__(self, root: str | os.PathLike, metadata: str | os.PathLike = "metadata.json", frames: int = 16,
                 stride: int = 1, size: tuple[int, int] = (256, 256), image_frames: int = 1, text_dropout: float = 0.0,
                 flip: bool = False, max_missing_fraction: float = 0.0, seed: int = 0, random_crop: bool = False,
                 buckets: Sequence[tuple[int, int, int]] | None = None, decode_timeout: float | None = 30.0):
        size = (int(size[0]), int(size[1])) if len(size) == 2 else size
        _check_settings(frames, stride, size, image_frames, text_dropout, max_missing_fraction, decode_timeout)
        self.buckets = None if buckets is None else _check_buckets(buckets)
        self.root = Path(root)
        path, listed = _read_metadata(self.root, metadata)
        self.entries = _drop_missing(self.root, path, listed, max_missing_fraction)
        self.frames, self.stride, self.size, self.image_frames = frames, stride, size, image_frames
        self.text_dropout, self.flip, self.random_crop, self.seed = text_dropout, flip, random_crop, seed
        self.decode_timeout = decode_timeout
        self.epoch = 0
        # Frame counts as first read (headers with buckets, else frame_count): every process derives the same
        # numbers from the same file, so clip starts agree across DataLoader workers and resumed runs.
        self._lengths: dict[int, int] = {}
        if self.buckets is None:
            self._groups: list[Group] = [(e["type"], None) for e in self.entries]
        else:
            self._assign_buckets(path, len(listed), max_missing_fraction)
        self._members: dict[Group, list[int]] = {}
        for index, group in enumerate(self._groups):
            self._members.setdefault(group, []).append(index)
        self._position = {index: k for members in self._members.values() for k, index in enumerate(members)}
        self.bad: set[int] = set()  # unreadable or timed out: never tried again in this process
        self._skipped: set[int] = set()
        self._warned: set[tuple[int, int]] = set()

    def _assign_buckets(self, path: Path, listed: int, max_missing_fraction: float) -> None:
        assert self.buckets is not None
        kept: list[dict] = []
        groups: list[Group] = []
        lengths: dict[int, int] = {}
        unusable: list[str] = []
        for entry in self.entries:
            file = self.root / entry["file_path"]
            try:
                height, width, length = call_with_timeout(functools.partial(probe, file), self.decode_timeout,
                                                          str(file))
            except _READ_ERRORS as err:
                unusable.append(f"cannot read {entry['file_path']}: {err}")
                continue
            is_video = entry["type"] == "video"
            bucket = nearest_bucket(height, width, length if is_video else None, self.buckets, self.stride)
            if bucket is None:
                shortest = min(count for _, _, count in self.buckets)
                unusable.append(f"{entry['file_path']} has {length} frames, fewer than the "
                                f"{(shortest - 1) * self.stride + 1} the shortest bucket needs at stride {self.stride}")
                continue
            if is_video:
                lengths[len(kept)] = length
            kept.append(entry)
            groups.append((entry["type"], bucket))
        dropped = listed - len(kept)
        if unusable and dropped / listed > max_missing_fraction:
            raise KinemaError(f"{path}: {len(unusable)} entries fit no bucket or cannot be read (first: "
                              f"{unusable[0]}); with the missing files {dropped} of {listed} are unusable, more than "
                              f"max_missing_fraction={max_missing_fraction}; fix the files, add shorter buckets or "
                              f"raise the setting")
        if unusable:
            logger.warning("%s: %d of %d entries fit no bucket or cannot be read (first: %s); training without "
                           "them", path, len(unusable), listed, unusable[0])
        if not kept:
            raise KinemaError(f"{path}: no entry fits a bucket (first: {unusable[0]}); check the files and buckets")
        self.entries, self._groups, self._lengths = kept, groups, lengths

    @property
    def skipped(self) -> int:
        """How many entries this process found unreadable, too slow or too short and skipped."""
        return len(self._skipped)

    def groups(self) -> list[Hashable]:
        """The group of every entry, `(type, bucket index)` (`(type, None)` without buckets): BatchOrder's groups."""
        return list(self._groups)

    def bucket_shape(self, group: Hashable) -> tuple[tuple[int, int], int]:
        """`((height, width), frames)` that the entries of `group` are read at."""
        if group not in self._members:
            raise KinemaError(f"unknown group {group!r}; this dataset's groups are {sorted(self._members, key=str)}")
        kind, bucket = cast(Group, group)
        if bucket is None:
            size, frames = self.size, self.frames
        else:
            assert self.buckets is not None
            height, width, frames = self.buckets[bucket]
            size = (height, width)
        return size, (self.image_frames if kind == "image" else frames)

    def set_epoch(self, epoch: int) -> None:
        """Draw starts, crops, flips and caption dropout for `epoch` from now on (`dataset[i]`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """`load_item(index, epoch)` for the epoch of `set_epoch`, replaced by the next usable entry of any group."""
        return self.load_item(index, self.epoch, same_group=False)

    def load_item(self, index: int, epoch: int, size: tuple[int, int] | None = None, frames: int | None = None,
                  same_group: bool = True) -> dict[str, Any]:
        """Entry `index` read in `epoch`: a dict as the class describes, `pixels` `(F, 3, H, W)`.

        `size` (height, width) and `frames` default to the entry's `bucket_shape`; given, they apply to whichever
        entry is read (a still becomes `frames` copies). An entry that cannot be used is replaced by the next usable
        one (cyclically in dataset order): with `same_group`, first from the entry's group, then from the other
        entries of its type, so a batch keeps its type and, while its group has usable entries, its bucket;
        without, from any entry (each at its own shape where `size`/`frames` are None), as `dataset[i]` does.
        Every draw depends only on (seed, epoch, entry read), so the answer is the same in every process as long as
        no file times out. KinemaError when no candidate can be read.
        """
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for {len(self.entries)} entries")
        for candidate in self._candidates(index, same_group):
            if candidate in self.bad:
                continue
            item = self._load(candidate, epoch, size, frames)
            if item is not None:
                return item
        kind = self.entries[index]["type"]
        which = f"{kind} entries" if same_group else "files listed"
        raise KinemaError(f"none of the {which} for {self.root} could be read (see the warnings above); fix those "
                          f"files, or lower data.frames / data.stride where the clips are too short")

    def _candidates(self, index: int, same_group: bool) -> Iterator[int]:
        count = len(self.entries)
        if not same_group:
            yield from ((index + offset) % count for offset in range(count))
            return
        group = self._groups[index]
        members, position = self._members[group], self._position[index]
        yield from (members[(position + offset) % len(members)] for offset in range(len(members)))
        kind = group[0]
        for offset in range(1, count):
            candidate = (index + offset) % count
            if self._groups[candidate] != group and self._groups[candidate][0] == kind:
                yield candidate

    def _load(self, index: int, epoch: int, size: tuple[int, int] | None, frames: int | None
              ) -> dict[str, Any] | None:
        entry = self.entries[index]
        path = self.root / entry["file_path"]
        own_size, own_frames = self.bucket_shape(self._groups[index])
        size = own_size if size is None else size
        frames = own_frames if frames is None else frames
        # Every draw is made, in a fixed order, whatever the settings: turning flip or dropout on then changes
        # nothing else about the item.
        start_draw, crop_draw, flip_draw, drop_draw = np.random.default_rng((self.seed, epoch, index)).random(4)
        span = (frames - 1) * self.stride + 1
        known = self._lengths.get(index)
        if entry["type"] == "video" and known is not None and known < span:
            self._too_short(index, span, f"{path} has {known} frames, fewer than the {span} that frames={frames} at "
                                         f"stride={self.stride} need")
            return None
        try:
            pixels, total, start = call_with_timeout(
                functools.partial(_decode, path, entry["type"], frames, self.stride, float(start_draw), known),
                self.decode_timeout, str(path))
        except _READ_ERRORS as err:
            self.bad.add(index)
            self._skip(index, str(err))
            return None
        if total is not None:
            self._lengths[index] = total
        if pixels is None:
            self._too_short(index, span, f"{path} has {total} frames, fewer than the {span} that frames={frames} at "
                                         f"stride={self.stride} need")
            return None
        if entry["type"] == "video" and pixels.shape[0] < frames:
            # The container's frame count can overstate what decodes. Not marked bad: another start may fit, and
            # every process must make the same choice from the same (deterministic) count.
            self._too_short(index, span, f"{path} decoded only {pixels.shape[0]} of {frames} frames from frame "
                                         f"{start}")
            return None
        pixels = resize_and_crop(pixels, size, crop_draw if self.random_crop else None)
        if entry["type"] == "image" and frames > 1:
            pixels = pixels.expand(frames, -1, -1, -1)
        if self.flip and flip_draw < 0.5:
            pixels = torch.flip(pixels, dims=(-1,))
        text = "" if drop_draw < self.text_dropout else entry["text"]
        return {"pixels": pixels.contiguous(), "text": text, "type": entry["type"], "index": index}

    def _too_short(self, index: int, span: int, why: str) -> None:
        # Once per entry and length asked, so a short clip read every epoch warns once.
        if (index, span) not in self._warned:
            self._warned.add((index, span))
            self._skip(index, why)

    def _skip(self, index: int, why: str) -> None:
        self._skipped.add(index)
        logger.warning("skipping %s (%d skipped so far): %s", self.entries[index]["file_path"], len(self._skipped),
                       why)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of one shape into a batch: `pixels` `(B, F, 3, H, W)`, and `text`, `type`, `index` lists."""
    if not items:
        raise KinemaError("collate got no items; a batch needs at least one")
    shapes = {tuple(item["pixels"].shape) for item in items}
    if len(shapes) > 1:
        raise KinemaError(f"cannot batch items of different shapes {sorted(shapes)}; read them at one bucket's "
                          f"shape (load_item's size= and frames=)")
    return {"pixels": torch.stack([item["pixels"] for item in items]), "text": [item["text"] for item in items],
            "type": [item["type"] for item in items], "index": [item["index"] for item in items]}


class TrainBatches(Dataset):
    """Micro-batches `start, start + 1, ...` of process `rank`, collated: item `i` is micro-step `start + i`.

    `DataLoader(TrainBatches(...), batch_size=None, num_workers=n)` then prefetches whole batches in workers and
    yields exactly what a plain loop over `order.batch` and `dataset.load_item` at the group's `bucket_shape`
    would, `collate`d: `pixels` `(B, F, 3, H, W)` and the `text`, `type` and `index` lists. `steps` micro-steps in
    all (None: without end; the DataLoader's sampler then counts up to sys.maxsize). `order` must be built on
    `dataset.groups()`.
    """

    def __init__(self, dataset: VideoTextDataset, order: BatchOrder, start: int = 0, rank: int = 0,
                 steps: int | None = None):
        if order.groups != dataset.groups():
            raise KinemaError("the batch order was built on other groups than this dataset's; build it from "
                              "dataset.groups()")
        if start < 0 or (steps is not None and steps < 0):
            raise KinemaError(f"start and steps must be >= 0, got start={start}, steps={steps}")
        if not 0 <= rank < order.world_size:
            raise KinemaError(f"rank {rank} is outside the world of {order.world_size} processes (0 .. "
                              f"{order.world_size - 1}); pass the process index the launcher gives")
        self.dataset, self.order, self.start, self.rank = dataset, order, start, rank
        self.steps = sys.maxsize if steps is None else steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.steps:
            raise IndexError(f"batch {index} out of range for {self.steps} micro-steps")
        indices, group, epoch = self.order.batch(self.start + index, self.rank)
        size, frames = self.dataset.bucket_shape(group)
        return collate([self.dataset.load_item(i, epoch, size, frames) for i in indices])
