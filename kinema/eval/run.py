"""`evaluate()`: generate one video per prompt of a prompt set and score it (`kinema eval`).

Each video is read back by the frame detectors (kinema.eval.detectors: the colour, shape and motion of the one
object) and compared with the line's labels; the weight-free metrics (kinema.eval.metrics) add temporal flicker and
dynamic degree for every video, first-frame PSNR for image-to-video lines, and a continuation check: one prompt's
video extended to 128 frames through `generate`'s extend mode, with the seam score at its segment joins.

Held-out lines (colour x shape x motion combinations kept out of training) are scored apart and left out of the main
accuracies (the report says so in `held_out_in_main`). With `out_dir` the report, one confusion-matrix PNG per label
and, when asked, the videos are written there, whole or not at all (kinema.fileio's output policy).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kinema.data.probe import video_size
from kinema.errors import KinemaError
from kinema.eval.prompts import DEFAULT_PROMPTS, LABEL_NAMES, PromptEntry, default_seed, read_prompts
from kinema.fileio import slug
from kinema.pipelines.request import MAX_SEED

logger = logging.getLogger(__name__)

EVAL_KIND = "eval"  # kind in the output manifest (kinema.fileio)
REPORT_NAME = "report.json"
LABELS = LABEL_NAMES
DEFAULT_FRAMES = 16  # the synthetic clips' length, which kinema's bundled models were trained on
CONTINUATION_FRAMES = 128
FPS = 8.0
# The confusion-matrix drawing: cell side, label margins and font size in pixels.
_CELL, _MARGIN, _FONT = 40, 90, 12


@dataclass
class EvalReport:
    """What `evaluate` measured. `as_dict()` is the JSON `kinema eval --json` prints: `n` and the `*_acc` cover the
    lines that are not held out; `flicker`, `dynamic_degree` (the share of videos VBench's rule finds moving) and
    `dynamic_magnitude` every video; `i2v_psnr` and `i2v_jump` the image-to-video lines; `seam_score` the
    continuations (their mean; `continuation` is the first one's report, `continuations` every one's). A metric with
    nothing to measure is None. `files` are the paths written under `out_dir` (relative to it)."""

    model: str
    prompts: str
    n: int
    color_acc: float | None
    shape_acc: float | None
    motion_acc: float | None
    flicker: float | None
    dynamic_degree: float | None
    dynamic_magnitude: float | None
    i2v_psnr: float | None
    i2v_jump: float | None
    seam_score: float | None
    held_out: dict[str, Any]
    continuation: dict[str, Any] | None
    settings: dict[str, Any]
    seconds: float
    per_prompt: list[dict[str, Any]]
    out_dir: str | None = None
    files: list[str] = field(default_factory=list)
    continuations: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, in the order of the issue's `kinema eval --json`."""
        return {"n": self.n, "color_acc": self.color_acc, "shape_acc": self.shape_acc, "motion_acc": self.motion_acc,
                "flicker": self.flicker, "dynamic_degree": self.dynamic_degree, "i2v_psnr": self.i2v_psnr,
                "i2v_jump": self.i2v_jump, "seam_score": self.seam_score, "held_out": self.held_out,
                "held_out_in_main": False,
                "dynamic_magnitude": self.dynamic_magnitude, "continuation": self.continuation,
                "continuations": self.continuations, "model": self.model,
                "prompts": self.prompts, "settings": self.settings, "seconds": self.seconds,
                "out_dir": self.out_dir, "files": self.files, "per_prompt": self.per_prompt}


# ---------------------------------------------------------------- pieces


def continuation_boundaries(start_frames: int, total: int, segment: int, overlap: int) -> list[int]:
    """The first frame of each segment that `generate`'s extend mode appends to a `start_frames`-frame video until it
    has `total` frames, each segment `segment` frames of which the first `overlap` re-make (and cross-fade over) the
    end of what exists. Mirrors the loop of kinema.pipelines.generation._extend, which does not report them: segment
    k's new frames start where the video ended, `start_frames + k * (segment - overlap)`."""
    if not 0 < overlap < segment:
        raise KinemaError(f"overlap ({overlap}) must be at least 1 and below the segment length ({segment})")
    boundaries, have = [], start_frames
    while have < total:
        boundaries.append(have)
        have += min(segment - overlap, total - have)
    return boundaries


def native_size(family: Any) -> int:
    """The side in pixels the family's model was made for: its latent `sample_size` times the VAE's downscale
    (64 for kinema-tiny, 512 for SD1.5 and EasyAnimate V3 512); 512 when the config names none."""
    config = dict(getattr(family.model, "config", {}) or {})
    sample = config.get("sample_size") or dict(config.get("unet_config") or {}).get("sample_size")
    return int(sample) * int(family.spatial_factor) if isinstance(sample, int) else 512


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(float(sum(present) / len(present)), 4) if present else None


def _accuracies(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scores: dict[str, Any] = {"n": len(rows)}
    for key in LABELS:
        scores[f"{key}_acc"] = _mean([float(row["correct"][key]) for row in rows]) if rows else None
    return scores


def _write_video(folder: Path, name: str, video: Any, settings: dict[str, Any]) -> str:
    from kinema.data.video_io import write_video

    (folder / "videos").mkdir(exist_ok=True)
    relative = f"videos/{name}.mp4"
    frames = (video.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).byte().numpy()
    write_video(frames, folder / relative, fps=FPS, settings=settings)
    return relative


def labels_or_why(video: Any) -> tuple[dict[str, str | None], str | None]:
    """`detect` on a video `(F, 3, H, W)`, or no labels and the reason when there is no object to read."""
    from kinema.eval.detectors import detect

    try:
        return detect(video), None
    except KinemaError as err:
        return dict.fromkeys(LABELS), str(err)


# ---------------------------------------------------------------- confusion matrices


def confusion_matrix(expected: Sequence[str], detected: Sequence[str | None], classes: Sequence[str]
                     ) -> list[list[int]]:
    """Counts `(len(classes), len(classes) + 1)`: row = the expected class, column = the detected one, the last
    column for videos where nothing was detected."""
    matrix = [[0] * (len(classes) + 1) for _ in classes]
    for truth, found in zip(expected, detected, strict=True):
        column = classes.index(found) if found in classes else len(classes)
        matrix[classes.index(truth)][column] += 1
    return matrix


def draw_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> Any:
    """A PIL image of `matrix` (from `confusion_matrix`): rows expected, columns detected (and "none"), each cell
    shaded by its share of the row with its count written in, and each row's accuracy at the right."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=_FONT)
    columns = [*classes, "none"]
    top = _MARGIN + 24
    width = _MARGIN + _CELL * (len(columns) + 1) + 10
    height = top + _CELL * len(classes) + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), title, fill="black", font=font)
    for j, name in enumerate([*columns, "acc"]):  # column labels, turned upright
        label = Image.new("L", (_MARGIN - 6, _FONT + 6), 0)
        ImageDraw.Draw(label).text((0, 1), name, fill=255, font=font)
        turned = label.rotate(90, expand=True)
        x = _MARGIN + j * _CELL + (_CELL - turned.width) // 2
        image.paste(Image.new("RGB", turned.size, "black"), (x, top - turned.height - 2), turned)
    for i, (name, row) in enumerate(zip(classes, matrix, strict=True)):
        y = top + i * _CELL
        draw.text((6, y + _CELL // 2 - _FONT // 2), name, fill="black", font=font)
        total = sum(row)
        for j, count in enumerate(row):
            share = count / total if total else 0.0
            shade = (int(255 - 200 * share), int(255 - 160 * share), 255) if j < len(classes) else \
                (255, int(255 - 140 * share), int(255 - 140 * share))
            box = (_MARGIN + j * _CELL, y, _MARGIN + (j + 1) * _CELL - 1, y + _CELL - 1)
            draw.rectangle(box, fill=shade, outline=(200, 200, 200))
            if count:
                draw.text((box[0] + _CELL // 2, y + _CELL // 2), str(count), anchor="mm",
                          fill="white" if share > 0.6 else "black", font=font)
        accuracy = f"{100 * row[i] / total:.0f}%" if total else "-"
        draw.text((_MARGIN + len(columns) * _CELL + _CELL // 2, y + _CELL // 2), accuracy, anchor="mm",
                  fill="black", font=font)
    draw.text((6, height - 22), "rows: prompt's label; columns: detected", fill=(90, 90, 90), font=font)
    return image


def _write_confusions(folder: Path, rows: Sequence[dict[str, Any]]) -> list[str]:
    written = []
    for key, classes in LABELS.items():
        matrix = confusion_matrix([row["expected"][key] for row in rows], [row["detected"][key] for row in rows],
                                  classes)
        correct = sum(matrix[i][i] for i in range(len(classes)))
        title = f"{key}: {correct}/{len(rows)} correct (every prompt, held-out included)"
        name = f"confusion-{key}.png"
        draw_confusion(matrix, classes, title).save(folder / name)
        written.append(name)
    return written


# ---------------------------------------------------------------- the run


def default_out_dir(model: str, motion_module: str | os.PathLike | None = None) -> Path:
    """`out/eval-<model name>[-<motion module name>]`: where `kinema eval` writes without --out."""
    path = Path(str(model))
    name = slug((path.resolve() if path.exists() else path).name, 40)
    return Path("out") / (f"eval-{name}" + (f"-{slug(Path(motion_module).stem, 40)}" if motion_module else ""))


def check_eval_inputs(model: str, entries: Sequence[PromptEntry], prompts_path: str | os.PathLike, *, seed: int,
                      frames: int | None, motion_module: str | os.PathLike | None = None,
                      loras: Sequence[tuple[str | os.PathLike, float]] = (),
                      continuation: int | None = CONTINUATION_FRAMES) -> None:
    """One KinemaError line, before any model loads, for a frame count the model cannot make (or too few to show
    motion, or as many as the `continuation` the first videos are extended to: None for none), a motion module or
    LoRA that is missing or that the model cannot take, or a line whose seed plus `seed` is past the largest
    seed."""
    from kinema.pipelines.jobs import check_model_request, model_defaults_for
    from kinema.pipelines.request import LIBRARY_DEFAULTS

    if frames is not None and frames < 2:
        raise KinemaError(f"frames must be at least 2 to show motion, got {frames}")
    if frames is not None and continuation is not None and frames >= continuation:
        raise KinemaError(f"the continuation extends the first videos to {continuation} frames, so they must be "
                          f"shorter; got --frames {frames}: ask for fewer frames, or pass --no-continuation")
    for path, what in ((motion_module, "motion module"), *((path, "LoRA file") for path, _ in loras)):
        if path is not None and not os.path.lexists(path):
            raise KinemaError(f"no such {what}: {path}")
    folder, defaults = model_defaults_for(model, ("frames", "overlap_frames"), f"no such model file or folder: {model}",
                                          checked=True)
    check_model_request(folder, frames=frames, motion_module=motion_module, loras=loras)
    length = frames if frames is not None else defaults.get("frames", DEFAULT_FRAMES)
    overlap = defaults.get("overlap_frames", LIBRARY_DEFAULTS["overlap_frames"])
    if continuation is not None and length <= overlap:
        whose = "the model's kinema.json default" if "overlap_frames" in defaults else "kinema's default"
        raise KinemaError(f"the continuation extends each video in segments of its {length} frames that overlap by "
                          f"{overlap} ({whose}), so the videos need more than {overlap} frames: raise --frames, or "
                          "pass --no-continuation")
    for entry in entries:
        if _video_seed(entry, seed) > MAX_SEED:
            raise KinemaError(f"{prompts_path}, line {entry.line}: its seed plus --seed {seed} is "
                              f"{_video_seed(entry, seed)}, over 2**64 - 1 (the largest seed); give a smaller --seed")


def evaluate(
    model: str,
    prompts_path: str | os.PathLike = DEFAULT_PROMPTS,
    *,
    seed: int = 0,
    frames: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    continuation: bool = True,
    continuation_frames: int = CONTINUATION_FRAMES,
    continuations: int = 1,
    save_videos: bool = False,
    overwrite: bool = False,
    speed: str | None = None,
    device: Any = "cpu",
    motion_module: str | os.PathLike | None = None,
    loras: Sequence[tuple[str | os.PathLike, float]] = (),
) -> EvalReport:
    """Generate one video per line of `prompts_path` with `model` and score it (see the module docstring).

    Args:
        model: what `kinema.pipelines.load.load_family` loads: a bundled model's name or a model folder.
        prompts_path: a prompt set (kinema.eval.prompts); default the shipped synthetic set.
        seed: added to every line's seed (a line's own `seed`, else one drawn from its text).
        frames, steps, guidance: frames per video, sampling steps and guidance scale; by default the model's
            kinema.json defaults (as `kinema generate` takes them, with its size and scheduler), else 16 frames and
            GenerationRequest's steps and guidance at the model's native size (`native_size`).
        progress: show a progress bar over the prompts.
        out_dir: write report.json, confusion-{color,shape,motion}.png (and videos/ with `save_videos`) here;
            None writes nothing. It follows kinema's output policy (`overwrite` replaces an earlier eval output).
        limit: score only the first `limit` lines.
        continuation: also extend the video of the first text-to-video line that is not held out to
            `continuation_frames` frames and score its seams.
        continuations: how many such lines' videos to extend (the first ones); one seam score is one video's, and
            videos' joins differ (on the bundled kinema-tiny-ad, 1.3-4.4 over six prompts).
        speed: a speed preset (kinema.pipelines.speed: fast, balanced, quality) whose settings replace the model's
            defaults, as `kinema generate --speed` does; `steps` still wins. None: the model's defaults.
        device: where the model runs: a torch device or a kinema.devices name (auto, cpu, cuda, cuda:N, mps).
        motion_module, loras: a motion module and `(path, weight)` LoRAs for an SD1.5 model, as `load_family`
            takes them (a motion module or LoRA being trained, scored on the model it is for). With either, the
            lines are held out as the prompt file marks them, not by the model's kinema.json list.
    Returns:
        The `EvalReport`; videos are `(F, 3, H, W)` frames in [0, 1] at the model's native size.
    """
    entries = read_prompts(prompts_path)  # before any model loads: a bad file fails at once
    if limit is not None:
        if limit < 1:
            raise KinemaError(f"limit must be at least 1, got {limit}")
        entries = entries[:limit]
    if isinstance(continuations, bool) or not isinstance(continuations, int) or continuations < 1:
        raise KinemaError(f"continuations must be a whole number of at least 1, got {continuations!r}")
    if guidance is not None and not 1 <= guidance < float("inf"):
        raise KinemaError(f"guidance must be a finite number >= 1 (1 turns classifier-free guidance off), got "
                          f"{guidance}")
    check_eval_inputs(model, entries, prompts_path, seed=seed, frames=frames, motion_module=motion_module,
                      loras=loras, continuation=continuation_frames if continuation else None)
    if speed is not None:
        from kinema.pipelines.speed import preset_settings

        preset_settings(speed)  # an unknown preset fails here, before any model loads
    held_out_from = "prompt file"
    if motion_module is None and not loras:  # the model's list is what its own weights trained without
        entries, held_out_from = _held_out_by_the_model(model, entries, prompts_path)
    began = time.perf_counter()
    with ExitStack() as stack:
        folder = None
        if out_dir is not None:
            from kinema.fileio import atomic_folder

            folder = stack.enter_context(atomic_folder(
                out_dir, EVAL_KIND, overwrite=overwrite,
                inputs=(prompts_path, *(entry.image for entry in entries if entry.image is not None))))
        report = _run(model, entries, Path(prompts_path), seed=seed, frames=frames,
                      steps=steps, guidance=guidance, speed=speed, progress=progress, folder=folder,
                      continuation=continuation_frames if continuation else None, continuations=continuations,
                      save_videos=save_videos, device=device,
                      parts={"motion_module": motion_module, "loras": list(loras)})
        report.seconds = round(time.perf_counter() - began, 1)
        from kinema import __version__

        # What a reader of report.json needs to run it again: the prompt file's exact bytes, the lines scored.
        report.prompts = str(Path(prompts_path).resolve())
        # Paths absolute (a bundled model by its name), so that it runs again from any folder.
        report.model = os.path.abspath(model) if os.path.lexists(model) else model
        report.settings.update(kinema_version=__version__, limit=limit, held_out_from=held_out_from,
                               motion_module=None if motion_module is None else os.path.abspath(motion_module),
                               loras=[[os.path.abspath(path), weight] for path, weight in loras],
                               continuation_frames=continuation_frames if continuation else None,
                               continuations=continuations if continuation else 0,
                               prompts_sha256=hashlib.sha256(Path(prompts_path).read_bytes()).hexdigest())
        if folder is not None and out_dir is not None:
            report.out_dir = str(Path(out_dir).resolve())
            report.files = sorted([*report.files, *_write_confusions(folder, report.per_prompt), REPORT_NAME])
            (folder / REPORT_NAME).write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return report


def _held_out_by_the_model(model: str, entries: list[PromptEntry],
                           prompts_path: str | os.PathLike) -> tuple[list[PromptEntry], str]:
    """`entries` held out as the model's kinema.json "held_out" list says, where it has one (what its training
    left out, whatever the prompt file marks), with one warning naming the lines whose mark it changed; else as
    the file marks them. Returns them and where the marks came from ("kinema.json" or "prompt file")."""
    from kinema.bundled import read_model_info, resolve_model

    listed = read_model_info(resolve_model(model, f"no such model file or folder: {model}")).get("held_out")
    if not isinstance(listed, list) or not all(isinstance(combo, list) and len(combo) == 3 for combo in listed):
        return entries, "prompt file"
    combos = {tuple(combo) for combo in listed}
    marked = [replace(entry, held_out=(entry.color, entry.shape, entry.motion) in combos) for entry in entries]
    changed = [entry.line for entry, new in zip(entries, marked, strict=True) if entry.held_out != new.held_out]
    if changed:
        logger.warning("%s marks %d line(s) held out otherwise than %s's kinema.json, which lists what its training "
                       "left out; scored by the model's list (line %s)", prompts_path, len(changed), model,
                       ", ".join(str(line) for line in changed[:10]) + (", ..." if len(changed) > 10 else ""))
    return marked, "kinema.json"


def _video_seed(entry: PromptEntry, seed: int) -> int:
    """The seed of `entry`'s video: its own seed, else one drawn from its text, plus the eval's `seed`."""
    return entry.seed + seed if entry.seed is not None else default_seed(entry.prompt, seed)


def _run(model: str, entries: list[PromptEntry], prompts_path: Path, *, seed: int, frames: int | None,
         steps: int | None, guidance: float | None, speed: str | None, progress: bool, folder: Path | None,
         continuation: int | None, continuations: int, save_videos: bool, device: Any,
         parts: dict[str, Any]) -> EvalReport:
    from tqdm import tqdm

    from kinema.devices import resolve_device
    from kinema.eval.metrics import dynamic_degree, first_frame_psnr, seam_score, temporal_flicker
    from kinema.pipelines.generation import generate, image_tensor
    from kinema.pipelines.load import load_family
    from kinema.pipelines.request import LIBRARY_DEFAULTS, GenerationRequest

    device = resolve_device(device) if isinstance(device, str) else device
    family = load_family(model, device=device, **parts)
    size = native_size(family)
    # The model's kinema.json defaults (load_family reads them), as `kinema generate` takes them.
    shared: dict[str, Any] = {"height": size, "width": size, "frames": DEFAULT_FRAMES, **family.defaults, "fps": FPS}
    for key, given in (("frames", frames), ("steps", steps), ("guidance", guidance)):
        if given is not None:
            shared[key] = given
    if speed is not None:  # as `kinema generate --speed`: the preset fills what the user left unset
        from kinema.pipelines.speed import chosen_settings, describe_speed

        chosen = chosen_settings(speed, {"steps": steps} if steps is not None else {}, device)
        shared.update(chosen, speed=speed)
        logger.info("%s", describe_speed(speed, chosen))
    settings = {"steps": LIBRARY_DEFAULTS["steps"], "guidance": LIBRARY_DEFAULTS["guidance"], **shared, "seed": seed}
    continued = [i for i, entry in enumerate(entries) if entry.mode == "text-to-video" and not entry.held_out
                 ][:continuations] if continuation is not None else []
    if continuation is not None and not continued:
        logger.warning("no continuation and so no seam score: the prompts hold no text-to-video line that is not "
                       "held out")
    elif continuation is not None and len(continued) < continuations:
        logger.warning("%d continuations asked for, but the prompts hold %d text-to-video lines that are not held "
                       "out; continuing those", continuations, len(continued))
    start_videos: dict[int, Any] = {}
    flow_missing = None
    if importlib.util.find_spec("cv2") is None:  # the one metric that needs the [eval] extra: reported as null
        flow_missing = "OpenCV is not installed: pip install 'kinema[eval]' (or opencv-python-headless)"
        logger.warning("no dynamic degree: %s", flow_missing)
    files: list[str] = []
    rows: list[dict[str, Any]] = []
    for index, entry in enumerate(tqdm(entries, desc="eval", unit="prompt", disable=None if progress else True)):
        video_seed = _video_seed(entry, seed)
        image = None
        if entry.image is not None:  # what generate() makes of it, for the PSNR; the request names its path
            image = image_tensor(entry.image, shared["height"], shared["width"], True, "the start image")
            height, width = video_size(entry.image, "start image")
            if (height, width) != (shared["height"], shared["width"]):
                logger.warning("%s line %d: the start image %s is %dx%d; it is resized to the model's %dx%d",
                               prompts_path, entry.line, entry.image, width, height, shared["width"],
                               shared["height"])
        request = GenerationRequest(prompt=entry.prompt, seeds=[video_seed], resize=image is not None,
                                    image=None if entry.image is None else str(entry.image), **shared)
        made = time.perf_counter()
        result = generate(family, request, progress=False)
        video = result.frames[0]
        detected, problem = labels_or_why(video)
        row: dict[str, Any] = {
            "prompt": entry.prompt, "line": entry.line, "mode": entry.mode, "held_out": entry.held_out,
            "seed": video_seed, "expected": entry.labels, "detected": detected,
            "correct": {key: detected[key] == entry.labels[key] for key in LABELS},
            "flicker": round(temporal_flicker(video), 4), "dynamic": None, "flow_magnitude": None, "psnr": None,
            "jump": None,
            "seconds": round(time.perf_counter() - made, 2)}
        if problem is not None:
            row["detector_error"] = problem
        if flow_missing is None:
            moved = dynamic_degree(video, fps=FPS)
            row["dynamic"], row["flow_magnitude"] = moved.dynamic, round(moved.magnitude, 3)
        if image is not None:
            row["psnr"] = round(first_frame_psnr(video, image), 2)
            # A video can keep its start image as frame 0 and then ignore it; the step after it, against the
            # median step, tells (1: it moves on from the image as from any frame).
            row["jump"] = round(seam_score(video, [1]), 3)
        if folder is not None and save_videos:
            row["video"] = _write_video(folder, f"{index:03d}-{slug(entry.prompt, 40)}", video, result.settings[0])
            files.append(row["video"])
        if index in continued:
            start_videos[index] = video
        rows.append(row)
        logger.info("eval %d/%d %r: %s", index + 1, len(entries), entry.prompt, detected)

    continuation_reports = []
    if continuation is not None:
        for index in continued:
            continued_report = _continue(family, entries[index], rows[index]["seed"], start_videos[index],
                                         continuation, shared, folder if save_videos else None, index)
            continuation_reports.append(continued_report)
            if "video" in continued_report:
                files.append(continued_report["video"])
    main = [row for row in rows if not row["held_out"]]
    held = [row for row in rows if row["held_out"]]
    scores = _accuracies(main)
    dynamic = [row["dynamic"] for row in rows if row["dynamic"] is not None]
    return EvalReport(
        model=str(model), prompts=str(prompts_path), n=scores["n"], color_acc=scores["color_acc"],
        shape_acc=scores["shape_acc"], motion_acc=scores["motion_acc"],
        flicker=_mean([row["flicker"] for row in rows]),
        dynamic_degree=_mean([float(value) for value in dynamic]) if dynamic else None,
        dynamic_magnitude=_mean([row["flow_magnitude"] for row in rows]),
        i2v_psnr=_mean([row["psnr"] for row in rows]), i2v_jump=_mean([row["jump"] for row in rows]),
        seam_score=_mean([report["seam_score"] for report in continuation_reports]),
        held_out=_accuracies(held), continuation=continuation_reports[0] if continuation_reports else None,
        continuations=continuation_reports,
        settings={**settings, "i2v_n": sum(row["psnr"] is not None for row in rows), "dynamic_degree_missing":
                  flow_missing, "device": str(device),
                  "dtype": str(next(family.model.parameters()).dtype).removeprefix("torch.")},
        seconds=0.0, per_prompt=rows, files=files)


def _continue(family: Any, entry: PromptEntry, seed: int, start: Any, total: int, shared: dict[str, Any],
              folder: Path | None, index: int) -> dict[str, Any]:
    """Extend `start` `(F, 3, H, W)` (the video of `entry`, line `index` of the set) to `total` frames in segments
    of F frames (the length the eval generates, so each segment is what the model makes best) and score the joins;
    its video, in `folder`, is named by `index` like the line's own."""
    from kinema.eval.metrics import seam_score, video_psnr
    from kinema.pipelines.generation import generate
    from kinema.pipelines.request import GenerationRequest

    frames = start.shape[0]
    if total <= frames:
        raise KinemaError(f"the continuation must be longer than the clip it extends ({frames} frames), got {total}")
    request = GenerationRequest(
        prompt=entry.prompt, seeds=[seed], video=start, extend_frames=total - frames, segment_frames=frames,
        **shared).with_defaults(family.defaults)  # the overlap: the model's default, as `kinema extend` takes it
    overlap = request.overlap_frames
    assert overlap is not None  # filled by with_defaults
    made = time.perf_counter()
    result = generate(family, request, progress=False)
    video = result.frames[0]
    boundaries = continuation_boundaries(frames, total, frames, overlap)
    tail, problem = labels_or_why(video[-frames:])
    report: dict[str, Any] = {
        "prompt": entry.prompt, "line": entry.line, "seed": seed, "frames": int(video.shape[0]),
        "segment_frames": frames, "overlap": overlap, "segments": result.report.get("segments"),
        "boundaries": boundaries, "seam_score": round(seam_score(video, boundaries), 4),
        # The join is cross-faded over the held frames, so a continuation that re-made them differently would spread
        # its jump over them (a ghosted blend the seam score does not see): how much of the clip they kept.
        "overlap_psnr": round(video_psnr(video[frames - overlap:frames], start[frames - overlap:],
                                         "the clip's held frames"), 2),
        "tail_detected": tail, "tail_correct": {key: tail[key] == entry.labels[key] for key in LABELS},
        "seconds": round(time.perf_counter() - made, 2)}
    if problem is not None:
        report["detector_error"] = problem
    if folder is not None:
        report["video"] = _write_video(folder, f"continuation-{index:03d}-{slug(entry.prompt, 40)}", video,
                                       result.settings[0])
    return report


# ---------------------------------------------------------------- printing


def _continued(report: EvalReport) -> str:
    """What the seam score is over: "128-frame continuation", "mean of 6 128-frame continuations (1.31-4.38)"."""
    if not report.continuations:
        return "no continuation"
    frames = report.continuations[0]["frames"]
    if len(report.continuations) == 1:
        return f"{frames}-frame continuation"
    scores = [entry["seam_score"] for entry in report.continuations]
    return f"mean of {len(scores)} {frames}-frame continuations, {min(scores):.2f}-{max(scores):.2f}"


def format_report(report: EvalReport) -> str:
    """A readable summary of `report`: the accuracies, the metrics and where the files went."""
    def number(value: float | None, percent: bool = False, digits: int = 3) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"

    held = report.held_out
    held_label = f"held out ({held.get('n', 0)})"
    lines = [f"kinema eval: {report.model} on {report.prompts} ({len(report.per_prompt)} prompts, "
             f"{report.seconds:.0f} s)",
             "",
             f"{'':<22}{'colour':>9}{'shape':>9}{'motion':>9}",
             f"{f'main ({report.n})':<22}{number(report.color_acc, True):>9}{number(report.shape_acc, True):>9}"
             f"{number(report.motion_acc, True):>9}",
             f"{held_label:<22}{number(held.get('color_acc'), True):>9}"
             f"{number(held.get('shape_acc'), True):>9}{number(held.get('motion_acc'), True):>9}",
             "",
             f"temporal flicker      {number(report.flicker)}   (VBench: 1 = no change between frames)",
             f"dynamic degree        {number(report.dynamic_degree)}   (share of videos that move; mean flow "
             f"{number(report.dynamic_magnitude, digits=2)} px/frame)",
             f"image-to-video PSNR   {number(report.i2v_psnr, digits=2)} dB   "
             f"({report.settings.get('i2v_n', 0)} start images)",
             f"image-to-video jump   {number(report.i2v_jump, digits=2)}   (frame 0 -> 1 over the median step; "
             f"1 = it moves on from the image)",
             f"seam score            {number(report.seam_score)}   (1 = seamless; " + _continued(report) + ")"]
    kept = _mean([entry["overlap_psnr"] for entry in report.continuations])
    if kept is not None:
        lines.append(f"held frames kept      {number(kept, digits=2)} dB   (the {report.continuations[0]['overlap']} "
                     f"frames each continuation held, against its clip's)")
    if report.out_dir is not None:
        lines += ["", f"wrote {report.out_dir}: {', '.join(report.files)}"]
    return "\n".join(lines)
