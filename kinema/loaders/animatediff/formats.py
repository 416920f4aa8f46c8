"""AnimateDiff entries of the format registry (kinema.loaders.formats): motion modules and motion LoRAs.

Describers decide from tensor names (a .safetensors header gives them without reading data), check every name and
shape against the layout they detect, and read only the small tensors they need the values of (frame tables,
LoRA alphas).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError, naming
from kinema.fileio import read_json_object
from kinema.loaders.source import Source


def _motion_report(info, dropped: dict[str, str]) -> dict[str, Any]:
    from kinema.loaders.animatediff.settings import SETTING_DEFAULTS, named_settings

    # The attentions only where they are not every published module's two temporal ones, as kinema files store them.
    attentions = {name: value for name, value in named_settings(info.video_unet_kwargs).items()
                  if name in SETTING_DEFAULTS}
    # Where heads and norms come from: an original-layout file of others records only weights and frame tables, so
    # a model folder's kinema.json (or the caller) may load it with other settings than the version's preset.
    settings_source = "the file's metadata" if info.settings_stored else "config.json" if \
        info.format == "animatediff-diffusers" else (f"the {info.version} preset (the file records only weights and "
                                                     "frame tables; a model folder's kinema.json \"motion\" entry may "
                                                     "set others)")
    return {
        "kind": "motion_module", "format": info.format, "version": info.version, "keys": info.num_keys,
        "parameters": info.num_params, "max_frames": info.max_frames, "max_frames_source": info.max_frames_source,
        "dtype": info.dtype, "mid_block": info.mid_block, "channels": list(info.channels),
        "num_attention_heads": info.num_attention_heads, "norm_num_groups": info.norm_num_groups,
        "norm_mode": info.norm_mode, "resnet_norm_mode": info.resnet_norm_mode, **attentions,
        "settings_source": settings_source, "dropped": dropped,
        **({} if info.image_channels is None else {
            "image_conditioning": f"PIA: a {info.image_channels}-channel conv_in (the latents, a mask and the start "
                                  "image's latents); it animates a start image"}),
    }


def _check_motion_module(weights: Source, config: dict | None, shown: Path) -> dict[str, Any]:
    from kinema.loaders.animatediff.detect import detect_motion_module
    from kinema.loaders.animatediff.keys import is_pe_key
    from kinema.loaders.animatediff.structure import check_frame_tables

    tensors, metadata = weights.layout
    try:
        # Every name and shape is checked from the header; then only the small frame tables are read, for values.
        info = detect_motion_module(tensors, metadata if config is None else None, config)
        check_frame_tables(weights.read(name for name in tensors if is_pe_key(name)))
    except KinemaError as err:
        raise naming(shown, err) from None
    return _motion_report(info, weights.dropped)


def describe_motion_module(source: Source) -> dict[str, Any] | None:
    """An AnimateDiff motion module: original or kinema file, or a diffusers MotionAdapter folder."""
    path = source.path
    if path.is_dir():
        if not (path / "config.json").is_file():
            return None
        from kinema.loaders.animatediff.load import adapter_files

        if read_json_object(path / "config.json", "a model config").get("_class_name") != "MotionAdapter":
            return None
        config, weights = adapter_files(path)
        return _check_motion_module(source.file_inside(weights), config, path)
    if not source.is_weights_file:
        return None
    # Decided from the names, which a header gives: an EasyAnimate transformer is GBs, and not ours to load.
    temporal = any(".motion_modules." in k or "temporal_attentions." in k for k in source.names)
    if not temporal or any("lora" in k.lower() for k in source.names):  # motion LoRAs have their own describer
        return None
    from kinema.loaders.animatediff.sparsectrl import sparsectrl_variant

    if sparsectrl_variant(source.names) is not None:  # motion modules inside a ControlNet: SparseCtrl's describer
        return None
    return _check_motion_module(source, None, path)


def describe_motion_lora_source(source: Source) -> dict[str, Any] | None:
    """A motion LoRA file (kinema.loaders.animatediff.motion_lora_keys); its names and shapes come from the header,
    and only the alpha scalars are read."""
    from kinema.loaders.animatediff.motion_lora_keys import describe_motion_lora
    from kinema.loaders.checkpoint_io import check_weight_values

    if not source.is_weights_file or not any("lora" in name.lower() for name in source.names):
        return None
    if source.holds_image_lora:  # LoRA matrices on the image layers too: generate --lora applies both parts
        return None
    tensors, metadata = source.layout
    try:
        alphas = source.read(k for k in tensors if k.endswith(".alpha"))
        check_weight_values(alphas, "the motion LoRA")
        return describe_motion_lora({**tensors, **alphas}, metadata)
    except KinemaError as err:
        raise naming(source.path, err) from None


def load_motion_module_path(source: Source, *, unet: Any = None, dtype: Any = None, **overrides: Any) -> Any:
    """A motion module inflating `unet` (a diffusers `UNet2DConditionModel`, a `VideoUNet`, or loaded Stable
    Diffusion components) into a `VideoUNet`, in `dtype` when given (the whole video UNet; None: as loaded);
    `overrides` change detected settings (e.g. `norm_mode`). What `describe` read of the file is used, not read
    again."""
    from kinema.loaders.animatediff.load import load_motion_module
    from kinema.loaders.stable_diffusion import StableDiffusionComponents

    path = source.path
    if unet is None:
        raise KinemaError(f"{path} is a motion module, which animates a base image UNet: pass unet=, e.g. "
                          "kinema.load(motion_module, unet=kinema.load('stable-diffusion-v1-5').unet)")
    base = unet.unet if isinstance(unet, StableDiffusionComponents) else unet
    video_unet = load_motion_module(source, base, **overrides)
    if dtype is None:
        return video_unet
    from kinema.models.precision import cast_module

    return cast_module(video_unet, dtype=dtype)  # diffusers' .to() logs a "kept in float32: []" notice


def load_motion_lora_path(source: Source, *, video_unet: Any = None, name: str | None = None, strength: float = 1.0,
                          merge: bool = False) -> Any:
    """A motion LoRA applied to `video_unet` under `name` (default: the file's name); returns the VideoUNet."""
    from kinema.loaders.animatediff.motion_lora import load_motion_lora

    path = source.path
    if video_unet is None:
        raise KinemaError(f"{path} is a motion LoRA, which changes a video UNet's motion modules: pass video_unet=, "
                          "e.g. kinema.load(lora, video_unet=kinema.load(motion_module, unet=...))")
    adapter = name if name is not None else re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)
    load_motion_lora(video_unet, source.checkpoint.tensors, adapter, strength=strength, merge=merge,
                     metadata=source.checkpoint.metadata)
    return video_unet


def convert_motion_module_source(source: Source, target: Path, to: str, *, overwrite: bool = False
                                 ) -> tuple[Path, list[str]]:
    """A motion module in layout `to` (original / diffusers / kinema), weights unchanged; what `describe` read of the
    file is used, not read again."""
    from kinema.loaders.animatediff.write import convert_motion_module

    return convert_motion_module(source, target, to, overwrite=overwrite)


def convert_motion_lora_source(source: Source, target: Path, to: str, *, overwrite: bool = False
                               ) -> tuple[Path, list[str]]:
    """Rename a motion LoRA file's keys into layout `to`; tensors are copied as they are."""
    from kinema.loaders.animatediff.motion_lora_keys import (
        LAYOUTS,
        motion_lora_format,
        parse_motion_lora,
        write_motion_lora,
    )
    from kinema.loaders.checkpoint_io import check_weight_values, write_state_dict

    tensors = source.checkpoint.tensors
    check_weight_values(tensors, f"the motion LoRA {source.path}")
    layout = motion_lora_format(to)
    lora = parse_motion_lora(tensors, source.checkpoint.metadata)
    notes = []
    scales = {pair.scale for pair in lora.layers.values() if pair.alpha is not None}
    if scales - {1.0} and LAYOUTS[layout].alpha is None:
        notes.append(f"the {to} layout has no place for alpha, so alpha / rank ({_listed(scales)}) is multiplied "
                     "into each up matrix: the same LoRA, but not the same tensors, and a conversion back has no "
                     "alpha")
    converted = write_motion_lora(lora, layout)
    written = write_state_dict(converted, target, kind="motion_lora", overwrite=overwrite, inputs=(source.path,))
    return written, notes


def _listed(values: set[float]) -> str:
    return ", ".join(f"{value:g}" for value in sorted(values))
