"""`kinema inspect`: say what a weights file or model folder is.

Describers take a `Source` (the path, with its tensor names and tensors read at most once, on first use) and return
a summary dict, or None when the path is not their kind. They are tried in the order of DESCRIBERS and the first
answer wins. A describer that recognises its kind but finds the file broken or
unsupported raises KinemaError, so a damaged motion module is reported as such rather than as "unknown".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError
from kinema.loaders.animatediff import (
    detect_motion_module,
    guess_kind,
    read_motion_module,
    to_kinema_motion_state_dict,
)
from kinema.loaders.checkpoint_io import SUPPORTED_SUFFIXES, Checkpoint, read_checkpoint, tensor_names


@dataclass
class Source:
    """A path being described. Several describers look at the same file; it is read once, and only as far as
    needed: a .safetensors header answers `names` without reading tensor data."""

    path: Path

    @cached_property
    def is_weights_file(self) -> bool:
        return self.path.is_file() and self.path.suffix.lower() in SUPPORTED_SUFFIXES

    @cached_property
    def checkpoint(self) -> Checkpoint:
        return read_checkpoint(self.path)

    @cached_property
    def names(self) -> list[str]:
        header = tensor_names(self.path)
        return header if header is not None else list(self.checkpoint.tensors)


def _motion_report(info, dropped: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "motion_module", "format": info.format, "version": info.version, "keys": info.num_keys,
        "parameters": info.num_params, "max_frames": info.max_frames, "max_frames_source": info.max_frames_source,
        "dtype": info.dtype, "mid_block": info.mid_block, "channels": list(info.channels),
        "num_attention_heads": info.num_attention_heads, "norm_num_groups": info.norm_num_groups,
        "norm_mode": info.norm_mode, "resnet_norm_mode": info.resnet_norm_mode, "dropped": dropped,
    }


def describe_motion_module(source: Source) -> dict[str, Any] | None:
    """An AnimateDiff motion module: original or kinema file, or a diffusers MotionAdapter folder."""
    path = source.path
    if path.is_dir():
        config = path / "config.json"
        try:
            if not config.is_file() or json.loads(config.read_text()).get("_class_name") != "MotionAdapter":
                return None
        except ValueError as err:
            raise KinemaError(f"{config} is not readable JSON: {err}") from None
        motion = read_motion_module(path)
        return _motion_report(motion.info, motion.dropped)
    if not source.is_weights_file:
        return None
    # Decided from the names, which a header gives: an EasyAnimate transformer is GBs, and not ours to load.
    temporal = any(".motion_modules." in k or "temporal_attentions." in k for k in source.names)
    if not temporal or any("lora" in k.lower() for k in source.names):  # motion LoRAs have their own describer
        return None
    checkpoint = source.checkpoint
    try:
        info = detect_motion_module(checkpoint.tensors, checkpoint.metadata)
        to_kinema_motion_state_dict(checkpoint.tensors, info)  # checks the frame tables' values
    except KinemaError as err:
        raise KinemaError(f"{path}: {err}") from None
    return _motion_report(info, checkpoint.dropped)


def describe_motion_lora_file(source: Source) -> dict[str, Any] | None:
    """A motion LoRA file (kinema.loaders.motion_lora)."""
    from kinema.loaders.motion_lora import describe_motion_lora

    if not source.is_weights_file or not any("lora" in name.lower() for name in source.names):
        return None
    return describe_motion_lora(source.checkpoint.tensors)


def describe_easyanimate_path(source: Source) -> dict[str, Any] | None:
    """An EasyAnimate V3 folder or transformer file (kinema.loaders.easyanimate)."""
    from kinema.loaders.easyanimate import describe_easyanimate

    return describe_easyanimate(source.path)


def describe_slice_vae_path(source: Source) -> dict[str, Any] | None:
    """An EasyAnimate V3 Slice VAE folder (kinema.loaders.easyanimate_vae)."""
    from kinema.loaders.easyanimate_vae import describe_slice_vae

    return describe_slice_vae(source.path) if source.path.is_dir() else None


DESCRIBERS: list[tuple[str, Callable[[Source], dict[str, Any] | None]]] = [
    ("AnimateDiff motion module (file or diffusers MotionAdapter folder)", describe_motion_module),
    ("motion LoRA", describe_motion_lora_file),
    ("EasyAnimate V3 folder or transformer", describe_easyanimate_path),
    ("EasyAnimate V3 Slice VAE folder", describe_slice_vae_path),
]


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What `path` holds, as plain data (`{"kind" or "format": ..., ...}`); KinemaError when kinema knows no such
    format, naming what was looked for and what the file looks like."""
    path = Path(path)
    if not path.exists():
        raise KinemaError(f"no such file or folder: {path}")
    source = Source(path)
    for _, describer in DESCRIBERS:
        report = describer(source)
        if report is not None:
            return {"path": str(path), **report}
    hint = ""
    if source.is_weights_file:
        hint = f"; {guess_kind(source.names)}"
    elif path.is_file():
        hint = f"; weights files kinema reads end in {', '.join(SUPPORTED_SUFFIXES)}"
    looked = "; ".join(name for name, _ in DESCRIBERS)
    raise KinemaError(f"{path}: not a format kinema knows: looked for {looked}{hint}")
