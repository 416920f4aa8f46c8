"""Jobs: one generation as plain data, checked before any model loads, and run into a folder of its own.

Every front end builds its work the same way: `job_from_mapping` turns plain data (a JSON body, a JSONL line, a YAML
config entry, a web form) into a checked `Job`; `run_job` generates it with a model from a `FamilyCache` and writes
the videos, with their settings, into one output folder. So the CLI's configs, the web app, the HTTP API and batch
runs refuse the same bad input with the same one-line message, and record the same settings.

A job's folder (`run_job(job, OUT)`), written whole or not at all under kinema's output policy (kinema.fileio):

    OUT/video-seedS.mp4       one video per seed, its settings inside and in the sidecar `video-seedS.mp4.json`
    OUT/job.json              `job.settings()`: what `job_from_mapping` takes back to make the same videos
    OUT/report.json           the run's report (time, peak memory, ...)

The model defaults (`model_defaults_for`) are what `kinema generate` fills unset options with. Nothing here imports
torch at module level: checking a job is plain Python, PIL for images and PyAV for an input video's size.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import json
import logging
import math
import os
import re
import secrets
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kinema.bundled import DEFAULT_MODEL, folder_motion_module, is_bundled_name, model_defaults, resolve_model
from kinema.data.probe import (
    PIL_FORMATS,
    STILL_IMAGE_KINDS,
    frame_count,
    missing_encoder,
    oriented_size,
    video_fps,
    video_kind_and_frames,
    video_size,
)
from kinema.errors import (
    KinemaError,
    lone_surrogate,
    lone_surrogate_error,
    os_error_message,
    shorten,
    value_words,
)
from kinema.memory import check_frames_fit
from kinema.pipelines.request import (
    CONTINUATION_DEFAULTS,
    DTYPES,
    GENERATE_DEFAULTS,
    INPUT_DEFAULTS,
    MAX_SEED,
    QUANTIZATIONS,
    SPARSECTRL_FALLOFF,
    SPEEDS,
    ContextSettings,
    FreeInitSettings,
    FreeUSettings,
    GenerationRequest,
    changed_inputs,
    check_context_latent_frames,
    check_image_keyframes,
    check_lora_weight,
    check_mask_file,
    check_pia_module,
    check_seed,
    check_seeds_once,
    check_video_holds_overlap,
    check_window,
    control_places,
    freeu_error,
    image_prompt_keyframes,
    overlap_error,
    stored_prompt_settings,
)
from kinema.sampling.prompt_travel import INTERPOLATIONS, parse_prompt_schedule
from kinema.sampling.schedulers import SCHEDULERS, TIMESTEP_SPACINGS

if TYPE_CHECKING:
    from kinema.pipelines.family import VideoFamily
    from kinema.sampling.loop import StepCallback

RANDOM_SEED = -1
# Random seeds stay below 2**32: JavaScript front ends (the web app, API clients) read JSON numbers as doubles,
# which keep integers exact only up to 2**53.
RANDOM_SEED_LIMIT = 2**32
JOB_FILE = "job.json"
REPORT_FILE = "report.json"
JOB_OUTPUT_KIND = "job"
VIDEO_SUFFIX = ".mp4"

_MODEL_KEYS = ("model", "motion_module", "loras", "tokenizer", "ip_adapter", "image_encoder", "controlnet", "vae")
_REQUEST_KEYS = tuple(f.name for f in fields(GenerationRequest))
# "seed" is the friendlier spelling of "seeds"; "mode" is accepted so that job.settings() reads back (it must agree
# with the mode the inputs give).
JOB_KEYS: tuple[str, ...] = (*_MODEL_KEYS, *_REQUEST_KEYS, "seed", "mode")
logger = logging.getLogger(__name__)
# What a video's settings (OUT.json) record about its run besides the job: kinema's version, the model's family, the
# run's report. A job drops them, so the settings kinema wrote beside a video are a job that makes it again.
RECORD_KEYS = ("kinema", "family", "report")
_INT_FIELDS = ("frames", "height", "width", "steps", "extend_frames", "overlap_frames", "segment_frames",
               "decode_chunk", "attention_chunk", "cache_interval", "clip_skip")
_NUMBER_FIELDS = ("guidance", "strength", "fps", "cfg_truncation", "motion_scale", "motion_effect", "control_start",
                  "control_end", "guidance_rescale", "prompt_hold", "mask_blur")
_BOOL_FIELDS = ("resize", "vae_tiling", "offload", "compile", "normalize_control", "guess_mode", "control_loop",
                "prompt_loop")
_TEXT_FIELDS = ("negative_prompt",)
_FILE_FIELDS = {"image": "image", "end_image": "end image", "video": "video", "mask": "mask",
                "ip_image": "image prompt", "control_video": "control video"}
PATH_KEYS = (*_MODEL_KEYS, *_FILE_FIELDS)  # the job keys that name files, resolved by job_from_mapping
_VIDEO_FIELDS = ("video", "mask", "control_video")  # file fields that may be videos (or frame folders), not images only
# The named choices of ContextSettings and FreeInitSettings, checked here without importing the torch modules that
# define them (kinema.sampling.context SCHEDULES, FUSE_METHODS; kinema.sampling.freeinit FREE_INIT_METHODS);
# tests/pipelines/test_jobs.py checks that they stay equal.
SETTING_CHOICES = {"schedule": ("uniform", "static"), "fuse": ("flat", "pyramid", "overlap-linear"),
                   "method": ("butterworth", "gaussian", "ideal", "box")}


class Cancelled(Exception):
    """Raised by a step callback to stop a job; `run_job` leaves nothing of the job's folder behind."""


# ---------------------------------------------------------------- the job


@dataclass
class Job:
    """One generation: the request and the model that serves it (paths resolved and checked by
    `job_from_mapping`; a bundled model keeps its name)."""

    request: GenerationRequest
    model: str
    motion_module: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    tokenizer: str | None = None
    ip_adapter: tuple[str, float] | None = None  # (path, scale)
    image_encoder: str | None = None
    # (path, scale), or a list of them: ControlNets that steer together, each with its own control video
    controlnet: tuple[str, float] | list[tuple[str, float]] | None = None
    vae: str | None = None  # another VAE for an SD model's own

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings: model, motion_module, loras, tokenizer, ip_adapter, image_encoder, controlnet, vae and
        `request.settings()` (seeds as used); `job_from_mapping` reads them back into the same job."""
        return {"model": self.model, "motion_module": self.motion_module,
                "loras": [[path, weight] for path, weight in self.loras], "tokenizer": self.tokenizer,
                "ip_adapter": None if self.ip_adapter is None else {"path": self.ip_adapter[0],
                                                                    "scale": self.ip_adapter[1]},
                "image_encoder": self.image_encoder,
                "controlnet": _scaled_settings(self.controlnet), "vae": self.vae,
                **self.request.settings()}

    def model_key(self) -> tuple:
        """What decides which loaded model serves the job: jobs with equal keys share one `load_family`."""
        return (self.model, self.motion_module, tuple((path, weight) for path, weight in self.loras),
                self.request.dtype or "float32", self.tokenizer, self.request.quantize, self.request.compile,
                self.ip_adapter, self.image_encoder,
                tuple(self.controlnet) if isinstance(self.controlnet, list) else self.controlnet, self.vae)


def _scaled_settings(files: tuple[str, float] | list[tuple[str, float]] | None) -> Any:
    """A model file at its scale as settings, `{"path", "scale"}` (a list of them for a list)."""
    if isinstance(files, list):
        return [_scaled_settings(pair) for pair in files]
    return None if files is None else {"path": files[0], "scale": files[1]}


# ---------------------------------------------------------------- checks shared with `kinema generate`


def model_defaults_for(model: str | os.PathLike, unset: Iterable[str], not_found: str | None = None, *,
                       checked: bool = False) -> tuple[Path, dict[str, Any]]:
    """`(folder, defaults)`: the model's path (`kinema.bundled.resolve_model`, `not_found` its words for a missing
    one) and the values its kinema.json "defaults" give the request fields named in `unset` (those it has). One
    KinemaError line for a missing model or a default scheduler kinema does not know, and with `checked` for a path
    given that is no model to generate with (`check_model_path`: a folder of other weights fails here, not once the
    model loads; a bundled model's name is left unread)."""
    folder = resolve_model(model, not_found)
    if checked and os.path.lexists(model):
        check_model_path(folder)
    found = model_defaults(folder) if folder.is_dir() else {}
    chosen = {key: found[key] for key in unset if key in found}
    if "scheduler" in chosen and chosen["scheduler"] not in SCHEDULERS:
        raise KinemaError(f"{folder / 'kinema.json'}: default scheduler {chosen['scheduler']!r} is not one kinema "
                          f"knows ({', '.join(SCHEDULERS)})")
    return folder, chosen


def check_slice_frames(frames: int, per_slice: int, input_video: bool = False) -> None:
    """One KinemaError line unless a Slice VAE of `per_slice` frames per slice (8 in V3) can make `frames`: 1 (an
    image) or a multiple of `per_slice`. It names the nearest counts it can make; for an `input_video` remade frame
    for frame, how to trim it."""
    if frames == 1 or (frames >= per_slice and frames % per_slice == 0):
        return
    below = frames // per_slice * per_slice if frames > per_slice else 1
    above = max(frames // per_slice + 1, 1) * per_slice
    if input_video:
        fix = f"trim it to {below} frames" if frames > per_slice else f"give one of {per_slice} frames or more"
        raise KinemaError(f"the input video has {frames} frames, and EasyAnimate V3 remakes 1 or a multiple of "
                          f"{per_slice}: {fix}")
    raise KinemaError(f"EasyAnimate V3 makes 1 or a multiple of {per_slice} frames; {frames} is not: use {below} or "
                      f"{above}")


def check_size_multiple(height: int, width: int, factor: int, why: str) -> None:
    """One KinemaError line unless `height` and `width` are positive multiples of `factor` (`why`: what makes it),
    naming the nearest smaller size (width x height, as every size kinema names)."""
    near = size_multiple_below(height, width, factor)
    if near != (height, width):
        raise KinemaError(f"width and height must be positive multiples of {factor} ({why}); got {width}x{height}: "
                          f"use {near[1]}x{near[0]}")


def size_multiple_below(height: int, width: int, factor: int) -> tuple[int, int]:
    """(height, width) rounded down to positive multiples of `factor`: the size a model of that `factor` makes
    nearest below."""
    return max(height // factor, 1) * factor, max(width // factor, 1) * factor


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


@dataclass(frozen=True)
class ModelShape:
    """What sizes and frame counts a model folder makes, read from its configs before any weights load: heights and
    widths are multiples of `size_multiple` (`why`), frames 1 or a multiple of `frames_per_slice` (a Slice VAE's;
    None: any count)."""

    size_multiple: int
    why: str
    frames_per_slice: int | None = None
    family: str = "animatediff"  # or "easyanimate": which family's loader takes the folder
    frames_per_latent: int = 1  # pixel frames per latent frame (a Slice VAE's: 4 in V3)


def model_shape(folder: Path) -> ModelShape | None:
    """The `ModelShape` of an EasyAnimate V3 folder (its Slice VAE's `ch_mult` and `mini_batch_encoder`, its
    transformer's `patch_size`) or a Stable Diffusion folder (its VAE's `block_out_channels`), as the loaded family
    checks them; None for anything else (a single file, a folder the loader will name the problem of)."""
    from kinema.models.presets import image_vae_downsample

    vae = _config(folder / "vae" / "config.json")
    per_slice = _whole(vae.get("mini_batch_encoder"))
    if per_slice is not None and isinstance(vae.get("ch_mult"), list) and vae["ch_mult"]:
        ratio = image_vae_downsample(vae["ch_mult"])
        patch = _whole(_config(folder / "transformer" / "config.json").get("patch_size"))
        if patch is None:
            return None
        latents = _whole(vae.get("mini_batch_decoder"))
        return ModelShape(ratio * patch, f"the VAE's {ratio}x downscale times the transformer's {patch}x{patch} "
                                         "patches", per_slice, "easyanimate",
                          per_slice // latents if latents and per_slice % latents == 0 else 1)
    if isinstance(vae.get("block_out_channels"), list) and vae["block_out_channels"]:
        return ModelShape(image_vae_downsample(vae["block_out_channels"]), "the VAE's downscale")
    return None


def model_window(folder: Path, motion_module: Any = None) -> tuple[int, str] | None:
    """The most pixel frames the model at `folder` denoises at once, and the name of what sets it, read before any
    weights load: an EasyAnimate folder's motion-module frame tables (its transformer config, in latent frames) over
    its Slice VAE's slices, as EasyAnimateFamily.max_frames counts them; an SD1.5 model's motion module's (the
    `pos_encoder.pe` lengths in a safetensors header: `motion_module`, else the folder's own). None where that takes
    loading weights (a torch pickle, a module saved without its tables) or the configs say nothing."""
    from kinema.sniff import Kind, sniff

    shape = model_shape(folder)
    if shape is not None and shape.family == "easyanimate":
        vae, config = _config(folder / "vae" / "config.json"), _config(folder / "transformer" / "config.json")
        specs = config.get("motion_modules") or [config.get(key) for key in (
            "motion_module_kwargs", "motion_module_kwargs_even", "motion_module_kwargs_odd") if config.get(key)]
        lengths = [_whole(spec.get("max_frames", spec.get("temporal_position_encoding_max_len")))
                   for spec in specs if isinstance(spec, dict)] if isinstance(specs, list) else []
        pixels, latents = _whole(vae.get("mini_batch_encoder")), _whole(vae.get("mini_batch_decoder"))
        if not lengths or None in lengths or pixels is None or latents is None:
            return None
        latent_max = min(length for length in lengths if length is not None)
        return (latent_max // latents * pixels if latent_max >= latents else 1), folder.name
    given = isinstance(motion_module, str | os.PathLike)
    module = Path(motion_module) if given else folder_motion_module(folder)  # the one load_family takes
    if module is None or not module.is_file():
        return None
    found = sniff(module)
    tables = [size[1] for name, size in zip(found.names, found.shapes, strict=True)
              if name.endswith("pos_encoder.pe") and len(size) == 3]
    if found.kind is not Kind.SAFETENSORS or not tables:
        return None
    return min(tables), module.name if given else folder.name


def check_easyanimate_extras(path: Path, *, motion_module: Any = None, loras: Any = (), tokenizer: Any = None,
                             config: Any = None, freeu: bool = False, ip_adapter: Any = None,
                             controlnet: Any = None, clip_skip: int = 1, vae: Any = None) -> None:
    """An EasyAnimate model brings its own motion layers, tokenizer, configs and Slice VAE, and has no UNet: one
    KinemaError line for a motion module, LoRA, tokenizer, config, FreeU, IP-Adapter, ControlNet or VAE given with
    one (they are for Stable Diffusion 1.5 models)."""
    if motion_module is not None:
        raise KinemaError(f"{path} is an EasyAnimate model, which has its own motion layers: drop --motion-module "
                          "(motion modules are for Stable Diffusion 1.5 models)")
    if loras:
        raise KinemaError(f"{path} is an EasyAnimate model: --lora is for AnimateDiff (SD1.5) models; drop it")
    if tokenizer is not None or config is not None:
        raise KinemaError(f"{path} is an EasyAnimate folder, which brings its own tokenizer and configs; tokenizer= "
                          "and config= are for single-file SD checkpoints")
    if freeu:
        raise freeu_error(str(path))
    if ip_adapter is not None:
        raise KinemaError(f"{path} is an EasyAnimate model: an IP-Adapter is for AnimateDiff (SD1.5) models, and "
                          "EasyAnimate's InP models take an image as the first frame (--image)")
    if controlnet is not None:
        raise KinemaError(f"{path} is an EasyAnimate model: a ControlNet steers an SD1.5 UNet, and EasyAnimate is a "
                          "diffusion transformer; use it with an AnimateDiff model")
    if clip_skip != 1:
        raise KinemaError(f"{path} is an EasyAnimate model, whose text encoder is not CLIP: clip_skip (--clip-skip) "
                          "is for AnimateDiff models; drop it")
    if vae is not None:
        raise KinemaError(f"{path} is an EasyAnimate model, whose Slice VAE encodes time as well as space: another "
                          "VAE (vae, --vae) is for AnimateDiff (SD1.5) models, which use an image VAE; drop it")


def check_model_request(folder: Path, *, frames: int | None = None, height: int | None = None,
                        width: int | None = None, motion_module: Any = None, loras: Any = (),
                        tokenizer: Any = None, input_video: bool = False, freeu: bool = False,
                        ip_adapter: Any = None, controlnet: Any = None, clip_skip: int = 1, vae: Any = None,
                        context: ContextSettings | None = None, segment_frames: int | None = None,
                        overlap_frames: int | None = None) -> None:
    """Before any weights load, one KinemaError line for what the model folder cannot take, read from its configs
    once (`model_shape`): a frame count (an `input_video`'s, remade frame for frame) or size it cannot make, a
    `context` window or continuation segment longer than its window (`model_window`), context windows that are no
    whole latent frames, a continuation's
    `overlap_frames` not below its segments (`segment_frames`, else the window), or a motion module, LoRA,
    tokenizer or FreeU given with an EasyAnimate model. Values left None, and models whose configs say nothing, are
    not checked."""
    shape = model_shape(folder)
    if shape is None:
        return
    if context is not None or segment_frames is not None or overlap_frames is not None:
        window = model_window(folder, motion_module)
        if window is not None:
            check_window(*window, context_length=None if context is None else context.length,
                         segment_frames=segment_frames)
        segment = segment_frames or (None if window is None else window[0])
        if overlap_frames is not None and segment is not None and overlap_frames >= segment:
            raise overlap_error(overlap_frames, segment)
    if context is not None:
        check_context_latent_frames(folder.name, shape.frames_per_latent, context.length, context.overlap)
    if frames is not None and shape.frames_per_slice is not None:
        check_slice_frames(frames, shape.frames_per_slice, input_video)
    if height is not None and width is not None:
        check_size_multiple(height, width, shape.size_multiple, shape.why)
    if shape.family == "easyanimate":
        check_easyanimate_extras(folder, motion_module=motion_module, loras=loras, tokenizer=tokenizer, freeu=freeu,
                                 ip_adapter=ip_adapter, controlnet=controlnet, clip_skip=clip_skip, vae=vae)
    else:
        check_sd_folder_extras(folder, tokenizer=tokenizer, clip_skip=clip_skip)


def diffusers_folder_tokenizer_error(path: Path) -> KinemaError:
    """The refusal of a tokenizer (or single-file configs) given with a diffusers folder."""
    return KinemaError(f"{path} is a diffusers folder, which brings its own tokenizer and configs; tokenizer= and "
                       "config= are for single-file checkpoints")


def check_sd_folder_extras(folder: Path, *, tokenizer: Any = None, clip_skip: int = 1) -> None:
    """A Stable Diffusion folder's limits read from configs before any weights load: no tokenizer (it has its own),
    and a clip_skip its text encoder can take (a CLIP encoder with that many layers), for folders with
    `text_encoder/config.json` or a kinema.json entry whose encoder folder is on this machine."""
    if tokenizer is not None:
        raise diffusers_folder_tokenizer_error(folder)
    if clip_skip == 1:
        return
    config = _config(folder / "text_encoder" / "config.json")
    if not config:
        from kinema.loaders.text_encoder import resolve_text_encoder, text_encoder_entry

        entry = text_encoder_entry(folder)
        source = None if entry is None else Path(resolve_text_encoder(entry, folder))
        config = _config(source / "config.json") if source is not None and source.is_dir() else {}
    if not config:
        return
    architectures = config.get("architectures") or [config.get("model_type", "another model")]
    if not any("CLIPText" in str(name) for name in architectures):
        raise KinemaError(f"clip_skip {clip_skip} skips layers of a CLIP text encoder, and {folder}'s is "
                          f"{architectures[0]}: drop clip_skip (--clip-skip)")
    layers = _whole(config.get("num_hidden_layers"))
    if layers is not None and not 1 <= clip_skip <= layers:
        raise KinemaError(f"clip_skip {clip_skip} is more layers than the text encoder's {layers}; give 1 (the last "
                          f"layer) to {layers}, usually 2")


def check_sparsectrl_falloff(controlnets: Iterable[str | os.PathLike], falloff: Any) -> None:
    """One KinemaError line, before any weights load, for a control_falloff given with a SparseCtrl network: a folder
    by its config's class, a file by its tensor names (a torch pickle's read without unpickling it)."""
    if falloff is None:
        return
    from kinema.loaders.animatediff.sparsectrl import CONFIG_CLASS, sparsectrl_variant
    from kinema.loaders.checkpoint_io import folder_config_class, tensor_names
    from kinema.sniff import pickled_tensor_names

    for path in map(Path, controlnets):
        names: Iterable[str] | None = None
        if path.is_dir():
            sparse = folder_config_class(path) == CONFIG_CLASS
        else:
            try:
                names = tensor_names(path)
            except KinemaError:
                continue  # a broken file: the load names it
            names = names if names is not None else pickled_tensor_names(path)
            sparse = names is not None and sparsectrl_variant(list(names)) is not None
        if sparse:
            raise KinemaError(SPARSECTRL_FALLOFF)


def check_image_bytes(data: bytes, *, max_bytes: int, what: str = "image") -> None:
    """One KinemaError line when `data` is over `max_bytes`, is not an image PIL can read (a text file named .png
    is not an image), or has more pixels than PIL opens (a decompression bomb)."""
    if len(data) > max_bytes:
        raise KinemaError(f"the {what} is {len(data)} bytes, over the limit of {max_bytes} bytes; send a smaller "
                          "image (or raise the upload limit)")
    import io

    _verify_image(lambda: io.BytesIO(data), what)


def check_video_bytes(data: bytes, *, max_bytes: int, what: str = "video") -> tuple[str, int]:
    """`(suffix, frames)` of an uploaded video: the file suffix kinema reads it by (from its content, not its name)
    and its frame count (from the container, or its packets). One KinemaError line when `data` is over `max_bytes`
    or is not a video or animation that PyAV or PIL reads."""
    import io

    if len(data) > max_bytes:
        raise KinemaError(f"the {what} is {len(data)} bytes, over the limit of {max_bytes} bytes; send a shorter or "
                          "smaller video (or raise the upload limit)")
    return video_kind_and_frames(lambda: io.BytesIO(data), what)


def check_image_file(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """`(width, height)` of the image file `path`, read from its header; one KinemaError line when it is not an
    image PIL can read or has more pixels than PIL opens."""
    return _verify_image(lambda: os.fspath(path), f"{what} {path}")


# warnings.catch_warnings changes process-wide state: two threads checking images at once (the API, the web app)
# must not restore each other's filters.
_WARNINGS_LOCK = threading.Lock()


def _verify_image(opener: Any, what: str) -> tuple[int, int]:
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; such an image is as unusable here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opener(), formats=PIL_FORMATS) as image:
                image.verify()  # the chunks and checksums: a truncated file fails here
            with Image.open(opener(), formats=PIL_FORMATS) as image:
                image.load()  # the pixels: verify passes compressed data that is garbage with good checksums
                size = oriented_size(image)  # as shown, and read: a phone photo's EXIF turn applied
                # A phone's JPEG may hold a second picture (MPO) that PIL counts as a frame: animated formats alone.
                frames = getattr(image, "n_frames", 1) if image.format in ("GIF", "PNG", "WEBP") else 1
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's error names twice the limit (where it stops warning); the limit that counts here is the one it warns at.
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        count = f"{pixels.group(1)} pixels, " if pixels else ""
        raise KinemaError(f"the {what} is too large: {count}over the limit of {Image.MAX_IMAGE_PIXELS} pixels (PIL's "
                          "guard against decompression bombs); give a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        other = _other_image_format(opener) if isinstance(err, UnidentifiedImageError) else None
        if other is not None:  # a BMP, TIFF, ...: an image, of a format kinema does not read
            raise KinemaError(f"the {what} is a {other} image, which kinema does not read; save it as a "
                              f"{STILL_IMAGE_KINDS} file") from None
        detail = "" if isinstance(err, UnidentifiedImageError) else f" ({shorten(str(err), 80)})"
        raise KinemaError(f"the {what} is not an image{detail}; give a {STILL_IMAGE_KINDS} file") from None
    if frames > 1:  # an animated GIF, PNG or WebP: taken as its first frame, as PIL opens it
        logger.warning("the %s is an animated image of %d frames; its first frame is used", what, frames)
    return size


# Image formats kinema does not read, by their first bytes: told from the header alone, not by letting PIL's other
# plugins parse an upload (an EPS is rendered by Ghostscript).
_OTHER_IMAGE_MAGIC = ((b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"II+\0", "BigTIFF"),
                      (b"MM\0+", "BigTIFF"), (b"%!PS", "EPS"),
                      (b"\xc5\xd0\xd3\xc6", "EPS"), (b"8BPS", "PSD"), (b"\0\0\1\0", "ICO"),
                      (b"\xff\x0a", "JPEG XL"), (b"\0\0\0\x0cJXL ", "JPEG XL"), (b"qoif", "QOI"))


def _other_image_format(opener: Any) -> str | None:
    """The name of an image format kinema does not read that the file starts like, else None; HEIC, HEIF and AVIF
    by their ISO media brand."""
    source = opener()  # a path, or the bytes of an upload
    with open(source, "rb") if isinstance(source, str) else source as file:
        head = file.read(16)
    brands = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
    if head[4:8] == b"ftyp" and head[8:12] in brands:
        return brands[head[8:12]]
    return next((name for magic, name in _OTHER_IMAGE_MAGIC if head.startswith(magic)), None)


# ---------------------------------------------------------------- from plain data


def unknown_key_error(key: Any, known: Iterable[str], within: str = "", *,
                      also_near: Iterable[str] = ()) -> KinemaError:
    """`unknown key 'x'; did you mean 'y'?` (the nearest of `known` and `also_near`), else listing `known`; prefixed
    with `within: ` when given."""
    known = tuple(known)
    near = difflib.get_close_matches(str(key), known + tuple(also_near), n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(known)}"
    return KinemaError(f"{within}{': ' if within else ''}unknown key {key!r}; {hint}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _integer(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        whole = isinstance(value, float) and value.is_integer()  # JSON's 8.0, as some clients write numbers
        raise KinemaError(f"{key} must be a whole number, got {value_words(value)}"
                          + (f"; send {int(value)}" if whole else ""))
    if value < minimum:
        raise KinemaError(f"{key} must be at least {minimum}, got {value}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KinemaError(f"{key} must be a finite number, got {value_words(value)}")
    return float(value)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise KinemaError(f"{key} must be text, got {value_words(value)}")
    return value


def _choice(value: Any, key: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise KinemaError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")
    return value


def _seeds(data: Mapping[str, Any]) -> list[int]:
    """The job's seeds, -1 drawn at random here (so the settings record the seed used)."""
    given = [key for key in ("seed", "seeds") if data.get(key) is not None]  # null: left out, as for every key
    if len(given) == 2:
        raise KinemaError("give seed or seeds, not both")
    key = given[0] if given else "seeds"
    value = data[key] if given else 0
    values = value if isinstance(value, list) else [value]
    if not values:
        raise KinemaError(f"{key} is an empty list; give at least one seed (one video per seed)")
    seeds = []
    for seed in values:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise KinemaError(f"{key} must be a whole number or a list of them, got {value_words(seed)}")
        if seed == RANDOM_SEED:
            seed = secrets.randbelow(RANDOM_SEED_LIMIT)
        else:
            check_seed(seed, ", or -1 for a random one")
        seeds.append(seed)
    check_seeds_once(seeds)
    return seeds


def _settings_object(value: Any, key: str, kind: type) -> Any:
    """A ContextSettings / FreeInitSettings / FreeUSettings from a mapping of its fields (each checked against the
    default's type)."""
    if not isinstance(value, Mapping):
        raise KinemaError(f"{key} must be an object of settings ({{...}}), got {_type_name(value)}")
    known = {f.name: f.default for f in fields(kind)}
    checked: dict[str, Any] = {}
    for name, item in value.items():
        if name not in known:
            raise unknown_key_error(name, known, key)
        default = known[name]
        if isinstance(default, bool):
            if not isinstance(item, bool):
                raise KinemaError(f"{key}.{name} must be true or false, got {item!r}")
        elif isinstance(default, int):
            item = _integer(item, f"{key}.{name}", minimum=0 if name == "overlap" else 1)
        elif isinstance(default, float):
            item = _number(item, f"{key}.{name}")
            if kind is FreeInitSettings and not 0 < item <= 1:  # FreeU's factors check themselves
                raise KinemaError(f"{key}.{name} must be in (0, 1], got {item}")
        else:
            item = _choice(item, f"{key}.{name}", SETTING_CHOICES[name])
        checked[name] = item
    return kind(**checked)  # request.check() checks them together (a context overlap below its length)


def existing_path(text: str, key: str, folders: Iterable[Path | None]) -> Path | None:
    """The first `folder / text` that exists, or None; one KinemaError line for a text no path can be (too long
    for a file name, a NUL character), which the file system would otherwise answer with an OSError."""
    if "\0" in text:  # pathlib calls such a path missing, and the message would carry the NUL along
        raise KinemaError(f"{key} holds a NUL character, which no path can; give a path without it")
    text = os.path.expanduser(text)  # ~/clip.mp4, as a shell would have given it to the command line
    for folder in folders:
        if folder is None:
            continue
        candidate = folder / text
        try:
            if candidate.exists():
                return candidate
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:
                raise KinemaError(f"{key} is too long for a path ({len(text)} characters: {shorten(text, 40)}); "
                                  "give an existing path or a shorter name") from None
            raise KinemaError(f"{key} {os_error_message(err, shorten(text, 80))}") from None
    return None


def _path(value: Any, key: str, base: Path, models_dir: Path | None, what: str) -> str:
    """An existing path, relative ones against `base` then `models_dir`; absolute as a string."""
    text = _text(value, key)
    if not text:
        raise KinemaError(f"{key} is empty; give the {what}'s path")
    found = existing_path(text, key, (base, models_dir))
    if found is None:
        raise KinemaError(f"no such {what}: {text}{_looked_in(text, (base, models_dir))}")
    return os.path.abspath(found)


def _looked_in(text: str, folders: Iterable[Path | None]) -> str:
    """Where a relative path was looked for, as a missing file's message says it: a jobs file's paths are its
    folder's, not the shell's."""
    if os.path.isabs(os.path.expanduser(text)):
        return ""
    places = dict.fromkeys(str(folder) for folder in folders if folder is not None)
    return f" (looked in {' and '.join(places)})"


# The model kinds `load_family` generates with (the format registry's names, kinema.loaders.formats).
_GENERATION_KINDS = ("easyanimate_transformer", "stable_diffusion")
_MODEL_WORDS = ("an EasyAnimate V3 folder, a Stable Diffusion 1.5 folder or single file, or a bundled model's name "
                "(kinema.bundled)")


def _model(value: Any, base: Path, models_dir: Path | None) -> str:
    """A model path (absolute), or a bundled model's name as it is."""
    text = _text(value, "model")
    if not text.strip():
        raise KinemaError("model is empty; give a model folder or file, or a bundled model's name")
    found = existing_path(text, "model", (base, models_dir))
    if found is not None:
        path = os.path.abspath(found)
        check_model_path(Path(path))
        return path
    if is_bundled_name(text):
        resolve_model(text)  # a bundled name whose folder this install lacks says so
        return text
    resolve_model(text, f"no such model file or folder: {text}")  # raises, listing the bundled models
    raise AssertionError("unreachable")  # pragma: no cover


def check_model_path(path: Path) -> None:
    """One KinemaError line unless `path` is a model `load_family` generates with, as far as headers tell
    (`_check_file_kind`), and an EasyAnimate one a whole model folder."""
    if _check_file_kind(str(path), "model") == "easyanimate_transformer":
        from kinema.loaders.easyanimate.folder import is_model_folder

        if not is_model_folder(path):
            raise KinemaError(f"model {path} is an EasyAnimate transformer alone; generation needs the whole V3 "
                              "folder (transformer/, vae/ and a text encoder)")


# What each model-file key of a job takes: the format registry's kinds (kinema.loaders.formats), what a file of
# another kind is not, and what to give instead.
_FILE_KINDS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "model": (_GENERATION_KINDS, "a model to generate with", _MODEL_WORDS),
    "motion_module": (("motion_module",), "an AnimateDiff motion module", "a motion module file or MotionAdapter "
                                                                          "folder"),
    "LoRA": (("motion_lora", "image_lora"), "a LoRA", "a motion LoRA or an SD1.5 image LoRA"),
    "vae": (("image_vae",), "an SD1.x VAE", "an SD1.x VAE file or AutoencoderKL folder"),
    "controlnet": (("controlnet", "sparsectrl"), "a ControlNet", "a ControlNet or SparseCtrl encoder for SD1.5"),
    "ip_adapter": (("ip_adapter",), "an IP-Adapter", "an IP-Adapter for SD1.5")}


def _check_file_kind(path: str, kind: str, key: str | None = None) -> str | None:
    """One KinemaError line, when a job is accepted rather than when it runs, unless the file or folder at `path`
    is what a `kind` key takes (`_FILE_KINDS`) as far as headers tell: a file sniffed (its first bytes), a folder or
    safetensors file described (no weights read); messages name it as `key` (default: `kind`). Returns the kind
    described, or None for a torch pickle, which passes: its names show only to the load."""
    from kinema.loaders.formats import format_of
    from kinema.sniff import Kind, sniff

    kinds, what, words = _FILE_KINDS[kind]
    key = key or kind
    where = Path(path)
    if where.is_file():
        found = sniff(where)
        if not found.is_weights:
            raise KinemaError(f"{key} {found.diagnosis}")
        if found.kind is not Kind.SAFETENSORS:
            return None
    elif not where.is_dir():
        raise KinemaError(f"{key} {path} is neither a file nor a folder; give {words}")
    stat = where.stat()
    try:
        described = _described(path, stat.st_mtime_ns, stat.st_size)
    except KinemaError as err:
        raise KinemaError(f"{key} {err}; give {words}") from None
    if described not in kinds:
        raise KinemaError(f"{key} {path} is not {what} (it is: {format_of(described).label}); give {words}")
    return described


@functools.lru_cache(maxsize=64)
def _described(path: str, mtime_ns: int, size: int) -> str:
    """What kinema.loaders.describe calls `path`, cached by modification time (a batch of jobs on one file)."""
    from kinema.loaders import describe

    return str(describe(path)["kind"])


def _loras(value: Any, base: Path, models_dir: Path | None) -> list[tuple[str, float]]:
    form = 'a list of [path, weight] pairs or {"path": ..., "weight": ...} objects'
    if not isinstance(value, list):
        raise KinemaError(f"loras must be {form}, got {_type_name(value)}")
    loras = []
    for entry in value:
        if isinstance(entry, Mapping):
            unknown = [key for key in entry if key not in ("path", "weight")]
            if unknown:
                raise unknown_key_error(unknown[0], ("path", "weight"), "loras")
            path, weight = entry.get("path"), entry.get("weight", 1.0)
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            path, weight = entry
        else:
            raise KinemaError(f"each LoRA is {form}, got {entry!r}")
        weight = check_lora_weight(_number(weight, "LoRA weight"), "LoRA weight")  # before the path is looked up
        loras.append((_path(path, "LoRA path", base, models_dir, "LoRA file"), weight))
    return loras


def _scaled_file(value: Any, key: str, base: Path, models_dir: Path | None, what: str,
                 check_scale: Callable[[float], float], kind: str) -> tuple[str, float] | None:
    """A model file at its scale (ip_adapter, controlnet): a path (scale 1) or {"path": ..., "scale": ...}."""
    if value is None:
        return None
    scale: Any = 1.0
    if isinstance(value, Mapping):
        unknown = [name for name in value if name not in ("path", "scale")]
        if unknown:
            raise unknown_key_error(unknown[0], ("path", "scale"), key)
        value, scale = value.get("path"), value.get("scale", 1.0)
    scale = check_scale(_number(scale, f"{key}.scale"))
    path = _path(value, key, base, models_dir, what)
    _check_file_kind(path, kind, key)
    return path, scale


def _prompt(value: Any) -> str | dict[str, Any]:
    """A prompt: text, a schedule mapping, or a schedule as JSON text (starting with "{")."""
    if isinstance(value, Mapping):
        return {str(key): item for key, item in value.items()}
    text = _text(value, "prompt")
    if text.strip().startswith("{"):
        parse_prompt_schedule(text, 10**9)  # one-line errors for bad JSON and repeated keys
        return dict(json.loads(text))
    return text


def stored_model_parts(recorded: Mapping[str, Any], *, continued: bool = False) -> dict[str, Any]:
    """The model, motion module and VAE that a video's or latents' settings `recorded` name, those still here (a
    bundled model's name, or a path that exists): what `kinema extend`, `kinema decode` and extend jobs take when
    given no model. {} when the model is not here. A video `continued` (extend) keeps its LoRAs too (`loras`,
    `{"path", "weight"}` each, when every file is still here; `warn_continued_without` says when not)."""
    model = recorded.get("model")
    if not isinstance(model, str) or not (is_bundled_name(model) or os.path.exists(model)):
        return {}
    parts: dict[str, Any] = {"model": model}
    if not is_bundled_name(model):  # a bundled model's own folder supplies them (no install path is copied)
        for key in ("motion_module", "vae"):
            stored = recorded.get(key)
            if isinstance(stored, str) and os.path.exists(stored):
                parts[key] = stored
    loras = recorded.get("loras")
    if continued and isinstance(loras, list) and loras and all(
            isinstance(entry, Mapping) and isinstance(entry.get("path"), str) and os.path.exists(entry["path"])
            for entry in loras):
        parts["loras"] = [dict(entry) for entry in loras]
    return parts


def warn_continued_without(recorded: Mapping[str, Any], parts: Mapping[str, Any], given: Collection[str],
                           options: Mapping[str, str]) -> None:
    """One warning each for what the video of settings `recorded` was made with and a continuation of it, with the
    model `parts` it takes (`stored_model_parts`), goes without: its LoRAs no longer all here, its IP-Adapter's
    image prompt, its ControlNet. Parts the caller gives (`given`: "loras", "ip_adapter") are not said; `options`
    names them as the caller's user gives them ({"loras": "--lora", "ip_adapter": "--ip-adapter and --ip-image"})."""
    loras = recorded.get("loras")
    # With no parts the model itself is gone, and the video is continued by another: its LoRAs are not in question.
    if isinstance(loras, list) and loras and parts and "loras" not in parts and "loras" not in given:
        paths = [entry.get("path") if isinstance(entry, Mapping) else entry for entry in loras]
        logger.warning("the video was made with LoRAs that are no longer all here (%s), so it is continued without "
                       "them; give them again (%s) to keep its style", ", ".join(map(str, paths)), options["loras"])
    if recorded.get("ip_adapter") and "ip_adapter" not in given:
        logger.warning("the video was made with an IP-Adapter's image prompt, and is continued without it; give the "
                       "IP-Adapter and its image again (%s) to keep it", options["ip_adapter"])
    if recorded.get("controlnet"):
        logger.warning("the video was made with a ControlNet, which steers one clip's frames: it is continued "
                       "without")


def job_from_mapping(data: Mapping[str, Any], *, where: str = "job", models_dir: str | os.PathLike | None = None,
                     base: str | os.PathLike | None = None, device: Any = "cpu", check_memory: bool = True) -> Job:
    """Build and check a Job from plain data (JSON body, JSONL line, YAML entry, web form).

    Keys (`JOB_KEYS`): model (default kinema-tiny), motion_module, loras ([[path, weight], ...] or [{"path": ...,
    "weight": ...}]), tokenizer, vae, and the GenerationRequest fields (prompt, negative_prompt, frames, height, width,
    steps, guidance, scheduler, seeds, seed (int, list, or -1 for a random one), image, end_image, resize, video,
    strength, extend_frames, fps, context {...}, free_init (iterations, or {...}), freeu (true, or {b1, b2, s1,
    s2}), ...). Unset height/width/frames/steps/guidance/scheduler take the model's kinema.json defaults (as `kinema
    generate` does); with an input video, the size is the video's. Relative paths resolve against `base` (default:
    the current folder), then `models_dir`; a model name that is no path is a bundled model's. Random seeds (-1) are
    drawn here, so job.settings() records the seeds actually used. A speed preset takes the settings of the
    `device` the job will run on (a kinema.devices name; bfloat16 only where it is native; None: other machines'
    device, unknown here, so neither bfloat16 nor int8). With `check_memory` (and a device here), the finished
    frames must fit in the memory free now.

    Raises KinemaError with one line starting with `where`: unknown key (naming the nearest valid key), wrong type,
    missing model/motion-module/LoRA/image file, a model path that is no model kinema generates with (sniffed or
    described from headers, no weights read), a path too long or with a NUL character, an image file that is not
    an image or too large, a start/end image of another size than the video without `resize`, and
    request.check()'s limits, all before any model loads.
    """
    try:
        return _job(data, Path(base) if base is not None else Path.cwd(),
                    Path(models_dir) if models_dir is not None else None, device, check_memory)
    except KinemaError as err:
        raise KinemaError(f"{where}: {err}") from None


def _job(data: Mapping[str, Any], base: Path, models_dir: Path | None, device: Any = "cpu",
         check_memory: bool = True) -> Job:
    data, recorded = _job_keys(data)
    data = _with_makers_parts(data, base, models_dir)
    parts = _model_parts(data, base, models_dir)
    given = _plain_settings(data)
    image_sizes = _input_files(data, given, parts.controlnet, base)
    _control_settings(data, given, parts.controlnet)
    given["seeds"] = _seeds(data)
    given["prompt"] = _prompt(data.get("prompt", ""))
    if given.get("speed") is not None:  # the preset fills what the job leaves unset, before the model's defaults
        from kinema.pipelines.speed import chosen_settings

        given.update(chosen_settings(given["speed"], given, device))
    _frames_of_input_video(given)
    folder = _fill_defaults(given, parts.model, data, image_sizes)
    # What neither the job nor the model's defaults set takes the library's, so the limits below see the real size.
    request = GenerationRequest(**given).with_defaults()
    request.check()
    check_pia_module(parts.motion_module, request)
    if isinstance(recorded, Mapping):  # a video's settings, replayed: its inputs may have changed since
        for path in changed_inputs(request, recorded):
            logger.warning("%s has changed since the video these settings come from was made (its SHA-256 differs), "
                           "so this job makes another video", path)
    made, whole = _frames_made_and_whole(request)
    check_model_request(folder, frames=made, height=request.height, width=request.width,
                        motion_module=parts.motion_module, loras=parts.loras, tokenizer=parts.tokenizer,
                        input_video=request.video is not None, freeu=request.freeu is not None,
                        ip_adapter=parts.ip_adapter, controlnet=parts.controlnet, clip_skip=request.clip_skip,
                        vae=parts.vae, context=request.context,
                        segment_frames=request.segment_frames if request.extend_frames is not None else None,
                        overlap_frames=request.overlap_frames if request.extend_frames is not None else None)
    finished = made if made is not None else whole  # an extended video's finished frames are all of its frames
    if check_memory and device is not None and finished is not None and request.height is not None \
            and request.width is not None:
        check_frames_fit(len(request.seeds), finished, request.height, request.width,
                         'ask for fewer "frames" (or "extend_frames"), a smaller "width" and "height", or fewer '
                         '"seeds"')
    _check_control_inputs(request, parts.controlnet, made, image_sizes)
    if made is not None:
        check_image_keyframes(request.ip_image, made, "make more frames (\"frames\")" if request.video is None
                              else "give a longer input video")
    if not request.resize:  # generate() refuses these too, but only once the model has loaded
        for what, (width, height) in image_sizes.items():
            if (height, width) != (request.height, request.width):
                raise KinemaError(f"the {what} is {width}x{height} but the job makes {request.width}x"
                                  f"{request.height} videos; set \"resize\": true to resize it, or \"width\": {width}, "
                                  f"\"height\": {height}")
    if data.get("mode") is not None and data["mode"] != request.mode:
        raise KinemaError(f"mode is {data['mode']!r} but the inputs make a {request.mode} job; drop mode or fix the "
                          "inputs (image: image-to-video, video: video-to-video, video + extend_frames: extend)")
    prompt = request.prompt
    if request.mode == "text-to-video" and isinstance(prompt, str) and not prompt.strip() \
            and request.control_video is None:  # control images alone may lead (guess mode)
        raise KinemaError('no prompt: add "prompt": "a red circle moving right" (or a prompt schedule)')
    if not isinstance(prompt, str) or prompt.strip():  # its keyframes within the frames made (an extended video's all)
        parse_prompt_schedule(prompt, whole or 10**9, request.interpolation, request.prompt_hold, request.prompt_loop)
    return Job(request=request, **parts._asdict())


class _ModelParts(NamedTuple):
    """A job's model files, resolved and checked (`Job`'s fields besides its request)."""

    model: str
    motion_module: str | None
    loras: list[tuple[str, float]]
    tokenizer: str | None
    ip_adapter: tuple[str, float] | None
    image_encoder: str | None
    controlnet: tuple[str, float] | list[tuple[str, float]] | None
    vae: str | None


def _job_keys(data: Any) -> tuple[dict[str, Any], Any]:
    """`(data, recorded)`: a job's keys, each known, without what a video's settings record besides the job, and the
    inputs' digests those settings recorded (None when they are not a video's)."""
    if not isinstance(data, Mapping):
        raise KinemaError(f"a job is an object of settings ({{\"prompt\": ...}}), not {_type_name(data)}")
    surrogate = lone_surrogate(data)
    if surrogate is not None:  # before any path is tried or text repeated in a message
        raise lone_surrogate_error(surrogate)
    encoder = missing_encoder(VIDEO_SUFFIX)
    if encoder is not None:  # every job writes its videos so: said when it is accepted, not after its sampling
        raise KinemaError(f"this PyAV's FFmpeg has no {encoder} encoder, which kinema writes a job's {VIDEO_SUFFIX} "
                          f"videos with; install PyAV from PyPI (its wheels bundle {encoder})")
    report = data.get("report")
    recorded = report.get("inputs") if isinstance(report, Mapping) else None
    data = {key: value for key, value in data.items() if key not in RECORD_KEYS}
    for key in data:
        if key not in JOB_KEYS:
            raise unknown_key_error(key, JOB_KEYS)
    return data, recorded


def _with_makers_parts(data: dict[str, Any], base: Path, models_dir: Path | None) -> dict[str, Any]:
    """As `kinema extend`: a video is continued by the model (and motion module and VAE) that made it, where an
    extend job names no model."""
    video = data.get("video")
    if data.get("model") is None and data.get("extend_frames") is not None and isinstance(video, str) and video:
        found = existing_path(video, "video", (base, models_dir))
        if found is not None:
            from kinema.data.probe import stored_settings

            recorded = stored_settings(found)
            made_with = stored_model_parts(recorded, continued=True)
            warn_continued_without(recorded, made_with, [key for key in ("loras", "ip_adapter") if data.get(key)],
                                   {"loras": "loras", "ip_adapter": "ip_adapter and ip_image"})
            return {**data, **{key: value for key, value in made_with.items() if data.get(key) is None}}
    return data


def _optional_path(data: Mapping[str, Any], key: str, base: Path, models_dir: Path | None, what: str) -> str | None:
    return None if data.get(key) is None else _path(data[key], key, base, models_dir, what)


def _model_parts(data: Mapping[str, Any], base: Path, models_dir: Path | None) -> _ModelParts:
    """The job's model files: each path resolved (`base`, then `models_dir`) and told to be the kind its key names,
    scales checked, and the files that come in pairs (an IP-Adapter and its image, a ControlNet and its control
    video) given together."""
    from kinema.loaders.controlnet import check_controlnet_scale
    from kinema.loaders.ip_adapter import check_ip_adapter_scale

    model = _model(DEFAULT_MODEL if data.get("model") is None else data["model"], base, models_dir)
    motion_module = _optional_path(data, "motion_module", base, models_dir, "motion module")
    if motion_module is not None:
        _check_file_kind(motion_module, "motion_module")
    tokenizer = _optional_path(data, "tokenizer", base, models_dir, "tokenizer")
    vae = _optional_path(data, "vae", base, models_dir, "VAE")
    if vae is not None:
        _check_file_kind(vae, "vae")
    loras = _loras([] if data.get("loras") is None else data["loras"], base, models_dir)
    for path, _ in loras:
        _check_file_kind(path, "LoRA")
    ip_adapter = _scaled_file(data.get("ip_adapter"), "ip_adapter", base, models_dir, "IP-Adapter file",
                              lambda scale: check_ip_adapter_scale(scale, "ip_adapter.scale"), "ip_adapter")
    controlnet: tuple[str, float] | list[tuple[str, float]] | None
    if isinstance(data.get("controlnet"), list):  # several that steer together
        if len(data["controlnet"]) < 2:
            raise KinemaError("controlnet lists the ControlNets that steer together, two or more; give one as a path "
                              "or {\"path\": ..., \"scale\": ...}")
        controlnet = []
        for index, entry in enumerate(data["controlnet"]):
            pair = _scaled_file(entry, f"controlnet {index + 1}", base, models_dir, "ControlNet",
                                check_controlnet_scale, "controlnet")
            if pair is None:
                raise KinemaError(f"controlnet {index + 1} is null; give a path or {{\"path\": ..., \"scale\": ...}}")
            controlnet.append(pair)
    else:
        controlnet = _scaled_file(data.get("controlnet"), "controlnet", base, models_dir, "ControlNet",
                                  check_controlnet_scale, "controlnet")
    if (data.get("control_video") is None) != (controlnet is None):
        raise KinemaError("a ControlNet and its control images come together: give both controlnet and "
                          "control_video, or neither")
    image_encoder = _optional_path(data, "image_encoder", base, models_dir, "image encoder folder")
    if ip_adapter is not None:
        from kinema.loaders.ip_adapter import image_encoder_folder

        image_encoder_folder(ip_adapter[0], image_encoder)
    elif image_encoder is not None:
        raise KinemaError("image_encoder is the CLIP image encoder of an IP-Adapter: give ip_adapter too")
    if (data.get("ip_image") is None) != (ip_adapter is None):
        raise KinemaError("an IP-Adapter and its image prompt come together: give both ip_adapter and ip_image, "
                          "or neither")
    return _ModelParts(model, motion_module, loras, tokenizer, ip_adapter, image_encoder, controlnet, vae)


def _plain_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields that are no files: numbers, switches, text, named choices and settings objects, each of
    its type."""
    given: dict[str, Any] = {}
    for key in _INT_FIELDS:
        if data.get(key) is not None:
            given[key] = _integer(data[key], key)
    if data.get("pia_motion") is not None:  # a preset index, 0 to 8 (the request's check names the range)
        given["pia_motion"] = _integer(data["pia_motion"], "pia_motion", minimum=0)
    for key in _NUMBER_FIELDS:
        if data.get(key) is not None:
            given[key] = _number(data[key], key)
    for key in _BOOL_FIELDS:
        if data.get(key) is not None:
            if not isinstance(data[key], bool):
                raise KinemaError(f"{key} must be true or false, got {data[key]!r}")
            given[key] = data[key]
    for key in _TEXT_FIELDS:
        if data.get(key) is not None:
            given[key] = _text(data[key], key)
    for key, choices in (("scheduler", SCHEDULERS), ("interpolation", INTERPOLATIONS), ("dtype", DTYPES),
                         ("quantize", QUANTIZATIONS), ("speed", SPEEDS), ("timestep_spacing", TIMESTEP_SPACINGS)):
        if data.get(key) is not None:
            given[key] = _choice(data[key], key, choices)
    if data.get("context") is not None:
        given["context"] = _settings_object(data["context"], "context", ContextSettings)
    free_init = data.get("free_init")
    if free_init is not None:
        given["free_init"] = (FreeInitSettings(iterations=_integer(free_init, "free_init"))
                              if not isinstance(free_init, Mapping)
                              else _settings_object(free_init, "free_init", FreeInitSettings))
    freeu = data.get("freeu")
    if freeu is True:
        given["freeu"] = FreeUSettings()
    elif freeu is not None and freeu is not False:
        if not isinstance(freeu, Mapping):
            raise KinemaError(f"freeu must be true (Stable Diffusion 1.5's factors), false, or an object of factors "
                              f"({{\"b1\": 1.5, \"b2\": 1.6, \"s1\": 0.9, \"s2\": 0.2}}), got {_type_name(freeu)}")
        given["freeu"] = _settings_object(freeu, "freeu", FreeUSettings)
    return given


def _input_files(data: Mapping[str, Any], given: dict[str, Any], controlnet: Any, base: Path
                 ) -> dict[str, tuple[int, int]]:
    """Puts the input files (images, videos, masks, image prompts, control videos or keyframe images) in `given`,
    each resolved against `base` and told to be what its key names; returns the `(width, height)` of those that
    must match the video's size, by their names in words."""
    image_sizes: dict[str, tuple[int, int]] = {}
    for key, what in _FILE_FIELDS.items():
        if key == "control_video" and isinstance(controlnet, list):  # one control video per ControlNet
            if not (isinstance(data.get(key), list) and len(data[key]) == len(controlnet)):
                raise KinemaError(f"{len(controlnet)} ControlNets steer together, so control_video is a list of "
                                  f"{len(controlnet)} control videos or images (or lists of keyframe images), one per "
                                  "ControlNet in their order")
            if any(item == [] for item in data[key]):
                raise KinemaError(f"control video {[item == [] for item in data[key]].index(True) + 1} is an empty "
                                  "list; give a video, an image, or a list of keyframe images for each ControlNet")
            given[key] = [[_path(image, key, base, None, "control image") for image in item]
                          if isinstance(item, list) else _path(item, key, base, None, "control video")
                          for item in data[key]]  # a list among them: that ControlNet's keyframe images
            for index, item in enumerate(given[key]):
                for number, image in enumerate(item if isinstance(item, list) else []):
                    image_sizes[f"control image {number + 1} of ControlNet {index + 1}"] = check_image_file(
                        image, "control image")
        elif key == "control_video" and isinstance(data.get(key), list):  # keyframe images, one path each
            if not data[key]:
                raise KinemaError("control_video is an empty list; give a video, an image, or a list of images")
            if any(isinstance(item, list) for item in data[key]):
                raise KinemaError("control_video lists one ControlNet's images (paths); a list of lists is for several "
                                  "ControlNets, one list each (\"controlnet\": [...])")
            given[key] = [_path(item, key, base, None, "control image") for item in data[key]]
            for index, image in enumerate(given[key]):
                image_sizes[f"control image {index + 1}"] = check_image_file(image, "control image")
        elif key == "ip_image" and isinstance(data.get(key), Mapping):  # an image prompt schedule
            image_prompt_keyframes(data[key])  # its frame keys, one line each
            given[key] = {str(frame): _path(image, key, base, None, f"image prompt of frame {frame}")
                          for frame, image in data[key].items()}
            for frame, image in given[key].items():
                check_image_file(image, f"image prompt of frame {frame}")
        elif data.get(key) is not None:
            given[key] = _path(data[key], key, base, None, what)
            if key not in _VIDEO_FIELDS:
                size = check_image_file(given[key], what)
                if key != "ip_image":  # an image prompt may be any size: CLIP's processor crops it
                    image_sizes[what] = size
    return image_sizes


def _control_settings(data: Mapping[str, Any], given: dict[str, Any], controlnet: Any) -> None:
    """Puts the control frames' placement, falloff and preprocessors in `given`, each of its type."""
    if data.get("control_indices") is not None:
        indices = data["control_indices"]
        if not (isinstance(indices, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)):
            raise KinemaError(f"control_indices must be a list of frame numbers (e.g. [0, 15], or [0, -1] for the "
                              f"first and last), got {indices!r}")
        given["control_indices"] = indices  # placed (range, repeats) against the frames made, by _job
    if data.get("control_falloff") is not None:  # a list of weights: the request's check names what it takes
        falloff = data["control_falloff"]
        given["control_falloff"] = falloff if not isinstance(falloff, list) else [
            _number(weight, "control_falloff") for weight in falloff]
    if data.get("control_preprocess") is not None:
        from kinema.pipelines.control_maps import preprocessors_for

        names = data["control_preprocess"]
        several = len(controlnet) if isinstance(controlnet, list) else 1
        if not (isinstance(names, str) or (isinstance(names, list) and all(isinstance(n, str) for n in names))):
            raise KinemaError(f"control_preprocess is a preprocessor name (canny, canny:LOW:HIGH, tile_resample:RATE, "
                              f"blur:SIGMA, invert, none), or a "
                              f"list of them, one per ControlNet; got {names!r}")
        preprocessors_for(names, several)
        given["control_preprocess"] = names


def _frames_of_input_video(given: dict[str, Any]) -> None:
    """With an input video: its fps where the job gives none, and frames, which the video decides: its own count
    (remade frame for frame), or that plus extend_frames (extend)."""
    video = given.get("video")
    if video is None:
        return
    if "fps" not in given:  # the frames kept or remade play at the input's speed
        rate = video_fps(video)
        if rate is not None:
            given["fps"] = rate
    count = frame_count(video)
    if given.get("extend_frames") is None:  # remade frame for frame
        if given.get("frames", count) != count:
            raise KinemaError(f"frames is {given['frames']} but video-to-video remakes the input video's {count} "
                              "frames; drop frames (or give a video of that length)")
        given["frames"] = count
    else:  # extend: the input's frames and those appended, which the job's settings record
        whole = count + given["extend_frames"]
        if given.get("frames", whole) != whole:
            raise KinemaError(f"frames is {given['frames']} but extending the input video's {count} frames by "
                              f"extend_frames {given['extend_frames']} makes {whole}; drop frames (extend_frames says "
                              "how many to append)")
        given["frames"] = whole


def _fill_defaults(given: dict[str, Any], model: str, data: Mapping[str, Any],
                   image_sizes: dict[str, tuple[int, int]]) -> Path:
    """Fills what the job leaves unset from the model's kinema.json defaults, an input video's size, and, for an
    extend job with no prompt, the video's own prompt settings; returns the model's folder."""
    video = given.get("video")
    unset = [key for key in (INPUT_DEFAULTS if video else GENERATE_DEFAULTS) + CONTINUATION_DEFAULTS
             if key not in given]
    folder, defaults = model_defaults_for(model, unset, f"no such model file or folder: {model}")
    given.update(defaults)
    if video is not None:
        height, width = video_size(video)
        given.setdefault("height", height)
        given.setdefault("width", width)
        image_sizes["input video"] = (width, height)  # another size needs resize, as for the images
    if video is not None and given.get("extend_frames") is not None and given["prompt"] == "":
        from kinema.data.probe import stored_settings

        # As `kinema extend` continues the video's own: its prompt, blended as it was where the job does not say.
        given.update(stored_prompt_settings(stored_settings(video), [key for key in data if data[key] is not None]))
    return folder


def _frames_made_and_whole(request: GenerationRequest) -> tuple[int | None, int | None]:
    """`(made, whole)`: the frames sampled anew (None for an extend, whose count the model's segments decide) and
    the frames the schedules run over (an extended video's all); an extend's input checked against its overlap and
    image prompt keyframes."""
    if request.video is None:
        return request.frames, request.frames
    have = frame_count(request.video)  # its frames are remade (video-to-video), or continued past the overlap
    if request.extend_frames is None:
        return have, have
    whole = have + request.extend_frames
    check_video_holds_overlap(have, request.overlap_frames or 0)
    check_image_keyframes(request.ip_image, whole, "append more frames (\"extend_frames\")")
    return None, whole


def _check_control_inputs(request: GenerationRequest, controlnet: Any, made: int | None,
                          image_sizes: dict[str, tuple[int, int]]) -> None:
    """The control videos' and keyframe images' frames placed against the `made` frames, their sizes added to
    `image_sizes`, the mask's frames and the SparseCtrl falloff checked."""
    # The control videos as files, each with its frame count: one file, the files of several ControlNets, or one
    # ControlNet's keyframe images (counted as one video of that many frames).
    videos: list[tuple[str, str]] = []
    if isinstance(request.control_video, str):
        videos = [(request.control_video, "control video")]
    elif isinstance(controlnet, list) and request.control_video is not None:
        videos = [(video, f"control video {index + 1}") for index, video in enumerate(request.control_video)
                  if not isinstance(video, list)]
        for index, images in enumerate(request.control_video):
            if isinstance(images, list) and made is not None:
                control_places(len(images), made, request.control_indices, what=f"control video {index + 1}")
    for video, what in videos:
        if made is not None:
            controls = frame_count(video, what)
            control_places(controls, made, request.control_indices, what=f"the {what}", fix=f"\"frames\": {controls}")
        height, width = video_size(video, what)
        image_sizes[what] = (width, height)
    if isinstance(request.mask, str):  # one mask image for all frames, or one per frame of the input video
        assert made is not None  # request.check(): a mask comes with video-to-video, which remakes `have` frames
        height, width = check_mask_file(request.mask, made)
        image_sizes["mask"] = (width, height)
    if controlnet is not None:
        check_sparsectrl_falloff([path for path, _ in (controlnet if isinstance(controlnet, list) else [controlnet])],
                                 request.control_falloff)
    if isinstance(request.control_video, list) and not isinstance(controlnet, list) and made is not None:
        control_places(len(request.control_video), made, request.control_indices)


# ---------------------------------------------------------------- running


# The models a FamilyCache keeps loaded by default: the two used last. A key holds the dtype and every LoRA weight, so
# a web app or server whose users change those would otherwise keep a whole model per change until memory ran out.
MODELS_KEPT = 2


class FamilyCache:
    """Keeps loaded models by `Job.model_key()`: `load_family` runs once per key (`loads` counts its calls).
    `max_models` bounds how many stay loaded (the least recently used goes first, though one a running job still
    holds is taken back rather than loaded twice; None keeps all); `device` is
    where they load: a torch device, or a name of kinema.devices (auto, cpu, cuda, cuda:N, mps) resolved here, on
    the machine that runs the jobs (a Ray worker's own). Safe to share between threads: a key is loaded by one of
    them while the others wait."""

    def __init__(self, *, max_models: int | None = MODELS_KEPT, device: Any = "cpu") -> None:
        if max_models is not None and max_models < 1:
            raise KinemaError(f"max_models must be at least 1 (or None for no limit), got {max_models}")
        from kinema.devices import resolve_device

        self.max_models = max_models
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.loads = 0
        self._families: OrderedDict[tuple, VideoFamily] = OrderedDict()
        self._let_go: weakref.WeakValueDictionary[tuple, VideoFamily] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, job: Job) -> VideoFamily:
        """The model serving `job`, loaded on first use."""
        key = job.model_key()
        with self._lock:
            if key in self._families:
                self._families.move_to_end(key)
                return self._families[key]
            from kinema.pipelines.load import load_family

            family = self._let_go.get(key)  # let go of, but still held by a job running on it: no second copy
            if self.max_models is not None:
                while len(self._families) >= self.max_models:  # free memory before the next model takes it
                    gone, held = self._families.popitem(last=False)
                    with contextlib.suppress(TypeError):  # a stand-in that takes no weak reference
                        self._let_go[gone] = held
            if family is not None:
                self._families[key] = family
                return family
            family = load_family(job.model, motion_module=job.motion_module, loras=job.loras,
                                 dtype=job.request.dtype or "float32", device=self.device, tokenizer=job.tokenizer,
                                 ip_adapter=job.ip_adapter, image_encoder=job.image_encoder,
                                 controlnet=job.controlnet, vae=job.vae)
            self.loads += 1
            self._families[key] = family
            return family


def video_names(seeds: Iterable[int]) -> list[str]:
    """The file name of each seed's video in a job's folder: `video-seedS.mp4`."""
    return [f"video-seed{seed}{VIDEO_SUFFIX}" for seed in seeds]


def run_job(job: Job, out: str | os.PathLike, *, cache: FamilyCache, callback: StepCallback | None = None,
            progress: bool = False, overwrite: bool = False) -> list[Path]:
    """Generate `job`'s videos (one per seed) and write them into the folder `out`, created whole or not at all:
    `video-seedS.mp4` each (settings inside each file and in its sidecar, as `kinema generate` writes them),
    `job.json` = job.settings() and `report.json`, the run's report.

    `callback(step, timestep, latents)` is generate()'s step callback: it may raise `Cancelled` to stop the job
    (nothing is written then). `overwrite` replaces an earlier job folder kinema wrote (never anything else); the
    output policy is checked before the model loads. Returns the video paths.
    """
    from kinema.fileio import atomic_folder, check_output

    out = Path(out)
    inputs = [path for path in (job.request.image, job.request.end_image, job.request.video)
              if isinstance(path, (str, os.PathLike))]
    check_output(out, JOB_OUTPUT_KIND, folder=True, overwrite=overwrite, inputs=inputs)
    family = cache.get(job)
    from kinema.pipelines.generation import generate
    from kinema.pipelines.outputs import write_result

    result = generate(family, job.request, callback=callback, progress=progress)
    seeds = [int(seed) for seed in job.request.seeds]
    names = video_names(seeds)
    with atomic_folder(out, JOB_OUTPUT_KIND, overwrite=overwrite, inputs=inputs) as folder:
        # write_result names one seed's video `out` itself and several `STEM-seedS`: both give video-seedS.mp4.
        target = folder / (names[0] if len(seeds) == 1 else f"video{VIDEO_SUFFIX}")
        write_result(result, target, fps=job.request.fps)
        (folder / JOB_FILE).write_text(json.dumps(job.settings(), indent=2) + "\n")
        (folder / REPORT_FILE).write_text(json.dumps(result.report, indent=2) + "\n")
    return [out / name for name in names]


__all__ = ["JOB_KEYS", "MAX_SEED", "Cancelled", "FamilyCache", "Job", "ModelShape", "check_easyanimate_extras",
           "check_image_bytes", "check_image_file", "check_model_request", "check_size_multiple", "check_slice_frames",
           "job_from_mapping", "model_defaults_for", "model_shape", "run_job", "video_names"]
