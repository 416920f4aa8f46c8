"""SparseCtrl (AnimateDiff v3): a ControlNet with motion modules of its own that steers a video from a few keyframes.

The published files are `v3_sd15_sparsectrl_rgb.ckpt` (keyframe images, VAE-encoded: `controlnet_cond_embedding`
is one convolution) and `v3_sd15_sparsectrl_scribble.ckpt` (sketches in pixels through a conv stack); both append a
0/1 mask channel (which frames have a keyframe) to the condition. Their names are diffusers' `ControlNetModel` names
with AnimateDiff's motion-module names inside; diffusers' `SparseControlNetModel` holds the same tensors under
diffusers' motion names, so the file is renamed (as diffusers' conversion script does) and loaded strictly. A file
carries no config: the network copies the base UNet's encoder, as AnimateDiff builds it (`from_unet`), with 8 motion
heads and frame tables of 32 (AnimateDiff's sparsectrl inference configs). Diffusers `SparseControlNetModel`
folders load as they are. The files' frame tables (`pos_encoder.pe`) set the network's frame limit and are checked to
be the sinusoid the model makes itself, which is what runs (AnimateDiff's own loader drops them).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError, naming

if TYPE_CHECKING:
    import torch

    from kinema.loaders.source import Source

logger = logging.getLogger(__name__)

CONFIG_CLASS = "SparseControlNetModel"
RGB_EMBEDDING, SCRIBBLE_EMBEDDING = "controlnet_cond_embedding.weight", "controlnet_cond_embedding.conv_in.weight"
# AnimateDiff's motion-module names -> diffusers' (SparseCtrl's modules have self-attention only).
_RENAMES = ((".temporal_transformer.", "."), (".attention_blocks.0.", ".attn1."), (".norms.0.", ".norm1."),
            (".ff_norm.", ".norm3."))
_FRAME_TABLE = re.compile(r"\.pos_(encoder|embed)\.pe$")
# SparseCtrl's motion settings in AnimateDiff's configs/inference/sparsectrl/*.yaml.
MOTION_HEADS, MAX_FRAMES = 8, 32


def sparsectrl_variant(names: list[str]) -> str | None:
    """"rgb" or "scribble" from a file's tensor names (a ControlNet embedding beside motion modules), else None."""
    if not any(".motion_modules." in name for name in names):
        return None
    if RGB_EMBEDDING in names:
        return "rgb"
    if SCRIBBLE_EMBEDDING in names:
        return "scribble"
    return None


def is_sparsectrl(source: Source) -> bool:
    """A SparseCtrl folder or file by its config's class or its tensor names (headers only), not yet checked."""
    from kinema.loaders.checkpoint_io import folder_config_class

    return folder_config_class(source.path) == CONFIG_CLASS or (source.is_weights_file
                                                               and sparsectrl_variant(source.names) is not None)


def sparsectrl_config(unet_config: dict[str, Any] | None, variant: str, conditioning_channels: int,
                      max_frames: int = MAX_FRAMES) -> dict[str, Any]:
    """The `SparseControlNetModel` config of a SparseCtrl file for a UNet of `unet_config` (default SD1.5's), its
    frame tables `max_frames` long."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from kinema.loaders.controlnet import base_unet_config
    from kinema.loaders.stable_diffusion import SD15_CONFIGS

    unet = base_unet_config(dict(unet_config or UNet2DConditionModel.load_config(SD15_CONFIGS / "unet")))
    motion = {"CrossAttnDownBlock2D": "CrossAttnDownBlockMotion", "DownBlock2D": "DownBlockMotion"}
    unknown = [block for block in unet["down_block_types"] if block not in motion]
    if unknown:
        raise KinemaError(f"SparseCtrl copies an SD1.5-style UNet encoder, and this UNet has {unknown[0]} blocks")
    copied = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
              "norm_num_groups", "norm_eps", "use_linear_projection", "flip_sin_to_cos", "freq_shift",
              "downsample_padding", "mid_block_scale_factor", "act_fn", "upcast_attention",
              "resnet_time_scale_shift", "transformer_layers_per_block")
    return {**{key: unet[key] for key in copied if key in unet},
            "down_block_types": [motion[block] for block in unet["down_block_types"]],
            "conditioning_channels": conditioning_channels, "use_simplified_condition_embedding": variant == "rgb",
            "concat_conditioning_mask": True, "motion_max_seq_length": max_frames,
            "motion_num_attention_heads": MOTION_HEADS}


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors under diffusers' names, frame tables left out."""
    renamed = {}
    for name, tensor in state.items():
        if _FRAME_TABLE.search(name):
            continue
        for old, new in _RENAMES:
            name = name.replace(old, new)
        renamed[name] = tensor
    return renamed


def _source_config(source: Source, unet_config: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """`(format, config)`: "diffusers-folder" with the folder's config, or "original" with the one for a UNet of
    `unet_config` (SD1.5's by default)."""
    from diffusers.models.controlnets.controlnet_sparsectrl import SparseControlNetModel

    if source.path.is_dir():
        return "diffusers-folder", dict(SparseControlNetModel.load_config(source.path))
    variant = sparsectrl_variant(source.names)
    assert variant is not None  # the caller checked
    tensors, _ = source.layout
    embedding = tensors[RGB_EMBEDDING if variant == "rgb" else SCRIBBLE_EMBEDDING]
    tables = {tensor.shape[1] for name, tensor in tensors.items() if _FRAME_TABLE.search(name) and tensor.ndim == 3}
    if len(tables) > 1:
        raise KinemaError(f"the frame tables (pos_encoder.pe) disagree in length: {sorted(tables)}")
    # The embedding reads the condition and, appended to it, the keyframe mask.
    return "original", sparsectrl_config(unet_config, variant, int(embedding.shape[1]) - 1,
                                         tables.pop() if tables else MAX_FRAMES)


_ADVICE = "Is it AnimateDiff v3's SparseCtrl (v3_sd15_sparsectrl_rgb or _scribble), and the base model an SD1.5 model?"


def _empty_model(config: dict[str, Any]) -> Any:
    """The `SparseControlNetModel` of `config`, its weights on the meta device (its frame tables made, real)."""
    from diffusers.models.controlnets.controlnet_sparsectrl import SparseControlNetModel

    from kinema.state_dicts import empty_model

    return empty_model(SparseControlNetModel, config)


def _check_fits(model: Any, state: dict[str, torch.Tensor]) -> None:
    """One KinemaError line unless the renamed tensors `state` are exactly `model`'s (its frame tables aside)."""
    from kinema.state_dicts import check_fits, shapes

    wanted = {k: v for k, v in shapes(model.state_dict()).items() if not _FRAME_TABLE.search(k)}
    check_fits(wanted, shapes(state), "its weights do not fit SparseCtrl", advice=_ADVICE)


def describe_sparsectrl(source: Source) -> dict[str, Any] | None:
    """The format registry's describer: a SparseCtrl file or diffusers folder, with its variant; None for anything
    else. A file is checked against the network of `unet_config=` (SD1.5's by default), and with `unet_config=`
    also that its residuals fit that UNet."""
    if not is_sparsectrl(source):
        return None
    from kinema.loaders.checkpoint_io import dtype_report
    from kinema.loaders.controlnet import check_fits_unet, weights_source

    try:
        layout, config = _source_config(source, source.options.get("unet_config"))
        tensors, _ = weights_source(source).layout
        _check_fits(_empty_model(config), _renamed(tensors))
        if source.options.get("unet_config") is not None:
            check_fits_unet(config, source.options["unet_config"])
    except KinemaError as err:
        raise naming(source.path, err) from None
    return {"kind": "sparsectrl", "format": layout,
            "variant": "rgb" if config.get("use_simplified_condition_embedding") else "scribble",
            "conditioning_channels": config["conditioning_channels"],
            "block_out_channels": list(config["block_out_channels"]),
            "dtype": dtype_report(str(t.dtype).removeprefix("torch.") for t in tensors.values())}


def read_sparsectrl(path: str | os.PathLike | Source, unet_config: dict[str, Any] | None = None, *,
                    dtype: torch.dtype | None = None) -> Any:
    """The SparseCtrl network at `path` (file or diffusers folder, or the `Source` a describe read, whose reads are
    reused: a torch pickle is unpickled once) as a diffusers `SparseControlNetModel`, loaded strictly, in `dtype`
    (default float32)."""
    import torch

    from kinema.loaders.animatediff.structure import check_frame_tables
    from kinema.loaders.controlnet import check_fits_unet, weights_source
    from kinema.loaders.source import Source
    from kinema.state_dicts import assign_checked

    source = path if isinstance(path, Source) else Source(Path(path))
    if not is_sparsectrl(source):
        raise KinemaError(f"{source.path} is not a SparseCtrl network; give AnimateDiff's v3_sd15_sparsectrl_rgb.ckpt "
                          "or v3_sd15_sparsectrl_scribble.ckpt, or a diffusers SparseControlNetModel folder")
    # describe_sparsectrl's checks, in its order, on the tensors themselves: read once, the model built once.
    try:
        _, config = _source_config(source, unet_config)
        weights = weights_source(source)
        stored = weights.read(weights.names)
        state = _renamed(stored)
        model = _empty_model(config)
        _check_fits(model, state)
        tables = {k: v for k, v in model.state_dict().items() if _FRAME_TABLE.search(k)}
        if unet_config is not None:
            check_fits_unet(config, unet_config)
        check_frame_tables({k: v for k, v in stored.items() if _FRAME_TABLE.search(k)})
        assign_checked(model, state, "SparseCtrl", dtype=dtype, advice=_ADVICE, extra=tables)
    except KinemaError as err:
        raise naming(source.path, err) from None
    from kinema.models.precision import cast_module

    return cast_module(model, dtype=dtype or torch.float32).eval()  # the frame tables, made in float32
