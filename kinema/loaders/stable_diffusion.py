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
- Spatial LoRAs (kohya/civitai or diffusers format) go through diffusers' `load_lora_weights` and are fused into the
  weights, as AnimateDiff merges its DreamBooth LoRAs, so the 2D UNet stays a plain model to inflate.

Nothing here touches the network: every path is local and every diffusers/transformers call is `local_files_only`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from kinema.errors import KinemaError, shorten
from kinema.fileio import read_json_object
from kinema.loaders.checkpoint_io import check_weights_file, read_state_dict
from kinema.state_dicts import key_mismatch, shapes

SD15_CONFIGS = Path(__file__).parent / "configs" / "sd15"
# Key prefixes of the three networks inside an LDM single file; everything else there is training state (EMA copies,
# noise-schedule buffers, and the VAE's training loss `first_stage_model.loss.*`), listed in `ignored_keys`.
LDM_PREFIXES = {
    "unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer.",
}
LDM_TRAINING_ONLY = ("first_stage_model.loss.",)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model", (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
_TRANSFORMERS_WEIGHTS = (("model", (".safetensors", ".safetensors.index.json")),
                         ("pytorch_model", (".bin", ".bin.index.json")))


@dataclass
class StableDiffusionComponents:
    """The parts of an SD1.5 model. `unet` is 2D: inflate it with `VideoUNet.from_unet2d`."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin
    source: Path
    # Single file: entries of no component (EMA copies, noise-schedule buffers, the VAE's training loss).
    ignored_keys: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- diffusers folders


def _weights_variant(folder: Path, stems: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    """"" for plain weight files, "fp16" when only the fp16 variant is there, None when there are none."""
    for variant in ("", "fp16"):
        infix = f".{variant}" if variant else ""
        for stem, suffixes in stems:
            if any((folder / f"{stem}{infix}{suffix}").is_file() for suffix in suffixes):
                return variant
    return None


def _check_folder(root: Path) -> dict[str, str | None]:
    """Every component is present with its config and weights; returns the weights variant per model."""
    missing, variants = [], {}
    for name, stems in (("unet", (_DIFFUSERS_WEIGHTS,)), ("vae", (_DIFFUSERS_WEIGHTS,)),
                        ("text_encoder", _TRANSFORMERS_WEIGHTS)):
        if not (root / name / "config.json").is_file():
            missing.append(f"{name}/config.json")
        variant = _weights_variant(root / name, stems)
        if variant is None:
            missing.append(f"{name}/ weights ({stems[0][0]}.safetensors or .bin)")
        variants[name] = variant or None
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    if _tokenizer_files_missing(root / "tokenizer"):
        missing.append("tokenizer/ (vocab.json and merges.txt, or tokenizer.json)")
    if missing:
        raise KinemaError(f"{root} is not a complete diffusers Stable Diffusion folder: missing {', '.join(missing)}. "
                          "Download the whole model folder, or give a single .safetensors/.ckpt file instead")
    return variants


def _tokenizer_files_missing(folder: Path) -> bool:
    return not ((folder / "tokenizer.json").is_file() or
                ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()))


def _check_loading_info(info: Mapping[str, Any], what: str, root: Path) -> None:
    problems = {kind: list(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        found = "; ".join(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {keys[:3]})" for kind, keys in problems.items())
        raise KinemaError(f"{root / what}: weights do not fit its config: {found}")


def _load_scheduler(folder: Path) -> SchedulerMixin:
    path = folder / "scheduler_config.json"
    config = read_json_object(path, what="the scheduler's config")
    if "_class_name" not in config:
        raise KinemaError(f"{path} is not a diffusers scheduler config: that is a JSON object naming its class, e.g. "
                          '{"_class_name": "PNDMScheduler", ...}; copy scheduler/ from an SD1.5 diffusers folder')
    cls = getattr(diffusers, str(config["_class_name"]), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise KinemaError(f"{path}: {config['_class_name']!r} is not a diffusers scheduler class")
    return cls.from_config(config)


def load_tokenizer(path: str | os.PathLike) -> CLIPTokenizer:
    """A CLIP tokenizer from a diffusers SD folder (its `tokenizer/`) or from a tokenizer folder itself."""
    root = Path(path)
    folder = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    if _tokenizer_files_missing(folder):
        raise KinemaError(f"no CLIP tokenizer in {root}: expected vocab.json and merges.txt (or tokenizer.json) there "
                          "or in its tokenizer/ folder; an SD1.5 diffusers folder has one")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _load_folder(root: Path, dtype: torch.dtype) -> StableDiffusionComponents:
    variants = _check_folder(root)
    models = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        model, info = cls.from_pretrained(root, subfolder=name, local_files_only=True, variant=variants[name],
                                          torch_dtype=dtype, output_loading_info=True)
        _check_loading_info(info, name, root)
        models[name] = model.eval()
    return StableDiffusionComponents(**models, tokenizer=load_tokenizer(root),
                                     scheduler=_load_scheduler(root / "scheduler"), source=root)


# ---------------------------------------------------------------- single LDM files


def _strict_load(model: nn.Module, weights: dict[str, torch.Tensor], what: str, path: Path) -> None:
    own = model.state_dict()
    # Old files store buffers that transformers now rebuilds (CLIP's position_ids); those are not weights.
    non_persistent = {name for name, _ in model.named_buffers()} - set(own)
    found = key_mismatch(shapes(own), shapes(weights), ignore=non_persistent)
    if found:
        raise KinemaError(f"{path}: its {what} weights do not fit the Stable Diffusion 1.5 {what}: {found}. "
                          "Is this an SD1.5-architecture checkpoint (SD2, SDXL and inpainting models differ)?")
    model.load_state_dict({k: weights[k] for k in own}, strict=True)


def _unconverted(state: Mapping[str, torch.Tensor], prefix: str, converted: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys under `prefix` whose tensor the conversion did not carry over (it copies or views, never recomputes)."""
    taken = {tensor.data_ptr() for tensor in converted.values()}
    return [k for k, v in state.items()
            if k.startswith(prefix) and not k.startswith(LDM_TRAINING_ONLY) and v.data_ptr() not in taken]


def _build(cls: type, config_dir: Path, name: str) -> tuple[nn.Module, dict[str, Any]]:
    if cls is CLIPTextModel:
        config = CLIPTextConfig.from_pretrained(config_dir / name, local_files_only=True)
        return CLIPTextModel(config), config.to_dict()
    config = cls.load_config(config_dir / name, local_files_only=True)
    return cls.from_config(config), dict(config)


def _load_single_file(path: Path, tokenizer: str | os.PathLike | None, config_dir: Path,
                      dtype: torch.dtype) -> StableDiffusionComponents:
    if tokenizer is None:
        raise KinemaError(f"{path} is a single-file checkpoint, which holds no tokenizer: pass tokenizer= (CLI: "
                          "--tokenizer) an SD1.5 diffusers folder or a folder with the CLIP tokenizer's vocab.json and "
                          "merges.txt")
    missing_dirs = [name for name in ("unet", "vae", "text_encoder", "scheduler") if not (config_dir / name).is_dir()]
    if missing_dirs:
        raise KinemaError(f"config folder {config_dir} lacks {', '.join(f'{n}/' for n in missing_dirs)}")
    tok = load_tokenizer(tokenizer)
    state = read_state_dict(path)
    absent = [f"{name} ({prefix}*)" for name, prefix in LDM_PREFIXES.items()
              if not any(k.startswith(prefix) for k in state)]
    if absent:
        raise KinemaError(f"{path} has no {', '.join(absent)} weights: it is not a full Stable Diffusion checkpoint "
                          "(a LoRA, VAE or UNet-only file?); use a full SD1.5 file or a diffusers folder")
    kind = infer_diffusers_model_type(state)
    if kind != "v1":
        raise KinemaError(f"{path} looks like a {kind!r} checkpoint, not Stable Diffusion 1.x; AnimateDiff's SD1.5 "
                          "motion modules need an SD1.5-architecture base")
    models = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        model, config = _build(cls, config_dir, name)
        if name == "unet":
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
        _strict_load(model, weights, name, path)
        models[name] = model.to(dtype).eval()
    ignored = [k for k in state if not k.startswith(tuple(LDM_PREFIXES.values())) or k.startswith(LDM_TRAINING_ONLY)]
    return StableDiffusionComponents(**models, tokenizer=tok, scheduler=_load_scheduler(config_dir / "scheduler"),
                                     source=path, ignored_keys=ignored)


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
    root = Path(path)
    if root.is_dir():
        if tokenizer is not None or config is not None:
            raise KinemaError(f"{root} is a diffusers folder, which brings its own tokenizer and configs; "
                              "tokenizer= and config= are for single-file checkpoints")
        return _load_folder(root, dtype)
    if not root.is_file():
        raise KinemaError(f"no such model file or folder: {root}")
    check_weights_file(root)  # before the tokenizer and configs are read
    config_dir = Path(config) if config is not None else SD15_CONFIGS
    return _load_single_file(root, tokenizer, config_dir, dtype)


# ---------------------------------------------------------------- spatial LoRAs


def _lora_layer_names(component: nn.Module, adapter: str) -> set[str]:
    return {name for name, module in component.named_modules()
            if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {})}


def load_spatial_lora(
    components: StableDiffusionComponents,
    lora: str | os.PathLike | Mapping[str, torch.Tensor],
    scale: float = 1.0,
) -> dict[str, int]:
    """Fuse an image LoRA (kohya/civitai `lora_unet_*`/`lora_te_*`, or diffusers format) into the 2D UNet and text
    encoder, in place: `W += scale * alpha / r * up @ down` per layer, through diffusers' `load_lora_weights`.

    Call it before `VideoUNet.from_unet2d`. Returns how many layers it changed: `{"unet": n, "text_encoder": m}`.
    Raises `KinemaError` when diffusers cannot place every layer of the file.
    """
    state = dict(read_state_dict(lora) if isinstance(lora, (str, os.PathLike)) else lora)
    downs = sum(k.endswith((".lora_down.weight", ".lora_A.weight", ".down.weight")) for k in state)
    if not downs:
        raise KinemaError(f"no LoRA down matrices (`*.lora_down.weight` / `*.lora_A.weight`) among {len(state)} keys; "
                          "is this a LoRA file?")
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    adapter = "kinema_spatial"
    try:
        pipe.load_lora_weights(state, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as err:
        pipe.unload_lora_weights()
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
