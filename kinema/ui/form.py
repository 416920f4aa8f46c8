"""The web app's form as plain data, and its two translations: form values -> the mapping `job_from_mapping` checks
(so the app refuses bad input with the same line as the CLI and the API), and a job's settings -> form values (the
gallery's "load settings").

Form values are a dict keyed by `FORM_KEYS`. The tab decides the mode: text-to-video and image-to-video take the
form's size and frame count; video-to-video and extend keep the input video's size (and video-to-video its length),
unless their tab's resize box asks for the form's width and height.
The form holds one seed; a job of several seeds loads back with its first. Settings the form has no field for
(context windows, FreeInit, dtype, step caching, ...) load back into "extra", which the page shows and the next job
takes as they were.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kinema.bundled import DEFAULT_MODEL
from kinema.data.probe import PIL_FORMATS, oriented_size, video_fps
from kinema.errors import KinemaError
from kinema.pipelines.jobs import JOB_KEYS
from kinema.pipelines.request import CONTINUATION_DEFAULTS, LIBRARY_DEFAULTS, MODES, GenerationRequest

TEXT_TO_VIDEO, IMAGE_TO_VIDEO, VIDEO_TO_VIDEO, EXTEND = MODES
FORM_KEYS = ("mode", "prompt", "negative_prompt", "model", "motion_module", "loras", "scheduler", "steps", "width",
             "height", "frames", "guidance", "seed", "image", "end_image", "resize", "v2v_video", "strength",
             "extend_video", "extend_frames", "speed", "extra", "v2v_resize", "extend_resize", "motion_effect",
             "motion_scale", "controlnet", "controlnet_scale", "control_video", "control_indices", "guess_mode",
             "pia_motion", "controlnet_2", "controlnet_scale_2", "control_video_2", "guidance_rescale", "v2v_mask",
             "v2v_mask_blur")
# The job keys the form's fields (and tabs) make; every other job key is "extra".
_FORM_JOB_KEYS = ("model", "motion_module", "loras", "prompt", "negative_prompt", "frames", "height", "width", "steps",
                  "guidance", "scheduler", "seeds", "seed", "image", "end_image", "resize", "video", "strength",
                  "extend_frames", "speed", "mode", "motion_effect", "motion_scale", "controlnet", "control_video",
                  "control_indices", "guess_mode", "pia_motion", "guidance_rescale", "mask",
                  "mask_blur")
# Job settings without a form field: a loaded video carries those it set (not at their defaults) in "extra". Derived
# from the job's keys, so a setting added to jobs later loads back without a change here.
EXTRA_KEYS = tuple(key for key in JOB_KEYS if key not in _FORM_JOB_KEYS)
# A setting at the request's default is no "extra": nor is one that the library's defaults fill (the continuation
# overlap), which the job fills again.
_REQUEST_DEFAULTS = {**{field.name: field.default for field in dataclasses.fields(GenerationRequest)},
                     **{key: LIBRARY_DEFAULTS[key] for key in CONTINUATION_DEFAULTS}}
# The input video of each mode that takes one: the tabs have a video box each.
VIDEO_KEYS = {VIDEO_TO_VIDEO: "v2v_video", EXTEND: "extend_video"}
# ... and its box "resize the video to the form's width x height" (for an input whose size the model cannot make).
RESIZE_KEYS = {VIDEO_TO_VIDEO: "v2v_resize", EXTEND: "extend_resize"}
# The size a video takes from its start image rounds down to this: both families' VAEs downscale 8x.
SIZE_MULTIPLE = 8
_WHOLE_NUMBERS = ("steps", "width", "height", "frames", "seed", "extend_frames")


def _number(value: Any, whole: bool) -> Any:
    """A form number as the job wants it: whole numbers as int (sliders and number boxes may give 8.0, the seed's
    text box "123"); anything else as it is, for the job's own one-line refusal."""
    if whole and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if whole and isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,30}\s*", value):  # past 2**64: the job's
        return int(value)
    return value


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def form_to_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """The job mapping of the form `values` (keys of `FORM_KEYS`; missing or empty ones are left to the job's
    defaults). One KinemaError line for a tab whose input is missing (no start image, no video)."""
    mode = values.get("mode") or TEXT_TO_VIDEO
    if mode not in MODES:
        raise KinemaError(f"unknown mode {mode!r}; the app's tabs are {', '.join(MODES)}")
    data: dict[str, Any] = {"mode": mode, "model": values.get("model") or DEFAULT_MODEL,
                            "prompt": values.get("prompt") or ""}
    for key in ("negative_prompt", "motion_module", "scheduler", "speed"):
        if _given(values.get(key)):
            data[key] = values[key]
    loras = [[path, _number(weight, whole=False)] for path, weight in values.get("loras") or [] if _given(path)]
    if loras:
        data["loras"] = loras
    sized = ("width", "height", "frames") if mode in (TEXT_TO_VIDEO, IMAGE_TO_VIDEO) else ()
    for key in ("steps", "guidance", "seed", "motion_effect", "motion_scale", *sized):
        if _given(values.get(key)):
            data[key] = _number(values[key], key in _WHOLE_NUMBERS)
    if _given(values.get("guidance_rescale")) and values["guidance_rescale"] != 0:  # the field's 0 is "off": None
        data["guidance_rescale"] = values["guidance_rescale"]
    extra = values.get("extra") or {}
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        raise KinemaError(f"the form's extra settings hold {', '.join(unknown)}, which are not among "
                          f"{', '.join(EXTRA_KEYS)}")
    data.update(extra)
    data.update(_control_mapping(values))
    if mode == IMAGE_TO_VIDEO:
        if not _given(values.get("image")):
            raise KinemaError("Image to Video needs a start image: upload one (the end image is optional)")
        data["image"] = values["image"]
        if _given(values.get("end_image")):
            data["end_image"] = values["end_image"]
        data["resize"] = bool(values.get("resize"))
        if _given(values.get("pia_motion")):
            data["pia_motion"] = _number(values["pia_motion"], whole=True)
    elif mode in VIDEO_KEYS:
        video = values.get(VIDEO_KEYS[mode])
        if not _given(video):
            tab = "Video to Video" if mode == VIDEO_TO_VIDEO else "Long video / Extend"
            raise KinemaError(f"{tab} needs an input video: upload one")
        data["video"] = video
        if values.get(RESIZE_KEYS[mode]):  # else the video keeps its own size
            data["resize"] = True
            for key in ("width", "height"):
                if _given(values.get(key)):
                    data[key] = _number(values[key], whole=True)
        if mode == VIDEO_TO_VIDEO and _given(values.get("strength")):
            data["strength"] = _number(values["strength"], whole=False)
        if mode == VIDEO_TO_VIDEO and _given(values.get("v2v_mask")):
            data["mask"] = values["v2v_mask"]
        if mode == VIDEO_TO_VIDEO and _given(values.get("v2v_mask_blur")) and values["v2v_mask_blur"] != 0:
            data["mask_blur"] = _number(values["v2v_mask_blur"], whole=False)
        if mode == EXTEND and _given(values.get("extend_frames")):
            data["extend_frames"] = _number(values["extend_frames"], whole=True)
        if mode == EXTEND and _is_the_videos_model(video, data["model"], values.get("motion_module")):
            # The model that made the video (the upload put it in the field): the job goes on as `kinema extend`
            # without --model, taking it and its LoRAs from the video's settings. Another model chosen stays.
            del data["model"]
            data.pop("motion_module", None)
    return data


def _recorded_loras(loras: Any) -> list[list[Any]]:
    """The `[path, weight]` pairs of recorded settings' LoRAs (pairs, or `{"path", "weight"}` objects); an entry of
    another shape (a hand-edited job.json) is one KinemaError line, not Python's unpacking error."""
    pairs = []
    for entry in loras or []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            pairs.append([entry["path"], entry.get("weight", 1.0)])
        elif isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], str):
            pairs.append(list(entry))
        else:
            raise KinemaError(f"these settings' loras hold {json.dumps(entry)[:80]}, not a [path, weight] pair; fix "
                              "or remove it in the job.json")
    return pairs


def video_settings(video: str | None) -> dict[str, Any]:
    """The settings stored with `video` ({} for none, and for a video kinema cannot read: the job says so)."""
    from kinema.data.probe import stored_settings

    if not video:
        return {}
    try:
        return stored_settings(video)
    except (KinemaError, OSError):
        return {}


def video_model_parts(video: str | None, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model (and motion module) a video's stored settings name (`recorded`, read from it when None), where
    they are still here: what the Extend tab's model fields show once the video is uploaded ({} for a video without
    them)."""
    from kinema.pipelines.jobs import stored_model_parts

    parts = stored_model_parts(video_settings(video) if recorded is None else recorded)
    return {key: parts[key] for key in ("model", "motion_module") if key in parts}


def _is_the_videos_model(video: Any, model: str, motion_module: Any) -> bool:
    parts = video_model_parts(video)
    return bool(parts) and parts["model"] == model and parts.get("motion_module") == (motion_module or None)


def _control_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """The job keys of the form's ControlNet fields (none when no ControlNet is chosen): the network at its scale,
    the control video, the frames its images are keyframes of typed as `0, -1`, guess mode; with a second ControlNet
    both, each with its own control video (they steer together, at the same keyframes)."""
    def scaled(path: str, scale: Any) -> dict[str, Any]:
        return {"path": path, "scale": 1.0 if not _given(scale) else _number(scale, whole=False)}

    if not _given(values.get("controlnet")):
        if _given(values.get("controlnet_2")):
            raise KinemaError("the second ControlNet steers beside a first one: choose the first ControlNet too")
        return {}
    data: dict[str, Any] = {"controlnet": scaled(values["controlnet"], values.get("controlnet_scale"))}
    if _given(values.get("control_video")):
        data["control_video"] = values["control_video"]
    if values.get("guess_mode"):
        data["guess_mode"] = True
    indices = values.get("control_indices")
    if _given(values.get("controlnet_2")):
        if not (_given(values.get("control_video")) and _given(values.get("control_video_2"))):
            raise KinemaError("two ControlNets steer together, each by its own control video: upload both")
        data["controlnet"] = [data["controlnet"], scaled(values["controlnet_2"], values.get("controlnet_scale_2"))]
        data["control_video"] = [values["control_video"], values["control_video_2"]]
    if _given(indices) and str(indices).strip():  # keyframes: SparseCtrl's, or every ControlNet's alike
        try:
            data["control_indices"] = [int(part) for part in str(indices).replace(" ", "").split(",")]
        except ValueError:
            raise KinemaError(f"the keyframe indices are whole numbers separated by commas (e.g. 0, -1), got "
                              f"{indices!r}") from None
    return data


def _extra_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `settings` without a form field that the job set: not at GenerationRequest's defaults, not
    what its speed preset filled in (the form's speed brings those, and a changed speed must replace them), and not
    an input video's own frame rate (the job takes it from the video again)."""
    from kinema.pipelines.speed import CPU_WITHOUT_BFLOAT16, SPEED_PRESETS

    speed = settings.get("speed")
    preset = {**SPEED_PRESETS.get(speed, {}), **CPU_WITHOUT_BFLOAT16.get(speed, {})} if isinstance(speed, str) else {}
    video = settings.get("video")
    if isinstance(video, str) and Path(video).exists():
        preset = {**preset, "fps": video_fps(video)}
    return {key: settings[key] for key in EXTRA_KEYS
            if settings.get(key) is not None and settings[key] != _REQUEST_DEFAULTS.get(key)
            and not (key in preset and settings[key] == preset[key])}


def settings_to_form(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Form values (a subset of `FORM_KEYS`) that make the job of `settings` (a job's `settings()`, as job.json
    and the gallery hold them) again; keys the job's mode does not use are left out, so the form keeps them."""
    mode = settings.get("mode") if settings.get("mode") in MODES else TEXT_TO_VIDEO
    prompt = settings.get("prompt", "")
    values: dict[str, Any] = {
        "mode": mode,
        "prompt": prompt if isinstance(prompt, str) else json.dumps(prompt),
        "negative_prompt": settings.get("negative_prompt") or "",
        "model": settings.get("model") or DEFAULT_MODEL,
        "motion_module": settings.get("motion_module"),
        "loras": _recorded_loras(settings.get("loras")),
        "scheduler": settings.get("scheduler"),
        "speed": settings.get("speed") or "",
        "extra": _extra_settings(settings),
    }
    for key in ("steps", "guidance", "motion_effect", "motion_scale"):
        if settings.get(key) is not None:
            values[key] = settings[key]
    values["guidance_rescale"] = settings.get("guidance_rescale") or 0.0
    # Set either way: a video made without a ControlNet must not take the one the form held before.
    given, control_video = settings.get("controlnet"), settings.get("control_video")
    second: Mapping[str, Any] = {}
    second_video = None
    if isinstance(given, list):  # several steered together; the form holds two (the page says so of more)
        videos = control_video if isinstance(control_video, list) else []
        if len(given) > 1 and isinstance(given[1], Mapping):
            second, second_video = given[1], videos[1] if len(videos) > 1 else None
        given = given[0] if given else None
        control_video = videos[0] if videos else None
    values.update(controlnet_2=second.get("path") or "", controlnet_scale_2=second.get("scale", 1.0),
                  control_video_2=second_video)
    controlnet: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    values.update(controlnet=controlnet.get("path") or "", controlnet_scale=controlnet.get("scale", 1.0),
                  control_video=control_video if controlnet else None,
                  control_indices=", ".join(str(i) for i in settings.get("control_indices") or []),
                  guess_mode=bool(controlnet and settings.get("guess_mode")))
    seeds = settings.get("seeds") or [settings.get("seed", 0)]
    values["seed"] = "" if seeds[0] is None else str(seeds[0])  # the seed's box holds text: exact to 2**64 - 1
    if mode in (TEXT_TO_VIDEO, IMAGE_TO_VIDEO):
        values.update({key: settings[key] for key in ("width", "height", "frames") if settings.get(key) is not None})
    if mode == IMAGE_TO_VIDEO:
        values.update(image=settings.get("image"), end_image=settings.get("end_image"),
                      resize=bool(settings.get("resize")),
                      pia_motion="" if settings.get("pia_motion") is None else settings["pia_motion"])
    elif mode in VIDEO_KEYS:
        values[VIDEO_KEYS[mode]] = settings.get("video")
        values[RESIZE_KEYS[mode]] = bool(settings.get("resize"))
        if settings.get("resize"):
            values.update({key: settings[key] for key in ("width", "height") if settings.get(key) is not None})
        if mode == VIDEO_TO_VIDEO:
            values.update(strength=settings.get("strength"), v2v_mask=settings.get("mask"),
                          v2v_mask_blur=settings.get("mask_blur", 0.0))
        else:
            values["extend_frames"] = settings.get("extend_frames")
    return values


def size_of_image(path: str, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """`(width, height)` for a video made from the image at `path`: its own size rounded down to a multiple of
    `multiple` (at least `multiple`; with resize on, the image is scaled by less than `multiple` pixels each way).
    One KinemaError line when it is not an image."""
    from kinema.pipelines.jobs import check_image_file

    check_image_file(path, "start image")
    from PIL import Image

    with Image.open(path, formats=PIL_FORMATS) as image:
        width, height = oriented_size(image)
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)
