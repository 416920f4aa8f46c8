"""Read a motion module (a file, a MotionAdapter folder, or a `Source` that `describe` has already read) and load it
into a `VideoUNet` on a base image UNet, strictly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# From its own module: mypy reads `from diffusers import ...` as diffusers' placeholder class for installs without
# torch (its TYPE_CHECKING imports name those first), which has none of the model's attributes.
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from kinema.errors import KinemaError, naming
from kinema.fileio import read_json_object
from kinema.loaders.animatediff.detect import MotionModuleInfo, detect_motion_module, motion_settings
from kinema.loaders.animatediff.keys import rename_state_dict
from kinema.loaders.animatediff.structure import check_frame_tables, names_of, split_image_conv, split_pe
from kinema.loaders.checkpoint_io import Checkpoint, check_weight_values, find_weights
from kinema.loaders.source import Source
from kinema.models.video_unet import VideoUNet
from kinema.state_dicts import load_strict

ADAPTER_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what diffusers' MotionAdapter.save_pretrained writes


def to_kinema_motion_state_dict(
    state_dict: dict[str, torch.Tensor], info: MotionModuleInfo, check_pe_values: bool = True
) -> dict[str, torch.Tensor]:
    """Motion weights under kinema names (the published original names), `pe` buffers checked and dropped."""
    weights, pe = split_pe(state_dict)
    if check_pe_values:
        check_frame_tables(pe)
    return rename_state_dict(weights, names_of(info.format), "kinema")


@dataclass
class MotionModuleFile:
    """A read motion module: where from, what it is, its weights under kinema names, what was dropped, and PIA's
    image-conditioning `conv_in` (`{"conv_in.weight", "conv_in.bias"}`; empty for other modules)."""

    path: Path
    info: MotionModuleInfo
    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, str]
    image_conv: dict[str, torch.Tensor] = field(default_factory=dict)


def adapter_files(path: Path) -> tuple[dict[str, Any], Path]:
    """A diffusers MotionAdapter folder's config and its weights file (`diffusion_pytorch_model.safetensors`, its
    fp16 variant, or `.bin`); KinemaError when it is not one."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise KinemaError(f"{path} is a folder without config.json; a diffusers MotionAdapter folder holds "
                          f"config.json and {ADAPTER_WEIGHTS_FILE}")
    config = read_json_object(config_path, "a model config")
    if config.get("_class_name") != "MotionAdapter":
        raise KinemaError(f"{path} holds a {config.get('_class_name')!r}, not a diffusers MotionAdapter")
    weights = find_weights(path, variants=(None, "fp16"))
    if weights.index is not None:
        raise KinemaError(f"{weights.index}: the MotionAdapter's weights are sharded, and kinema reads them from one "
                          "file; save the adapter again with a max_shard_size above its size")
    return config, weights.files[0]


def read_motion_module(source: str | os.PathLike | Source) -> MotionModuleFile:
    """Read and recognise a motion-module file or MotionAdapter folder; errors name the file. A `Source` keeps what
    was read of it (kinema.loaders.source), so a torch checkpoint `describe` unpickled is not unpickled again."""
    described = source if isinstance(source, Source) else Source(Path(source))
    path = described.path
    try:
        checkpoint: Checkpoint
        if path.is_dir():
            config, weights = adapter_files(path)
            checkpoint, metadata, dropped = described.file_inside(weights).checkpoint, None, {}
        else:
            checkpoint, config = described.checkpoint, None
            metadata, dropped = checkpoint.metadata, checkpoint.dropped
        info = detect_motion_module(checkpoint.tensors, metadata, config)
        check_weight_values(checkpoint.tensors, "the motion module")
        motion, image_conv = split_image_conv(checkpoint.tensors)
        state_dict = to_kinema_motion_state_dict(motion, info)
    except KinemaError as err:
        raise naming(path, err) from None
    return MotionModuleFile(path, info, state_dict, dropped, image_conv)


def _base_unet(unet: VideoUNet | UNet2DConditionModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """(2D UNet config, 2D weights without any motion module) of the UNet to animate."""
    if isinstance(unet, VideoUNet):
        base = {k: v for k, v in unet.unet.state_dict().items() if ".motion_modules." not in k}
        return dict(unet.config.unet_config), base
    if isinstance(unet, UNet2DConditionModel):
        return {k: v for k, v in unet.config.items() if not k.startswith("_")}, unet.state_dict()
    raise KinemaError(f"load_motion_module needs a VideoUNet or diffusers UNet2DConditionModel, got {type(unet)}")


def _check_unet_fits(info: MotionModuleInfo, unet_config: dict, source: Path) -> None:
    widths = tuple(unet_config["block_out_channels"])
    if widths != info.channels:
        raise KinemaError(
            f"{source}: {info.label} is made for a {len(info.channels)}-level UNet of widths {info.channels}, but "
            f"this UNet has widths {widths}. Use a motion module made for this base model (SD1.5 modules with "
            "SD1.5 UNets, sdxl-beta with SDXL)")
    layers = unet_config["layers_per_block"]
    if (layers if isinstance(layers, int) else layers[0]) != info.modules_per_level[0]:
        raise KinemaError(f"{source}: {info.label} has {info.modules_per_level[0]} modules per down level, the UNet "
                          f"{layers} layers per block")


def _with_image_conv(unet_config: dict, base: dict[str, torch.Tensor], image_conv: dict[str, torch.Tensor],
                     source: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """PIA: the base UNet's config and weights with its conv_in widened to take the mask and the image's latents
    too. The latents' input channels keep the base model's weights and only the added ones are PIA's, as diffusers'
    `UNetMotionModel.from_unet2d` and ComfyUI-AnimateDiff combine them (the bias stays the base model's)."""
    weight, own = image_conv["conv_in.weight"], base["conv_in.weight"]
    if weight.shape[0] != own.shape[0] or weight.shape[2:] != own.shape[2:] or weight.shape[1] <= own.shape[1]:
        raise KinemaError(f"{source}: PIA's conv_in {tuple(weight.shape)} does not widen this UNet's conv_in "
                          f"{tuple(own.shape)}; use a PIA adapter made for this base model (SD1.5)")
    widened = torch.cat([own, weight[:, own.shape[1]:].to(own)], dim=1)
    return {**unet_config, "in_channels": int(weight.shape[1])}, {**base, "conv_in.weight": widened}


def load_motion_module(
    source: str | os.PathLike | Source, unet: VideoUNet | UNet2DConditionModel, **overrides: Any
) -> VideoUNet:
    """Build a VideoUNet from `unet`'s 2D weights and the motion module at `source` (file, MotionAdapter folder or
    described `Source`).

    Settings come from the detected version (kinema.models.presets.ANIMATEDIFF_VERSIONS) and can be overridden, e.g.
    `norm_mode="per_frame"`. The load is strict; errors name the file, the detected version and the first bad keys.
    The result takes latents `(B, C, F, H, W)` with F up to the module's frame-encoding length.
    """
    motion = read_motion_module(source)
    video_unet_kwargs = motion_settings(motion.info, **overrides)
    unet_config, base = _base_unet(unet)
    _check_unet_fits(motion.info, unet_config, motion.path)
    if motion.image_conv:
        unet_config, base = _with_image_conv(unet_config, base, motion.image_conv, motion.path)
    first = next(iter(base.values()))
    with torch.device(first.device):  # a meta-device base builds a meta model: checks keys without memory
        video = VideoUNet(unet_config=unet_config, **video_unet_kwargs)
    load_strict(video.unet, {**base, **motion.state_dict}, f"{motion.path} (detected {motion.info.label})",
                advice=VideoUNet.motion_mismatch_advice)
    return video if first.dtype == torch.float32 else video.to(first.dtype)
