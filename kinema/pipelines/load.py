"""A model for generation from paths: `load_family` tells what `model` is and returns that family's parts.

An EasyAnimate V3 folder becomes an `EasyAnimateFamily`; a Stable Diffusion 1.5 folder or single file becomes an
`AnimateDiffFamily` once a motion module inflates its UNet. Every path, weight and kind is checked before any
weights are read (headers only), so a typo fails in a second rather than after the base model has loaded.

`model` may also be a bundled model's name (kinema.bundled: "kinema-tiny", "kinema-tiny-ad"). A model folder's
kinema.json may name its text encoder (kinema.loaders.text_encoder) and declare its world ("synth": prompts outside
the synthetic dataset's coloured shapes get one warning); an AnimateDiff folder with kinema.json may hold its own
motion module as `motion_module.safetensors`, used when no motion module is given, and name its motion modules'
settings in "motion" (`model_motion_settings`): what training builds fresh modules with and what loading a module
that does not store them (original or diffusers layout) inflates the UNet with.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kinema.bundled import folder_motion_module
from kinema.errors import KinemaError, naming, shorten
from kinema.pipelines.family import VideoFamily
from kinema.pipelines.request import DTYPES, check_lora_weight

logger = logging.getLogger(__name__)

_MODEL_KINDS = "a Stable Diffusion 1.5 folder or single file (with a motion module) or an EasyAnimate V3 folder"
# The kinema.json entry naming an AnimateDiff folder's motion-module settings (kinema.loaders.animatediff.settings'
# named settings, all of them), e.g. kinema-tiny-ad's 4 heads, which no original-layout file records.
MOTION_SETTINGS_ENTRY = "motion"


def _existing(path: str | os.PathLike, what: str) -> Path:
    """`path` made absolute, as the settings record it (so they remake the video from any folder), once it exists."""
    found = Path(path)
    if not found.exists():
        raise KinemaError(f"{what} {found} does not exist: check the path")
    return Path(os.path.abspath(found))


def _checked_loras(loras: Sequence[tuple[str | os.PathLike, float]]) -> list[tuple[Path, float]]:
    checked: list[tuple[Path, float]] = []
    for entry in loras:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise KinemaError(f"each LoRA is a (path, weight) pair; got {entry!r}")
        path, weight = entry
        weight = check_lora_weight(weight, f"the LoRA weight for {path}")
        checked.append((_existing(path, "LoRA"), weight))
    return checked


def _describe(path: Path, **options: Any) -> tuple[Any, dict[str, Any]]:
    """`path`'s `Source` (what describe read, kept so the load reads nothing twice) and its describe report."""
    from kinema.loaders.source import Source, describe_source

    source = Source(path, options)
    return source, describe_source(source)


def _not_the_kind(path: Path, wanted: str, kind: str, give: str) -> KinemaError:
    """The one refusal of a file given as `wanted` that the format registry describes as another `kind`."""
    from kinema.loaders.formats import format_of

    return KinemaError(f"{path} is not {wanted} (it is: {format_of(kind).label}): give {give}")


def _load_described(source: Any, kind: str, **options: Any) -> Any:
    """What `kinema.load` does once a path is described: the kind's loader, on the same `Source`."""
    from kinema.loaders.formats import format_of

    return format_of(kind).function("load")(source, **options)


def _lora_kind(path: Path) -> tuple[Any, str, dict[str, Any]]:
    """`(source, kind, report)` for a LoRA file, by the format registry (`report`: its describe report): "motion"
    for a motion LoRA; "spatial" for an image LoRA; "both" for an image LoRA with a motion LoRA beside it in one
    file (kinema's `lora.targets: all` export, diffusers' save of such a LoRA), whose two parts are applied as each
    kind is. A malformed LoRA gets its describer's error; anything else is refused as not a LoRA."""
    from kinema.loaders.source import Source, describe_source

    source = Source(path)
    try:
        report = describe_source(source)
    except KinemaError as err:
        if source.holds_image_lora or source.holds_motion_weights:
            raise  # a LoRA (or motion module) that is broken: its describer says how
        found = str(err).removeprefix(f"{path}: ")
    else:
        if report["kind"] == "motion_lora":
            return source, "motion", report
        if report["kind"] == "image_lora":
            return source, "both" if report["motion_lora_too"] else "spatial", report
        found = f"it is a {report['kind']}"
    raise KinemaError(f"{path} is not a LoRA ({found}); --lora takes motion LoRAs and SD1.5 image LoRAs")


def _check_motion_lora_fits(lora: Path, report: dict[str, Any], motion: Path, motion_report: dict[str, Any]
                            ) -> None:
    """One KinemaError line when the motion LoRA `lora` has layers for a mid block the motion module `motion`
    lacks, from both describe reports: said before any weights load, naming the LoRA. (Widths are left to the
    load's layer-by-layer check: a report's LoRA widths are its distinct input widths, a text attention's among
    them, and the module's one per level.)"""
    if report.get("mid_block") and not motion_report.get("mid_block"):
        raise KinemaError(f"the motion LoRA {lora} has layers for the motion modules' mid block, which "
                          f"{motion} ({motion_report.get('version', 'its version')}) has none of: AnimateDiff's "
                          "MotionLoRAs (pan, zoom, tilt, roll) are made for v2 modules, so use one such as "
                          "mm_sd_v15_v2.ckpt, or a LoRA made for this motion module")


def unet_config_of(model: Path, config: str | os.PathLike | None = None, part: str = "unet") -> dict[str, Any]:
    """The SD UNet's config (or another `part`'s: "vae"): the folder's, or the single-file configs; no weights
    read."""
    from kinema.fileio import read_json_object
    from kinema.loaders.stable_diffusion import SD15_CONFIGS

    folder = model if model.is_dir() else Path(config) if config is not None else SD15_CONFIGS
    return read_json_object(folder / part / "config.json", f"the {'UNet' if part == 'unet' else part.upper()}'s config")


def _checked_setting(where: Path, name: str, value: Any) -> None:
    from kinema.models.motion import NORM_MODES

    if name == "mid_block":
        ok, wanted = isinstance(value, bool), "true or false"
    elif name in ("norm_mode", "resnet_norm_mode"):
        ok, wanted = value in NORM_MODES, " or ".join(repr(mode) for mode in NORM_MODES)
    elif name == "attention_kinds":
        ok = isinstance(value, list) and bool(value) and all(kind in ("temporal", "text") for kind in value)
        wanted = 'a list of "temporal" and "text" attentions, e.g. ["temporal", "text", "temporal"]'
    elif name == "cross_attention_dim":
        ok = value is None or isinstance(value, int) and not isinstance(value, bool) and value > 0
        wanted = "null or the prompt tokens' width (a positive whole number)"
    else:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive whole number"
    if not ok:
        raise KinemaError(f"{where}: motion setting {name} must be {wanted}, got {value!r}")


def model_motion_settings(model_folder: str | os.PathLike) -> dict[str, Any] | None:
    """The `VideoUNet` keyword arguments of the motion modules a model folder's kinema.json names in "motion", or
    None when it names none (a published SD folder: training and loading use AnimateDiff's version presets).

    The entry holds every named setting of kinema.loaders.animatediff.settings, e.g. kinema-tiny-ad's
    `{"max_frames": 32, "mid_block": false, "transformer_blocks": 1, "num_attention_heads": 4, "norm_num_groups": 32,
    "norm_mode": "per_frame", "resnet_norm_mode": "per_frame"}`: training's fresh modules are built from it and a
    motion module that does not store its settings is loaded with it, so the two agree. One KinemaError line for an
    entry that is not such an object.
    """
    from kinema.bundled import MODEL_INFO, read_model_info
    from kinema.loaders.animatediff.settings import SETTING_DEFAULTS, SETTING_PLACES, with_settings

    named = read_model_info(model_folder).get(MOTION_SETTINGS_ENTRY)
    if named is None:
        return None
    where = Path(model_folder) / MODEL_INFO
    if not isinstance(named, dict):
        raise KinemaError(f"{where}: \"{MOTION_SETTINGS_ENTRY}\" must be an object of motion-module settings "
                          f"({', '.join(SETTING_PLACES)}), got {type(named).__name__}")
    unknown = sorted(set(named) - set(SETTING_PLACES))
    missing = [name for name in SETTING_PLACES if name not in named and name not in SETTING_DEFAULTS]
    if unknown or missing:
        required = [name for name in SETTING_PLACES if name not in SETTING_DEFAULTS]
        raise KinemaError(f"{where}: \"{MOTION_SETTINGS_ENTRY}\" needs exactly the settings {', '.join(required)}, "
                          f"and may hold {', '.join(SETTING_DEFAULTS)}"
                          + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                          + (f"; missing: {', '.join(missing)}" if missing else ""))
    for name, value in named.items():
        _checked_setting(where, name, value)
    return with_settings({"motion_module": {"type": "temporal"}}, **named)


def _folder_motion_overrides(path: Path, motion_path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The settings to load `motion_path` with into the folder `path`'s UNet: those its kinema.json names, for a
    file that does not store them (a kinema-layout file keeps its own in its metadata); {} without the entry. The
    weights fix the mid block and the file's frame tables their length: a module that disagrees was made for
    another model, and is refused."""
    from kinema.loaders.animatediff.settings import OVERRIDABLE, SETTING_DEFAULTS, named_settings

    settings = model_motion_settings(path) if path.is_dir() else None
    if settings is None or report["format"] == "kinema":
        return {}
    named = {**SETTING_DEFAULTS, **named_settings(settings)}
    fixed = {"mid_block": report["mid_block"], **{name: report.get(name, default)
                                                  for name, default in SETTING_DEFAULTS.items()}}
    if report["max_frames_source"] == "file":
        fixed["max_frames"] = report["max_frames"]
    for name, found in fixed.items():
        if named[name] != found:
            raise KinemaError(f"{motion_path} has {name}={found!r} but {path}'s kinema.json names {name}="
                              f"{named[name]!r}: use a motion module made for this model")
    return {name: named[name] for name in OVERRIDABLE}


def _adapter_name(path: Path, taken: set[str]) -> str:
    """A peft adapter name from the file's name, unique among the motion LoRAs loaded."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "motion_lora"
    name, number = stem, 1
    while name in taken:
        number += 1
        name = f"{stem}_{number}"
    taken.add(name)
    return name


def load_family(
    model: str | os.PathLike,
    *,
    motion_module: str | os.PathLike | None = None,
    loras: Sequence[tuple[str | os.PathLike, float]] = (),
    dtype: str = "float32",
    device: Any = "auto",
    tokenizer: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    ip_adapter: tuple[str | os.PathLike, float] | None = None,
    image_encoder: str | os.PathLike | None = None,
    controlnet: tuple[str | os.PathLike, float] | Sequence[tuple[str | os.PathLike, float]] | None = None,
    vae: str | os.PathLike | None = None,
) -> VideoFamily:
    """Load `model` for generation as its family's parts (`AnimateDiffFamily` or `EasyAnimateFamily`).

    Args:
        model: an EasyAnimate V3 folder (transformer/, vae/, text_encoder/, tokenizer/[, image_encoder/]; or
            transformer/, vae/ and a kinema.json naming the text encoder), a Stable Diffusion 1.5 diffusers folder or
            single `.safetensors`/`.ckpt` file, or a bundled model's name (`kinema.bundled.available_models()`).
        motion_module: for SD models (required there, unless the folder has kinema.json and its own
            `motion_module.safetensors`): an AnimateDiff motion module file or MotionAdapter folder; it inflates the
            UNet into a `VideoUNet` taking latents `(B, 4, F, h, w)`.
        loras: SD models only: `(path, weight)` pairs, applied in order. Motion LoRAs (told apart by the format
            registry's motion-LoRA describer, as `kinema.describe` tells them) are applied to the motion modules at
            strength `weight`; any other file of LoRA matrices is an image LoRA, fused into the UNet and text
            encoder at scale `weight` before the UNet is inflated. Weights go from -100 to 100.
        dtype: "float32", "bfloat16" or "float16" (or the torch dtype) for every model (the text encoders too). SD
            parts are loaded and LoRAs fused in float32, then cast.
        device: where the models go: a torch device, or a kinema.devices name: auto (the first CUDA GPU when torch
            sees one, else the CPU), cpu, cuda, cuda:N or mps.
        tokenizer: SD single files only (they hold none): an SD1.5 diffusers folder or a CLIP tokenizer folder.
        config: SD single files only: a folder of component configs (default: the shipped SD1.5 ones).
        ip_adapter: SD models only: `(path, scale)` of an IP-Adapter file (kinema.loaders.ip_adapter), whose image
            prompt then conditions every run (`GenerationRequest.ip_image`).
        image_encoder: the IP-Adapter's CLIP image encoder folder (default: `image_encoder/` beside its file).
        controlnet: SD models only: `(path, scale)` of a ControlNet folder or file or of AnimateDiff's SparseCtrl
            (kinema.loaders.controlnet), whose control images then steer every run
            (`GenerationRequest.control_video`); or a list of such pairs, ControlNets that steer together (each with
            its own control video).
        vae: SD models only: another VAE for the model's own (kinema.loaders.image_vae): an SD1.x VAE file in the
            original or diffusers layout (e.g. vae-ft-mse-840000-ema-pruned.safetensors) or an AutoencoderKL folder,
            checked to share the model's latent space before any weights load.

    Raises one KinemaError line, before any weights are read (beyond a torch pickle's, which must be unpickled to
    see its names), for a missing path that is not a bundled model's name either (listing those), an unknown dtype,
    a device this machine lacks, a LoRA weight out of range, a model that is neither family, an SD model without
    motion module, a motion module or LoRA given with an EasyAnimate model, a file given as motion module or LoRA
    that is not one, or a motion module made for another UNet.
    """
    import torch

    if isinstance(dtype, torch.dtype):  # torch.float16, as kinema.load takes it
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise KinemaError(f"unknown dtype {dtype!r}; known dtypes: {', '.join(DTYPES)}")
    from kinema.bundled import check_model_name

    check_model_name(model)  # before the message below makes a Path of it
    if not isinstance(device, torch.device):  # a name this machine lacks: one line before any weights load
        from kinema.devices import resolve_device

        device = resolve_device(device)
    from kinema.bundled import (
        is_bundled_name,
        model_defaults,
        model_prediction_type,
        model_world,
        resolve_model,
    )

    torch_dtype = getattr(torch, dtype)
    model_path = resolve_model(model, f"model {Path(model)} does not exist: check the path")
    # Settings record a bundled model by its name (the same on every install).
    recorded = str(model) if is_bundled_name(model) else os.path.abspath(model_path)
    world = model_world(model_path)
    prediction_type = model_prediction_type(model_path)
    if motion_module is None:
        motion_module = folder_motion_module(model_path)
    motion_path = None if motion_module is None else _existing(motion_module, "motion module")
    checked_loras = _checked_loras(loras)
    if tokenizer is not None:
        _existing(tokenizer, "tokenizer")
    image_prompt = None if ip_adapter is None else _image_prompt_files(ip_adapter, image_encoder)
    control = None if controlnet is None else _control_files(controlnet)
    vae_path = None if vae is None else _existing(vae, "VAE")
    source, report = _describe(model_path, **({} if config is None else {"config": config}))
    kind = report["kind"]
    logger.info("%s: %s (%s)", model_path, kind, report.get("format", "kinema"))

    from kinema.pipelines.text_encoding import PromptWorld

    named = _Named(recorded, None if world is None else PromptWorld(world), vae_path)
    if kind == "easyanimate_transformer":
        family = _easyanimate(source, model_path, torch_dtype, device, motion_path, checked_loras, tokenizer, config,
                              named, image_prompt, control)
    elif kind == "stable_diffusion":
        family = _animatediff(source, model_path, torch_dtype, device, motion_path, checked_loras, tokenizer, config,
                              named, image_prompt, control)
    else:
        raise _not_the_kind(model_path, "a model to generate with", kind, _MODEL_KINDS)
    family.prediction_type = prediction_type
    family.defaults = model_defaults(model_path) if model_path.is_dir() else {}
    return family


@dataclass
class _ImagePromptFiles:
    """An IP-Adapter file (the `Source` its describe read, which the load reads through) at its scale, and its image
    encoder's folder, checked to exist before any weights load."""

    adapter: Any  # kinema.loaders.source.Source
    scale: float
    encoder: Path


def _image_prompt_files(ip_adapter: tuple[str | os.PathLike, float], encoder: str | os.PathLike | None
                        ) -> _ImagePromptFiles:
    from kinema.loaders.ip_adapter import check_ip_adapter_scale, image_encoder_folder

    if not (isinstance(ip_adapter, (tuple, list)) and len(ip_adapter) == 2):
        raise KinemaError(f"ip_adapter is a (path, scale) pair, e.g. (\"ip-adapter_sd15.safetensors\", 1.0); got "
                          f"{ip_adapter!r}")
    path, scale = ip_adapter
    adapter = _existing(path, "IP-Adapter")
    source, report = _describe(adapter)  # headers only: another kind of file is named before any weights load
    if report["kind"] != "ip_adapter":
        raise _not_the_kind(adapter, "an IP-Adapter", report["kind"], "h94/IP-Adapter's ip-adapter_sd15.safetensors "
                            "or its plus or full-face variant")
    return _ImagePromptFiles(source, check_ip_adapter_scale(scale), image_encoder_folder(adapter, encoder))


def _vae_source(path: Path, model_vae_config: dict[str, Any]) -> Any:
    """The described `Source` of another VAE for a model whose own VAE has `model_vae_config`: names and shapes
    checked against that VAE, and a folder's latent space against the model's, before any weights load."""
    from kinema.loaders.image_vae import other_vae_problem
    from kinema.loaders.source import Source, describe_source

    source = Source(path, {"vae_config": model_vae_config})  # one Source: a torch pickle is unpickled once
    problem = other_vae_problem(source)  # names only
    if problem is not None:
        raise KinemaError(f"{path} is not a Stable Diffusion image VAE: {problem}; give an SD1.5 VAE file (e.g. "
                          "vae-ft-mse-840000-ema-pruned.safetensors) or an AutoencoderKL folder")
    report = describe_source(source)
    if report["kind"] != "image_vae":
        raise _not_the_kind(path, "a VAE", report["kind"], "an SD1.5 VAE file (e.g. "
                            "vae-ft-mse-840000-ema-pruned.safetensors) or an AutoencoderKL folder (its config.json "
                            "and weights; of an SD folder, its vae/)")
    return source


def _control_files(controlnet: Any) -> list[tuple[Path, float]]:
    """Each ControlNet's path, checked to exist, and its scale, checked: `(path, scale)` or a list of such pairs
    (several steer together). Their weights are checked against the base UNet once that is known
    (`_animatediff`)."""
    from kinema.loaders.controlnet import check_controlnet_scale

    pairs = controlnet if isinstance(controlnet, list) else [controlnet]
    checked = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise KinemaError(f"controlnet is a (path, scale) pair, or a list of them; got {pair!r}")
        path, scale = pair
        checked.append((_existing(path, "ControlNet"), check_controlnet_scale(scale)))
    if not checked:
        raise KinemaError("controlnet is an empty list; give a (path, scale) pair, or leave it out")
    return checked


@dataclass
class _Named:
    """What the family records and checks besides its parts: the model as the settings name it (a bundled model's
    name, else its path) and the prompt world its kinema.json declares."""

    source: str
    world: Any
    vae: Path | None = None  # another VAE for an SD model's own


def _easyanimate(source: Any, path: Path, dtype: Any, device: Any, motion_path: Path | None,
                 loras: list[tuple[Path, float]], tokenizer: Any, config: Any, named: _Named,
                 image_prompt: _ImagePromptFiles | None = None,
                 control: list[tuple[Path, float]] | None = None) -> VideoFamily:
    from kinema.loaders.easyanimate.folder import MODEL_PARTS, is_model_folder
    from kinema.pipelines.jobs import check_easyanimate_extras

    check_easyanimate_extras(path, motion_module=motion_path, loras=loras, tokenizer=tokenizer, config=config,
                             ip_adapter=image_prompt, controlnet=control, vae=named.vae)
    if not is_model_folder(path):
        raise KinemaError(f"{path} is an EasyAnimate transformer alone; generation needs the whole V3 folder "
                          f"({', '.join(part + '/' for part in MODEL_PARTS)})")
    from kinema.pipelines.easyanimate import EasyAnimateFamily

    family = EasyAnimateFamily.from_model(_load_described(source, "easyanimate_transformer", dtype=dtype,
                                                          device=device), source=named.source, world=named.world)
    logger.info("loaded EasyAnimate model %s (%s)", path, str(dtype).removeprefix("torch."))
    return family


def _animatediff(source: Any, path: Path, dtype: Any, device: Any, motion_path: Path | None,
                 loras: list[tuple[Path, float]], tokenizer: Any, config: Any, named: _Named,
                 image_prompt: _ImagePromptFiles | None = None,
                 control: list[tuple[Path, float]] | None = None) -> VideoFamily:
    import torch

    from kinema.loaders.source import MOTION_MODULE_NAME
    from kinema.models.precision import cast_module
    from kinema.pipelines.animatediff import AnimateDiffFamily

    if path.is_dir() and (tokenizer is not None or config is not None):
        from kinema.pipelines.jobs import diffusers_folder_tokenizer_error

        raise diffusers_folder_tokenizer_error(path)
    if motion_path is None:
        raise KinemaError(f"{path} is a Stable Diffusion 1.5 model; AnimateDiff needs a motion module: pass "
                          "--motion-module PATH (motion_module= in Python)")
    give = "an AnimateDiff motion module file (e.g. mm_sd_v15_v2.ckpt) or a MotionAdapter folder"
    try:
        motion_source, motion_report = _describe(motion_path)
    except KinemaError as err:
        from kinema.loaders.source import Source

        if motion_path.is_dir() or Source(motion_path).holds_motion_weights:
            raise  # a motion module that is broken: its describer says how
        # Something else whose describer refused it (a VAE of other widths): not what was asked for, first.
        reason = shorten(str(err).removeprefix(f"{motion_path}: "), 160)
        raise KinemaError(f"{motion_path} is not a motion module ({reason}); give {give}") from None
    if motion_report["kind"] != "motion_module":
        raise _not_the_kind(motion_path, "a motion module", motion_report["kind"], give)
    unet_config = unet_config_of(path, config)
    widths = tuple(unet_config.get("block_out_channels", ()))
    if tuple(motion_report["channels"]) != widths:
        raise KinemaError(f"{motion_path} is made for a UNet of widths {tuple(motion_report['channels'])}, but "
                          f"{path}'s UNet has widths {widths}: use a motion module made for this base model")
    overrides = _folder_motion_overrides(path, motion_path, motion_report)
    vae_source = None if named.vae is None else _vae_source(named.vae, unet_config_of(path, config, "vae"))
    control_sources = []  # kept, so the load reads nothing twice (a torch pickle is unpickled once)
    for control_path, _ in control or []:  # headers only, against this UNet's config: named before weights load
        control_source, control_report = _describe(control_path, unet_config=unet_config)
        control_kind = control_report["kind"]
        control_sources.append((control_source, control_kind))
        if control_kind not in ("controlnet", "sparsectrl"):
            raise _not_the_kind(control_path, "a ControlNet", control_kind, "an SD1.5 ControlNet folder or file, "
                                "e.g. lllyasviel's control_v11p_sd15_openpose, or AnimateDiff's SparseCtrl")
        if control_kind == "sparsectrl" and len(control or []) > 1:
            raise KinemaError(f"{control_path} is SparseCtrl, whose keyframes are its own: give it alone, not with "
                              "other ControlNets")
    kinds = []
    for lora_path, weight in loras:
        lora_source, lora_kind, lora_report = _lora_kind(lora_path)
        if lora_kind == "motion":  # from the headers, before any weights load, naming the file
            _check_motion_lora_fits(lora_path, lora_report, motion_path, motion_report)
        kinds.append((lora_path, weight, lora_source, lora_kind))

    # float32 first: LoRAs fuse and motion modules load at full precision, and the result is cast once.
    options: dict[str, Any] = {"dtype": torch.float32, "tokenizer": tokenizer}
    if config is not None:
        options["config"] = config
    components = _load_described(source, "stable_diffusion", **options)
    for lora_path, weight, lora_source, lora_kind in kinds:
        if lora_kind in ("spatial", "both"):  # into the 2D weights, which inflating copies
            _load_described(lora_source, "image_lora", sd=components, strength=weight)
            logger.info("fused image LoRA %s at %g", lora_path, weight)
    if vae_source is not None:
        components.vae = _load_described(vae_source, "image_vae", vae_config=dict(components.vae.config))
        logger.info("swapped in VAE %s", named.vae)
    video_unet = _load_described(motion_source, "motion_module", unet=components.unet, **overrides)
    logger.info("inflated the UNet with motion module %s (%s%s)", motion_path, motion_report.get("version"),
                ", settings from kinema.json" if overrides else "")
    taken: set[str] = set()
    for lora_path, weight, lora_source, lora_kind in kinds:
        if lora_kind == "motion":
            _load_described(lora_source, "motion_lora", video_unet=video_unet, strength=weight,
                            name=_adapter_name(lora_path, taken))
        elif lora_kind == "both":
            from kinema.loaders.animatediff.motion_lora import load_motion_lora

            motion_part = [key for key in lora_source.names if MOTION_MODULE_NAME in key]
            try:
                load_motion_lora(video_unet, lora_source.read(motion_part), _adapter_name(lora_path, taken), weight,
                                 metadata=lora_source.layout[1])
            except KinemaError as err:
                raise naming(lora_path, err) from None
        else:
            continue
        logger.info("applied motion LoRA %s at %g", lora_path, weight)

    ip_adapter = None
    if image_prompt is not None:
        from kinema.loaders.ip_adapter import load_ip_adapter

        ip_adapter = load_ip_adapter(video_unet, image_prompt.adapter, scale=image_prompt.scale,
                                     image_encoder=image_prompt.encoder)
    controlnet = None
    if control is not None:
        from kinema.models.controlnet import VideoMultiControlNet

        nets = [_load_described(control_source, kind, video_unet=video_unet, scale=scale)
                for (control_source, kind), (_, scale) in zip(control_sources, control, strict=True)]
        controlnet = nets[0] if len(nets) == 1 else VideoMultiControlNet(nets)
    parts = [video_unet.eval(), components.vae, components.text_encoder]
    parts += [] if ip_adapter is None else [ip_adapter.image_encoder]
    parts += [] if controlnet is None else [controlnet]
    for part in parts:
        cast_module(part, device=device, dtype=dtype)
    family = AnimateDiffFamily(video_unet, components.vae, components.text_encoder, components.tokenizer,
                               source=named.source, motion_module=str(motion_path),
                               loras=[(str(lora_path), weight) for lora_path, weight in loras], world=named.world,
                               ip_adapter=ip_adapter, controlnet=controlnet,
                               vae_source=None if named.vae is None else os.path.abspath(named.vae))
    logger.info("loaded AnimateDiff model %s with %s: %d LoRAs, %s on %s", path, motion_path, len(loras),
                str(dtype).removeprefix("torch."), device)
    return family
