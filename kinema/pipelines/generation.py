"""`generate()`: every generation mode on either model family, the one call behind the CLI, the web app and the API.

Modes (`GenerationRequest.mode`):
- text-to-video: noise -> denoise -> decode; an InP DiT gets V3's "generate everything" inpaint inputs.
- image-to-video: an InP model is conditioned through mask + masked-video latents and CLIP image tokens; a model
  without inpaint channels (AnimateDiff) holds the first (and last) frame's latents, re-noised at each step (repaint),
  and starts sampling from them (`REPAINT_START_STRENGTH`).
- video-to-video (SDEdit): the input's latents noised to `strength` and denoised from there.
- extend: segments of the model's window appended one by one, each conditioned on the last `overlap_frames` frames
  of what exists, the overlap cross-faded; memory does not grow with the number of segments but for the frames.
Long text-to-video runs the whole model per context window (kinema.sampling.context); a prompt schedule gives each
frame its own interpolated text (kinema.sampling.prompt_travel). Everything is checked before any denoising.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kinema.data.probe import PIL_FORMATS, oriented_size, rgb8
from kinema.errors import KinemaError, count_words, shorten, value_words
from kinema.memory import available_memory, check_frames_fit, memory_words, peak_memory_bytes, reset_peak_memory
from kinema.models.freeu import freeu
from kinema.models.motion.strength import motion_strength
from kinema.pipelines.family import Conditioning, VideoFamily
from kinema.pipelines.request import (
    DTYPES,
    MASK_MARKS_NOTHING,
    OUTPUT_TYPES,
    GenerationRequest,
    changed_since_saved,
    check_context_latent_frames,
    check_image_keyframes,
    check_mask_frames,
    check_video_holds_overlap,
    check_window,
    freeu_error,
    image_prompt_keyframes,
    input_digests,
    overlap_error,
    pia_refusal,
)
from kinema.sampling.denoisers import Denoiser
from kinema.sampling.loop import StepCallback, initial_noise, noised_to, repaint_step, sample, step_generators
from kinema.sampling.schedulers import check_timestep_spacing, make_scheduler

logger = logging.getLogger(__name__)
LatentsHook = Callable[[torch.Tensor, list[dict[str, Any]]], None]
# Repaint (image-to-video and continuation without inpaint channels) starts sampling from the held frames noised
# this far. On kinema-tiny-ad's continuations (6 prompts, 64 frames) the seam score went 4.9 / 3.9 / 3.25 / 2.9 at
# 1 / 0.95 / 0.85 / 0.7, while the tails went still more often below 0.85 (docs/generation.md).
REPAINT_START_STRENGTH = 0.85
# The conditioning a ControlNet reads: left out at the steps outside its control window.
CONTROL_KEYS = ("control_frames", "control_mask", "control_guess")


@dataclass
class GenerationResult:
    """What `generate()` returns.

    frames: output "tensor": float `(B, F, 3, H, W)` in [0, 1]; "numpy": a list of uint8 `(F, H, W, 3)` arrays;
        "pil": a list of lists of PIL images; "latent": None.
    latents: the final latents `(B, C, F', h, w)` (scaled; for `extend`, the last segment's).
    settings: one JSON-ready dict per video (its seed included), for sidecars.
    report: "mode", "dtype", "seconds", "peak_memory_bytes", "frames", "family", "windows" / "segments".
    """

    frames: Any
    latents: torch.Tensor
    settings: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- inputs


def image_tensor(image: Any, height: int, width: int, resize: bool, what: str) -> torch.Tensor:
    """`image` (a path, a PIL image or `(3, H, W)` in [0, 1]) as float `(3, height, width)` in [0, 1]."""
    return _fit(_read_image(image, what)[None], height, width, resize, what)[0]


def _read_image(image: Any, what: str) -> torch.Tensor:
    """`image` (a path, a PIL image or `(3, H, W)` in [0, 1]) as float `(3, H, W)` in [0, 1], at its own size."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise KinemaError(f"{what} {path} does not exist")
        try:
            with Image.open(path, formats=PIL_FORMATS) as opened:
                pixels = np.array(rgb8(opened, upright=True))  # a file is read upright, as shown
        except OSError as err:
            raise KinemaError(f"cannot read {what} {path}: {err}") from None
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    elif isinstance(image, Image.Image):
        # np.array copies: torch warns about the read-only buffer np.asarray would share with PIL
        image = torch.from_numpy(np.array(rgb8(image))).permute(2, 0, 1).float() / 255
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise KinemaError(f"{what} must be a path, a PIL image or a (3, H, W) tensor in [0, 1]")
    return _unit_range(image, what)


def _unit_range(frames: torch.Tensor, what: str) -> torch.Tensor:
    """`frames` as float, refused in one line unless they are finite values in [0, 1]: 0-255 bytes or [-1, 1] pixels
    would run and wash the video out (or darken it), and NaN would run the whole sampling into a NaN video."""
    if frames.numel() == 0:  # the frame count's own checks name that
        return frames.float()
    if not frames.is_floating_point():
        raise KinemaError(f"{what} is a {str(frames.dtype).removeprefix('torch.')} tensor; give floats in [0, 1] "
                          "(bytes: divide by 255)")
    frames = frames.float()
    if not torch.isfinite(frames).all():
        raise KinemaError(f"{what} holds NaN or infinity; give finite values in [0, 1]")
    low, high = float(frames.min()), float(frames.max())
    if low < 0 or high > 1:
        fix = "divide by 255" if high > 1.5 else "(x + 1) / 2 takes [-1, 1] there" if low < -0.5 else "clamp them"
        raise KinemaError(f"{what} holds values from {low:.3g} to {high:.3g}; give values in [0, 1] ({fix})")
    return frames


def _fit(frames: torch.Tensor, height: int, width: int, resize: bool, what: str) -> torch.Tensor:
    """Frames `(F, 3, H, W)` at height x width: as they are, resized when `resize`, else one error offering it."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames.float()
    if not resize:
        raise KinemaError(f"{what} is {frames.shape[-1]}x{frames.shape[-2]} but the video is {width}x{height}; pass "
                          f"--resize (resize=True) to resize it, or set --width {frames.shape[-1]} --height "
                          f"{frames.shape[-2]}")
    return torch.nn.functional.interpolate(frames.float(), size=(height, width), mode="bicubic",
                                           align_corners=False, antialias=True).clamp(0, 1)


def _path_frames(path: str | Path, height: int | None, width: int | None, resize: bool, what: str) -> torch.Tensor:
    """The frames of the video, animation, image or frame folder `path` as float `(F, 3, H, W)` in [0, 1]. With
    `resize`, a frame folder's frames are fitted to height x width (None: the first frame's) one by one, so that they
    may differ in size, as the image folders of prompt travel's img2img_map and controlnet_map do; a clip's frames
    (and a folder's without resize) have one size."""
    from PIL import Image

    from kinema.data.probe import folder_frames
    from kinema.data.video_io import read_video

    files = folder_frames(path) if resize and Path(path).is_dir() else []
    sizes = set()
    try:  # headers alone: frames of one size (as shown) are read as a clip, as they were before
        for file in files:
            with Image.open(file, formats=PIL_FORMATS) as image:
                sizes.add(oriented_size(image))
    except OSError:
        sizes.clear()  # read_video names the file
    if len(sizes) < 2:
        return (read_video(path).frames + 1) / 2
    first = _read_image(files[0], what)
    height, width = height or first.shape[-2], width or first.shape[-1]
    return torch.cat([_fit((first if index == 0 else _read_image(file, what))[None], height, width, True, what)
                      for index, file in enumerate(files)])


def _video_tensor(video: Any, height: int | None, width: int | None, resize: bool) -> torch.Tensor:
    """`video` (a path or `(F, 3, H, W)` in [0, 1]) as float `(F, 3, height, width)` in [0, 1] (height or width
    None: the video's own)."""
    if isinstance(video, (str, Path)):
        video = _path_frames(video, height, width, resize, "the input video")
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[1] != 3:
        raise KinemaError("the input video must be a path or an (F, 3, H, W) tensor in [0, 1]")
    video = _unit_range(video, "the input video")
    return _fit(video, height or video.shape[-2], width or video.shape[-1], resize, "the input video")


def _mask_tensor(mask: Any, frames: int, height: int, width: int, resize: bool) -> torch.Tensor:
    """`mask` (see GenerationRequest.mask) as bool `(frames, height, width)`, True for the pixels to remake."""
    from PIL import Image
    if isinstance(mask, (str, Path)):
        mask = _path_frames(mask, height, width, resize, "the mask")
    elif isinstance(mask, Image.Image):
        mask = _read_image(mask, "the mask")[None]
    if not isinstance(mask, torch.Tensor):
        raise KinemaError(f"the mask must be a path, a PIL image, or an (H, W) or (F, H, W) tensor in [0, 1]; got "
                          f"{type(mask).__name__}")
    mask = _unit_range(mask.float() if mask.dtype == torch.bool else mask, "the mask")  # True: remake
    if mask.ndim in (2, 3):  # (H, W) or (F, H, W)
        mask = mask.reshape(-1, 1, *mask.shape[-2:])
    if mask.ndim != 4 or mask.shape[1] not in (1, 3):
        raise KinemaError(f"the mask must be a path, a PIL image, or an (H, W) or (F, H, W) tensor in [0, 1]; got "
                          f"shape {tuple(mask.shape)}")
    check_mask_frames(mask.shape[0], frames)
    remake = _fit(mask.float().mean(dim=1, keepdim=True), height, width, resize, "the mask")[:, 0] > 0.5
    if not remake.any():
        raise KinemaError(MASK_MARKS_NOTHING)
    return remake.expand(frames, -1, -1)


def _composite(frames: torch.Tensor, video: torch.Tensor, remake: torch.Tensor, blur: float) -> torch.Tensor:
    """Video inpainting's finish: the kept pixels of the input `video` `(F, 3, H, W)` in [0, 1] over the decoded
    `frames` `(B, F, 3, H, W)`, so that they are the input's own rather than their VAE round trip (kinema-tiny's
    decoder alone gives back about 30 dB). `remake` `(F, H, W)` (True: remade) is first feathered by a Gaussian blur
    of radius `blur` pixels (diffusers' VaeImageProcessor.blur, A1111's mask blur). diffusers' apply_overlay does
    this blend per PIL image in 8 bits; here the frames stay float (tests/pipelines/test_generate.py proves
    the two equal)."""
    weight = remake.float()
    if blur > 0:
        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        weight = torch.stack([torch.from_numpy(np.asarray(VaeImageProcessor.blur(
            Image.fromarray(frame.mul(255).round().byte().numpy()), blur), dtype=np.float32) / 255)
            for frame in weight])
    weight = weight.to(frames)[None, :, None]
    return torch.lerp(video.to(frames)[None], frames, weight)


def _control_images(control: Any, height: int, width: int, resize: bool, normalize: bool = False,
                    preprocess: str | None = None) -> torch.Tensor:
    """The control images `control` (a video, animation, image or frame folder, a list of image paths, or
    `(K, 3, H, W)` in [0, 1]) as float `(K, 3, height, width)` in [0, 1], made into the map `preprocess` names
    (kinema.pipelines.control_maps); `normalize`: gray, stretched to [0, 1] each, as AnimateDiff's
    normalize_condition_images makes them."""
    from kinema.pipelines.control_maps import preprocess_control

    if isinstance(control, list | tuple):
        control = torch.stack([image_tensor(image, height, width, resize, "the control image") for image in control])
    elif isinstance(control, (str, Path)):
        control = _path_frames(control, height, width, resize, "the control video")
    if not isinstance(control, torch.Tensor) or control.ndim != 4 or control.shape[1] != 3:
        raise KinemaError("the control video must be a path (a video, animation, image or folder of frames), a list "
                          "of image paths, or an (F, 3, H, W) tensor in [0, 1]")
    control = preprocess_control(_fit(control, height, width, resize, "the control video"), preprocess)
    if normalize:
        gray = control.mean(dim=1, keepdim=True)
        low = gray.amin(dim=(1, 2, 3), keepdim=True)
        span = (gray.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-6)  # a flat image stays flat, not NaN
        control = ((gray - low) / span).expand(-1, 3, -1, -1)
    return control


def _control_videos(family: VideoFamily, control: Any) -> list[Any]:
    """The control video of each ControlNet loaded: the request's own, or with several ControlNets its list of them,
    one each (where one ControlNet's list is its keyframe images)."""
    from kinema.models.controlnet import VideoMultiControlNet

    if not isinstance(family.controlnet, VideoMultiControlNet):
        return [control]
    count = len(family.controlnet.nets)
    if not isinstance(control, list | tuple) or len(control) != count:
        raise KinemaError(f"{family.name} is loaded with {count} ControlNets, so control_video is a list of {count} "
                          "control videos or images, one per ControlNet in their order (--control-video once each)")
    return list(control)


def _with_control(family: VideoFamily, request: GenerationRequest, text: _Text,
                  control_images: Sequence[torch.Tensor] | None, frames: int, videos: int) -> _Text:
    """`text` with the ControlNet's conditioning (`VideoFamily.control_conditioning` of each ControlNet's control
    images `(K, 3, H, W)`) for every video, on both sides of guidance, as diffusers' ControlNet pipelines give it; in
    guess mode `control_guess` marks the conditional side alone as steered."""
    if control_images is None:
        return text
    device = _device(family, request.offload)
    control = family.control_conditioning([images.to(device) for images in control_images], frames,
                                          request.control_indices, request.control_falloff, request.control_loop)
    rows = {key: value.expand(videos, *value.shape[1:]) for key, value in control.items() if value is not None}
    cond, uncond = {**text.cond, **rows}, None if text.uncond is None else {**text.uncond, **rows}
    if request.guess_mode:
        cond["control_guess"] = torch.ones(videos, dtype=torch.bool, device=device)
        if uncond is not None:
            uncond["control_guess"] = torch.zeros(videos, dtype=torch.bool, device=device)
    return _Text(cond, uncond, text.table)


def controlled(step: int, steps: int, start: float, end: float) -> bool:
    """Whether the ControlNet steers step `step` of `steps`: diffusers' rule (`controlnet_keep`), a step is steered
    unless it begins before `start` or ends after `end` (shares of the steps)."""
    return not (step / steps < start or (step + 1) / steps > end)


# ---------------------------------------------------------------------------------------------------- text


@dataclass
class _Text:
    """The text conditioning of a run: `cond` / `uncond` batched per video; per-frame states for prompt travel."""

    cond: Conditioning
    uncond: Conditioning | None
    table: str | None = None


@dataclass(frozen=True)
class _Span:
    """Where a clip lies in the video it is part of (a continuation's segment): its first frame, and the whole
    video's frames, over which the prompt and image prompt schedules run."""

    first: int
    total: int


def _encode_text(family: VideoFamily, request: GenerationRequest, videos: int, latent_frames: int,
                 pixel_frames: int, span: _Span | None = None) -> _Text:
    """Encode the prompt (or each keyframe prompt of a schedule, interpolated per latent frame) and the negative
    prompt, one row per video; with an IP-Adapter, the image prompt joins both sides. With `span`, the clip is the
    frames of a longer video there, and the schedules run over that video."""
    text = _encode_prompts(family, request, videos, latent_frames, pixel_frames, span)
    if request.ip_image is None:
        return text
    keyframes = image_prompt_keyframes(request.ip_image)
    if keyframes is None:
        cond, uncond = family.image_prompt(_read_image(request.ip_image, "the image prompt")[None], videos)
    else:
        images = [_read_image(image, f"the image prompt of frame {frame}") for frame, image in keyframes]
        # An IP-Adapter is an AnimateDiff model's, whose latent frames are its frames.
        frames, window = (latent_frames, None) if span is None else (
            span.total, range(span.first, span.first + latent_frames))
        cond, uncond = family.image_prompt_frames(images, [frame for frame, _ in keyframes], frames, videos,
                                                  request.interpolation, request.prompt_hold, request.prompt_loop,
                                                  window)
    return _Text({**text.cond, **cond}, None if text.uncond is None else {**text.uncond, **uncond}, text.table)


def _encode_prompts(family: VideoFamily, request: GenerationRequest, videos: int, latent_frames: int,
                    pixel_frames: int, span: _Span | None = None) -> _Text:
    skip = request.clip_skip
    uncond = family.encode_text([request.negative_prompt] * videos, skip) if request.guidance != 1 else None
    if isinstance(request.prompt, str):
        return _Text(family.encode_text([request.prompt] * videos, skip), uncond)
    from kinema.sampling.prompt_travel import interpolate_states, parse_prompt_schedule, schedule_table

    total = pixel_frames if span is None else span.total
    schedule = parse_prompt_schedule(request.prompt, total, request.interpolation, request.prompt_hold,
                                     request.prompt_loop)
    keyframes = family.encode_text(schedule.prompts(), skip)
    states = keyframes[family.text_key]
    assert states is not None
    window = None if span is None else range(span.first, span.first + pixel_frames)
    per_frame = interpolate_states(states, schedule, total, window)  # (F, L, D)
    if latent_frames != pixel_frames:  # the VAE merges frames in time: each latent frame takes the mean blend of
        # the frames it covers (4 in V3's Slice VAE), so the DiT's mean over them is the clip's middle blend
        bounds = [round(k * pixel_frames / latent_frames) for k in range(latent_frames + 1)]
        per_frame = torch.stack([per_frame[first:end].mean(dim=0) for first, end in itertools.pairwise(bounds)])
    cond: Conditioning = {family.text_key: per_frame[None].expand(videos, *per_frame.shape).contiguous()}
    for key, value in keyframes.items():
        if key != family.text_key and value is not None:  # masks: a token kept by any keyframe prompt is kept
            cond[key] = value.amax(dim=0, keepdim=True).expand(videos, *value.shape[1:])
    if uncond is not None and family.text_key in uncond:
        negative = uncond[family.text_key]
        assert negative is not None
        uncond = {**uncond, family.text_key: negative[:, None].expand(-1, latent_frames, -1, -1).contiguous()}
    return _Text(cond, uncond, schedule_table(schedule, total))


# ---------------------------------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    """What a request comes to on a family, settled before any denoising."""

    frames: int          # pixel frames of one denoised clip (a segment when extending)
    latent_frames: int
    scheduler: str
    height: int
    width: int
    steps: int
    guidance: float
    context: Any = None  # kinema.sampling.context.ContextOptions in latent frames, or None
    continuation: bool = False


def _plan(family: VideoFamily, request: GenerationRequest) -> _Plan:
    """The plan of `request`, whose None fields `generate()` has filled (`with_defaults`, an input video's size)
    and which it has checked."""
    height, width, frames = request.height, request.width, request.frames
    steps, guidance = request.steps, request.guidance
    if height is None or width is None or frames is None or steps is None or guidance is None:
        raise TypeError("_plan takes a request with its defaults filled (GenerationRequest.with_defaults)")
    family.check_size(height, width)
    scheduler = request.scheduler or family.default_scheduler
    make_scheduler(scheduler, family.family)  # an unknown name fails here, listing the known ones
    check_timestep_spacing(request.timestep_spacing, scheduler)  # the model's default, or a speed preset's

    def planned(frames: int, context: Any = None, continuation: bool = False) -> _Plan:
        return _Plan(frames, family.latent_frames(frames), scheduler, height, width, steps, guidance, context,
                     continuation)

    if request.freeu is not None and not family.model.supports_freeu:
        raise freeu_error(family.name)
    family.check_image_prompt(request.ip_image is not None)
    family.check_control(request.control_video is not None)
    mode = request.mode
    refusal = pia_refusal(getattr(family, "motion_module", None) or family.name, family.animates_image, mode,
                          request.end_image is not None, request.pia_motion is not None)
    if refusal is not None:
        raise refusal
    if mode in ("image-to-video", "extend") and not (family.inpaints or family.repaint_fallback):
        raise KinemaError(f"{mode} needs an inpaint (InP) model (EasyAnimate V3 InP) or an AnimateDiff model, which "
                          f"holds the known frames instead; {family.name} is neither")
    if mode == "extend":
        check_window(family.max_frames, family.name, segment_frames=request.segment_frames)
        segment = request.segment_frames or family.max_frames
        return planned(segment, continuation=True)
    latent_frames = family.latent_frames(frames)  # the VAE's frame rule first: its message gives the nearest counts
    context = None
    if request.context is not None or frames > family.max_frames:
        if request.context is None and family.inpaints and mode == "text-to-video" and request.segment_frames is None:
            segment = family.max_frames  # InP models go past their window by continuation (V3's long video)
            return planned(segment, continuation=True)
        context = _context_options(family, request, latent_frames)
    return planned(frames, context)


def _context_options(family: VideoFamily, request: GenerationRequest, latent_frames: int) -> Any:
    from kinema.pipelines.request import ContextSettings
    from kinema.sampling.context import ContextOptions

    settings = request.context or ContextSettings(length=min(16, family.max_frames))
    check_window(family.max_frames, family.name, context_length=settings.length)  # pixel frames, as the request's
    scale = max(family.pixel_frames(2) // 2, 1)  # pixel frames per latent frame, for the windows' latent length
    options = ContextOptions(length=max(settings.length // scale, 1), overlap=settings.overlap // scale,
                             stride=settings.stride, closed_loop=settings.closed_loop, schedule=settings.schedule,
                             fuse=settings.fuse, freenoise=settings.freenoise)
    check_context_latent_frames(family.name, scale, settings.length, settings.overlap)  # jobs check it at submit
    options.check(latent_frames, family.model.max_frames)
    if request.context is not None and latent_frames <= options.length:
        logger.warning("the context windows change nothing: these %d frames fit in one window of %d, sampled as one "
                       "clip, so the context overlap, stride, schedule, fuse, closed loop and FreeNoise do nothing; "
                       "make more frames than the context length", request.frames, settings.length)
    return options


# ---------------------------------------------------------------------------------------------------- running


@contextmanager
def _precision_and_memory(family: VideoFamily, request: GenerationRequest) -> Any:
    if request.dtype is not None:
        from kinema.models.precision import prepare_for_inference

        dtype = getattr(torch, request.dtype)  # a name of request.DTYPES, checked by request.check()
        _warn_if_emulated(dtype, _device(family, request.offload))
        for module in family.modules():
            prepare_for_inference(module, dtype)
    _optimize(family.model, request)
    family.model.set_attention_chunk_size(request.attention_chunk)
    set_vae_options(family, vae_tiling=request.vae_tiling, decode_chunk=request.decode_chunk)
    offloaded = _offload(family) if request.offload else []
    try:
        with motion_strength(request.motion_scale, request.motion_effect), freeu(request.freeu):
            yield
    finally:
        family.model.set_attention_chunk_size(None)
        if offloaded:
            from accelerate.hooks import remove_hook_from_module

            for module in offloaded:
                remove_hook_from_module(module, recurse=True)


def _optimize(model: torch.nn.Module, request: GenerationRequest) -> None:
    """int8 quantisation and torch.compile of the video model, in place, each once: a model already quantised or
    compiled (by an earlier request on the same family) stays so, which the report records."""
    from kinema.models.optimize import compile_model, quantize_model

    if request.quantize is not None and not _quantized(model):
        quantize_model(model, request.quantize)
    if request.compile and not _compiled(model):
        compile_model(model)


def _compiled(model: torch.nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def _quantized(model: torch.nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return any(isinstance(module, DynamicQuantizedLinear) for module in model.modules())


def _warn_if_emulated(dtype: torch.dtype, device: torch.device) -> None:
    """Half precision on a CPU without native support (AVX2 only: no AVX-512 BF16 / AMX) runs in slow fallback
    kernels, measured ~100x slower than float32 at SD1.5 size; say so rather than let a run crawl. A GPU before
    Ampere (compute capability 8) has no bfloat16 tensor cores: float16 runs at full speed there."""
    from kinema.pipelines.speed import native_bfloat16

    if dtype == torch.bfloat16 and device.type == "cuda" and not native_bfloat16(device):
        logger.warning("this GPU has no native bfloat16 support (it predates compute capability 8), so the models run "
                       "slower than they could; use --dtype float16 here")
    if device.type != "cpu" or dtype == torch.float32:
        return
    native = native_bfloat16(device) if dtype == torch.bfloat16 else torch.ops.mkldnn._is_mkldnn_fp16_supported()
    if not native:
        logger.warning("this CPU has no native %s support, so the models run far slower than in float32; use "
                       "--dtype float32 here", str(dtype).removeprefix("torch."))


def _offload(family: VideoFamily) -> list[torch.nn.Module]:
    """Model CPU offload through accelerate's hooks (as diffusers' `enable_model_cpu_offload`): each model stays in
    CPU memory and moves to the accelerator (`family.offload_device`, else the first CUDA GPU) for its own forward,
    sending the previous one back. `generate` turns offload off, saying so, where there is no accelerator."""
    target = _offload_target(family)
    assert target is not None  # generate's request keeps offload only with an accelerator
    from accelerate import cpu_offload_with_hook

    vae = getattr(family, "vae", None)
    encoders = [m for m in family.modules() if m is not family.model and m is not vae]
    modules = [*encoders, family.model, *([vae] if isinstance(vae, torch.nn.Module) else [])]  # the order of use
    hook = None
    for module in modules:
        module.to("cpu")
        _, hook = cpu_offload_with_hook(module, target, prev_module_hook=hook)
    return modules


def _offload_target(family: VideoFamily) -> torch.device | None:
    """The accelerator an offloaded run moves each model to; None where there is none."""
    target = family.offload_device
    if target is None and torch.cuda.is_available():
        target = torch.device("cuda")
    return None if target is None or torch.device(target).type == "cpu" else torch.device(target)


def _device(family: VideoFamily, offload: bool = False) -> torch.device:
    """Where the run's tensors live: the video model's device, or with `offload` the accelerator the offloaded
    models run on (their weights wait in CPU memory)."""
    return (_offload_target(family) if offload else None) or next(family.model.parameters()).device


@dataclass
class _Clip:
    """One clip to denoise: its latent shape and the conditioning beyond text."""

    noise: torch.Tensor
    cond_extra: Conditioning = field(default_factory=dict)
    uncond_extra: Conditioning = field(default_factory=dict)
    clean: torch.Tensor | None = None    # video-to-video, repaint: latents sampling starts from, noised to strength
    strength: float = 1.0                # the share of `clean` noised away
    known: torch.Tensor | None = None    # repaint: latents of the kept frames
    keep: torch.Tensor | None = None     # repaint: (F',) bool


def _denoise(family: VideoFamily, request: GenerationRequest, plan: _Plan, text: _Text, clip: _Clip,
             seeds: Sequence[int], callback: StepCallback | None, progress: bool) -> torch.Tensor:
    """Sample one clip's latents `(B, C, F', h, w)` under everything the plan and the clip ask for."""
    scheduler = _scheduler(family, request, plan)
    steps = plan.steps
    denoiser: Denoiser = family.denoiser()
    frames = clip.noise.shape[2]
    if plan.context is not None:
        from kinema.sampling.context import ContextDenoiser

        axes = {key: 1 for key in (family.text_key,) if (text.cond.get(key) is not None
                                                          and text.cond[key].ndim == 4)}  # type: ignore[union-attr]
        denoiser = ContextDenoiser(denoiser, plan.context, frames, steps=steps, frame_axes=axes)  # type: ignore[assignment]

    def conditioning_at(step: int) -> tuple[Conditioning, Conditioning | None]:
        # Counted over the scheduler's timesteps once set, as diffusers counts them (a second-order scheduler has
        # more than `steps`, PNDM one more).
        count = len(scheduler.timesteps) if getattr(scheduler, "num_inference_steps", None) else steps
        with_image = family.image_tokens_from(step, count)
        with_control = controlled(step, count, request.control_start, request.control_end)

        def kept(given: Conditioning, extra: Conditioning) -> Conditioning:
            return {**{k: v for k, v in given.items() if with_control or k not in CONTROL_KEYS},
                    **{k: v for k, v in extra.items() if with_image or not k.startswith("clip_")}}

        return kept(text.cond, clip.cond_extra), None if text.uncond is None else kept(text.uncond, clip.uncond_extra)

    first_step = 0
    start = clip.noise
    if clip.clean is not None:
        first_step = min(steps - 1, steps - max(1, round(steps * clip.strength)))
        start = noised_to(scheduler, clip.clean, clip.noise, first_step, steps)

    # FreeInit's fresh noise is the draws after the initial noise (seeded_fresh_noise), so a sampler's step noise
    # comes after those too, not again.
    free_init = request.free_init if clip.clean is None else None  # `generate` says when FreeInit is off
    drawn = free_init.iterations if free_init is not None else 1

    def run(noise: torch.Tensor, run_steps: int) -> torch.Tensor:
        repaint = None
        if clip.known is not None and clip.keep is not None:
            repaint = repaint_step(scheduler, clip.known, clip.keep, clip.noise, run_steps)
        cond, uncond = conditioning_at(first_step)
        latents = sample(denoiser, scheduler, noise, cond, uncond, run_steps, plan.guidance, callback=callback,
                         progress=progress, generator=step_generators(seeds, clip.noise.shape, drawn),
                         first_step=first_step,
                         conditioning_at=conditioning_at, after_step=repaint, cache_interval=request.cache_interval,
                         cfg_truncation=request.cfg_truncation, guidance_rescale=request.guidance_rescale)
        if not torch.isfinite(latents).all():
            raise _not_finite(family, request)
        return latents

    with torch.no_grad():
        if free_init is None:
            return run(start, steps)
        from kinema.sampling.freeinit import FreeInitOptions, free_init_sample, seeded_fresh_noise

        options = FreeInitOptions(**vars(free_init))
        fresh = seeded_fresh_noise(start.shape, seeds, dtype=start.dtype, device=start.device)
        return free_init_sample(run, start, scheduler, options, steps, fresh)


def _scheduler(family: VideoFamily, request: GenerationRequest, plan: _Plan) -> Any:
    """A fresh diffusers scheduler of the plan's sampler for `family`, at the request's timestep spacing."""
    spacing = {} if request.timestep_spacing is None else {"timestep_spacing": request.timestep_spacing}
    return make_scheduler(plan.scheduler, family.family, prediction_type=family.prediction_type, **spacing)


def _warn_late_start(family: VideoFamily, request: GenerationRequest, plan: _Plan) -> None:
    """A warning, once before any sampling, when the sampler's first timestep is far below pure noise (below 3/4 of
    the noise schedule), where sampling starts: few steps of a `leading` or `linspace` spacing (DDIM's 1 step runs at
    timestep 1, 2 steps from 501), which leave the video noisy; `trailing` spacing starts at the top."""
    scheduler = _scheduler(family, request, plan)
    scheduler.set_timesteps(plan.steps)
    first, top = int(scheduler.timesteps[0]), int(scheduler.config.num_train_timesteps)
    if first < 0.75 * top:
        logger.warning("with %s the %s sampler starts at timestep %d of %d (its %r timestep spacing), far below "
                       "the pure noise sampling starts from, so the video stays noisy: use --timestep-spacing "
                       "trailing (timestep_spacing), or more steps", count_words(plan.steps, "step"), plan.scheduler,
                       first, top, scheduler.config.timestep_spacing)


def _warn_prompts(family: VideoFamily, request: GenerationRequest, frames: int) -> None:
    """Warnings, once per run before any sampling, for prompts the model will not follow: one outside the world of
    a model that declares one (`PromptWorld`: the bundled models' coloured shapes), and each prompt (a schedule's
    keyframes', and the negative one where guidance reads it) longer than the text encoder reads, naming the end
    that is cut off and changes nothing."""
    from kinema.sampling.prompt_travel import parse_prompt_schedule

    prompts = [request.prompt] if isinstance(request.prompt, str) else \
        parse_prompt_schedule(request.prompt, frames).prompts()
    world = getattr(family, "world", None)
    if world is not None:
        world.check(prompts)
    if request.guidance != 1 and request.negative_prompt:
        prompts.append(request.negative_prompt)
    unguided = [name for name, value in (("the negative prompt", request.negative_prompt),
                                         ("guidance_rescale", request.guidance_rescale),
                                         ("cfg_truncation", request.cfg_truncation)) if value]
    if request.guidance == 1 and unguided:
        logger.warning("guidance 1 turns classifier-free guidance off, so %s change%s nothing; give a guidance above 1 "
                       "(5 to 9 are usual) for %s", " and ".join(unguided), "s" if len(unguided) == 1 else "",
                       "it" if len(unguided) == 1 else "them")
    for prompt in dict.fromkeys(prompts):
        cut = family.cut_off_text(prompt)
        if cut:
            logger.warning("the text encoder reads the start of each prompt only, so the end of %r is cut off and "
                           "changes nothing: '%s'; shorten the prompt, or spread it over a prompt schedule",
                           shorten(prompt, 60), _last_words(cut, 60))


def _last_words(text: str, limit: int) -> str:
    """The end of `text` in whole words, at most about `limit` characters, with `…` before where it was cut."""
    words = text.split()
    kept: list[str] = []
    while words and len(" ".join([words[-1], *kept])) <= limit:
        kept.insert(0, words.pop())
    return ("…" if words else "") + " ".join(kept or [text.split()[-1]])


def _not_finite(family: VideoFamily, request: GenerationRequest) -> KinemaError:
    """Sampling gave NaN or infinity: one line naming what in this run can cause it, said before anything is
    decoded or saved."""
    causes = []
    if next(family.model.parameters()).dtype == torch.float16:
        causes.append("float16 overflowed (run in float32 or bfloat16: --dtype)")
    if (request.motion_scale, request.motion_effect) != (1.0, 1.0):
        causes.append(f"the motion scale {request.motion_scale:g} or effect {request.motion_effect:g} (1 and 1: as "
                      "trained)")
    if request.freeu is not None:
        causes.append("FreeU's factors (drop freeu, or bring them nearer 1)")
    loras = family.settings().get("loras")
    if loras:
        causes.append("a LoRA's weight or file (" + ", ".join(f"{lora['path']} at {lora['weight']:g}"
                                                              for lora in loras) + ")")
    causes.append("damaged or mis-converted model weights")
    return KinemaError("sampling produced NaN or infinity, so nothing was decoded or saved; look at "
                       + "; ".join(causes))


def _noise(family: VideoFamily, plan: _Plan, request: GenerationRequest, seeds: Sequence[int],
           device: torch.device) -> torch.Tensor:
    shape = (len(seeds), family.latent_channels, plan.latent_frames, plan.height // family.spatial_factor,
             plan.width // family.spatial_factor)
    if plan.context is not None and plan.context.freenoise:
        from kinema.sampling.noise import freenoise_initial_noise

        return freenoise_initial_noise(shape, seeds, plan.context.length, plan.context.overlap, device=device)
    return initial_noise(shape, seeds, device=device)


def _condition_on_frames(family: VideoFamily, noise: torch.Tensor, video: torch.Tensor, keep: torch.Tensor,
                         clip_image: torch.Tensor | None, inpaint: bool) -> _Clip:
    """A clip conditioned on known frames: `video` `(B, F, 3, H, W)` in [0, 1] with `keep` `(F,)` True where known.
    InP models take inpaint inputs; the others hold the known frames' latents (repaint) and start from them."""
    if inpaint:
        cond, uncond = family.inpaint_conditioning(video, keep, clip_image)
        return _Clip(noise, cond, uncond)
    # Held latents reach a repaint sample only through noise, so from pure noise it commits to its own layout
    # before they matter: the frame after an image-to-video start jumped 11x the median frame change on the
    # bundled kinema-tiny-ad (docs/generation.md). Sampling from the held frames, each unknown frame a copy of the
    # last known one before it, keeps the object and background where they were.
    known = family.encode_frames(_held_forward(video, keep)).to(noise)
    return _Clip(noise, known=known, keep=_latent_keep(family, keep), clean=known, strength=REPAINT_START_STRENGTH)


def _held_forward(video: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`video` `(B, F, 3, H, W)` with each frame not in `keep` `(F,)` replaced by the last kept frame before it
    (the first kept frame before any)."""
    kept = keep.nonzero().flatten().tolist()
    if not kept:
        raise KinemaError("conditioning on known frames needs at least one of them")
    source = [max((k for k in kept if k <= frame), default=kept[0]) for frame in range(keep.shape[0])]
    return video[:, source]


def _latent_keep(family: VideoFamily, keep: torch.Tensor) -> torch.Tensor:
    """What the latents hold of `keep`: `(F,)` kept pixel frames give `(F',)`, the latent frames whose every pixel
    frame is kept (pixel frames merged per latent frame by the VAE); `(F, H, W)` kept pixels give `(F', h, w)`, the
    latent pixels whose every pixel is kept."""
    frames = keep.shape[0]
    latent_frames = family.latent_frames(frames)
    per = frames // latent_frames if latent_frames > 1 else frames
    held = keep[: latent_frames * per].reshape(latent_frames, per, *keep.shape[1:]).all(dim=1)
    if keep.ndim == 1:
        return held
    factor = family.spatial_factor
    height, width = held.shape[1] // factor, held.shape[2] // factor
    return held.reshape(latent_frames, height, factor, width, factor).all(dim=4).all(dim=2)


def _text_to_video_clip(family: VideoFamily, noise: torch.Tensor, plan: _Plan) -> _Clip:
    if not family.inpaints:
        return _Clip(noise)
    # An InP model makes text-to-video with every frame to generate (V3's T2V with an InP checkpoint).
    frames = family.pixel_frames(noise.shape[2])
    video = torch.zeros(noise.shape[0], frames, 3, plan.height, plan.width, device=noise.device)
    return _condition_on_frames(family, noise, video, torch.zeros(frames, dtype=torch.bool), None, inpaint=True)


def _masked_clip(family: VideoFamily, noise: torch.Tensor, video: torch.Tensor, remake: torch.Tensor,
                 clean: torch.Tensor) -> _Clip:
    """Video inpainting: `video` `(B, F, 3, H, W)` in [0, 1] remade where `remake` `(F, H, W)` is True. Every model
    holds the latents of `clean` `(B, C, F', h, w)` (the input's) wherever every pixel a latent covers is kept
    (repaint); InP models also see the kept pixels through their inpaint inputs (V3's mask video, per pixel). V3
    trained its InP checkpoints on frame masks only, so the inputs alone did not keep the kept half of a
    half-masked video on the bundled kinema-tiny (13.5 dB, as far from the input as the remade half)."""
    keep = _latent_keep(family, ~remake)
    if family.inpaints:
        cond, uncond = family.inpaint_conditioning(video, ~remake.to(video.device), None)
        return _Clip(noise, cond, uncond, known=clean, keep=keep)
    return _Clip(noise, known=clean, keep=keep)


def _image_clip(family: VideoFamily, noise: torch.Tensor, start: torch.Tensor, end: torch.Tensor | None,
                pia_motion: int | None = None) -> _Clip:
    """A clip holding `start` (and `end`), each `(3, H, W)` in [0, 1], as its first (and last) frame; an image
    animator's (PIA) conditioned on `start` at its motion preset `pia_motion`."""
    frames = family.pixel_frames(noise.shape[2])
    if family.animates_image:
        image = start[None].expand(noise.shape[0], -1, -1, -1).to(noise.device)
        return _Clip(noise, *family.image_conditioning(image, frames, pia_motion))
    video = torch.zeros(noise.shape[0], frames, 3, *start.shape[1:])
    keep = torch.zeros(frames, dtype=torch.bool)
    video[:, 0], keep[0] = start, True
    if end is not None:
        video[:, -1], keep[-1] = end, True
    clip_image = start[None].expand(noise.shape[0], -1, -1, -1)
    return _condition_on_frames(family, noise, video.to(noise.device), keep, clip_image.to(noise.device),
                                inpaint=family.inpaints)


def _crossfade(tail: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Blend overlapping frames `(B, K, 3, H, W)`: a linear ramp from the old `tail` to the new `head`."""
    k = tail.shape[1]
    ramp = torch.arange(1, k + 1, dtype=tail.dtype, device=tail.device).div(k + 1).view(1, k, 1, 1, 1)
    return tail * (1 - ramp) + head * ramp


def _extend(family: VideoFamily, request: GenerationRequest, plan: _Plan, start: torch.Tensor, total: int,
            seeds: Sequence[int], callback: StepCallback | None, progress: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          int]:
    """Append segments to `start` `(B, F0, 3, H, W)` until the video has `total` frames; returns (frames, last
    segment's latents, segments)."""
    batch = start.shape[0]
    overlap = request.overlap_frames
    if overlap is None:
        raise TypeError("_extend takes a request with its defaults filled (GenerationRequest.with_defaults)")
    segment = plan.frames
    if overlap >= segment:
        raise overlap_error(overlap, segment)
    video = torch.empty(batch, total, 3, plan.height, plan.width)
    have = min(start.shape[1], total)
    video[:, :have] = start[:, :have].cpu()
    latents = torch.empty(0)
    segments = 0
    while have < total:
        context = video[:, have - overlap:have]
        # The schedules run over the whole video: each segment takes its own frames' blend.
        text = _encode_text(family, request, batch, plan.latent_frames, segment, _Span(have - overlap, total))
        frames = torch.zeros(batch, segment, 3, plan.height, plan.width)
        frames[:, :overlap] = context
        keep = torch.zeros(segment, dtype=torch.bool)
        keep[:overlap] = True
        segment_seeds = [s + 7919 * (segments + 1) for s in seeds]
        noise = _noise(family, plan, request, segment_seeds, _device(family, request.offload))
        device = noise.device
        clip = _condition_on_frames(family, noise, frames.to(device), keep, context[:, 0].to(device),
                                    inpaint=family.inpaints)
        latents = _denoise(family, request, plan, text, clip, segment_seeds, callback, progress)
        new = family.decode(latents).cpu()
        video[:, have - overlap:have] = _crossfade(context, new[:, :overlap])
        take = min(segment - overlap, total - have)
        video[:, have:have + take] = new[:, overlap:overlap + take]
        have += take
        segments += 1
        logger.info("extend: segment %d done, %d of %d frames", segments, have, total)
    return video, latents, segments


# ---------------------------------------------------------------------------------------------------- outputs


def _as_output(frames: torch.Tensor, output: str) -> Any:
    if output == "tensor":
        return frames
    arrays = [(video.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy() for video in frames]
    if output == "numpy":
        return arrays
    from PIL import Image

    return [[Image.fromarray(frame) for frame in video] for video in arrays]


def _check_saved_by_a_match(family: VideoFamily, latents: torch.Tensor, settings: Sequence[dict[str, Any]]) -> None:
    """One KinemaError line when the settings saved with `latents` say another kind of VAE made them (another family,
    or a video size this model's VAE would not decode them to) or that the latents were cut or padded since (their
    frame count is not the one recorded). Older files without those fields pass."""
    from kinema.pipelines.outputs import another_familys_latents, decode_with_their_maker

    recorded = settings[0] if settings else {}
    fix = decode_with_their_maker(recorded)
    refusal = another_familys_latents(recorded, family.name, family.family)
    if refusal is not None:
        raise refusal
    side = (latents.shape[-2] * family.spatial_factor, latents.shape[-1] * family.spatial_factor)
    wanted = (recorded.get("height"), recorded.get("width"))
    if None not in wanted and side != wanted:
        raise KinemaError(f"these latents were saved for {wanted[1]}x{wanted[0]} videos, but {family.name}'s VAE "
                          f"would decode them to {side[1]}x{side[0]}: it is not the VAE that made them; {fix}")
    frames, held = recorded.get("frames"), int(latents.shape[2])
    if isinstance(frames, int) and not isinstance(frames, bool):
        try:
            decoded: int | None = family.pixel_frames(held)
        except KinemaError:
            decoded = None
        if decoded != frames:
            makes = f"{decoded} frames" if decoded is not None else "no video"
            raise KinemaError(f"these latents hold {held} latent frames, which {family.name} decodes to {makes}, but "
                              f"their settings say {frames} frames: the file was changed after kinema saved it; "
                              "decode the file as kinema saved it, or generate again")


def set_vae_options(family: VideoFamily, *, vae_tiling: bool, decode_chunk: int | None) -> None:
    """The VAE's memory options on `family`: spatial tiles, and frames per VAE call (an SD VAE's; a Slice VAE
    decodes by its slices, so it has none). None leaves the family's own."""
    for name, value in (("vae_tiling", vae_tiling), ("decode_chunk", decode_chunk)):
        if value is not None and hasattr(family, name):
            setattr(family, name, value)


def decode_saved(family: VideoFamily, latents: torch.Tensor,
                 settings: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
    """Frames `(B, F, 3, H, W)` in [0, 1] of latents saved before decoding (`kinema decode`; `set_vae_options` sets
    tiling and chunks first). `settings`, the ones saved with them (`load_latents`), are checked first: latents
    another family's or another size of VAE made are refused, before any decoding."""
    if latents.ndim != 5 or latents.shape[1] != family.latent_channels:
        raise KinemaError(f"saved latents must be (B, {family.latent_channels}, F', h, w) for this model; got "
                          f"{tuple(latents.shape)}")
    if settings is not None:
        _check_saved_by_a_match(family, latents, settings)
    batch, _, held, height, width = latents.shape
    _check_decode_fits(family, batch, family.pixel_frames(held), height * family.spatial_factor,
                       width * family.spatial_factor)
    with torch.no_grad():
        return family.decode(latents.to(_device(family)))


def _check_decode_fits(family: VideoFamily, videos: int, frames: int, height: int, width: int,
                       dtype: str | None = None) -> None:
    """Refuse, before any sampling, a decode whose VAE needs more memory at once than its device has free
    (`VideoFamily.decode_bytes`, an estimate; `dtype`: the run's, if it casts the VAE)."""
    needed = family.decode_bytes(videos, frames, height, width)
    if needed is None:
        return
    if dtype is not None:  # a smaller element than the VAE's now; a larger one is not estimated up
        held = next(family.vae.parameters()).element_size()
        needed = needed * min(held, torch.empty(0, dtype=getattr(torch, dtype)).element_size()) // held
    device = _device(family)
    try:
        free = available_memory(device)
    except KinemaError:
        return
    if needed > free:
        raise KinemaError(f"decoding {frames} frames at {width}x{height} needs about {memory_words(needed)} of "
                          f"memory at once on {device.type} (the VAE's full-size layers), and {memory_words(free)} "
                          "is free; decode in tiles (--vae-tiling, vae_tiling), fewer frames at a time "
                          "(--decode-chunk, decode_chunk, AnimateDiff models), or ask for a smaller size")


def generate(family: VideoFamily, request: GenerationRequest, *, callback: StepCallback | None = None,
             progress: bool = True, output: str = "tensor", on_latents: LatentsHook | None = None,
             resume: tuple[torch.Tensor, Sequence[dict[str, Any]]] | None = None) -> GenerationResult:
    """Make one video per seed of `request` with `family`'s model (see the module docstring for the modes).

    Args:
        family: the model's parts (`kinema.pipelines.load.load_family`, or an `AnimateDiffFamily` /
            `EasyAnimateFamily` built from parts).
        request: the settings; checked, with the family's own limits, before any denoising.
        callback: called as `callback(step, timestep, latents)` after each sampling step; the videos are made one
            after another, each alone (so a seed's settings remake its video exactly), so `latents` are one video's
            `(1, C, F', h, w)` and `step` counts from 0 again for each (`GenerationRequest.sampling_steps` counts
            them all).
        progress: show progress bars.
        output: "tensor", "numpy", "pil" or "latent" (see `GenerationResult.frames`).
        on_latents: called with the final latents `(B, C, F', h, w)` and the settings before decoding (to save them,
            so a failed decode can be redone with `decode_saved`).
        resume: the final latents `(B, C, F', h, w)` and settings an earlier run of this same request saved
            (`load_latents`) and stopped before writing its videos: they are decoded instead of sampling again. One
            KinemaError line, before any denoising, when they are another run's (their settings differ).
    """
    if not isinstance(family, VideoFamily):
        raise KinemaError(f"generate takes a loaded model (kinema.pipelines.load_family(...)), got "
                          f"{value_words(family)}")
    if not isinstance(request, GenerationRequest):
        raise KinemaError(f"generate takes a GenerationRequest(prompt=..., ...), got {value_words(request)}")
    if callback is not None and not callable(callback):
        raise KinemaError(f"callback must be a function of (step, timestep, latents), got {value_words(callback)}")
    if output not in OUTPUT_TYPES:
        raise KinemaError(f"unknown output {output!r}; known outputs: {', '.join(OUTPUT_TYPES)}")
    began = time.perf_counter()
    # Fields left None take the model's kinema.json defaults (a bundled model's 64x64), else the library's; the
    # filled request is what the video's settings record, and what is checked.
    request = request.with_defaults(family.defaults)
    if family.controlnet is not None and family.controlnet.pools_globally and not request.guess_mode:
        request = replace(request, guess_mode=True)  # diffusers' rule; recorded as what ran
    if request.offload and _offload_target(family) is None:  # recorded as what ran: no offload
        logger.warning("offload: no accelerator here, so the models stay where they are")
        request = replace(request, offload=False)
    request.check()
    mode = request.mode
    if isinstance(request.prompt, str) and not isinstance(request.ip_image, Mapping) and (
            request.prompt_hold or request.prompt_loop or request.interpolation != "linear"):
        logger.warning("prompt_hold, prompt_loop and interpolation blend a prompt or image prompt schedule, and this "
                       "video has neither: they change nothing")
    # Hashed as they are read, so the report names the inputs this run made its video from, and a resume can
    # tell inputs changed since its latents were saved.
    inputs = input_digests(request)
    # Inputs are read and sized before any model runs, so a bad file fails fast.
    input_video = None
    if mode in ("video-to-video", "extend"):
        input_video = _video_tensor(request.video, request.height, request.width, request.resize)
        request = replace(request, height=input_video.shape[-2], width=input_video.shape[-1])
        # The settings record the frames made: the input's remade frame for frame, or it and those appended.
        request = replace(request, frames=input_video.shape[0] + (request.extend_frames or 0))
    plan = _plan(family, request)
    if output == "latent" and plan.continuation:
        raise KinemaError("a video made in segments (a continuation) is decoded segment by segment and has no "
                          "latents of the whole video, so output='latent' cannot be given; ask for 'tensor', 'numpy' "
                          "or 'pil'")
    seeds = [int(s) for s in request.seeds]
    device = _device(family, request.offload)
    if input_video is not None:
        if mode == "video-to-video":
            plan = replace(plan, frames=input_video.shape[0], latent_frames=family.latent_frames(input_video.shape[0]))
            if plan.frames > family.max_frames and plan.context is None:
                plan.context = _context_options(family, request, plan.latent_frames)
        else:
            check_video_holds_overlap(input_video.shape[0], request.overlap_frames or 0)  # filled by with_defaults
    remake = None
    if request.mask is not None:  # read (and sized) once, here, before any model runs
        assert input_video is not None  # request.check(): a mask comes with video-to-video
        remake = _mask_tensor(request.mask, input_video.shape[0], input_video.shape[2], input_video.shape[3],
                              request.resize)
    images = None
    if mode == "image-to-video":  # read (and sized) once, here, before any model runs
        images = (image_tensor(request.image, plan.height, plan.width, request.resize, "the start image"),
                  None if request.end_image is None else
                  image_tensor(request.end_image, plan.height, plan.width, request.resize, "the end image"))
    control_images = None
    if request.control_video is not None:  # read (and sized) once, here, before any model runs
        from kinema.pipelines.request import control_places

        videos = _control_videos(family, request.control_video)
        from kinema.pipelines.control_maps import preprocessors_for

        preprocessors = preprocessors_for(request.control_preprocess, len(videos))
        control_images = [_control_images(video, plan.height, plan.width, request.resize, request.normalize_control,
                                          preprocess) for video, preprocess in zip(videos, preprocessors, strict=True)]
        for each in control_images:
            control_places(each.shape[0], input_video.shape[0] if input_video is not None else plan.frames,
                           request.control_indices)
    if plan.context is None and not plan.continuation:
        from kinema.models.motion import check_frame_count

        check_frame_count(plan.latent_frames, family.model.max_frames,
                          unit="frames" if plan.frames == plan.latent_frames else "latent frames")

    if mode == "extend":
        assert input_video is not None and request.extend_frames is not None  # read above; filled by with_defaults
        made = input_video.shape[0] + request.extend_frames
    else:
        made = input_video.shape[0] if input_video is not None else int(request.frames or plan.frames)
    check_frames_fit(len(seeds), made, plan.height, plan.width, "ask for fewer frames (generate --frames, extend "
                     "--frames / --to), a smaller size or fewer seeds")
    set_vae_options(family, vae_tiling=request.vae_tiling, decode_chunk=request.decode_chunk)
    if output != "latent" and not request.offload:  # a continuation is refused output="latent" above
        # Offloaded to an accelerator (offload stays on only where there is one, above), the weights still sit
        # there now and leave it stage by stage: not counted.
        _check_decode_fits(family, 1, made, plan.height, plan.width, request.dtype)  # one video at a time
    _warn_prompts(family, request, made)
    if mode != "video-to-video" and resume is None:
        _warn_late_start(family, request, plan)
    check_image_keyframes(request.ip_image, made, "make more frames" if input_video is None
                          else "append more frames" if mode == "extend" else "give a longer input video")

    if request.free_init is not None and (mode == "video-to-video" or (
            mode in ("image-to-video", "extend") and not (family.inpaints or family.animates_image))):
        # These clips start from given frames (`_Clip.clean`: the input's, or repaint's held ones), and FreeInit
        # re-noises from pure noise; said once here rather than per continuation segment.
        logger.warning("FreeInit is off: sampling starts from given frames (video-to-video, or the held frames of "
                       "a model without inpaint channels), not from noise")

    # One entry per video: its own seed (a seed alone remakes that video: each is made alone), the batch's dropped.
    # int8 and torch.compile stay on a family once an earlier request turned them on: recorded as what runs, so the
    # settings remake the video.
    # So is a family loaded in another dtype than float32 (load_family(dtype=), or an earlier request's).
    loaded_in = str(next(family.model.parameters()).dtype).removeprefix("torch.")
    kept = {"quantize": request.quantize or ("int8" if _quantized(family.model) else None),
            "compile": request.compile or _compiled(family.model),
            "dtype": request.dtype or (loaded_in if loaded_in in DTYPES and loaded_in != "float32" else None)}
    settings = [{**{k: v for k, v in request.settings().items() if k != "seeds"}, **kept, **family.settings(),
                 "seed": seed, "scheduler": plan.scheduler} for seed in seeds]
    if resume is not None and plan.continuation:
        raise KinemaError("a continuation is decoded segment by segment and saves no final latents, so there is "
                          "nothing to resume it from; run it without resume")
    if resume is not None:
        _check_resumed(resume, settings, inputs, (len(seeds), family.latent_channels, plan.latent_frames,
                                          plan.height // family.spatial_factor, plan.width // family.spatial_factor))
    reset_peak_memory(device)
    segments = 0
    windows = None
    # Each video is made alone, a batch of one: a batch of several sums in other orders (GEMM blocking), which moved a
    # seed's video by up to 9/255 from the one its own settings remake.
    with _precision_and_memory(family, request):
        if plan.continuation:
            made_videos = []
            for seed in seeds:
                if mode == "text-to-video":
                    first = _generate_clip(family, replace(request, frames=plan.frames), plan, [seed], callback,
                                           progress, span=_Span(0, made))
                    with torch.no_grad():
                        start = family.decode(first).cpu()
                else:
                    assert input_video is not None
                    start = input_video[None]
                with torch.no_grad():
                    made_videos.append(_extend(family, request, plan, start, made, [seed], callback, progress))
            frames = torch.cat([video for video, _, _ in made_videos])
            latents = torch.cat([last for _, last, _ in made_videos])
            segments = made_videos[0][2] + (1 if mode == "text-to-video" else 0)
        else:
            if resume is not None:
                logger.info("resumed: the saved final latents of this run are decoded, not sampled again")
                latents = resume[0].to(device)
            else:
                encoded = None
                if input_video is not None:  # video-to-video: the input's latents, the same for every seed
                    with torch.no_grad():
                        encoded = family.encode_frames(input_video[None].to(device))
                latents = torch.cat([_sample_clip(family, request, plan, [seed], callback, progress, input_video,
                                                  encoded, remake, images, control_images) for seed in seeds])
            if plan.context is not None:
                from kinema.sampling.context import context_windows

                windows = len(context_windows(plan.latent_frames, plan.context))
            if on_latents is not None and resume is None:
                on_latents(latents, [{**entry, "report": {"inputs": inputs}} for entry in settings])
            frames = None
            if output != "latent":
                with torch.no_grad():
                    frames = torch.cat([family.decode(latents[video:video + 1]).cpu() for video in range(len(seeds))])
                if remake is not None:
                    assert input_video is not None  # a mask comes with video-to-video
                    frames = _composite(frames, input_video, remake, request.mask_blur)
    dtype = str(next(family.model.parameters()).dtype).removeprefix("torch.")
    vae_dtype = str(next(family.vae.parameters()).dtype).removeprefix("torch.")
    report = {"mode": mode, "family": family.family, "device": str(device), "dtype": dtype,
              "vae_dtype": vae_dtype,  # float32 after a float16 VAE overflowed (kinema.pipelines.decode)
              "int8": _quantized(family.model),
              "compiled": _compiled(family.model),
              "seconds": round(time.perf_counter() - began, 3),
              "peak_memory_bytes": peak_memory_bytes(device), "frames": None if frames is None else frames.shape[1],
              "latent_frames": int(latents.shape[2]), "scheduler": plan.scheduler, "windows": windows,
              "segments": segments or None, "resumed": resume is not None,
              "inputs": inputs}  # so a job replaying these settings can tell a changed input
    logger.info("generated %s: %s", mode, report)
    for entry in settings:
        entry["report"] = report
    return GenerationResult(None if frames is None else _as_output(frames, output), latents, settings, report)


def _sample_clip(family: VideoFamily, request: GenerationRequest, plan: _Plan, seeds: Sequence[int],
                 callback: StepCallback | None, progress: bool, input_video: torch.Tensor | None,
                 encoded: torch.Tensor | None, remake: torch.Tensor | None,
                 images: tuple[torch.Tensor, torch.Tensor | None] | None,
                 control_images: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """The final latents `(B, C, F', h, w)` of a clip that is no continuation: video-to-video from `input_video`
    `(F, 3, H, W)` and its latents `encoded` `(1, C, F', h, w)` (inpainting where `remake` marks it), else text- or
    image-to-video."""
    if request.mode != "video-to-video":
        return _generate_clip(family, request, plan, seeds, callback, progress, images, control_images)
    assert input_video is not None and encoded is not None
    device = _device(family, request.offload)
    noise = _noise(family, plan, request, seeds, device)
    clean = encoded.expand(len(seeds), -1, -1, -1, -1).to(noise, copy=True)  # this clip's own, as sampling changes
    clip = replace(_text_to_video_clip(family, noise, plan) if remake is None else _masked_clip(
        family, noise, input_video[None].expand(len(seeds), -1, -1, -1, -1).to(device), remake, clean),
        clean=clean, strength=request.strength)
    with torch.no_grad():
        text = _with_control(family, request, _encode_text(family, request, len(seeds), plan.latent_frames,
                                                           plan.frames), control_images, plan.frames, len(seeds))
    return _denoise(family, request, plan, text, clip, seeds, callback, progress)


# Settings that change how latents are decoded, not the latents: a resumed run may take others than its first.
DECODE_SETTINGS = ("vae_tiling", "decode_chunk", "offload")


class NotThisRun(KinemaError):
    """Saved latents given to resume a run are another run's."""


def _check_resumed(resume: tuple[torch.Tensor, Sequence[dict[str, Any]]], settings: Sequence[dict[str, Any]],
                   inputs: Mapping[str, str], shape: tuple[int, ...]) -> None:
    """One KinemaError line unless the saved latents and settings of `resume` are this run's: the same settings,
    as JSON stores them, the same input files (`inputs`, their digests, against those saved with the latents) and
    latents of the run's `shape`."""
    from kinema.pipelines.outputs import differing_settings

    latents, saved = resume
    if len(saved) != len(settings):
        raise NotThisRun(f"the saved latents hold {len(saved)} videos and this run makes {len(settings)}, so they are "
                         "another run's")
    # How the latents are decoded may change (the usual fix for a run stopped by running out of memory there).
    differ = [key for key in differing_settings(settings, saved) if key not in DECODE_SETTINGS]
    if differ:
        raise NotThisRun(f"the saved latents are another run's: their settings differ in {', '.join(differ)}")
    changed = changed_since_saved(inputs, saved)
    if changed:
        raise NotThisRun(f"the saved latents were made from another {changed[0]}: the file changed since they were "
                         "saved")
    if not torch.isfinite(latents).all():
        raise NotThisRun("the saved latents hold NaN or infinity: the file is damaged")
    if tuple(latents.shape) != shape:
        raise NotThisRun(f"the saved latents are {tuple(latents.shape)} where this run makes {shape}: the file was "
                          "changed after kinema saved it")


def _generate_clip(family: VideoFamily, request: GenerationRequest, plan: _Plan, seeds: Sequence[int],
                   callback: StepCallback | None, progress: bool,
                   images: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                   control_images: Sequence[torch.Tensor] | None = None, span: _Span | None = None) -> torch.Tensor:
    """Latents of a clip of `plan.frames` frames: text-to-video, or image-to-video holding `images` (start, end);
    steered by the control images `(K, 3, H, W)` of each ControlNet when given; `span`: the clip opens a longer
    video, over which the schedules run."""
    device = _device(family, request.offload)
    noise = _noise(family, plan, request, seeds, device)
    with torch.no_grad():
        text = _with_control(family, request, _encode_text(family, request, len(seeds), plan.latent_frames,
                                                           plan.frames, span), control_images, plan.frames,
                             len(seeds))
        if text.table is not None:
            logger.info("prompt schedule:\n%s", text.table)
        clip = _image_clip(family, noise, *images, pia_motion=request.pia_motion) if images is not None else \
            _text_to_video_clip(family, noise, plan)
    return _denoise(family, request, plan, text, clip, seeds, callback, progress)
