"""A synthetic motion dataset: one coloured shape moving in a known way over a muted background, with a caption.

Clips are rendered procedurally (numpy, no files), so they need no download and their ground truth is exact.
Each clip `index` of a dataset with seed `seed` is drawn from its own `numpy.random.Generator` seeded with
`(seed, index)`, so clip 7 is the same whether the dataset has 10 or 10,000 clips.

Ground truth per clip (all lists have one entry per frame):
- `colour`, `shape`, `motion`: canonical names from `COLOURS`, `SHAPES`, `MOTIONS`;
- `centre`: `[x, y]` in pixels from the top-left corner of the frame, so the centre of pixel (row i, column j)
  is `(j + 0.5, i + 0.5)`; for every shape it is also the centroid of the shape's area;
- `scale`: the radius of the shape's circumscribed circle, in pixels;
- `angle`: degrees, increasing clockwise on screen (`rotate_cw` increases it); 0 is a square with level edges
  and a triangle pointing up;
- `background`: `{"kind": plain|gradient|noise|checker, "colour": name}`.

Edges are anti-aliased analytically (pixel coverage from the signed distance to the outline), which keeps
H.264 round trips above 35 dB PSNR and makes the area centroid equal the recorded centre.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
from collections.abc import Collection, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from kinema.data.synth_limits import MOTIONS, SHAPES, SYNTH_KIND, check_combinations, check_synth_args
from kinema.data.video_io import DEFAULT_CRF, generation_settings, to_float_frames, write_video
from kinema.errors import KinemaError
from kinema.fileio import atomic_folder, check_output
from kinema.interrupt import pool_worker_init, stop_if_requested

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (45, 90, 235), "yellow": (240, 215, 40),
    "white": (245, 245, 245), "purple": (150, 60, 205), "orange": (245, 140, 30), "cyan": (40, 210, 225),
}
BACKGROUND_KINDS = ("plain", "gradient", "noise", "checker")
# Muted, darker than every shape colour so the shape always stands out.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (105, 105, 105), "dark grey": (55, 55, 58), "slate": (65, 75, 92), "brown": (92, 72, 58),
    "olive": (80, 86, 58), "navy": (35, 42, 70),
}
_SIDES = {"square": 4, "triangle": 3}
LUMA_EDGE_PX = 1.0
CHROMA_EDGE_PX = 4.0
# BT.601, the matrix H.264 players and swscale assume for untagged yuv420p.
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC)
# A rotating circle looks still, so circles never get a rotation.
_CIRCLE_MOTIONS = tuple(m for m in MOTIONS if not m.startswith("rotate"))

_SHAPE_WORDS = {"circle": ("circle", "ball", "disc", "dot"), "square": ("square", "box", "block"),
                "triangle": ("triangle",)}
_MOTION_WORDS = {
    "left": ("moving left", "drifting to the left", "sliding left", "travelling left", "moving to the left"),
    "right": ("moving right", "drifting to the right", "sliding right", "travelling right", "moving to the right"),
    "up": ("moving up", "rising", "floating upward", "drifting up", "sliding upward"),
    "down": ("moving down", "falling", "sinking", "dropping down", "sliding downward"),
    "grow": ("growing", "getting bigger", "expanding", "growing larger", "zooming in"),
    "shrink": ("shrinking", "getting smaller", "contracting", "shrinking away", "zooming out"),
    "rotate_cw": ("rotating clockwise", "spinning clockwise", "turning clockwise"),
    "rotate_ccw": ("rotating counterclockwise", "spinning anticlockwise", "turning counterclockwise"),
    "still": ("standing still", "not moving", "staying in place", "at rest"),
}


def in_synth_world(prompt: str) -> bool:
    """Whether `prompt` asks for something the synthetic dataset shows: it names one of `COLOURS` and one of `SHAPES`
    by a word the captions use for it (ball, box, ...), as whole words in any case, plurals too. Motion may be left out
    (any motion, or still, fits). Models trained only on this dataset know nothing else."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    words |= {word[:-2] for word in words if word.endswith("es")} | {word[:-1] for word in words if word.endswith("s")}
    shape_words = {word for names in _SHAPE_WORDS.values() for word in names}
    return bool(words & set(COLOURS)) and bool(words & shape_words)


_BACKGROUND_WORDS = {
    "gradient": ("a soft gradient background", "a gradient background", "a smooth gradient"),
    "noise": ("a mottled background", "a textured background", "a noisy background"),
    "checker": ("a checkered background", "a checkerboard", "a faint checker pattern"),
}
_VIDEO_TEMPLATES = (
    "a {size}{colour} {shape} {motion}{background}",
    "{colour} {shape}, {motion}{background}",
    "a {size}{colour} {shape} that is {motion}{background}",
    "video of a {colour} {shape} {motion}{background}",
    "{size}{colour} {shape} {motion}",
)
_IMAGE_TEMPLATES = (
    "a {size}{colour} {shape}{background}",
    "{colour} {shape}{background}",
    "a picture of a {size}{colour} {shape}{background}",
)


@dataclass
class SynthClip:
    """One rendered item: `frames` uint8 `(F, H, W, 3)`, its caption, `type` video|image, and the ground truth."""

    frames: np.ndarray
    text: str
    type: str
    ground_truth: dict


# ---------------------------------------------------------------- rendering


def render_background(kind: str, colour: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted background, float `(H, W, 3)` in [0, 255], of the given kind around a base colour."""
    base = np.array(BACKGROUND_COLOURS[colour], dtype=np.float64)
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    if kind == "plain":
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "gradient":
        direction = rng.uniform(0, 2 * math.pi)
        ramp = (xs - 0.5) * math.cos(direction) + (ys - 0.5) * math.sin(direction)  # in [-0.71, 0.71]
        return base + ramp[..., None] * rng.uniform(30, 50)
    if kind == "noise":
        # Low-frequency noise: a coarse random grid upsampled smoothly, so H.264 keeps it cheaply.
        coarse = rng.uniform(-1, 1, size=(4, 4)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float64)
        return base + np.clip(smooth, -1, 1)[..., None] * 18
    if kind == "checker":
        cell = max(4, size // 8)
        ys_px, xs_px = np.mgrid[0:size, 0:size]
        sign = np.where((ys_px // cell + xs_px // cell) % 2 == 0, 1.0, -1.0)
        return base + sign[..., None] * 10
    raise KinemaError(f"unknown background kind {kind!r}; choose one of {', '.join(BACKGROUND_KINDS)}")


def shape_distance(shape: str, centre: tuple[float, float], scale: float, angle: float, size: int) -> np.ndarray:
    """Signed distance in pixels from each pixel centre to the shape's outline, `(H, W)`, negative inside."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        return np.hypot(dx, dy) - scale
    if shape in _SIDES:
        # A regular polygon is the intersection of half-planes; its edge normals sit at equal angles.
        sides = _SIDES[shape]
        apothem = scale * math.cos(math.pi / sides)
        first = math.radians(angle) + (math.pi / 2 if sides == 3 else 0.0)  # triangle: bottom edge faces down
        normals = [first + 2 * math.pi * k / sides for k in range(sides)]
        return np.max([dx * math.cos(a) + dy * math.sin(a) - apothem for a in normals], axis=0)
    raise KinemaError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def composite(background: np.ndarray, fill: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Paint `fill` (3,) over `background` `(H, W, 3)` where `distance` < 0; returns uint8 `(H, W, 3)`.

    Luma gets a 1 px anti-aliased edge and chroma a wider one: yuv420p stores chroma at half resolution, so a
    sharp colour edge cannot survive H.264 (about 31 dB at best at 64 px); a soft one does, and the eye reads
    sharpness from luma anyway.
    """
    luma_alpha = np.clip(0.5 - distance / LUMA_EDGE_PX, 0.0, 1.0)[..., None]
    chroma_alpha = np.clip(0.5 - distance / CHROMA_EDGE_PX, 0.0, 1.0)[..., None]
    back, front = background @ _RGB_TO_YCC.T, fill @ _RGB_TO_YCC.T
    ycc = np.concatenate([back[..., :1] * (1 - luma_alpha) + front[:1] * luma_alpha,
                          back[..., 1:] * (1 - chroma_alpha) + front[1:] * chroma_alpha], axis=-1)
    return np.clip(np.round(ycc @ _YCC_TO_RGB.T), 0, 255).astype(np.uint8)


def _trajectory(motion: str, frames: int, size: int, rng: np.random.Generator) -> tuple[list, list, list]:
    """Per-frame centre `[x, y]`, scale and angle for one motion, keeping the whole shape inside the frame."""
    t = np.linspace(0.0, 1.0, frames)
    margin = 1.0
    angle0 = float(rng.uniform(0, 360))
    if motion in ("grow", "shrink"):
        small, large = size * rng.uniform(0.10, 0.14), size * rng.uniform(0.26, 0.32)
        scale = small + (large - small) * (t if motion == "grow" else 1 - t)
        reach = large + margin
    elif motion in ("rotate_cw", "rotate_ccw"):
        # A step under 10 deg/frame stays far below half the square's 90-deg symmetry, so the spin is unambiguous.
        scale = np.full(frames, size * rng.uniform(0.2, 0.3))
        reach = scale[0] + margin
    else:
        scale = np.full(frames, size * rng.uniform(0.12, 0.2))
        reach = scale[0] + margin
    span = size - 2 * reach
    centre = rng.uniform(reach, size - reach, size=2)
    x, y = np.full(frames, centre[0]), np.full(frames, centre[1])
    if motion in ("left", "right", "up", "down"):
        distance = span * rng.uniform(0.55, 0.9)
        begin = reach + rng.uniform(0, span - distance)
        forward = begin + distance * t
        path = forward if motion in ("right", "down") else forward[::-1]
        if motion in ("left", "right"):
            x = path
        else:
            y = path
    step = rng.uniform(4, 10) if motion.startswith("rotate") else 0.0
    angle = angle0 + step * np.arange(frames) * (-1 if motion == "rotate_ccw" else 1)
    # Rounded before rendering, so the frames match the stored ground truth exactly and metadata.json stays short.
    centres = [[round(float(a), 4), round(float(b), 4)] for a, b in zip(x, y, strict=True)]
    return centres, [round(float(s), 4) for s in scale], [round(float(a), 4) for a in angle]


def _caption(rng: np.random.Generator, colour: str, shape: str, motion: str | None, background: dict,
             relative_size: float) -> str:
    size_word = "small " if relative_size < 0.15 else "large " if relative_size > 0.24 else ""
    phrases: tuple[str, ...]
    if background["kind"] == "plain":
        phrases = (f"a {background['colour']} background", f"plain {background['colour']}")
    else:
        phrases = _BACKGROUND_WORDS[background["kind"]]
    where = f" on {rng.choice(phrases)}" if rng.random() < 0.5 else ""
    templates = _IMAGE_TEMPLATES if motion is None else _VIDEO_TEMPLATES
    words = {"size": size_word, "colour": colour, "shape": rng.choice(_SHAPE_WORDS[shape]), "background": where,
             "motion": rng.choice(_MOTION_WORDS[motion]) if motion else ""}
    text = str(rng.choice(templates)).format(**words)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange ball"


def synth_clip(seed: int, index: int, frames: int = 16, size: int = 64, image_fraction: float = 0.0) -> SynthClip:
    """Render clip `index` of the dataset with `seed`: frames uint8 `(F, size, size, 3)` (F = 1 for an image)."""
    check_synth_args(frames, size, image_fraction)
    if seed < 0 or index < 0:
        raise KinemaError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng((seed, index))
    is_image = rng.random() < image_fraction  # drawn first so image_fraction never shifts the rest of the stream
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    motion = "still" if is_image else str(rng.choice(_CIRCLE_MOTIONS if shape == "circle" else MOTIONS))
    background = {"kind": str(rng.choice(BACKGROUND_KINDS)), "colour": str(rng.choice(list(BACKGROUND_COLOURS)))}
    count = 1 if is_image else frames
    centres, scales, angles = _trajectory(motion, count, size, rng)
    if shape == "circle":
        angles = [0.0] * count  # a circle has no orientation; the angle drawn above only keeps the stream aligned
    canvas = render_background(background["kind"], background["colour"], size, rng)
    fill = np.array(COLOURS[colour], dtype=np.float64)
    video = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        video[i] = composite(canvas, fill, shape_distance(shape, centres[i], scales[i], angles[i], size))
    text = _caption(rng, colour, shape, None if is_image else motion, background, float(np.mean(scales)) / size)
    truth = {"colour": colour, "shape": shape, "motion": motion, "background": background, "centre": centres,
             "scale": scales, "angle": angles, "size": size, "frames": count}
    return SynthClip(frames=video, text=text, type="image" if is_image else "video", ground_truth=truth)


class SynthMotionDataset(Dataset):
    """Synthetic clips rendered on the fly; item `i` is `synth_clip(seed, i, ...)` as tensors.

    Each item is a dict: `frames` float `(F, 3, size, size)` in [-1, 1] (F = 1 for image items, so batch items of
    one type together), `text`, `type` ("video" | "image") and `ground_truth` (see the module docstring).
    """

    def __init__(self, n: int, seed: int = 0, frames: int = 16, size: int = 64, image_fraction: float = 0.0):
        if n < 1:
            raise KinemaError(f"a dataset needs at least one clip, got n={n}")
        check_synth_args(frames, size, image_fraction)
        self.n, self.seed, self.frames, self.size, self.image_fraction = n, seed, frames, size, image_fraction

    def __len__(self) -> int:
        return self.n

    def clip(self, index: int) -> SynthClip:
        """Item `index` as uint8 frames `(F, H, W, 3)`, the form the dataset writer encodes."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} clips")
        return synth_clip(self.seed, index, self.frames, self.size, self.image_fraction)

    def __getitem__(self, index: int) -> dict:
        item = self.clip(index)
        frames: torch.Tensor = to_float_frames(item.frames)
        return {"frames": frames, "text": item.text, "type": item.type, "ground_truth": item.ground_truth}


# ---------------------------------------------------------------- writing a dataset folder

SETTINGS_NAME = "synth.json"  # settings of the whole set


VIDEO_FORMATS = {"mp4": ".mp4", "png": ""}  # a clip's file suffix by format ("": a folder of PNG frames)


@dataclass(frozen=True)
class _ClipJob:
    """Render and write one clip of a synth dataset into `temp` (a picklable callable, for worker processes)."""

    dataset: SynthMotionDataset
    temp: Path
    width: int  # digits in the file names
    suffix: str
    fps: float
    crf: int
    held_out: frozenset[tuple[str, str, str]]

    def __call__(self, index: int) -> dict | None:
        """The clip's metadata entry, or None for a held-out combination (rendered, not written)."""
        item = self.dataset.clip(index)
        truth = item.ground_truth
        if (truth["colour"], truth["shape"], truth["motion"]) in self.held_out:
            return None
        relative = (f"videos/{index:0{self.width}d}{self.suffix}" if item.type == "video"
                    else f"images/{index:0{self.width}d}.png")
        size = self.dataset.size
        settings = generation_settings(item.text, seed=self.dataset.seed, model="kinema-synth", width=size,
                                       height=size, frames=item.frames.shape[0], fps=self.fps, index=index)
        write_video(item.frames, self.temp / relative, fps=self.fps, crf=self.crf, settings=settings)
        return {"file_path": relative, "text": item.text, "type": item.type, "ground_truth": item.ground_truth}


def write_synth_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, frames: int = 16, size: int = 64,
                        fps: float = 8.0, image_fraction: float = 0.0, crf: int = DEFAULT_CRF,
                        progress: bool = True, *, overwrite: bool = False,
                        hold_out: Collection[tuple[str, str, str]] = (), video_format: str = "mp4",
                        workers: int = 1) -> list[dict]:
    """Render `n` clips to `out_dir/videos/NNNN.mp4` (and `images/NNNN.png`) plus `out_dir/metadata.json`.

    `video_format` "png" writes each clip as a folder of lossless PNG frames, `videos/NNNN/`, instead of an H.264
    file: what a machine without PyAV can write and train on. `workers` > 1 renders and writes clips in that many
    processes; the files and the metadata are the same as with one.

    `metadata.json` is a list of `{"file_path": relative path, "text": caption, "type": "video" | "image",
    "ground_truth": {...}}`; `synth.json` records the settings of the whole set. Everything is written to a
    temporary folder beside `out_dir` and renamed into place at the end. `out_dir` follows kinema's output policy
    (kinema.fileio): new or empty, or with `overwrite` an earlier synth dataset holding no files kinema did not
    write. Clips whose `(colour, shape, motion)` is in `hold_out` are rendered but not written, so a model trained on
    the set never sees those combinations and every other clip keeps its index and content. Returns the metadata
    list.
    """
    out_dir = Path(out_dir)
    if n < 1:
        raise KinemaError(f"n must be at least 1, got {n}")
    check_synth_args(frames, size, image_fraction)
    if seed < 0:
        raise KinemaError(f"seed must be >= 0, got {seed}")
    if video_format not in VIDEO_FORMATS:
        raise KinemaError(f"video_format must be one of {', '.join(VIDEO_FORMATS)}; got {video_format!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise KinemaError(f"workers must be a whole number >= 1, got {workers!r}")
    check_output(out_dir, SYNTH_KIND, folder=True, overwrite=overwrite)
    held_out = set(check_combinations(hold_out))
    entries = []
    with atomic_folder(out_dir, SYNTH_KIND, overwrite=overwrite) as temp:
        job = _ClipJob(SynthMotionDataset(n, seed, frames, size, image_fraction), temp, max(4, len(str(n - 1))),
                       VIDEO_FORMATS[video_format], fps, crf, frozenset(held_out))
        with contextlib.ExitStack() as stack:
            written: Iterator[dict | None] = map(job, range(n))
            if workers > 1:
                pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(
                    "spawn"), initializer=pool_worker_init))
                # The pool is shut down (queued clips cancelled) before the temporary folder is removed.
                stack.callback(pool.shutdown, wait=True, cancel_futures=True)
                written = pool.map(job, range(n), chunksize=16)
            for entry in tqdm(written, total=n, desc="synth", unit="clip", disable=None if progress else True):
                stop_if_requested()
                if entry is not None:
                    entries.append(entry)
        if not entries:  # raised inside the temporary folder: nothing is written
            raise KinemaError(f"every one of the {n} clips drawn shows a held-out combination, so the dataset would "
                              "be empty; draw more clips (--n) or hold out fewer combinations")
        (temp / "metadata.json").write_text(json.dumps(entries, indent=1) + "\n")
        summary = generation_settings("", seed=seed, model="kinema-synth", width=size, height=size, frames=frames,
                                      fps=fps, n=n, image_fraction=image_fraction, crf=crf, video_format=video_format,
                                      hold_out=[list(combo) for combo in sorted(held_out)])
        (temp / SETTINGS_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return entries
