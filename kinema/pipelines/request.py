"""What one generation is asked to do: `GenerationRequest`, shared by `generate()`, the CLI, the web app and the API.

Plain data with no torch import, so a front end can build, check and record a request before any model loads.
The mode follows from the inputs: `video` with `extend_frames` continues a video, `video` alone is video-to-video
(SDEdit at `strength`), `image` is image-to-video, otherwise text-to-video.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError, count_words, lone_surrogate, lone_surrogate_error, shorten, value_words
from kinema.sampling.prompt_travel import INTERPOLATIONS, check_prompt_hold, frame_number
from kinema.sampling.schedulers import check_timestep_spacing

# torch.Generator.manual_seed takes 0 .. 2**64 - 1.
MAX_SEED = 2**64 - 1
# The largest guidance scale and motion factors taken (ComfyUI's cfg stops at 100 too): past them a sample is noise
# or overflows, which would show only after every step had run.
MAX_GUIDANCE = 100.0
MAX_MOTION_FACTOR = 100.0
MAX_MASK_BLUR = 64.0
# Sampling steps: diffusers' schedulers sample 1000 training timesteps, and DDIM fails at 1000 steps and DPM++ gives
# NaN there; every scheduler but LCM ran at 500 (kinema-tiny). LCM takes at most its original_inference_steps, 50.
MAX_STEPS = 500
MAX_LCM_STEPS = 50
# Frame rates a written video keeps: its time base is the rate as a fraction of denominator up to 1001, so a slower
# rate rounds to 0, and a far faster one overflows the container's 32-bit numbers.
MIN_FPS, MAX_FPS = 0.01, 1000.0
# The characters of one prompt text (the prompt, each keyframe's of a schedule, the negative prompt): a text encoder
# reads its first 77 (CLIP) or 120 (V3's T5) tokens, and a longer text would only be stored and repeated in every
# settings file and job record.
MAX_PROMPT_CHARS = 10_000
DEFAULT_FPS = 8.0

MODES = ("text-to-video", "image-to-video", "video-to-video", "extend")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8",)
SPEEDS = ("fast", "balanced", "quality")
OUTPUT_TYPES = ("tensor", "numpy", "pil", "latent")
PromptSpec = str | Mapping[Any, Any]
# What the fields left None take when the model's kinema.json "defaults" say nothing: SD1.5's size, AnimateDiff's
# 16 frames, diffusers' 25 steps and guidance 7.5.
LIBRARY_DEFAULTS: dict[str, Any] = {"height": 512, "width": 512, "frames": 16, "steps": 25, "guidance": 7.5,
                                    "overlap_frames": 4}
# The fields a model's kinema.json "defaults" fill when a request leaves them None; a request with an input video
# takes its size from the video and its frame count from the input (or extend_frames).
GENERATE_DEFAULTS = ("height", "width", "frames", "steps", "guidance", "scheduler")
INPUT_DEFAULTS = ("steps", "guidance", "scheduler")
# Filled in every mode: continuation runs in extend mode and in text/image-to-video past the model's window.
CONTINUATION_DEFAULTS = ("overlap_frames",)
# PIA's motion presets by index (`pia_motion`), as PIA names them; their mask values are
# kinema.pipelines.animatediff.PIA_MOTION_PRESETS.
PIA_MOTION_NAMES = ("small motion", "moderate motion", "large motion", "loop, small", "loop, moderate", "loop, large",
                    "style transfer, small", "style transfer, moderate", "style transfer, large")


def overlap_error(overlap: int, segment: int) -> KinemaError:
    """The one refusal of a continuation overlap that is not below the segment length, for requests that set both
    (`GenerationRequest.check`, before any model loads) and for segments that are the model's window (`generate`)."""
    return KinemaError(f"overlap_frames ({overlap}: the request's, else the model's kinema.json default) must be "
                       f"below the segment length ({segment} frames); lower overlap_frames (kinema extend --overlap) "
                       "or raise segment_frames (--segment-frames)")


def check_video_holds_overlap(video_frames: int, overlap_frames: int) -> None:
    """One KinemaError line when a video to extend is shorter than the frames each new segment is conditioned on."""
    if video_frames < overlap_frames:
        raise KinemaError(f"the video to extend has {count_words(video_frames, 'frame')}, fewer "
                          f"than the {overlap_frames} each new segment is conditioned on (overlap_frames, --overlap); "
                          f"give an overlap of at most {video_frames}, or a longer video")


def check_fps(fps: float) -> None:
    """One KinemaError line for a frame rate a video cannot keep (outside MIN_FPS .. MAX_FPS)."""
    if not MIN_FPS <= fps <= MAX_FPS:  # NaN fails too
        raise KinemaError(f"fps must be from {MIN_FPS} to {MAX_FPS:g} frames per second, got {fps}")


@dataclass
class ContextSettings:
    """Context windows for videos longer than the model's window (see kinema.sampling.context): `length` and
    `overlap` in pixel frames."""

    length: int = 16
    overlap: int = 4
    stride: int = 1
    closed_loop: bool = False
    schedule: str = "uniform"
    fuse: str = "flat"
    freenoise: bool = False


@dataclass
class FreeInitSettings:
    """FreeInit noise re-initialisation (kinema.sampling.freeinit)."""

    iterations: int = 3
    method: str = "butterworth"
    spatial_stop: float = 0.25
    temporal_stop: float = 0.25
    order: int = 4


def freeu_error(model: str) -> KinemaError:
    """The one refusal of FreeU for a model without UNet skip features (an EasyAnimate diffusion transformer)."""
    return KinemaError(f"FreeU rebalances a UNet's backbone and skip features, and {model} is a diffusion "
                       "transformer, which has no skip features to rebalance; drop freeu (--freeu), which works with "
                       "AnimateDiff models")


@dataclass(frozen=True)
class FreeUSettings:
    """FreeU (kinema.models.freeu): in a UNet's two deepest up blocks, `b1` / `b2` multiply half the backbone
    channels and `s1` / `s2` the lowest frequencies of the skip features. The defaults are those diffusers' docs give
    for Stable Diffusion 1.5 (the FreeU authors' table)."""

    b1: float = 1.5
    b2: float = 1.6
    s1: float = 0.9
    s2: float = 0.2

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            # `not (...)`, so that NaN, which fails every comparison, is refused too.
            if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value)
                                                                                   and value > 0):
                raise KinemaError(f"FreeU factor {name} must be a finite number above 0, got {value!r} (1 leaves "
                                  "that part as trained; to turn FreeU off, leave it unset)")


# How a prompt schedule blends: what continuing a video (extend) takes from its stored settings with its schedule.
BLEND_SETTINGS = ("interpolation", "prompt_hold", "prompt_loop")
# What steers a ControlNet: a request without a control video records none of them.
CONTROL_SETTINGS = ("control_indices", "control_falloff", "control_loop", "control_preprocess", "normalize_control",
                    "control_start", "control_end", "guess_mode")


# Number fields whose checks say more of a wrong type than "must be a number" (check_mask_blur).
_OWN_TYPE_CHECKS = ("mask_blur",)


def _python_numbers(value: Any) -> Any:
    """`value` with numpy's numbers and booleans (alone, or in lists and dicts) as Python's, which JSON writes."""
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # no numbers.Real
        return bool(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool | int | float):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(value, list | tuple):
        return [_python_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: _python_numbers(item) for key, item in value.items()}
    return value


def stored_prompt_settings(stored: Mapping[str, Any], given: Collection[str] = ()) -> dict[str, Any]:
    """The prompt a video's stored settings hold (text or schedule) as request fields, with how a schedule blended
    (`BLEND_SETTINGS`) and its negative prompt, those not in `given`; {} when they hold no prompt. What `kinema
    extend` and extend jobs continue a video with when given no prompt."""
    prompt = stored.get("prompt")
    if not (isinstance(prompt, str | dict) and prompt):
        return {}
    blend = {key: stored[key] for key in BLEND_SETTINGS
             if isinstance(prompt, dict) and key not in given and stored.get(key) is not None}
    negative = stored.get("negative_prompt")
    if isinstance(negative, str) and negative and "negative_prompt" not in given:
        blend["negative_prompt"] = negative
    return {"prompt": prompt, **blend}


def check_image_keyframes(ip_image: Any, frames: int, fix: str) -> None:
    """One KinemaError line when an image prompt schedule has a keyframe the video's `frames` do not reach (`fix`:
    the front end's way to more frames)."""
    keyframes = image_prompt_keyframes(ip_image)
    if keyframes and keyframes[-1][0] >= frames:
        raise KinemaError(f"the image prompt has a keyframe at frame {keyframes[-1][0]}, which the video's {frames} "
                          f"frames do not reach; {fix}, or move the keyframe")


def image_prompt_keyframes(ip_image: Any) -> list[tuple[int, Any]] | None:
    """An image prompt schedule's `(frame, image)` keyframes in frame order (None for one image for every frame), or
    one KinemaError line: keys are whole frame numbers from 0 (as text too, as JSON gives them), each given once."""
    if not isinstance(ip_image, Mapping):
        return None
    if not ip_image:
        raise KinemaError("ip_image is an empty mapping; give an image, or {frame: image} keyframes such as "
                          "{\"0\": \"a.png\", \"16\": \"b.png\"}")
    keyframes: dict[int, Any] = {}
    for key, image in ip_image.items():
        frame = frame_number(key)
        if frame is None or frame < 0:
            raise KinemaError(f"ip_image keyframe {key!r} is not a frame number; keys are whole frame numbers from 0 "
                              "like \"0\" or \"16\"")
        if frame in keyframes:
            raise KinemaError(f"ip_image names frame {frame} twice; give each keyframe once")
        if image is None:
            raise KinemaError(f"ip_image keyframe {key!r} has no image")
        keyframes[frame] = image
    return sorted(keyframes.items(), key=lambda pair: pair[0])


def _paths(value: Any) -> bool:
    """Whether `value` is a path or a list of paths (as settings record them)."""
    return isinstance(value, str | os.PathLike) or (isinstance(value, list | tuple) and bool(value) and all(
        isinstance(item, str | os.PathLike) for item in value))


SPARSECTRL_FALLOFF = ("control_falloff spreads an ordinary ControlNet's keyframes; SparseCtrl's own motion modules "
                      "carry its keyframes to the other frames: drop control_falloff (--control-falloff)")
MAX_FALLOFF = 64  # frames a keyframe may reach on each side: past a window's length, a falloff is a typo


def check_control_window(start: Any, end: Any) -> None:
    """One KinemaError line unless 0 <= start < end <= 1: the share of the steps a ControlNet steers."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (start, end))
    # `not (...)`, so that NaN, which fails every comparison, is refused too.
    if not (numbers and 0 <= start < end <= 1):
        raise KinemaError(f"the ControlNet steers from control_start to control_end, shares of the steps with 0 <= "
                          f"start < end <= 1; got {start!r} to {end!r}")


def control_places(count: int, frames: int, indices: Sequence[int] | None = None, *, what: str = "the control video",
                   fix: str | None = None) -> list[int]:
    """The frames `count` control images go to in a video of `frames` frames: `indices` (one per image; negative
    ones count from the end), else every frame (one image each, or one image for all: repeated), or one KinemaError
    line (`what` naming the control video, `fix` the front end's way to another frame count)."""
    if indices is None:
        if count not in (1, frames):
            raise KinemaError(f"{what} has {count} frames and the video {frames}: give one control image per frame "
                              f"(or one for all), or {fix or f'make {count} frames'}; keyframes go where "
                              "control_indices (--control-indices) say")
        return list(range(frames))
    places = list(indices)
    if len(places) != count:
        raise KinemaError(f"control_indices name {len(places)} frames for {count} control images; give one index per "
                          "image (e.g. 0,15 for a first and last keyframe)")
    if not all(isinstance(i, int) and not isinstance(i, bool) and -frames <= i < frames for i in places):
        raise KinemaError(f"control_indices must be whole numbers from -{frames} to {frames - 1} (frames of the "
                          f"{frames}-frame video; -1 is the last), got {places}")
    normal = [i % frames for i in places]
    if len(set(normal)) != len(normal):
        raise KinemaError(f"control_indices {places} name a frame twice; give each keyframe once")
    return normal


def check_control_falloff(falloff: Any, loop: Any, keyframes: bool) -> None:
    """One KinemaError line unless `falloff` is None or a list of weights from 0 to 1 (at most MAX_FALLOFF), given
    with keyframes (control_indices) to spread, and `loop` is a bool that only a falloff uses."""
    if not isinstance(loop, bool):
        raise KinemaError(f"control_loop is true or false, got {loop!r}")
    if falloff is None:
        if loop:
            raise KinemaError("control_loop wraps the control_falloff around the video's ends: give control_falloff "
                              "(--control-falloff) too, or drop it")
        return
    weights = list(falloff) if isinstance(falloff, list | tuple) else None
    if weights is None or not 0 < len(weights) <= MAX_FALLOFF or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and 0 <= w <= 1 for w in weights):
        raise KinemaError(f"control_falloff is a list of 1 to {MAX_FALLOFF} weights from 0 to 1, for the frames 1, 2, "
                          f"... away from each keyframe (e.g. [0.5, 0.4, 0.3, 0.2, 0.1]), got "
                          f"{shorten(repr(falloff), 80)}")
    if not keyframes:
        raise KinemaError("control_falloff spreads keyframes to the frames beside them: give control_indices "
                          "(--control-indices), the frames the control images are keyframes of")


def control_weights(places: Sequence[int], frames: int, falloff: Sequence[float] | None = None,
                    loop: bool = False) -> list[tuple[int, float]]:
    """For each of `frames` frames, `(image, weight)`: which keyframe's image steers it (an index into `places`,
    the keyframes' frames) and how strongly: 1 at a keyframe, `falloff[d - 1]` d frames away (counted around the
    ends when `loop`), the strongest where several reach a frame (the nearer keyframe first, then the earlier);
    `(-1, 0.0)` where none does."""
    spread = [1.0, *(falloff or ())]
    best: list[tuple[int, float]] = [(-1, 0.0)] * frames
    nearest = [frames] * frames
    for image, place in enumerate(places):
        for frame in range(frames):
            distance = abs(frame - place)
            if loop:
                distance = min(distance, frames - distance)
            if distance < len(spread) and spread[distance] > 0 and (
                    spread[distance], -distance) > (best[frame][1], -nearest[frame]):
                best[frame], nearest[frame] = (image, float(spread[distance])), distance
    return best


def pia_refusal(motion_module: Any, pia: bool, mode: str, end_image: bool, preset: bool) -> KinemaError | None:
    """The one line for what a model loaded with `motion_module` (`pia`: a PIA motion module) cannot make in
    `mode`: a PIA image animator makes image-to-video from one start image (no `end_image`), and a PIA motion
    `preset` needs one; None when it can."""
    if pia and (mode != "image-to-video" or end_image):
        return KinemaError(f"the motion module {motion_module} is a PIA image animator: it animates one start image "
                           f"(image, --image), with no end image, and makes nothing else ({mode}"
                           f"{' with an end image' if end_image else ''}); load another motion module for that")
    if preset and not pia:
        what = "the model's motion module" if motion_module is None else f"the motion module {motion_module}"
        return KinemaError(f"pia_motion (--pia-motion) is a PIA motion preset, and {what} is not a PIA image "
                           "animator; load a PIA motion module, or drop it")
    return None


def check_pia_module(motion_module: Any, request: GenerationRequest) -> None:
    """Before any model loads: `pia_refusal` for the motion module at `motion_module` (None: none), told from its
    folder's config, safetensors header or zip checkpoint's tensor names; a legacy pickle is told when it loads
    (`generate`), still before sampling."""
    from kinema.loaders.animatediff.pia import is_pia_file

    pia = is_pia_file(Path(motion_module)) if motion_module is not None else False
    if pia is None:
        return
    refusal = pia_refusal(motion_module, pia, request.mode, request.end_image is not None,
                          request.pia_motion is not None)
    if refusal is not None:
        raise refusal


def check_scale(scale: Any, name: str, meaning: str) -> float:
    """`scale` as a float, or one KinemaError line (`name` naming the setting, `meaning` what 0 and 1 do) unless it
    is a finite number of at least 0: the weight of an IP-Adapter's image prompt or of a ControlNet's residuals."""
    # `not (...)`, so that NaN, which fails every comparison, is refused too.
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale >= 0):
        raise KinemaError(f"{name} must be at least 0 and finite ({meaning}), got {scale!r}")
    return float(scale)


def _check_field_types(settings: Any, prefix: str, skip: Sequence[str] = ()) -> None:
    """One KinemaError line for a field of the dataclass `settings` whose value is not of its declared kind: a whole
    number, a number, true/false or text (the Python API hands values straight through: "6", "no", 8.5). numpy
    numbers pass; None passes where the field allows it."""
    for field in fields(settings):
        kind, value = str(field.type), getattr(settings, field.name)
        if value is None or field.name in skip:
            continue
        name = f"{prefix}{field.name}"
        if kind.startswith(("int", "float")):
            whole = kind.startswith("int")
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
                raise KinemaError(f"{name} must be {'a whole number' if whole else 'a number'}, got "
                                  f"{value_words(value)}")
        elif kind.startswith("bool") and not (isinstance(value, bool) or (
                type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))):
            raise KinemaError(f"{name} must be True or False, got {value_words(value)}")
        elif kind == "str" and not isinstance(value, str):
            raise KinemaError(f"{name} must be text, got {value_words(value)}")


def _prompt_texts(prompt: Any) -> list[tuple[str, Any]]:
    """`(what, text)` for each text of a prompt: itself, or a schedule's keyframes, prompt travel's head_prompt,
    tail_prompt and prompt_map entries included."""
    if not isinstance(prompt, Mapping):
        return [("the prompt", prompt)]
    texts: list[tuple[str, Any]] = []
    for key, value in prompt.items():
        if isinstance(value, Mapping):  # prompt travel's prompt_map
            texts += [(f"the prompt of frame {frame}", text) for frame, text in value.items()]
        else:
            frame = str(key).lstrip("-").isdigit()
            texts.append((f"the prompt of frame {key}" if frame else f"the {str(key).replace('_', ' ')}", value))
    return texts


def _at_least_one(name: str, value: float) -> None:
    # `not (finite and >= 1)`, so that NaN, which fails every comparison, and infinity are refused too (the Python
    # API hands floats straight through).
    if not (math.isfinite(value) and value >= 1):
        raise KinemaError(f"{name} must be at least 1, got {value}")


MAX_LORA_WEIGHT = 100.0  # ComfyUI's LoRA loaders' range: beyond it a weight is a typo that turns frames to noise


def check_lora_weight(weight: Any, name: str = "the LoRA weight") -> float:
    """`weight` as a float, or one KinemaError line (`name` naming it) unless it is a number from -100 to 100: a
    LoRA's or motion LoRA's strength, where a negative one pushes away from what it learned, as ComfyUI allows."""
    number = float(weight) if isinstance(weight, numbers.Real) and not isinstance(weight, bool) else math.nan
    if not (math.isfinite(number) and abs(number) <= MAX_LORA_WEIGHT):  # NaN, and what is no number, fail here
        raise KinemaError(f"{name} must be a number from -100 to 100 (1: as trained, 0: off, negative: its "
                          f"opposite), got {weight!r}")
    return number


def check_context_latent_frames(name: str, frames_per_latent: int, length: int, overlap: int) -> None:
    """One KinemaError line unless context windows of `length` pixel frames overlapping by `overlap` are whole
    latent frames of `frames_per_latent` pixel frames each (the model `name`'s), the overlap below the length:
    other counts would be rounded down to windows of another length."""
    scale = frames_per_latent
    windows, shared = max(length // scale, 1), overlap // scale
    if scale > 1 and (length % scale or overlap % scale or shared >= windows):
        raise KinemaError(f"{name}'s windows count whole latent frames of {scale} frames, so a context length of "
                          f"{length} and an overlap of {overlap} would be windows of {windows * scale} frames "
                          f"overlapping by {shared * scale}; use a context length and overlap that are multiples of "
                          f"{scale}, the overlap below the length")


def check_seed(seed: int, also: str = "") -> None:
    """One KinemaError line for a seed torch.Generator does not take; `also` adds to the range the message gives
    (jobs: ", or -1 for a random one")."""
    if not 0 <= seed <= MAX_SEED:
        raise KinemaError(f"seed {seed} is out of range; seeds go from 0 to 2**64 - 1 ({MAX_SEED}){also}")


MASK_MARKS_NOTHING = ("the mask marks no pixel to remake: its white (or light) pixels are remade and its black ones "
                      "kept, and transparency is not read")


def check_mask_frames(count: int, frames: int) -> None:
    """One KinemaError line unless a mask of `count` frames fits an input video of `frames`: one mask for all
    frames, or one per frame."""
    if count not in (1, frames):
        raise KinemaError(f"the mask has {count} frames and the input video {frames}: give one mask image for every "
                          f"frame, or a mask video of {frames} frames")


def check_mask_file(mask: str | os.PathLike, frames: int) -> tuple[int, int]:
    """A mask file checked before any model loads (torch-free reads): its frame count against an input video of
    `frames`, and an image that marks no pixel to remake; returns its `(height, width)` for the caller's size check
    (the CLI's options, a job's fields)."""
    from kinema.data.probe import frame_count, is_blank_mask, video_size

    check_mask_frames(frame_count(mask, "mask"), frames)
    if is_blank_mask(mask):
        raise KinemaError(MASK_MARKS_NOTHING)
    return video_size(mask, "mask")


INPUT_KEYS = ("image", "end_image", "video", "mask", "ip_image", "control_video")


def paths_in(value: Any) -> list[str]:
    """Every path in `value`, in order: itself (a str or os.PathLike), or those of a list, tuple or mapping's values,
    nested (control videos, an image prompt schedule, a LoRA's {"path", "weight"}); anything else holds none."""
    if isinstance(value, str | os.PathLike):
        return [os.fspath(value)]
    if isinstance(value, Mapping):
        value = list(value.values())
    return [path for each in value for path in paths_in(each)] if isinstance(value, list | tuple) else []


def input_paths(request: GenerationRequest) -> list[str]:
    """The paths of `request`'s input files given by path (`INPUT_KEYS`), in order."""
    return [path for key in INPUT_KEYS for path in paths_in(getattr(request, key))]


def input_digests(request: GenerationRequest) -> dict[str, str]:
    """SHA-256 of each input file of `request` given by path (`INPUT_KEYS`; `sha256sum`'s for a file; a frames
    folder: over its frames' names and bytes), keyed by its absolute path: what a video's report records, so that a
    job made from its settings can tell an input that has changed since (`changed_inputs`). Inputs given as tensors
    or images, and paths that are gone, have none."""
    import hashlib

    from kinema.data.probe import folder_frames

    digests = {}
    for path in input_paths(request):
        files = folder_frames(path) if os.path.isdir(path) else [Path(path)] if os.path.isfile(path) else []
        if not files:
            continue
        digest = hashlib.sha256()
        for file in files:
            if os.path.isdir(path):  # a file's digest is `sha256sum`'s; a folder's frames go by name too
                digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        digests[os.path.abspath(path)] = digest.hexdigest()
    return digests


def changed_inputs(request: GenerationRequest, recorded: Mapping[str, Any]) -> list[str]:
    """The input paths of `request` whose SHA-256 is not the one `recorded` (`input_digests` of the run that made a
    video); paths not recorded are not compared."""
    return _changed(input_digests(request), recorded)


def changed_since_saved(inputs: Mapping[str, str], saved: Sequence[Mapping[str, Any]]) -> list[str]:
    """The paths among `inputs` (`input_digests` of a run) whose digest is not the one recorded in the `report` of
    the `saved` settings (those saved with latents, `read_latents_settings`): the inputs that changed since the
    latents were made. Latents saved with no digests (before kinema recorded them) have nothing to compare."""
    recorded: dict[str, Any] = {}
    for entry in saved:
        report = entry.get("report")
        if isinstance(report, Mapping) and isinstance(report.get("inputs"), Mapping):
            recorded.update(report["inputs"])
    return _changed(inputs, recorded)


def _changed(now: Mapping[str, str], recorded: Mapping[str, Any]) -> list[str]:
    return [path for path, digest in now.items() if path in recorded and recorded[path] != digest]


def check_window(window: int, name: str, context_length: int | None = None,
                 segment_frames: int | None = None) -> None:
    """One KinemaError line for a context window or a continuation segment longer than the `window` pixel frames
    that `name` (the model, or the motion module that sets its limit) denoises at once."""
    if context_length is not None and context_length > window:
        raise KinemaError(f"context length {context_length} exceeds the {window} frames {name} denoises at once; use "
                          f"a context length of at most {window}")
    if segment_frames is not None and segment_frames > window:
        raise KinemaError(f"segments of {segment_frames} frames exceed the {window} frames {name} denoises at once; "
                          f"use segment_frames (--segment-frames) of at most {window}")


def check_seeds_once(seeds: Sequence[int]) -> None:
    """One KinemaError line for a seed given twice: the same video made twice, and two files of one name."""
    repeated = next((seed for index, seed in enumerate(seeds) if seed in seeds[:index]), None)
    if repeated is not None:
        raise KinemaError(f"seed {repeated} is given more than once, which would make the same video twice; give "
                          "each seed once")


def check_mask_blur(blur: Any, masked: bool) -> None:
    """One KinemaError line for a mask blur that is not a number of pixels from 0 to MAX_MASK_BLUR, or one given
    without a mask (`masked`)."""
    if isinstance(blur, bool) or not isinstance(blur, numbers.Real) or not (
            math.isfinite(blur) and 0 <= float(blur) <= MAX_MASK_BLUR):
        raise KinemaError(f"mask_blur is the radius in pixels of the blur that feathers the mask's edge, from 0 (a "
                          f"hard edge) to {MAX_MASK_BLUR:g}; got {blur!r}")
    if blur and not masked:
        raise KinemaError("mask_blur (--mask-blur) feathers the edge of a video-to-video mask: give the mask "
                          "(--mask) too, or drop it")


def check_motion_strength(scale: float, effect: float) -> None:
    """One KinemaError line for a motion scale (factor on the motion attentions' keys) that is not a finite number
    above 0, or a motion effect (factor on the motion modules' residual) that is not a finite number of at least 0
    (kinema.models.motion.strength)."""
    # `not (finite and in range)`, so that NaN, which fails every comparison, is refused too.
    if not (math.isfinite(scale) and 0 < scale <= MAX_MOTION_FACTOR):
        raise KinemaError(f"motion scale must be a finite number above 0, at most {MAX_MOTION_FACTOR:g} (1: as "
                          f"trained), got {scale}")
    if not (math.isfinite(effect) and 0 <= effect <= MAX_MOTION_FACTOR):
        raise KinemaError(f"motion effect must be a finite number from 0 to {MAX_MOTION_FACTOR:g} (0: no motion "
                          f"module, 1: as trained), got {effect}")


@dataclass
class GenerationRequest:
    """Everything one call of `generate()` needs besides the model.

    Args:
        prompt: a string, or a prompt-travel schedule (`{0: "...", 48: "..."}` or head_prompt / prompt_map /
            tail_prompt, see kinema.sampling.prompt_travel).
        negative_prompt: the unconditional side of guidance.
        frames, height, width: the video's size in pixels. None (the default): the model's kinema.json "defaults"
            (a bundled model's 16 frames at 64x64), else `LIBRARY_DEFAULTS` (16 frames at 512x512); video-to-video
            and extend take the input video's size.
        steps, guidance, scheduler: sampling steps and guidance scale (None: the model's defaults, else 25 and
            7.5), scheduler name (None: the model's default, else the family's).
        seeds: one video per seed.
        image, end_image: image-to-video start (and end) frame: a path, a PIL image or frames `(3, H, W)` in [0, 1].
        resize: resize `image` / `video` to height x width instead of refusing another size.
        video: the input of video-to-video or of `extend`: a path or frames `(F, 3, H, W)` in [0, 1].
        strength: video-to-video: how much of the input is noised away (0 keeps it, 1 ignores it).
        mask: video-to-video only (video inpainting): the pixels of `video` to remake, white (> 0.5) remade and
            black kept; a path (an image for every frame, or a video, animation or frame folder of one frame per
            input frame), a PIL image, or `(H, W)` / `(F, H, W)` in [0, 1] or bool (None: the whole video is
            remade).
            The kept pixels of the finished frames are the input's own, not their VAE round trip.
        mask_blur: with a mask: the radius in pixels of the Gaussian blur that feathers the mask's edge where the
            remade pixels meet the input's (A1111's mask blur; 0, the default: a hard edge).
        extend_frames: append this many frames to `video` (continuation).
        overlap_frames: continuation: how many of the last frames condition the next segment (and are cross-faded;
            None: the model's default, else 4).
        segment_frames: continuation: frames per generated segment (None: the model's window).
        context: context windows for long text-to-video (None: one window; automatic past the model's limit).
        interpolation: prompt travel between keyframes: "linear" or "slerp".
        prompt_hold: the share of each gap between keyframes a keyframe's prompt (or image prompt) is held before
            the blend to the next starts, 0 to 1 (animatediff-cli-prompt-travel's prompt_fixed_ratio).
        prompt_loop: the schedule is circular: after the last keyframe it blends on to the first (prompt travel's).
        clip_skip: which CLIP layer the text comes from, counted from the end: 1 the last (as trained), 2 the one
            before (A1111's and prompt travel's "clip skip 2", for models trained on it; diffusers' clip_skip 1).
        timestep_spacing: where the sampling steps fall, `TIMESTEP_SPACINGS` (None: the scheduler's own; "trailing"
            for few-step distilled models such as AnimateDiff-Lightning).
        free_init: FreeInit, `FreeInitSettings(iterations=3, ...)` (None: off).
        motion_scale: factor on the motion modules' attention keys, a softmax temperature (ComfyUI-AnimateDiff's
            motion scale; 1: as trained).
        motion_effect: factor on the motion modules' residual (ComfyUI-AnimateDiff's effect; 0: each frame its own
            picture, 1: as trained).
        freeu: FreeU's backbone and skip factors for UNet models (AnimateDiff family; None: off).
        ip_image: the image prompt of a model loaded with an IP-Adapter (a path, a PIL image or `(3, H, W)` in
            [0, 1], any size: CLIP's processor resizes and crops it); such a model needs one. A mapping
            `{frame: image}` makes it travel: each keyframe's image at its frame, the embeddings between blended as
            a prompt schedule's text (`interpolation`, `prompt_hold`, `prompt_loop`).
        control_video: the control images of a model loaded with a ControlNet (pose, depth or edge maps, ...): a
            video, animation, image or folder of frames, a list of image paths, or frames `(F, 3, H, W)` in [0, 1];
            one per frame of the video (or one image for all of them; SparseCtrl: one per keyframe), sized as the
            video (else `resize`). Such a model needs them.
        control_preprocess: make the control images into the map the ControlNet reads, from ordinary frames:
            "canny" (OpenCV's Canny edges, thresholds 100 and 200; "canny:LOW:HIGH" for others), "tile_resample:RATE"
            (the frame at 1/RATE resolution, for the tile ControlNet), "blur:SIGMA", "invert" or "none";
            with several ControlNets a list, one per ControlNet (kinema.pipelines.control_maps).
        normalize_control: turn the control images gray and stretch them to [0, 1] (AnimateDiff's
            normalize_condition_images, for SparseCtrl scribbles).
        control_indices: the frames the control images are keyframes of, one per image (negative ones count from
            the end; None: one image per frame, or one image for frame 0 of a SparseCtrl model). A ControlNet
            steers only its keyframes, and their neighbours as control_falloff says; several share them.
        control_falloff: a ControlNet's keyframes also steer the frames beside them, weakened as this says: the
            weights 1, 2, ... frames away (animatediff-cli-prompt-travel's control_scale_list, e.g. [0.5, 0.4,
            0.3, 0.2, 0.1]); a frame two keyframes reach takes the stronger (None: keyframes only).
        control_loop: the falloff wraps around the video's ends (prompt travel's is_loop), for looping videos.
        control_start, control_end: the share of the sampling steps the ControlNet steers, from and to (diffusers'
            control_guidance_start / _end: step i of n is steered when start <= i/n and (i+1)/n <= end).
        pia_motion: a PIA image animator's motion preset (diffusers' PIAPipeline motion_scale): 0, 1, 2 small,
            moderate, large motion; 3, 4, 5 the same looping back to the image; 6, 7, 8 style transfer with small,
            moderate, large motion (None: 0). Only for a model loaded with a PIA motion module.
        guess_mode: ControlNet's guess mode: the control images lead and the prompt may be empty (the residuals
            graded from 0.1 at the first level to 1 at the middle block, and the unprompted half of guidance left
            unsteered). A ControlNet that pools its residuals (shuffle) turns it on itself, as in diffusers.
        dtype: "float32", "bfloat16" or "float16" for the whole pipeline (None: the models run as they are). The
            family's models are cast in place and stay so for later calls (weights cast down stay rounded): to run a
            family in one dtype, load it so (`load_family(..., dtype=)`); the report records the dtype that ran.
        vae_tiling: decode (and encode) in spatial tiles; decode_chunk: frames per VAE call (SD VAE).
        attention_chunk: run the motion modules' attention over this many sequences (pixel positions) at a
            time (None: all at once); the spatial attention is not chunked.
        offload: keep each model on the CPU until its stage runs (for accelerators).
        compile: torch.compile the video model (a persistent cache: only the first run of a shape pays).
        quantize: "int8": dynamic int8 quantisation of the video model's Linear layers (None: off).
        cache_interval: step caching: the model's deep features are computed every `cache_interval` steps and
            reused in between (None or 1: every step computes everything).
        cfg_truncation: classifier-free guidance stops after this fraction of the steps; the rest run the
            conditional half only (None: guidance on every step).
        guidance_rescale: in [0, 1], how far the guided prediction is rescaled to the conditional one's spread
            (diffusers' `guidance_rescale`, Lin et al. 2023; 0.7 there for v-prediction models with zero terminal
            SNR; None or 0: off).
        speed: the `--speed` preset these settings came from (recorded with the video; front ends apply it with
            kinema.pipelines.speed, which fills the fields above).
        fps: frames per second of the written video.
    """

    prompt: PromptSpec = ""
    negative_prompt: str = ""
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    seeds: Sequence[int] = (0,)
    image: Any = None
    end_image: Any = None
    resize: bool = False
    video: Any = None
    strength: float = 0.6
    mask: Any = None
    mask_blur: float = 0.0
    extend_frames: int | None = None
    overlap_frames: int | None = None
    segment_frames: int | None = None
    context: ContextSettings | None = None
    interpolation: str = "linear"
    prompt_hold: float = 0.0
    prompt_loop: bool = False
    clip_skip: int = 1
    timestep_spacing: str | None = None
    free_init: FreeInitSettings | None = None
    motion_scale: float = 1.0
    motion_effect: float = 1.0
    freeu: FreeUSettings | None = None
    ip_image: Any = None
    control_video: Any = None
    control_indices: Sequence[int] | None = None
    control_falloff: Sequence[float] | None = None
    control_loop: bool = False
    control_preprocess: str | Sequence[str | None] | None = None
    normalize_control: bool = False
    control_start: float = 0.0
    control_end: float = 1.0
    guess_mode: bool = False
    pia_motion: int | None = None
    dtype: str | None = None
    vae_tiling: bool = False
    decode_chunk: int = 16
    attention_chunk: int | None = None
    offload: bool = False
    fps: float = DEFAULT_FPS
    compile: bool = False
    quantize: str | None = None
    cache_interval: int | None = None
    cfg_truncation: float | None = None
    guidance_rescale: float | None = None
    speed: str | None = None

    @property
    def mode(self) -> str:
        """One of MODES, from the inputs given."""
        if self.video is not None:
            return "extend" if self.extend_frames is not None else "video-to-video"
        if self.image is not None:
            return "image-to-video"
        return "text-to-video"

    def sampling_steps(self) -> int | None:
        """The denoising steps generate() reports progress for, every video's (it makes one seed's at a time): each
        steps x FreeInit's iterations, or the last round(steps x strength) of them for video-to-video; None for a
        continuation (its segments follow the model's window) and for steps left to the model's default."""
        if self.mode == "extend" or self.steps is None:
            return None
        videos = len(self.seeds) if self.seeds else 1
        if self.mode == "video-to-video":
            return videos * max(1, round(self.steps * self.strength))
        return videos * self.steps * (self.free_init.iterations if self.free_init else 1)

    def with_defaults(self, model_defaults: Mapping[str, Any] | None = None) -> GenerationRequest:
        """This request with the fields it left None filled: from `model_defaults` (a model's kinema.json
        "defaults", `kinema.bundled.model_defaults`) where the mode takes them (`GENERATE_DEFAULTS`, or
        `INPUT_DEFAULTS` with an input video), else from `LIBRARY_DEFAULTS`. With an input video, height and width
        stay None: they are the video's, which only `generate()` reads."""
        video = self.video is not None
        taken = (INPUT_DEFAULTS if video else GENERATE_DEFAULTS) + CONTINUATION_DEFAULTS
        filled = {key: value for key, value in (model_defaults or {}).items()
                  if key in taken and getattr(self, key) is None}
        for key, value in LIBRARY_DEFAULTS.items():
            if getattr(self, key) is None and key not in filled and not (video and key in ("height", "width")):
                filled[key] = value
        return replace(self, **filled) if filled else self

    def check(self) -> None:
        """One KinemaError line for settings that no model can take (model-specific limits, such as the sizes a VAE
        takes, are checked by `generate()` before any denoising)."""
        self._check_types()
        # Only the text the tokenizer reads: a path's undecodable bytes are the real name of a file (surrogateescape).
        surrogate = lone_surrogate([self.prompt, self.negative_prompt])
        if surrogate is not None:
            raise lone_surrogate_error(surrogate)
        for what, text in [("the negative prompt", self.negative_prompt), *_prompt_texts(self.prompt)]:
            if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
                raise KinemaError(f"{what} is {len(text)} characters; kinema takes at most {MAX_PROMPT_CHARS} (the "
                                  "text encoder reads only its first 77 to 120 tokens): shorten it")
        self._check_sampling()
        self._check_control()
        self._check_inputs()
        self._check_speed()
        if not isinstance(self.prompt, (str, Mapping)):
            raise KinemaError(f"prompt must be a string or a prompt schedule mapping; got {type(self.prompt).__name__}")

    def _check_sampling(self) -> None:
        """Steps, frames, guidance, seeds, the scheduler's and the prompt schedule's settings, context windows,
        FreeInit, FreeU, clip skip, motion strength."""
        # None is "the model's default" (`with_defaults`), checked once filled.
        for name in ("steps", "frames"):
            if getattr(self, name) is not None:
                _at_least_one(name, getattr(self, name))
        if self.steps is not None and self.steps > MAX_STEPS:
            raise KinemaError(f"steps must be at most {MAX_STEPS} (some schedulers fail past it; 20 to 50 are usual), "
                              f"got {self.steps}")
        if self.scheduler == "lcm" and self.steps is not None and self.steps > MAX_LCM_STEPS:
            raise KinemaError(f"the lcm scheduler takes at most {MAX_LCM_STEPS} steps (its original_inference_steps; "
                              f"4 to 8 are usual), got {self.steps}")
        _at_least_one("decode_chunk", self.decode_chunk)
        check_fps(self.fps)
        if self.guidance is not None and not (math.isfinite(self.guidance) and 1 <= self.guidance <= MAX_GUIDANCE):
            raise KinemaError(f"guidance must be a finite number from 1 to {MAX_GUIDANCE:g} (1 turns classifier-free "
                              f"guidance off; 5 to 9 are usual), got {self.guidance}")
        seeds = list(self.seeds)
        if not seeds or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds):
            raise KinemaError(f"seeds must be a non-empty list of integers (one video per seed); got {self.seeds!r}")
        for seed in seeds:
            check_seed(seed)
        check_seeds_once(seeds)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise KinemaError(f"unknown dtype {self.dtype!r}; known dtypes: {', '.join(DTYPES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise KinemaError(f"unknown prompt interpolation {self.interpolation!r}; use {' or '.join(INTERPOLATIONS)}")
        check_prompt_hold(self.prompt_hold, self.prompt_loop)
        if self.context is not None and not 0 <= self.context.overlap < self.context.length:
            raise KinemaError(f"the context overlap {self.context.overlap} (--context-overlap, context.overlap) must "
                              f"be below the context length {self.context.length} (--context-length, "
                              f"context.length); use an overlap of 0 to {max(self.context.length - 1, 0)}")
        if self.free_init is not None:
            from kinema.sampling.freeinit import FreeInitOptions  # torch-free until sampling

            FreeInitOptions(**vars(self.free_init)).check()
        if self.context is not None and self.context.schedule != "uniform" and self.context.stride != 1:
            # ContextOptions.check says so too, but only once the model has loaded.
            raise KinemaError(f"the context stride {self.context.stride} (--context-stride, context.stride) spaces "
                              f"the windows of the uniform schedule only; drop it with the {self.context.schedule!r} "
                              "schedule")
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, numbers.Integral) or self.clip_skip < 1:
            raise KinemaError(f"clip_skip is a whole number of at least 1 (1: CLIP's last layer, 2: the one before), "
                              f"got {self.clip_skip!r}")
        check_timestep_spacing(self.timestep_spacing, self.scheduler)
        check_motion_strength(self.motion_scale, self.motion_effect)
        if self.freeu is not None and not isinstance(self.freeu, FreeUSettings):
            raise KinemaError(f"freeu must be FreeUSettings(b1=..., b2=..., s1=..., s2=...) or None, got "
                              f"{self.freeu!r}")

    def _check_control(self) -> None:
        """ControlNet and SparseCtrl settings, which come with a control video, and the PIA motion preset."""
        check_control_window(self.control_start, self.control_end)
        if self.control_indices is not None and self.control_video is None:
            raise KinemaError("control_indices place the images of a control video: give control_video "
                              "(--control-video) too")
        if (self.control_start, self.control_end) != (0.0, 1.0) and self.control_video is None:
            raise KinemaError("control_start and control_end (--control-start, --control-end) time a ControlNet's "
                              "steering over the steps: give a ControlNet and its control_video (--control-video), or "
                              "drop them")
        check_control_falloff(self.control_falloff, self.control_loop, self.control_indices is not None)
        image_prompt_keyframes(self.ip_image)
        presets = range(len(PIA_MOTION_NAMES))
        if self.pia_motion is not None and (isinstance(self.pia_motion, bool) or self.pia_motion not in presets):
            raise KinemaError(f"pia_motion is one of PIA's motion presets 0 to {presets[-1]}, got "
                              f"{self.pia_motion!r}")
        if self.control_preprocess is not None:
            from kinema.pipelines.control_maps import parse_preprocess

            if self.control_video is None:
                raise KinemaError("control_preprocess (--control-preprocess) makes control images from a control "
                                  "video: give control_video (--control-video) too")
            names: list[str | None] = [self.control_preprocess] if isinstance(self.control_preprocess, str) \
                else list(self.control_preprocess)
            for preprocessor in names:
                if preprocessor is not None:
                    parse_preprocess(preprocessor)
        if self.guess_mode and self.control_video is None:
            raise KinemaError("guess_mode (--guess-mode) is a ControlNet's: give the control video (and load the "
                              "ControlNet), or drop it")
        if self.control_video is not None and self.mode == "extend":
            raise KinemaError("a ControlNet steers the frames of one clip, and extend makes new segments past the "
                              "control video's end; use the control video with generate (text-, image- or "
                              "video-to-video), with --frames as long as it")

    def _check_inputs(self) -> None:
        """Start and end images, the mask, strength, and the extend settings, which come with their inputs."""
        if self.image is not None and self.video is not None:  # generate() would read the video alone
            raise KinemaError("a start image (image, --image) begins an image-to-video clip, and an input video "
                              "(video) is remade or continued from its own frames: give one of them")
        if self.end_image is not None and self.image is None:
            raise KinemaError("an end image needs a start image: give image too")
        if self.end_image is not None and self.frames == 1:  # the one frame would be the end image, not the start
            raise KinemaError("an end image is the last frame and the start image the first, so a video of both needs "
                              "at least 2 frames; ask for more frames, or drop the end image")
        if self.mask is not None and self.video is None:
            raise KinemaError("a mask (--mask) marks the pixels of an input video to remake (video-to-video): give "
                              "video too")
        if self.mask is not None and self.mode != "video-to-video":
            raise KinemaError("a mask (--mask) marks pixels of the input video's own frames to remake, and "
                              "extend_frames appends new ones: give one of them")
        check_mask_blur(self.mask_blur, self.mask is not None)
        if not 0 < self.strength <= 1:
            raise KinemaError(f"strength must be in (0, 1] (the share of the input noised away), got {self.strength}")
        if self.extend_frames is not None:
            _at_least_one("extend_frames", self.extend_frames)
            if self.video is None:
                raise KinemaError("extend_frames continues a video: give video too")
        if self.overlap_frames is not None and self.overlap_frames < 1:
            raise KinemaError(f"overlap_frames must be at least 1, got {self.overlap_frames}")
        if self.segment_frames is not None:
            _at_least_one("segment_frames", self.segment_frames)
            if self.overlap_frames is not None and self.overlap_frames >= self.segment_frames:
                raise overlap_error(self.overlap_frames, self.segment_frames)

    def _check_speed(self) -> None:
        """Attention chunks, quantisation, step caching, guidance truncation and rescale, the speed preset."""
        if self.attention_chunk is not None:
            _at_least_one("attention_chunk", self.attention_chunk)
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise KinemaError(f"unknown quantization {self.quantize!r}; known: {', '.join(QUANTIZATIONS)}")
        if self.quantize is not None and self.dtype not in (None, "float32"):
            raise KinemaError(f"{self.quantize} quantisation takes a float32 model, not {self.dtype}: drop dtype "
                              "(--dtype, or pass --dtype float32 with --speed)")
        if self.cache_interval is not None:
            _at_least_one("cache_interval", self.cache_interval)
        if self.cfg_truncation is not None and not 0 < self.cfg_truncation <= 1:
            raise KinemaError(f"cfg_truncation must be in (0, 1] (the share of steps that keep guidance), got "
                              f"{self.cfg_truncation}")
        if self.guidance_rescale is not None and (isinstance(self.guidance_rescale, bool) or not isinstance(
                self.guidance_rescale, numbers.Real) or not 0 <= self.guidance_rescale <= 1):
            raise KinemaError(f"guidance_rescale must be a number from 0 to 1 (the share of the guided prediction "
                              f"rescaled to the conditional one's spread), got {self.guidance_rescale!r}")
        if self.speed is not None and self.speed not in SPEEDS:
            raise KinemaError(f"unknown speed preset {self.speed!r}; known presets: {', '.join(SPEEDS)}")


    def _check_types(self) -> None:
        """One KinemaError line for a number field given as something else (the Python API hands values straight
        through: "6", True, a list), before any arithmetic on it fails in Python's words. numpy numbers pass."""
        _check_field_types(self, "", skip=_OWN_TYPE_CHECKS)
        # A one-pass iterator would be used up by this check and leave sampling no seed.
        if isinstance(self.seeds, str | bytes | Mapping | Iterator) or not isinstance(self.seeds, Iterable):
            raise KinemaError(f"seeds must be a list of whole numbers (one video per seed), got "
                              f"{value_words(self.seeds)}")
        settings_types: tuple[tuple[str, type], ...] = (("free_init", FreeInitSettings), ("context", ContextSettings))
        for name, settings_type in settings_types:
            value = getattr(self, name)
            if value is not None and not isinstance(value, settings_type):
                raise KinemaError(f"{name} must be {settings_type.__name__}(...) or None, got "
                                  f"{value_words(value)}")
            if value is not None:
                _check_field_types(value, f"{name}.")

    def settings(self) -> dict[str, Any]:
        """The request as JSON-ready data for a video's settings (inputs given as tensors or images recorded by
        type)."""
        data = asdict(self)
        # Input files by absolute path: the settings remake the video from any folder (relative paths were the
        # current folder's, which a job file or another shell does not share).
        path = os.path.abspath
        for key in INPUT_KEYS:
            value = data[key]
            if isinstance(value, Mapping):  # an image prompt schedule: its keyframes' images by frame, in order
                data[key] = {str(frame): path(image) if isinstance(image, str | os.PathLike)
                             else f"<{type(image).__name__}>" for frame, image in image_prompt_keyframes(value) or []}
            elif isinstance(value, str | os.PathLike):
                data[key] = path(value)
            elif isinstance(value, list | tuple) and all(_paths(item) for item in value):
                # keyframe images, or several ControlNets' control videos (each a path or its keyframe images)
                data[key] = [path(item) if isinstance(item, str | os.PathLike) else [path(i) for i in item]
                             for item in value]
            elif value is not None:
                data[key] = f"<{type(value).__name__}>"
        data["seeds"] = list(self.seeds)
        data["control_indices"] = None if self.control_indices is None else list(self.control_indices)
        data["control_falloff"] = None if self.control_falloff is None else list(self.control_falloff)
        if self.control_preprocess is not None and not isinstance(self.control_preprocess, str):
            data["control_preprocess"] = list(self.control_preprocess)
        data["mode"] = self.mode
        for key in self._unused_settings():
            del data[key]
        if isinstance(self.prompt, Mapping):
            data["prompt"] = {str(k): v for k, v in self.prompt.items()}
        return _python_numbers(data)  # numpy's numbers too: JSON writes Python's only

    def _unused_settings(self) -> list[str]:
        """The fields of inputs this request lacks, which had no effect on its videos: left out of their settings,
        which then say what made them (a text-to-video's recorded no video-to-video strength)."""
        unused = [*(("strength",) if self.mode != "video-to-video" else ()),
                  *(("mask_blur",) if self.mask is None else ()),
                  *(CONTROL_SETTINGS if self.control_video is None else ())]
        if not isinstance(self.prompt, Mapping) and not isinstance(self.ip_image, Mapping):
            unused += BLEND_SETTINGS
        return unused
