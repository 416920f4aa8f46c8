"""The files of a generation: one video per seed with its settings, and the final latents for decoding again later.

Where each file goes:

- `video_paths(out, seeds)`: one seed writes `out` itself; several write `STEM-seedS.SUFFIX` beside it
  (`clips/cat.mp4` with seeds 1 and 2 -> `clips/cat-seed1.mp4`, `clips/cat-seed2.mp4`). A frames folder (a path with
  no extension) is named the same way: `clips/cat` -> `clips/cat-seed1/`, `clips/cat-seed2/`, each a complete frame
  folder of its own with its own sidecar (`clips/cat-seed1.json`).
- `latents_path(out)`: the latents of the whole batch, one file for all seeds, beside `out`: `clips/cat.mp4` ->
  `clips/cat.mp4.latents.safetensors` (a frames folder `clips/cat` -> `clips/cat.latents.safetensors`).

Video formats are those of kinema.data.video_io (chosen by the extension); every file follows kinema's output policy
(kinema.fileio). The path helpers and `check_video_outputs` import no torch, so the CLI can check its outputs before
anything heavy is imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError
from kinema.pipelines.request import check_seeds_once

if TYPE_CHECKING:
    import torch

# Extensions kinema.data.video_io writes ("" is a folder of PNG frames); .png holds a single frame.
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".webp", ".png", "")
LATENTS_SUFFIX = ".latents.safetensors"
LATENTS_KIND = "latents"  # the output kind in the file's safetensors metadata (kinema.fileio.MARK_KEY)
LATENTS_TENSOR = "latents"
SETTINGS_METADATA_KEY = "kinema_settings"
# A digest of the latents and their settings text: a flipped bit in a saved file (a disk or copy fault) is refused on
# load, where it would otherwise decode, or resume, into a wrong video without a word. Files saved before it hold none.
DIGEST_METADATA_KEY = "kinema_latents_digest"


def video_paths(out: str | os.PathLike, seeds: Sequence[int]) -> list[Path]:
    """The video path of each seed, in the order of `seeds`: `[out]` for one seed, else `STEM-seedS.SUFFIX` beside
    `out` (a frames folder `NAME` gives folders `NAME-seedS`). A seed given twice is refused (the same video twice)."""
    out = Path(out)
    seeds = list(seeds)
    if not seeds:
        raise KinemaError("no seeds given; give at least one (one video per seed)")
    check_seeds_once(seeds)
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-seed{seed}{out.suffix}") for seed in seeds]


def latents_path(out: str | os.PathLike) -> Path:
    """Where the latents of a generation writing to `out` are saved: `out`'s full name plus `.latents.safetensors`,
    beside it (`clip.mp4` -> `clip.mp4.latents.safetensors`); one file holds every seed's latents."""
    out = Path(out)
    return out.with_name(out.name + LATENTS_SUFFIX)


def check_video_suffix(path: str | os.PathLike, frames: int | None = None) -> None:
    """One KinemaError line when `path`'s extension is not a video format kinema writes, or is `.png` for more
    than one frame (`frames`, when known)."""
    path = Path(path)
    suffix = path.suffix.lower()
    # `.mp4` alone: pathlib's hidden name with no extension.
    if not suffix and path.name and path.name.lower() in VIDEO_SUFFIXES:
        raise KinemaError(f"{path.name} is an extension with no name, which would be a hidden folder of frames; give "
                          f"a name such as out{path.name}")
    if suffix not in VIDEO_SUFFIXES:
        known = ", ".join(s for s in VIDEO_SUFFIXES if s)
        raise KinemaError(f"cannot write {path.name}: unsupported extension {suffix!r}; use {known}, or a folder path "
                          "with no extension for PNG frames")
    from kinema.data.probe import missing_encoder

    encoder = missing_encoder(suffix)
    if encoder is not None:  # found before any sampling, not when the finished frames are written
        raise KinemaError(f"cannot write {path.name}: this PyAV's FFmpeg has no {encoder} encoder, which kinema "
                          f"writes {suffix} with; write .gif, .webp or a frames folder instead, or install PyAV from "
                          f"PyPI (its wheels bundle {encoder})")
    if suffix == ".png" and frames is not None and frames != 1:
        raise KinemaError(f"{path.name}: a .png file holds one frame, not {frames}; give a folder path (no extension) "
                          "for one PNG per frame, or .mp4 / .gif")


def check_video_outputs(paths: Sequence[Path], *, overwrite: bool = False, frames: int | None = None,
                        inputs: Sequence[str | os.PathLike] = ()) -> None:
    """The output policy (kinema.fileio.check_output) for every video of `paths` and its settings sidecar, before
    any is written, so that a refusal leaves nothing half-done; no video may be (or hold) one of `inputs`. Raises
    one KinemaError line."""
    from kinema.fileio import check_output, clean_stale

    for path in paths:  # a killed run's leftovers of every video first, also where a refusal below stops early
        for target in (path, path.with_name(path.name + ".json")):
            clean_stale(Path(os.path.realpath(target)))
    from kinema.data.probe import check_video_not_a_link

    for path in paths:
        check_video_suffix(path, frames)
        check_video_not_a_link(path)
        check_output(path, "video", folder=path.suffix == "", overwrite=overwrite, inputs=inputs)
        check_output(path.with_name(path.name + ".json"), "video_settings", folder=False, overwrite=overwrite)


def remove_replaced_videos(paths: Sequence[Path]) -> None:
    """Remove kinema's own earlier videos at `paths` and their settings sidecars, which a run with `overwrite` is
    about to replace, once its new latents are saved: a run stopped before its new videos are written then leaves
    its latents without videos of other settings beside them, and the same command without `overwrite` resumes it
    (decodes them). Files kinema did not write are left alone."""
    from kinema.fileio import remove_own

    for path in paths:
        remove_own(path, "video")  # first: a video is known as kinema's by the sidecar that carries its settings
        remove_own(path.with_name(path.name + ".json"), "video_settings")


def _frames_per_video(frames: Any) -> list[Any]:
    """Each video's frames as uint8 `(F, H, W, 3)` arrays, what video_io writes: from a float `(B, F, 3, H, W)`
    tensor in [0, 1] (rounded to the nearest level), numpy output as is, PIL output stacked."""
    import numpy as np
    import torch

    if frames is None:
        raise KinemaError("the result holds no frames (it was generated with output='latent'); decode its latents "
                          "first (kinema.pipelines.decode_saved)")
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise KinemaError(f"expected frames shaped (B, F, 3, H, W), got {tuple(frames.shape)}")
        if not torch.isfinite(frames).all():
            raise KinemaError("the frames contain NaN or infinity; the model output is broken, not the file "
                              "(try float32 instead of float16)")
        # Straight to uint8: going through video_io's [-1, 1] floats would round some levels one step down.
        as_bytes = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return list(as_bytes.permute(0, 1, 3, 4, 2).cpu().numpy())
    videos = []
    for video in frames:
        if isinstance(video, np.ndarray):
            videos.append(video)
        else:  # output="pil": one list of images per video
            videos.append(np.stack([np.asarray(image.convert("RGB")) for image in video]))
    return videos


def write_result(result: Any, out: str | os.PathLike, *, fps: float, overwrite: bool = False) -> list[Path]:
    """Write each video of a `GenerationResult` to `video_paths(out, seeds)`, its settings (the video's generation
    settings plus the run's `report`) in the sidecar and, where the format allows, inside the file.

    Args:
        result: a GenerationResult: `frames` float `(B, F, 3, H, W)` in [0, 1] (or numpy / PIL output), `settings`
            one dict per video with its `seed`, and `report`.
        out: the output path (see `video_paths`); the extension picks the format (.mp4, .webm, .gif, .webp, .png
            for one frame, no extension for a PNG-frames folder).
        fps: frames per second of the written videos.
        overwrite: replace earlier kinema outputs at those paths (never files kinema did not write).
    Returns:
        The paths written, one per video. Every path is checked against the output policy before the first is
        written.
    """
    from kinema.data.video_io import write_video

    settings = list(result.settings)
    videos = _frames_per_video(result.frames)
    if len(videos) != len(settings):
        raise KinemaError(f"the result holds {len(videos)} video(s) but {len(settings)} settings; each video needs "
                          "its own settings (with its seed)")
    seeds = [entry.get("seed") for entry in settings]
    if len(seeds) > 1 and not all(isinstance(seed, int) for seed in seeds):
        raise KinemaError(f"the result's settings need an integer seed per video to name the files; got {seeds}")
    paths = video_paths(out, seeds)
    check_video_outputs(paths, overwrite=overwrite, frames=len(videos[0]))
    report = dict(getattr(result, "report", None) or {})
    for path, video, entry in zip(paths, videos, settings, strict=True):
        write_video(video, path, fps=fps, settings={**entry, "report": report}, overwrite=overwrite)
    return paths


def save_latents(latents: torch.Tensor, settings: Sequence[dict[str, Any]], path: str | os.PathLike, *,
                 overwrite: bool = False) -> Path:
    """Save final latents `(B, C, F', h, w)` and each video's settings (JSON, in the safetensors metadata) to the
    `.safetensors` file `path`, marked as kinema's `latents` output and written whole or not at all under the output
    policy. The tensor keeps its dtype, so `load_latents` gives back exactly what was saved."""
    import torch

    from kinema.loaders.checkpoint_io import write_state_dict

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise KinemaError(f"cannot save latents to {path.name}: latents are saved as .safetensors; name the file "
                          f"{path.name}{LATENTS_SUFFIX}")
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise KinemaError(f"expected latents shaped (B, C, F', h, w), got {shape}")
    settings = [dict(entry) for entry in settings]
    if len(settings) != latents.shape[0]:
        raise KinemaError(f"got {latents.shape[0]} latent video(s) but {len(settings)} settings; give one settings "
                          "dict per video")
    try:
        text = json.dumps(settings)
    except (TypeError, ValueError) as err:
        raise KinemaError(f"the settings cannot be stored as JSON ({err}); pass numbers, strings, lists or dicts"
                          ) from None
    metadata = {SETTINGS_METADATA_KEY: text, DIGEST_METADATA_KEY: _digest(latents, text)}
    return write_state_dict({LATENTS_TENSOR: latents}, path, metadata=metadata, kind=LATENTS_KIND,
                            overwrite=overwrite)


def _digest(latents: torch.Tensor, settings_text: str) -> str:
    from kinema.training.cache import tensor_key

    return tensor_key("kinema latents", latents, settings_text)


def _damaged(path: Path) -> KinemaError:
    return KinemaError(f"{path} is marked as kinema latents but its contents are damaged (expected one "
                       "(B, C, F', h, w) tensor and B settings); generate it again")


def decode_with_their_maker(recorded: Mapping[str, Any]) -> str:
    """The fix for latents that another model's VAE made, from their saved settings `recorded`."""
    maker = recorded.get("model")
    return f"decode them with --model {maker}, the model that made them" if maker else \
        "decode them with the model that made them"


def another_familys_latents(recorded: Mapping[str, Any], name: str, family: str) -> KinemaError | None:
    """The refusal of latents whose saved settings `recorded` say a model of another family than `family` (the
    model `name`'s) made them, whose VAE reads other latents; None when they match or do not say. Said before the
    model loads (`kinema decode`'s check, from its config) and again once it has."""
    made_by = recorded.get("family")
    if made_by in (None, family):
        return None
    return KinemaError(f"these latents were made by {recorded.get('model') or 'a model'} of the {made_by} family, "
                       f"and {name} is of the {family} family: its VAE reads other latents; "
                       f"{decode_with_their_maker(recorded)}")


def read_latents_settings(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-video settings stored with latents `save_latents` wrote to `path`, from the safetensors header alone
    (no torch: the CLI checks a latents file before anything heavy). A file that is not kinema latents is refused
    in one KinemaError line."""
    return _latents_header(Path(path))[0]


def _latents_header(path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(per-video settings, the header's metadata) of kinema latents at `path`; see `read_latents_settings`."""
    from kinema.fileio import MARK_KEY
    from kinema.sniff import Kind, sniff

    hint = f"give the {LATENTS_SUFFIX} file that `kinema generate` saved beside its video"
    if path.is_dir():
        raise KinemaError(f"{path} is a folder; {hint}")
    if not path.is_file():
        raise KinemaError(f"no such latents file: {path}")
    found = sniff(path)
    if found.kind is not Kind.SAFETENSORS:
        raise KinemaError(f"{path} is not kinema latents: it is {found.what}; {hint}")
    if found.metadata.get(MARK_KEY) != LATENTS_KIND:
        raise KinemaError(f"{path} is a safetensors file but not latents kinema saved (no '{LATENTS_KIND}' mark in "
                          f"its metadata); {hint}")
    if not all(isinstance(value, str) for value in found.metadata.values()):  # safetensors metadata is text only
        raise _damaged(path)
    try:
        settings = json.loads(found.metadata.get(SETTINGS_METADATA_KEY, ""))
    except ValueError:
        raise _damaged(path) from None
    if not isinstance(settings, list) or not settings or not all(isinstance(entry, dict) for entry in settings):
        raise _damaged(path)
    return settings, found.metadata


def differing_settings(ours: Sequence[Mapping[str, Any]], saved: Sequence[Mapping[str, Any]],
                       keys: Sequence[str] | None = None) -> list[str]:
    """The names of the settings in which this run's per-video `ours` and the `saved` ones (`read_latents_settings`)
    differ, compared as JSON stores them: every name but the report, or with `keys` those alone where this run
    gives a value. A different number of videos differs in "seed". A setting one side lacks (saved before it
    existed, or one the request's inputs did not use) differs only when the other's is not the request's default."""
    import dataclasses

    from kinema.pipelines.request import GenerationRequest

    defaults = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}
    if len(ours) != len(saved):
        return ["seed"]
    differ: set[str] = set()
    for mine, theirs in zip(json.loads(json.dumps(list(ours))), saved, strict=True):
        names = [key for key in keys if mine.get(key) is not None] if keys is not None else \
            [key for key in {*mine, *theirs} if key != "report"]
        differ.update(key for key in names if mine.get(key) != theirs.get(key) and not _defaulted(key, mine, theirs,
                                                                                                   defaults))
    return sorted(differ)


def _defaulted(key: str, mine: Mapping[str, Any], theirs: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
    """Whether one side lacks `key` while the other holds the request's default for it: settings written before the
    field existed, or without the fields a request's inputs did not use (GenerationRequest.settings), as the same."""
    if key not in defaults:
        return False
    return key not in theirs and mine.get(key) == defaults[key] or key not in mine and theirs.get(key) == defaults[key]


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The latents `(B, C, F', h, w)` and per-video settings that `save_latents` wrote to `path`. Reads
    safetensors only (no pickle); any other file, a safetensors file kinema did not write as latents, or latents
    whose bytes no longer match the digest saved with them, is refused in one KinemaError line."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    settings, metadata = _latents_header(Path(path))
    try:
        tensors = load_file(str(path))
    except SafetensorError:
        raise _damaged(Path(path)) from None
    latents = tensors.get(LATENTS_TENSOR)
    if latents is None or set(tensors) != {LATENTS_TENSOR} or latents.ndim != 5 or len(settings) != latents.shape[0]:
        raise _damaged(Path(path))
    if DIGEST_METADATA_KEY in metadata and \
            metadata[DIGEST_METADATA_KEY] != _digest(latents, metadata.get(SETTINGS_METADATA_KEY, "")):
        raise KinemaError(f"{path} is damaged: its latents or settings no longer match the digest saved with them (a "
                          "disk or copy fault); generate it again, or copy it again from where it was made")
    if not torch.isfinite(latents).all():  # kinema saves none such (generate() refuses them), so the file changed
        raise KinemaError(f"{path} is damaged: its latents hold NaN or infinity, which kinema never saves; generate "
                          "it again")
    return latents, settings
