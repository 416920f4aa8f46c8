"""Recognise a motion module: its layout, its AnimateDiff version, and the `VideoUNet` keyword arguments to load it.

No file records the norm semantics, so they come from the version's preset (kinema.models.presets); the frame-encoding
length comes from the stored `pe` tables when there are any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kinema.errors import KinemaError
from kinema.fileio import MARK_KEY
from kinema.loaders.animatediff.keys import rename_state_dict
from kinema.loaders.animatediff.settings import (
    adapter_file_settings,
    check_adapter_config,
    check_setting_values,
    kinema_file_settings,
    merged,
    overridden,
    setting,
    with_settings,
)
from kinema.loaders.animatediff.structure import (
    check_weights,
    common_pe_length,
    frame_table_length,
    layout_of,
    motion_structure,
    names_of,
    refuse_other_kinds,
    split_image_conv,
    split_pe,
)
from kinema.models.presets import ANIMATEDIFF_DIFFUSERS_NORMS, ANIMATEDIFF_VERSIONS


class _Setting:
    """A read-only attribute that is one named setting of `MotionModuleInfo.video_unet_kwargs` (see `setting`), so
    the keyword arguments stay the only copy."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, info: Any, owner: type | None = None) -> Any:
        return self if info is None else setting(info.video_unet_kwargs, self.name)


@dataclass(frozen=True)
class MotionModuleInfo:
    """What a motion-module file holds. `video_unet_kwargs` are the `VideoUNet` keyword arguments that load it (its
    settings, see kinema.loaders.animatediff.settings); `max_frames_source` says whether the frame-encoding length
    was read from `pe` buffers ("file"), the folder config or kinema metadata, or "assumed"."""

    format: str
    version: str
    video_unet_kwargs: dict[str, Any]
    max_frames_source: str
    channels: tuple[int, ...]
    modules_per_level: tuple[int, int]  # (down, up) modules per UNet level
    num_keys: int
    num_params: int
    dtype: str
    image_channels: int | None = None  # PIA: its conv_in's input channels (latents, mask, image latents); else None
    settings_stored: bool = False  # the file records its settings (kinema's metadata), not only its names

    max_frames = _Setting()
    mid_block = _Setting()
    transformer_blocks = _Setting()
    num_attention_heads = _Setting()
    norm_num_groups = _Setting()
    norm_mode = _Setting()
    resnet_norm_mode = _Setting()
    attention_kinds = _Setting()
    cross_attention_dim = _Setting()

    @property
    def label(self) -> str:
        label = motion_label(self.version, self.format)
        return label if self.image_channels is None else f"PIA image animator on {label}"


def motion_label(version: str, fmt: str) -> str:
    """`AnimateDiff v2 (animatediff-original)`: how messages name a detected motion module."""
    return f"AnimateDiff {version} ({fmt})"


def classify_version(levels: int, mid_block: bool, pe_length: int | None) -> str:
    """The published detection rules (diffusers single_file_utils, sd-webui, ComfyUI-AD), in their order."""
    if pe_length is None:  # no `pe` at all: AnimateLCM, or a re-save that dropped the buffers
        return "animatelcm" if mid_block else "sdxl-beta" if levels == 3 else "v3"
    if mid_block:
        return "animatelcm" if pe_length == 64 else "v2"
    if levels == 3:  # SDXL: 3 levels, i.e. up_blocks.2 has the first level's width (320)
        return "sdxl-beta"
    return "v1" if pe_length == 24 else "v3"


def _stored_settings(fmt: str, metadata: dict[str, str] | None, config: dict | None) -> tuple[str | None, dict]:
    """(version, named settings) that the file itself stores: a kinema file both (and an original-layout
    .safetensors file kinema wrote, in the same metadata), a MotionAdapter config some settings, another original
    file nothing."""
    metadata = metadata or {}
    if fmt == "kinema" or metadata.get(MARK_KEY) == "motion_module" and "motion_settings" in metadata:
        return kinema_file_settings(metadata)  # an original-layout file kinema wrote keeps them there too
    return None, adapter_file_settings(config) if config is not None else {}


def detect_motion_module(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, config: dict | None = None
) -> MotionModuleInfo:
    """Recognise a motion-module state dict (any layout); `metadata` is a kinema file's safetensors metadata,
    `config` a MotionAdapter folder's config.json. Raises KinemaError for other files, naming what they look like."""
    state_dict, image_conv = split_image_conv(state_dict)
    keys = list(state_dict)
    refuse_other_kinds(keys)
    fmt = layout_of(keys, metadata)
    weights, pe = split_pe(state_dict)
    structure = motion_structure(rename_state_dict(weights, names_of(fmt), "kinema"))
    stored_version, stored = _stored_settings(fmt, metadata, config)
    check_setting_values(stored, "its config.json" if config is not None else "the file's motion_settings metadata",
                         structure["channels"])
    version = stored_version or classify_version(len(structure["channels"]), structure["mid_block"],
                                                 common_pe_length(pe))
    if version not in ANIMATEDIFF_VERSIONS:
        raise KinemaError(f"unknown motion-module version {version!r} in the file's metadata; known: "
                          f"{list(ANIMATEDIFF_VERSIONS)}")
    # Every weight is checked before the frame tables, whose places are found beside the weights.
    check_weights(weights, structure, fmt, motion_label(version, fmt))
    pe_length = frame_table_length(pe, weights, fmt)
    image_channels = int(image_conv["conv_in.weight"].shape[1]) if image_conv else None
    if config is not None:
        check_adapter_config(config, structure, pe_length, image_channels)
    preset = merged(ANIMATEDIFF_VERSIONS[version], ANIMATEDIFF_DIFFUSERS_NORMS if fmt == "animatediff-diffusers"
                    else {})
    video_unet_kwargs = with_settings(preset, mid_block=structure["mid_block"],
                                      transformer_blocks=structure["transformer_blocks"],
                                      attention_kinds=structure["attention_kinds"],
                                      cross_attention_dim=structure["cross_attention_dim"], **stored)
    if pe_length:
        video_unet_kwargs = with_settings(video_unet_kwargs, max_frames=pe_length)
    source = "file" if pe_length else "metadata" if fmt == "kinema" else "config" if config else "assumed"
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()})
    return MotionModuleInfo(
        format=fmt, version=version, video_unet_kwargs=video_unet_kwargs, max_frames_source=source,
        channels=structure["channels"], modules_per_level=structure["modules_per_level"], num_keys=len(keys),
        num_params=sum(v.numel() for v in weights.values()), dtype="+".join(dtypes), image_channels=image_channels,
        settings_stored=stored_version is not None,
    )


def motion_settings(info: MotionModuleInfo, **overrides: Any) -> dict[str, Any]:
    """The `VideoUNet` keyword arguments for a detected module, with the caller's `overrides` (any of
    `settings.OVERRIDABLE`, e.g. `norm_mode="per_frame"`) applied."""
    return overridden(info.video_unet_kwargs, overrides)
