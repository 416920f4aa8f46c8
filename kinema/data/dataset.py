"""The training dataset: captioned videos and images listed in a metadata file, in the format `kinema data synth`
writes (a JSON list of `{"file_path": path relative to the data root, "text": caption, "type": "video"|"image"}`).

The metadata is checked once at construction, so a broken list fails before training step 1. Every random choice
of item `i` (clip start, crop, flip, caption dropout) comes from a generator seeded with `(seed, epoch, i)`: an item
is the same in every run and every DataLoader worker, and changes from epoch to epoch (`set_epoch`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kinema.data.video_io import read_video
from kinema.errors import KinemaError

logger = logging.getLogger(__name__)

TYPES = ("video", "image")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _check_settings(frames: int, stride: int, size: tuple[int, int], image_frames: int, text_dropout: float,
                    max_missing_fraction: float) -> None:
    if frames < 1 or stride < 1 or image_frames < 1:
        raise KinemaError(f"frames, stride and image_frames must be >= 1, got frames={frames}, stride={stride}, "
                          f"image_frames={image_frames}")
    if len(size) != 2 or min(size) < 1:
        raise KinemaError(f"size must be (height, width) with both >= 1, got {size!r}")
    if not 0.0 <= text_dropout <= 1.0:
        raise KinemaError(f"text_dropout is a probability and must be in [0, 1], got {text_dropout}")
    if not 0.0 <= max_missing_fraction <= 1.0:
        raise KinemaError(f"max_missing_fraction must be in [0, 1], got {max_missing_fraction}")


def load_metadata(root: Path, metadata: str | os.PathLike, max_missing_fraction: float) -> list[dict]:
    """Read and check `root/metadata`; returns the entries whose files exist, each with a `type`.

    Missing files are counted: above `max_missing_fraction` of all entries that is an error, at or below it a
    warning, and those entries are dropped.
    """
    path = root / metadata
    if not root.is_dir():
        raise KinemaError(f"data root {root} is not a folder; pass the folder that holds {metadata}")
    if not path.is_file():
        raise KinemaError(f"no metadata file {path}; write one with `kinema data synth` or pass metadata=")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KinemaError(f"{path} is not valid JSON ({err}); fix or rewrite it") from None
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
            kind = "image" if Path(entry["file_path"]).suffix.lower() in _IMAGE_SUFFIXES else "video"
        if kind not in TYPES:
            raise KinemaError(f"{path}: entry {index} has unknown type {kind!r}; use one of {', '.join(TYPES)}")
        checked.append({**entry, "type": kind})
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


def count_frames(path: Path) -> int:
    """Frames in a video file: the container's count when it has one, else counted by decoding."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise KinemaError(f"{path} has no video stream")
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


class VideoTextDataset(Dataset):
    """Captioned clips from `root/metadata` for training.

    Item `i` is a dict: `pixels` float `(F, 3, H, W)` in [-1, 1] with `(H, W) = size` (`F = frames` for videos,
    `image_frames` copies of the still for images), `text` (the caption, or "" with probability `text_dropout` so
    the model also learns the unconditional prediction for CFG), `type` ("video" | "image") and `index` (the entry
    actually read; it differs from `i` only when entry `i` could not be used).

    Videos read `frames` frames `stride` apart from a start drawn per item and epoch; frames are resized so the
    shorter side fits and centre-cropped (randomly cropped with `random_crop`), and flipped left-right with
    probability 1/2 when `flip`. A file that fails to decode, or a video too short for `frames` at `stride`, is
    logged as a warning, counted in `skipped` (per process: each DataLoader worker counts its own) and replaced by
    the next usable entry, so one bad file never stops a run.
    """

    def __init__(self, root: str | os.PathLike, metadata: str | os.PathLike = "metadata.json", frames: int = 16,
                 stride: int = 1, size: tuple[int, int] = (256, 256), image_frames: int = 1, text_dropout: float = 0.0,
                 flip: bool = False, max_missing_fraction: float = 0.0, seed: int = 0, random_crop: bool = False):
        size = (int(size[0]), int(size[1])) if len(size) == 2 else size
        _check_settings(frames, stride, size, image_frames, text_dropout, max_missing_fraction)
        self.root = Path(root)
        self.entries = load_metadata(self.root, metadata, max_missing_fraction)
        self.frames, self.stride, self.size, self.image_frames = frames, stride, size, image_frames
        self.text_dropout, self.flip, self.random_crop, self.seed = text_dropout, flip, random_crop, seed
        self.epoch = 0
        self.bad: set[int] = set()

    @property
    def skipped(self) -> int:
        """How many entries this process found unreadable or too short and skipped."""
        return len(self.bad)

    def set_epoch(self, epoch: int) -> None:
        """Draw starts, crops, flips and caption dropout for `epoch` from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for {len(self.entries)} entries")
        for offset in range(len(self.entries)):
            candidate = (index + offset) % len(self.entries)
            if candidate in self.bad:
                continue
            item = self._load(candidate)
            if item is not None:
                return item
        raise KinemaError(f"none of the {len(self.entries)} files listed for {self.root} could be read "
                          f"(see the warnings above); check the data")

    def _load(self, index: int) -> dict[str, Any] | None:
        entry = self.entries[index]
        path = self.root / entry["file_path"]
        # Every draw is made, in a fixed order, whatever the settings: turning flip or dropout on then changes
        # nothing else about the item.
        start_draw, crop_draw, flip_draw, drop_draw = np.random.default_rng((self.seed, self.epoch, index)).random(4)
        try:
            if entry["type"] == "image":
                pixels = read_video(path, max_frames=1).frames
            else:
                span = (self.frames - 1) * self.stride + 1
                total = count_frames(path)
                if total < span:
                    self._skip(index, f"{path} has {total} frames, fewer than the {span} that frames={self.frames} "
                                      f"at stride={self.stride} need")
                    return None
                start = min(int(start_draw * (total - span + 1)), total - span)
                pixels = read_video(path, start=start, stride=self.stride, max_frames=self.frames).frames
                if pixels.shape[0] < self.frames:
                    # The container's frame count can overstate what decodes.
                    self._skip(index, f"{path} decoded only {pixels.shape[0]} of {self.frames} frames from "
                                      f"frame {start}")
                    return None
        except (KinemaError, OSError, av.FFmpegError) as err:
            self._skip(index, str(err))
            return None
        pixels = resize_and_crop(pixels, self.size, crop_draw if self.random_crop else None)
        if entry["type"] == "image" and self.image_frames > 1:
            pixels = pixels.expand(self.image_frames, -1, -1, -1)
        if self.flip and flip_draw < 0.5:
            pixels = torch.flip(pixels, dims=(-1,))
        text = "" if drop_draw < self.text_dropout else entry["text"]
        return {"pixels": pixels.contiguous(), "text": text, "type": entry["type"], "index": index}

    def _skip(self, index: int, why: str) -> None:
        self.bad.add(index)
        logger.warning("skipping %s (%d skipped so far): %s", self.entries[index]["file_path"], len(self.bad), why)
