"""The web app's outputs folder: a new job folder per generation, and the gallery of earlier results read back from
it. Each job folder is what `kinema.pipelines.jobs.run_job` writes (video-seedS.mp4 per seed, job.json), so the
gallery shows folders made by any front end that writes job folders there, and only reads: nothing here deletes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError
from kinema.fileio import slug
from kinema.pipelines.jobs import JOB_FILE, REPORT_FILE, video_names

MAX_ENTRIES = 100
INPUTS_FOLDER = "inputs"


@dataclass
class GalleryEntry:
    """One earlier video: its file, the settings that make it again (its job's, with this video's seed alone) and
    a one-line caption."""

    video: Path
    settings: dict[str, Any]
    caption: str


def _first_prompt(prompt: Any) -> str:
    if isinstance(prompt, dict):  # a prompt schedule: its first keyframe's text
        return str(next(iter(prompt.values()), ""))
    return str(prompt)


def caption(settings: dict[str, Any], frames: int | None = None) -> str:
    """`prompt · seed S · F frames WxH · N steps` for a video's settings, the mode first when it is not
    text-to-video; `frames`: the frames the video has (its run report's), where the settings cannot say (an input
    video's length decides for video-to-video and extend)."""
    prompt = " ".join(_first_prompt(settings.get("prompt", "")).split()) or "(no prompt)"
    if len(prompt) > 60:
        prompt = prompt[:59] + "…"
    seed = (settings.get("seeds") or ["?"])[0]
    mode = settings.get("mode", "text-to-video")
    text = (f"{prompt} · seed {seed} · {frames or settings.get('frames')} frames {settings.get('width')}x"
            f"{settings.get('height')} · {settings.get('steps')} steps")
    return text if mode == "text-to-video" else f"{mode}: {text}"


def read_gallery(outputs_dir: str | os.PathLike, limit: int = MAX_ENTRIES) -> list[GalleryEntry]:
    """The videos of the job folders in `outputs_dir`, newest job first (at most `limit`); folders without a
    readable job.json, and videos missing from their folder, are passed over."""
    root = Path(outputs_dir)
    if not root.is_dir():
        return []
    jobs = []
    for folder in root.iterdir():
        job_file = folder / JOB_FILE
        try:
            jobs.append((job_file.stat().st_mtime_ns, folder.name, folder))
        except OSError:  # not a job folder (or a file)
            continue
    entries: list[GalleryEntry] = []
    for _, _, folder in sorted(jobs, reverse=True):
        try:
            settings = json.loads((folder / JOB_FILE).read_text())
        except (OSError, ValueError):
            continue
        seeds = settings.get("seeds") if isinstance(settings, dict) else None
        if not isinstance(seeds, list):
            continue
        frames = _reported_frames(folder / REPORT_FILE)
        for seed, name in zip(seeds, video_names(seeds), strict=True):
            if (folder / name).is_file():
                own = {**settings, "seeds": [seed]}
                entries.append(GalleryEntry(folder / name, own, caption(own, frames)))
            if len(entries) >= limit:
                return entries
    return entries


def _reported_frames(path: Path) -> int | None:
    try:
        frames = json.loads(path.read_text()).get("frames")
    except (OSError, ValueError, AttributeError):
        return None
    return frames if isinstance(frames, int) else None


_reserved: set[Path] = set()
_reserved_lock = threading.Lock()


def new_job_folder(outputs_dir: str | os.PathLike, settings: dict[str, Any]) -> Path:
    """A folder name for a new job under `outputs_dir` that neither exists nor was handed out before in this process
    (run_job creates it only at the end, and generations may run at once): `YYYYmmdd-HHMMSS-<prompt words>`, with
    `-2`, `-3`, ... when taken."""
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(_first_prompt(settings.get('prompt', '')), 40, 'job')}"
    root = Path(outputs_dir)
    with _reserved_lock:
        for number in range(1, 10_000):
            folder = root / (stem if number == 1 else f"{stem}-{number}")
            if folder not in _reserved and not folder.exists():
                _reserved.add(folder)
                return folder
    raise KinemaError(f"no free folder name for {stem} under {root}; move earlier results out of it")


def keep_input(path: str | os.PathLike, outputs_dir: str | os.PathLike) -> Path:
    """A lasting copy of an uploaded input (gradio's upload cache is temporary) in `outputs_dir/inputs/`, named by
    its content (`<sha256 prefix><suffix>`), so a job's settings name a file that is still there to load again; an
    equal file kept before is reused, and nothing else is ever replaced."""
    source = Path(path)
    digest = hashlib.sha256()
    with open(source, "rb") as data:
        for block in iter(lambda: data.read(2**20), b""):
            digest.update(block)
    folder = Path(outputs_dir) / INPUTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / f"{digest.hexdigest()[:20]}{source.suffix.lower()}"
    if not kept.exists():
        temporary = kept.with_name(f".{kept.name}.{os.getpid()}.{threading.get_ident()}.part")
        shutil.copyfile(source, temporary)
        os.replace(temporary, kept)  # whole or not at all; a same-named file holds the same bytes
    return kept.resolve()
