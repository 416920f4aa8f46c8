"""Prompt sets for `kinema eval`: JSON Lines files of prompts with the ground truth a generated video should show.

One JSON object per line (blank lines are skipped):

    {"prompt": "a red circle moving right", "color": "red", "shape": "circle", "motion": "right"}
    {"prompt": "...", "color": "...", "shape": "...", "motion": "...", "image": "images/start.png", "seed": 3,
     "held_out": true, "source": "synth 9001:17"}

- `color`, `shape`, `motion`: the labels of `kinema data synth`'s ground truth (the colour key is spelled `color`,
  as in the eval's report); circles never rotate (a turning circle looks still).
- `image` (optional): image-to-video: the start image, a path relative to the file; its PSNR against the first
  generated frame is scored.
- `seed` (optional): the seed of that video (default: one derived from the prompt text and the run's seed).
- `held_out` (optional): a colour x shape x motion combination kept out of training, reported separately.
- `source` (optional): free text saying where the line came from.

This module reads and checks files without importing torch or numpy, so `kinema eval` refuses a bad file at once.
The label names repeat kinema.data.synth's (which imports torch); tests/eval/test_prompts.py keeps them equal.
`write_synth_prompt_set` made the shipped set (`DEFAULT_PROMPTS`) and makes fresh ones from other seeds.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError
from kinema.pipelines.request import MAX_SEED

COLOR_NAMES = ("red", "green", "blue", "yellow", "white", "purple", "orange", "cyan")
SHAPE_NAMES = ("circle", "square", "triangle")
MOTION_NAMES = ("left", "right", "up", "down", "grow", "shrink", "rotate_cw", "rotate_ccw", "still")
# The colour x shape x motion combinations kinema's bundled models are trained without (`kinema data synth
# --hold-out`), so the eval can tell whether a model composes what it learned apart.
HELD_OUT_COMBINATIONS = (
    ("red", "triangle", "left"), ("green", "square", "grow"), ("blue", "circle", "down"),
    ("yellow", "triangle", "rotate_cw"), ("white", "square", "up"), ("purple", "circle", "right"),
    ("orange", "square", "rotate_ccw"), ("cyan", "triangle", "shrink"),
)
PROMPT_SETS = Path(__file__).parent / "prompt_sets"
DEFAULT_PROMPTS = PROMPT_SETS / "synth.jsonl"
# The synth dataset seed of the shipped set's captions and start images, and the one the bundled models trained on
# (configs/train: `kinema data synth --seed 11`), whose prompts they have seen.
SYNTH_PROMPT_SEED = 9001
BUNDLED_TRAINING_SEED = 11
PROMPT_SET_KIND = "eval_prompts"  # kind in the output manifest (kinema.fileio)

_KEYS = ("prompt", "color", "shape", "motion", "image", "seed", "held_out", "source")
# Each label's names by its key in a prompt line (and in `detect`'s answer).
LABEL_NAMES = {"color": COLOR_NAMES, "shape": SHAPE_NAMES, "motion": MOTION_NAMES}
_MISSPELT = {"colour": "color", "text": "prompt", "caption": "prompt", "heldout": "held_out", "held-out": "held_out"}


@dataclass(frozen=True)
class PromptEntry:
    """One checked line of a prompt set: `image` is an absolute path (None for text-to-video), `line` its 1-based
    line number in the file."""

    prompt: str
    color: str
    shape: str
    motion: str
    image: Path | None = None
    seed: int | None = None
    held_out: bool = False
    source: str | None = None
    line: int = 0

    @property
    def labels(self) -> dict[str, str]:
        """`{"color", "shape", "motion"}`: what the video should show (the keys `detect` answers with)."""
        return {"color": self.color, "shape": self.shape, "motion": self.motion}

    @property
    def mode(self) -> str:
        """"image-to-video" with a start image, else "text-to-video"."""
        return "text-to-video" if self.image is None else "image-to-video"


def _entry(value: Any, folder: Path, where: str, line: int) -> PromptEntry:
    """One parsed line checked into a PromptEntry; one KinemaError line (`where` first) naming the fix."""
    if not isinstance(value, dict):
        raise KinemaError(f"{where}: expected a JSON object like {{\"prompt\": ..., \"color\": ..., \"shape\": ..., "
                          f"\"motion\": ...}}, got {type(value).__name__}")
    unknown = [key for key in value if key not in _KEYS]
    if unknown:
        key = unknown[0]
        hint = f"write {_MISSPELT[key]!r}" if key in _MISSPELT else f"known keys: {', '.join(_KEYS)}"
        raise KinemaError(f"{where}: unknown key {key!r}; {hint}")
    missing = [key for key in ("prompt", "color", "shape", "motion") if key not in value]
    if missing:
        raise KinemaError(f"{where}: missing {', '.join(repr(key) for key in missing)}; every line needs prompt, "
                          "color, shape and motion")
    prompt = value["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise KinemaError(f"{where}: \"prompt\" must be non-empty text")
    for key, known in LABEL_NAMES.items():
        if value[key] not in known:
            raise KinemaError(f"{where}: unknown {key} {value[key]!r}; choose one of {', '.join(known)}")
    if value["shape"] == "circle" and value["motion"].startswith("rotate"):
        raise KinemaError(f"{where}: a circle cannot show {value['motion']} (a turning circle looks still, so the "
                          "synthetic world never rotates circles); use a square or triangle, or another motion")
    seed = value.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise KinemaError(f"{where}: \"seed\" must be a whole number from 0 to 2**64 - 1, got {seed!r}")
    held_out = value.get("held_out", False)
    if not isinstance(held_out, bool):
        raise KinemaError(f"{where}: \"held_out\" must be true or false, got {held_out!r}")
    source = value.get("source")
    if source is not None and not isinstance(source, str):
        raise KinemaError(f"{where}: \"source\" must be text, got {source!r}")
    image = value.get("image")
    image_path = None
    if image is not None:
        if not isinstance(image, str) or not image:
            raise KinemaError(f"{where}: \"image\" must be a path (relative to the prompt file), got {image!r}")
        from kinema.pipelines.jobs import check_image_file, existing_path

        try:
            found = existing_path(image, '"image"', (folder,))
        except KinemaError as err:
            raise KinemaError(f"{where}: {err}") from None
        image_path = (folder / image).resolve()
        if found is None:
            raise KinemaError(f"{where}: no such image {image} (looked for {image_path}); image paths are relative "
                              "to the prompt file's folder")
        if image_path.is_dir():
            raise KinemaError(f"{where}: \"image\" {image} is a folder ({image_path}); give an image file")
        if not image_path.is_file():
            raise KinemaError(f"{where}: \"image\" {image} is not a regular file ({image_path}: a device, pipe or "
                              "socket); give an image file")

        try:
            check_image_file(image_path, "start image")
        except KinemaError as err:
            raise KinemaError(f"{where}: {err}") from None
    return PromptEntry(prompt=prompt, color=value["color"], shape=value["shape"], motion=value["motion"],
                       image=image_path, seed=seed, held_out=held_out, source=source, line=line)


def read_prompts(path: str | os.PathLike = DEFAULT_PROMPTS) -> list[PromptEntry]:
    """Every prompt of the JSON Lines file `path` (see the module docstring), checked.

    A missing file, a line that is not JSON, an unknown key or label, a rotating circle, or a missing image raises
    one KinemaError naming the file, the line number and the fix.
    """
    from kinema.jsonl import read_json_lines

    example = '{"prompt": "a red circle moving right", "color": "red", "shape": "circle", "motion": "right"}'
    path = Path(path)
    entries: list[PromptEntry] = []
    first_line: dict[tuple[str, Path | None, int], int] = {}
    for where, number, value in read_json_lines(path, what="prompt", example=example):
        entry = _entry(value, path.parent, where, number)
        # The video a line makes: its prompt as the seed reads it, its start image, its seed (`default_seed`).
        seed = entry.seed if entry.seed is not None else default_seed(entry.prompt)
        video = (_spaced(entry.prompt), entry.image, seed)
        if video in first_line:
            raise KinemaError(f"{where}: the same prompt, start image and seed as line {first_line[video]}, so the "
                              "same video, which would be scored twice; drop one line, or give one another \"seed\"")
        first_line[video] = number
        entries.append(entry)
    return entries


# ---------------------------------------------------------------- making a prompt set from the synthetic world


def balanced_combinations(count: int) -> list[tuple[str, str, str]]:
    """`count` distinct (color, shape, motion) combinations outside HELD_OUT_COMBINATIONS, spread evenly: colours
    and shapes in turn (each colour x shape pair once before any repeats), each taking the motion used least so far
    that fits it (circles never rotate)."""
    pairs = [(COLOR_NAMES[i % len(COLOR_NAMES)], SHAPE_NAMES[i % len(SHAPE_NAMES)]) for i in range(count)]
    used = {motion: 0 for motion in MOTION_NAMES}
    chosen: list[tuple[str, str, str]] = []
    for colour, shape in pairs:
        fits = [motion for motion in MOTION_NAMES if not (shape == "circle" and motion.startswith("rotate"))
                and (colour, shape, motion) not in HELD_OUT_COMBINATIONS and (colour, shape, motion) not in chosen]
        if not fits:
            raise KinemaError(f"cannot make {count} distinct balanced combinations; ask for fewer")
        motion = min(fits, key=lambda name: used[name])
        used[motion] += 1
        chosen.append((colour, shape, motion))
    return chosen


def write_synth_prompt_set(out_dir: str | os.PathLike, *, seed: int = SYNTH_PROMPT_SEED, regular: int = 48,
                           held_out_each: int = 2, images: int = 6, size: int = 64, overwrite: bool = False) -> Path:
    """Write a prompt set made of kinema's synthetic clips to `out_dir` (`synth.jsonl` + `images/*.png`); returns
    the JSON Lines file. The shipped set (`DEFAULT_PROMPTS`) is this with the defaults.

    Clips `synth_clip(seed, 0), (seed, 1), ...` are taken in order, each giving its caption (the synthetic
    captions' varied phrasing) and ground truth, until the set holds: `images` image-to-video lines (distinct
    colours, moving clips; the start image is the clip's first frame, `images/synth-SEED-INDEX.png`),
    `held_out_each` lines of every HELD_OUT_COMBINATIONS entry, and one line of each of `balanced_combinations(
    regular)`. Pick a seed no model trained on. `out_dir` follows kinema's output policy (kinema.fileio).
    """
    from PIL import Image

    from kinema.data.synth import synth_clip
    from kinema.fileio import atomic_folder

    if seed == BUNDLED_TRAINING_SEED:
        logging.getLogger(__name__).warning(
            "seed %d is the synthetic data the bundled models trained on: its captions are not unseen prompts for "
            "them; pick another seed to check them on prompts they have not seen", seed)
    wanted = {combo: 1 for combo in balanced_combinations(regular)}
    wanted.update({combo: held_out_each for combo in HELD_OUT_COMBINATIONS})
    image_colours: set[str] = set()
    lines: list[tuple[int, dict[str, Any]]] = []
    pictures: dict[str, Any] = {}
    index = 0
    while any(wanted.values()) or len(image_colours) < images:
        clip = synth_clip(seed, index, size=size)
        truth = clip.ground_truth
        combo = (truth["colour"], truth["shape"], truth["motion"])
        line: dict[str, Any] = {"prompt": clip.text, "color": combo[0], "shape": combo[1], "motion": combo[2]}
        source = {"source": f"synth {seed}:{index}"}
        if wanted.get(combo, 0) > 0:
            wanted[combo] -= 1
            held_out = {"held_out": True} if combo in HELD_OUT_COMBINATIONS else {}
            lines.append((0 if not held_out else 2, {**line, **held_out, **source}))
        elif len(image_colours) < images and combo[0] not in image_colours and combo[2] != "still" and \
                combo not in HELD_OUT_COMBINATIONS:
            image_colours.add(combo[0])
            name = f"images/synth-{seed}-{index:04d}.png"
            pictures[name] = clip.frames[0]
            lines.append((1, {**line, "image": name, **source}))
        index += 1
        if index > 100_000:  # each wanted combination turns up about once in 200 clips: this is far past bad luck
            raise KinemaError(f"no prompt set found in 100,000 synthetic clips of seed {seed}; ask for fewer lines")
    lines.sort(key=lambda item: item[0])  # text-to-video first, then image-to-video, then the held-out lines
    with atomic_folder(out_dir, PROMPT_SET_KIND, overwrite=overwrite) as temp:
        (temp / "images").mkdir()
        for name, frame in pictures.items():
            Image.fromarray(frame).save(temp / name)
        (temp / "synth.jsonl").write_text("".join(json.dumps(line) + "\n" for _, line in lines))
    return Path(out_dir) / "synth.jsonl"


def default_seed(prompt: str, seed: int = 0) -> int:
    """The seed of a line that names none: `seed` plus a number drawn from the prompt's text (CRC-32), so a line
    keeps its video when lines are added, removed or reordered."""
    import zlib

    return seed + zlib.crc32(_spaced(prompt).encode("utf-8")) % 2**31


def _spaced(prompt: str) -> str:
    """`prompt` with its runs of white space made one space and its ends trimmed."""
    return re.sub(r"\s+", " ", prompt.strip())
