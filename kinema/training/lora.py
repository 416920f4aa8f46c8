"""LoRA for `kinema train` mode `lora`: peft LoRA layers on a video model's attention projections, and their export.

`add_lora` wraps the to_q/to_k/to_v/to_out.0 Linears of a `VideoUNet` (AnimateDiff) or `VideoDiT` (EasyAnimate V3)
with peft LoRA layers under the adapter `TRAIN_ADAPTER`: those of the motion modules (`"motion"`), those of the image
model's transformer blocks (`"spatial"`: attn1/attn2 of SD's or PixArt's blocks) or both (`"all"`). Each wrapped
layer computes `W x + (alpha / r) * B A x`, with `A` `(r, C_in)`, `B` `(C_out, r)` and `B` zero at first, so the
model is unchanged until it trains; afterwards only the A/B weights train.

Two export formats (`save_lora`):
- `"diffusers"`: peft names in a diffusers pipeline's naming, the keys `lora_state_dict` gives, e.g.
  `unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora_A.weight` (a VideoUNet's layers as
  diffusers' `UNetMotionModel` names them under the pipeline's `unet.`) or
  `transformer.transformer_blocks.0.attn1.to_q.lora_A.weight` (a VideoDiT's V3 names under `transformer.`). The rank
  and alpha travel as diffusers' own `lora_adapter_metadata` (the LoraConfig arguments, as diffusers'
  `save_lora_weights` writes them), the one place `load_lora_weights` reads an alpha from a peft-named file: it
  refuses kohya-style `.alpha` keys (not "lora" keys) and takes network alphas only from kohya-named files.
- `"animatediff"`: the original AnimateDiff MotionLoRA layout (`...attention_blocks.0.processor.to_q_lora.down.weight`),
  VideoUNet motion layers only. That format has no alpha (its rule is `W + up @ down`), so alpha / r is folded into
  `up`: loading it at strength 1 gives the trained model's function.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import cast

import torch
from diffusers.models.attention_processor import Attention
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from kinema.errors import KinemaError
from kinema.loaders.animatediff.keys import original_to_diffusers_key
from kinema.loaders.animatediff.motion_lora_keys import ADAPTER_METADATA_KEY, convert_motion_lora
from kinema.loaders.checkpoint_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, write_state_dict
from kinema.models.video_dit import VideoDiT
from kinema.models.video_unet import VideoUNet

LORA_TARGETS = ("motion", "spatial", "all")
LORA_FORMATS = ("diffusers", "animatediff")
TRAIN_ADAPTER = "kinema_train"
LORA_KIND = "lora"  # the output kind save_lora marks its files with (kinema.fileio's overwrite policy)
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _component(model: nn.Module) -> str:
    """The diffusers pipeline component a model's LoRA belongs to: `unet` (VideoUNet) or `transformer` (VideoDiT)."""
    if isinstance(model, VideoUNet):
        return "unet"
    if isinstance(model, VideoDiT):
        return "transformer"
    raise KinemaError(f"LoRA training applies to a kinema VideoUNet (AnimateDiff) or VideoDiT (EasyAnimate V3), got "
                      f"{type(model).__name__}; pass the video model itself, not a wrapper around it")


def _check_targets(targets: str) -> None:
    if targets not in LORA_TARGETS:
        raise KinemaError(f"unknown LoRA targets {targets!r}; choose one of {', '.join(LORA_TARGETS)}")


def _is_linear(module: nn.Module) -> bool:
    """A Linear, or a peft wrapper around one (a motion LoRA loaded earlier wraps the same projections)."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return isinstance(base, nn.Linear)


def lora_target_modules(model: nn.Module, targets: str) -> list[str]:
    """Names (as `model.named_modules()` gives them, in that order) of the Linears LoRA wraps for `targets`.

    `"motion"`: to_q, to_k, to_v and to_out.0 of every attention inside the motion modules (for a VideoUNet, exactly
    the layers a published AnimateDiff MotionLoRA covers); `"spatial"`: the same projections of every other attention
    (SD's transformer blocks' attn1/attn2, PixArt's attn1/attn2); `"all"`: both. KinemaError for unknown targets or
    a model that is neither a VideoUNet nor a VideoDiT.
    """
    _check_targets(targets)
    _component(model)
    video_model = cast("VideoUNet | VideoDiT", model)
    inside_motion = {id(part) for _, motion in video_model.motion_modules() for part in motion.modules()}
    wanted = {"motion": (True,), "spatial": (False,), "all": (True, False)}[targets]
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and (id(module) in inside_motion) in wanted:
            for projection in PROJECTIONS:
                layer = module.get_submodule(projection)
                if _is_linear(layer):
                    names.append(f"{name}.{projection}")
    return names


def _trained_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """`{name: peft layer}` of every layer holding the training adapter, in module order."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and TRAIN_ADAPTER in module.lora_A}


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str = "motion") -> list[str]:
    """Wrap `lora_target_modules(model, targets)` with peft LoRA layers (adapter `TRAIN_ADAPTER`) and make their A/B
    weights the only ones that train. Returns the wrapped module names.

    A wrapped Linear maps `(..., C_in)` to `(..., C_out)` as `W x + (alpha / rank) * B A x`, `A` `(rank, C_in)`
    initialised as peft does (Kaiming-uniform, from torch's global generator) and `B` `(C_out, rank)` zero, so the
    model's output `(B, C, F, H, W)` is unchanged until training moves `B`. Motion LoRAs loaded before stay active
    and frozen. KinemaError, before anything changes, for a rank that is not a whole number >= 1, an alpha that is
    not a finite number > 0, unknown targets, a model that already has the adapter, or targets with no layers.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise KinemaError(f"LoRA rank must be a whole number >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise KinemaError(f"LoRA alpha must be a finite number > 0, got {alpha!r} (the update is scaled by "
                          "alpha / rank; alpha = rank means scale 1)")
    names = lora_target_modules(model, targets)
    if _trained_layers(model):
        raise KinemaError(f"this model already has a training LoRA ({TRAIN_ADAPTER!r}); add_lora is called once per "
                          "model: start from a fresh model to train another")
    if not names:
        raise KinemaError(f"the {targets} targets of this {type(model).__name__} hold no attention projections "
                          "(to_q/to_k/to_v/to_out.0) to put a LoRA on; choose other targets")
    config = LoraConfig(
        # peft annotates lora_alpha as an int but uses it only as alpha / r, so a float alpha is kept as it is
        r=rank, lora_alpha=alpha,  # type: ignore[arg-type]
        target_modules=names, lora_dropout=0.0, bias="none", init_lora_weights=True,
    )
    # peft leaves only its newest adapter active on every LoRA layer; loaded motion LoRAs must keep acting.
    active = {name: list(layer.active_adapters) for name, layer in model.named_modules()
              if isinstance(layer, BaseTunerLayer)}
    inject_adapter_in_model(config, model, adapter_name=TRAIN_ADAPTER)
    wrapped = _trained_layers(model)
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_adapter(active.get(name, []) + ([TRAIN_ADAPTER] if name in wrapped else []))
    model.requires_grad_(False)
    for layer in wrapped.values():
        layer.lora_A[TRAIN_ADAPTER].requires_grad_(True)
        layer.lora_B[TRAIN_ADAPTER].requires_grad_(True)
    if list(wrapped) != names:  # peft matches targets by suffix too; a mismatch here would export the wrong layers
        raise KinemaError(f"peft wrapped {len(wrapped)} layers where {len(names)} were asked for; this is a bug in "
                          "kinema, please report it")
    return names


def _diffusers_name(model: nn.Module, name: str) -> str:
    """A wrapped layer's name in a diffusers pipeline: VideoUNet motion layers as `UNetMotionModel` names them (its
    2D layers are named alike), under `unet.` (which VideoUNet names already start with); VideoDiT layers under
    `transformer.`."""
    if isinstance(model, VideoUNet):
        return "unet." + original_to_diffusers_key(name.removeprefix("unet."))
    return f"{_component(model)}.{name}"


def _factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The training adapter's `A` `(r, C_in)` and `B` `(C_out, r)`, detached (sharing storage)."""
    down = cast(nn.Linear, layer.lora_A[TRAIN_ADAPTER]).weight.detach()
    up = cast(nn.Linear, layer.lora_B[TRAIN_ADAPTER]).weight.detach()
    return down, up


def _require_trained(model: nn.Module) -> dict[str, LoraLayer]:
    _component(model)
    layers = _trained_layers(model)
    if not layers:
        raise KinemaError(f"this {type(model).__name__} has no training LoRA ({TRAIN_ADAPTER!r}); call add_lora first")
    return layers


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained LoRA weights alone (detached, sharing storage), in a diffusers pipeline's peft naming: what
    `save_lora(..., "diffusers")` writes.

    Keys are `{component}.{layer}.lora_A.weight` `(r, C_in)` and `{component}.{layer}.lora_B.weight` `(C_out, r)`,
    the adapter name left out: component `unet` with diffusers' `UNetMotionModel` layer names for a VideoUNet
    (`unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora_A.weight`; the 2D UNet's layers keep
    kinema's names, which are diffusers'), `transformer` with the VideoDiT's own (V3) names for a VideoDiT. The scale
    alpha / r is not in the weights; `save_lora` stores it beside them.
    """
    out = {}
    for name, layer in _require_trained(model).items():
        prefix = _diffusers_name(model, name)
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = _factors(layer)
    return out


def _rank_and_alpha(layers: dict[str, LoraLayer]) -> tuple[int, float]:
    """The one rank and alpha add_lora gave every layer."""
    first = next(iter(layers.values()))
    return int(first.r[TRAIN_ADAPTER]), float(first.lora_alpha[TRAIN_ADAPTER])


def _adapter_metadata(model: nn.Module, layers: dict[str, LoraLayer]) -> dict[str, str]:
    """diffusers' `lora_adapter_metadata`: the LoraConfig arguments, keys under the component's prefix (diffusers
    strips it, then builds `LoraConfig(**arguments)`), target names relative to the component."""
    component = _component(model)
    rank, alpha = _rank_and_alpha(layers)
    targets = [_diffusers_name(model, name).removeprefix(f"{component}.") for name in layers]
    arguments = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "bias": "none"}
    packed = {f"{component}.{key}": value for key, value in arguments.items()}
    # "format": "pt" is what safetensors' torch writer and diffusers put in every file; some readers insist on it.
    return {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def _animatediff_state_dict(model: nn.Module, layers: dict[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """The motion LoRA in the original AnimateDiff layout, alpha / r folded into `up`."""
    if not isinstance(model, VideoUNet):
        raise KinemaError(f"the animatediff format holds AnimateDiff motion LoRAs (a VideoUNet's motion modules), "
                          f"not a {type(model).__name__} LoRA; save it with format 'diffusers'")
    motion = set(lora_target_modules(model, "motion"))
    spatial = [name for name in layers if name not in motion]
    if spatial:
        raise KinemaError(f"the animatediff format holds motion-module layers only, but this LoRA also trains "
                          f"{len(spatial)} spatial layers (e.g. {spatial[0]}); save it with format 'diffusers', or "
                          "train with targets 'motion'")
    _, alpha = _rank_and_alpha(layers)
    kinema_layout: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        path = name.removeprefix("unet.")
        kinema_layout[f"{path}.lora_A.weight"], kinema_layout[f"{path}.lora_B.weight"] = _factors(layer)
        kinema_layout[f"{path}.alpha"] = torch.tensor(alpha)
    # The layout converter bakes alpha / r into `up` when writing a layout without alpha.
    return convert_motion_lora(kinema_layout, "original")


def save_lora(model: nn.Module, path: str | os.PathLike, format: str = "diffusers", *,
              overwrite: bool = False) -> Path:
    """Write the trained LoRA (see `add_lora`) to the weights file `path`; returns `path`.

    `format="diffusers"`: a `.safetensors` file of `lora_state_dict(model)` with rank and alpha in diffusers'
    `lora_adapter_metadata`, which `AnimateDiffPipeline.load_lora_weights(path)` (VideoUNet) or a transformer's
    `load_lora_adapter(path, prefix="transformer")` loads. `format="animatediff"`: the original AnimateDiff MotionLoRA
    layout (down `(r, C)`, up `(C, r)` with alpha / r folded in), VideoUNet motion layers only, as `.safetensors` or
    as a tensors-only torch file (`.ckpt`, `.pt`, `.pth`), loaded by `load_motion_lora` or AnimateDiff itself.

    The file appears whole or not at all and is marked as kinema's (kind `lora`): an existing file is replaced only
    with `overwrite` and only when kinema wrote it. KinemaError for an unknown format or suffix, a model without a
    training LoRA, or a LoRA the format cannot hold.
    """
    if format not in LORA_FORMATS:
        raise KinemaError(f"unknown LoRA format {format!r}; choose one of {', '.join(LORA_FORMATS)}")
    suffix = Path(path).suffix.lower()
    allowed = SAFETENSORS_SUFFIXES if format == "diffusers" else SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
    if suffix not in allowed:
        why = " (its rank and alpha live in safetensors metadata)" if format == "diffusers" else ""
        raise KinemaError(f"cannot write {path}: a {format} LoRA file ends in {', '.join(allowed)}{why}")
    layers = _require_trained(model)
    if format == "diffusers":
        return write_state_dict(lora_state_dict(model), path, _adapter_metadata(model, layers), kind=LORA_KIND,
                                overwrite=overwrite)
    return write_state_dict(_animatediff_state_dict(model, layers), path, kind=LORA_KIND, overwrite=overwrite)
