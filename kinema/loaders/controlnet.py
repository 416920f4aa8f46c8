"""ControlNet for AnimateDiff (SD1.5): every frame steered by its own control image (pose, depth, edges, ...).

The files people have come in two layouts, both read here, strictly and without unpickling code:
- a diffusers folder (`config.json` of a `ControlNetModel` beside `diffusion_pytorch_model.safetensors`/`.bin`):
  lllyasviel/sd-controlnet-*, lllyasviel/control_v11*_sd15_*;
- one file in the original layout (`input_hint_block.*`, `zero_convs.*`, `middle_block_out.*`, `input_blocks.*`,
  with or without the `control_model.` prefix): lllyasviel/ControlNet-v1-1's `control_v11p_sd15_openpose.pth` and
  comfyanonymous' fp16 `.safetensors` of them; or one file of diffusers names.
A single file carries no config: its ControlNet copies the encoder of the base UNet it steers (diffusers'
`ControlNetModel.from_unet` config), SD1.5's unless the caller gives the UNet's config, and diffusers' own key map
(`convert_controlnet_checkpoint`, the function behind `from_single_file`) renames original names.

The ControlNet runs diffusers' `ControlNetModel` on the frames folded into the batch, as diffusers'
`AnimateDiffControlNetPipeline` does; its residuals are added to the VideoUNet's skips and mid block
(kinema.sampling.denoisers.UNetDenoiser).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError, naming

if TYPE_CHECKING:  # torch and diffusers load when a file is read, so the CLI checks its options without them
    import torch
    from diffusers.models.controlnets.controlnet import ControlNetModel

    from kinema.loaders.source import Source

logger = logging.getLogger(__name__)

ORIGINAL_PREFIX = "control_model."
# Names only a ControlNet has, in each layout (the UNet it copies has neither).
ORIGINAL_MARKERS = ("input_hint_block.0.weight", "zero_convs.0.0.weight")
DIFFUSERS_MARKERS = ("controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.0.weight")
CONFIG_CLASS = "ControlNetModel"


def controlnet_layout(names: list[str]) -> str | None:
    """"original" or "diffusers" from a file's tensor names, None for no plain ControlNet (a SparseCtrl encoder,
    with motion modules of its own, is kinema.loaders.animatediff.sparsectrl's)."""
    if any(".motion_modules." in name or name.startswith("motion_modules.") for name in names):
        return None
    bare = {name.removeprefix(ORIGINAL_PREFIX) for name in names}
    if all(marker in bare for marker in ORIGINAL_MARKERS):
        return "original"
    if all(marker in bare for marker in DIFFUSERS_MARKERS):
        return "diffusers"
    return None


def is_controlnet(source: Source) -> bool:
    """A ControlNet folder or file by its config's class or its tensor names (headers only), not yet checked."""
    from kinema.loaders.checkpoint_io import folder_config_class

    return folder_config_class(source.path) == CONFIG_CLASS or (source.is_weights_file
                                                               and controlnet_layout(source.names) is not None)


def controlnet_config(unet_config: dict[str, Any] | None = None, conditioning_channels: int = 3) -> dict[str, Any]:
    """The config of a ControlNet for a UNet of `unet_config` (default: SD1.5's, shipped with kinema), made by
    diffusers' `ControlNetModel.from_unet` on a weightless UNet."""
    from accelerate import init_empty_weights
    from diffusers.models.controlnets.controlnet import ControlNetModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from kinema.loaders.stable_diffusion import SD15_CONFIGS

    if unet_config is None:
        unet_config = dict(UNet2DConditionModel.load_config(SD15_CONFIGS / "unet"))
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(base_unet_config(unet_config))
        built = ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                          conditioning_channels=conditioning_channels)
    return {k: v for k, v in built.config.items() if not k.startswith("_")}


def base_unet_config(unet_config: dict[str, Any]) -> dict[str, Any]:
    """The base model's UNet config without what adapters loaded into it added: an IP-Adapter's image projection,
    and PIA's widened conv_in (a ControlNet reads the latents alone)."""
    base = dict(unet_config)
    if base.get("encoder_hid_dim_type") == "ip_image_proj":
        base.update(encoder_hid_dim_type=None, encoder_hid_dim=None)
    if "out_channels" in base:
        base["in_channels"] = base["out_channels"]
    return base


def _source_config(source: Source, unet_config: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """`(layout, config)` of a ControlNet file or folder (a file's for a UNet of `unet_config`, SD1.5's by default);
    the layout is "diffusers-folder", "original" or "diffusers"."""
    from diffusers.models.controlnets.controlnet import ControlNetModel

    if source.path.is_dir():
        return "diffusers-folder", dict(ControlNetModel.load_config(source.path))
    layout = controlnet_layout(source.names)
    assert layout is not None  # the caller checked
    tensors, _ = source.layout
    hint = tensors.get(f"{ORIGINAL_PREFIX}input_hint_block.0.weight", tensors.get("input_hint_block.0.weight"))
    if hint is None:
        hint = tensors["controlnet_cond_embedding.conv_in.weight"]
    return layout, controlnet_config(unet_config, int(hint.shape[1]))


def weights_source(source: Source) -> Source:
    """The `Source` of a model's weights: the file itself, or the one weights file of a diffusers folder."""
    if not source.path.is_dir():
        return source
    from kinema.loaders.checkpoint_io import find_weights

    # lllyasviel's folders hold plain and fp16 weights; a folder with only the fp16 ones is read too.
    files = find_weights(source.path, variants=(None, "fp16"))
    if len(files.files) > 1:
        raise KinemaError(f"{source.path} holds sharded ControlNet weights; kinema reads one weights file (SD1.5 "
                          "ControlNets are 1.4 GB, never sharded): give the folder as downloaded")
    return source.file_inside(files.files[0])


def _renamed(layout: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The file's tensors under diffusers' names (original ones through diffusers' own key map)."""
    if layout != "original":
        return state
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from kinema.loaders.stable_diffusion import storage_of

    bare = {name.removeprefix(ORIGINAL_PREFIX): tensor for name, tensor in state.items()}
    converted = convert_controlnet_checkpoint(bare, config)
    # The map copies or views; a name it did not carry over has no place in the ControlNet.
    taken = {storage_of(t) for t in converted.values() if t is not None}
    left = [name for name, t in bare.items() if storage_of(t) not in taken]
    if left:
        raise KinemaError(f"{len(left)} tensors have no place in the ControlNet (e.g. {', '.join(left[:3])}); is this "
                          "an SD1.5 ControlNet for this base model?")
    missing = [name for name, t in converted.items() if t is None]
    if missing:
        raise KinemaError(f"the file lacks {len(missing)} ControlNet tensors (e.g. {', '.join(missing[:3])}): it is "
                          "incomplete (an interrupted download?) or made for another base model")
    return converted


_ADVICE = "Is it an SD1.5 ControlNet, and the base model an SD1.5 model?"


def _empty_model(config: dict[str, Any]) -> ControlNetModel:
    """The `ControlNetModel` of `config`, its weights on the meta device."""
    from diffusers.models.controlnets.controlnet import ControlNetModel

    from kinema.state_dicts import empty_model

    return empty_model(ControlNetModel, config)


def _check_fits(model: ControlNetModel, state: dict[str, torch.Tensor]) -> None:
    """One KinemaError line unless the (renamed) tensors `state` are exactly `model`'s, names and shapes."""
    from kinema.state_dicts import check_fits, shapes

    check_fits(shapes(model.state_dict()), shapes(state), "its weights do not fit the ControlNet", advice=_ADVICE)


def describe_controlnet(source: Source) -> dict[str, Any] | None:
    """The format registry's describer: a ControlNet folder or file, with its layout, conditioning channels and
    width; None for anything else. A single file is checked against the ControlNet of `unet_config=` (SD1.5's
    by default); with `unet_config=`, also that its residuals fit that UNet."""
    if not is_controlnet(source):
        return None
    from kinema.loaders.checkpoint_io import dtype_report

    try:
        layout, config = _source_config(source, source.options.get("unet_config"))
        weights = weights_source(source)
        tensors, _ = weights.layout
        _check_fits(_empty_model(config), _renamed("diffusers" if layout == "diffusers-folder" else layout, tensors,
                                                   config))
        if source.options.get("unet_config") is not None:
            check_fits_unet(config, source.options["unet_config"])
    except KinemaError as err:
        raise naming(source.path, err) from None
    return {"kind": "controlnet", "format": layout, "conditioning_channels": config["conditioning_channels"],
            "block_out_channels": list(config["block_out_channels"]),
            "cross_attention_dim": config["cross_attention_dim"],
            "dtype": dtype_report(str(t.dtype).removeprefix("torch.") for t in tensors.values())}


def check_controlnet_scale(scale: Any) -> float:
    """`scale` as a float, or one KinemaError line unless it is a finite number >= 0."""
    from kinema.pipelines.request import check_scale

    return check_scale(scale, "the ControlNet scale", "0: no control, 1: as trained")


def read_controlnet(path: str | os.PathLike | Source, unet_config: dict[str, Any] | None = None, *,
                    dtype: torch.dtype | None = None) -> ControlNetModel:
    """The ControlNet at `path` (folder or file, or the `Source` a describe read, whose reads are reused: a torch
    pickle is unpickled once), loaded strictly, in `dtype` (default float32); a single file's config comes from
    `unet_config` (SD1.5's by default)."""
    from kinema.loaders.source import Source
    from kinema.state_dicts import assign_checked

    source = path if isinstance(path, Source) else Source(Path(path))
    if not is_controlnet(source):
        raise KinemaError(f"{source.path} is not a ControlNet (no ControlNetModel config.json, nor the tensors of one: "
                          "input_hint_block.*, zero_convs.*); give an SD1.5 ControlNet folder or file, e.g. "
                          "control_v11p_sd15_openpose")
    # describe_controlnet's checks, in its order, on the tensors themselves: read once, the model built once.
    try:
        layout, config = _source_config(source, unet_config)
        weights = weights_source(source)
        state = _renamed("diffusers" if layout == "diffusers-folder" else layout, weights.read(weights.names), config)
        model = _empty_model(config)
        _check_fits(model, state)
        if unet_config is not None:
            check_fits_unet(config, unet_config)
        assign_checked(model, state, "the ControlNet", dtype=dtype, advice=_ADVICE)
    except KinemaError as err:
        raise naming(source.path, err) from None
    return model.eval()



# The UNet settings a ControlNet's residuals must share with the UNet they are added to.
# addition_embed_type: an SDXL ControlNet (text_time) of SD1.5 widths would fit every other one, and fail in sampling.
_MUST_MATCH = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
               "addition_embed_type")


def check_fits_unet(config: dict[str, Any], unet_config: dict[str, Any]) -> None:
    """One KinemaError line unless a ControlNet (or SparseCtrl) of `config` makes residuals that fit a UNet of
    `unet_config`."""
    def settings(of: dict[str, Any]) -> dict[str, list[Any]]:
        found = {name: _as_list(of.get(name)) for name in _MUST_MATCH}
        # SparseCtrl's blocks are the motion versions of the UNet's (CrossAttnDownBlockMotion for CrossAttnDownBlock2D).
        found["down_block_types"] = [re.sub(r"(2D|Motion)$", "", str(kind)) for kind in found["down_block_types"]]
        return found

    ours, theirs = settings(config), settings(base_unet_config(unet_config))
    differ = [name for name in _MUST_MATCH if ours[name] != theirs[name]]
    if differ:
        name = differ[0]
        raise KinemaError(f"the ControlNet's {name} is {config.get(name)} and the base UNet's {unet_config.get(name)}, "
                          "so its residuals do not fit: use a ControlNet made for this base model (SD1.5 ControlNets "
                          "for SD1.5 models)")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def load_controlnet(video_unet: Any, path: str | os.PathLike | Source, *, scale: float = 1.0) -> Any:
    """The ControlNet or SparseCtrl network at `path` (or the `Source` a describe read) for `video_unet` (a
    `VideoUNet`), as a `kinema.models.controlnet.VideoControlNet` (or `VideoSparseControlNet`) at `scale`, in the
    UNet's dtype and on its device; a single file takes the UNet's own config. Checks everything (file, scale, fit to
    the UNet) before anything is built."""
    from kinema.loaders.animatediff.sparsectrl import is_sparsectrl, read_sparsectrl
    from kinema.loaders.source import Source
    from kinema.models.controlnet import VideoControlNet, VideoSparseControlNet
    from kinema.models.precision import cast_module

    scale = check_controlnet_scale(scale)
    source = path if isinstance(path, Source) else Source(Path(path))
    unet = video_unet.unet
    parameter = next(unet.parameters())
    unet_config = dict(unet.config)
    if is_sparsectrl(source):
        wrapper: type[VideoControlNet] = VideoSparseControlNet
        model = read_sparsectrl(source, unet_config, dtype=parameter.dtype)
    else:
        wrapper = VideoControlNet
        model = read_controlnet(source, unet_config, dtype=parameter.dtype)
    logger.info("%s %s loaded at scale %g", "SparseCtrl" if wrapper is VideoSparseControlNet else "ControlNet",
                source.path, scale)
    return wrapper(cast_module(model, device=parameter.device), scale=scale, path=str(source.path))


def load_controlnet_source(source: Source, *, video_unet: Any = None, scale: float = 1.0) -> Any:
    """The format registry's loader (ControlNets and SparseCtrl): the network for `video_unet` (`load_controlnet`),
    read through the `Source` its describe read."""
    from kinema.models.video_unet import VideoUNet

    if not isinstance(video_unet, VideoUNet):
        raise KinemaError(f"{source.path} is a ControlNet, which steers an AnimateDiff model frame by frame: pass "
                          "video_unet=, e.g. kinema.load(controlnet, video_unet=family.model)")
    return load_controlnet(video_unet, source, scale=scale)
