"""Write motion modules in each layout, save a VideoUNet's, and convert between layouts without changing a weight.

- "original": `.ckpt`/`.safetensors` with the published names plus a sinusoidal `pos_encoder.pe` table `(1, L, C)`
  per attention.
- "diffusers": a `MotionAdapter` folder (config.json + diffusion_pytorch_model.safetensors), diffusers names plus one
  `pos_embed.pe` per transformer block.
- "kinema": `.safetensors` with the original names, no `pe`, and the settings in its metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from kinema.errors import KinemaError
from kinema.fileio import atomic_folder
from kinema.loaders.animatediff.detect import classify_version
from kinema.loaders.animatediff.keys import with_pe_tables
from kinema.loaders.animatediff.load import ADAPTER_WEIGHTS_FILE, read_motion_module
from kinema.loaders.animatediff.settings import adapter_config, merged, named_settings, setting, video_unet_settings
from kinema.loaders.animatediff.structure import KINEMA_LAYOUT_TAG, motion_structure
from kinema.loaders.checkpoint_io import write_state_dict
from kinema.loaders.source import Source
from kinema.models.video_unet import VideoUNet

MOTION_MODULE_LAYOUTS = ("original", "diffusers", "kinema")  # what `save_motion_module` / `kinema convert --to` write


def write_motion_module(
    state_dict: dict[str, torch.Tensor], video_unet_kwargs: dict[str, Any], path: str | os.PathLike,
    layout: str = "kinema", version: str | None = None, with_pe: bool = True, *, overwrite: bool = False,
    inputs: tuple = (),
) -> Path:
    """Write kinema-named motion weights, loaded with `video_unet_kwargs` (see kinema.loaders.animatediff.settings),
    in `layout`: "kinema" (.safetensors + settings metadata), "original" (.ckpt/.safetensors with `pos_encoder.pe`,
    omitted when `with_pe` is False) or "diffusers" (a folder), under kinema's output policy (`overwrite` replaces
    only an earlier kinema motion module; never one of `inputs`)."""
    policy: dict[str, Any] = {"kind": "motion_module", "overwrite": overwrite, "inputs": inputs}
    if layout not in MOTION_MODULE_LAYOUTS:
        raise KinemaError(f"unknown layout {layout!r}; choose from {list(MOTION_MODULE_LAYOUTS)}")
    path = Path(path)
    structure = motion_structure(state_dict)
    max_frames = setting(video_unet_kwargs, "max_frames")
    version = version or classify_version(len(structure["channels"]), video_unet_kwargs["motion_mid_block"],
                                          max_frames)
    if layout == "kinema":
        if path.suffix.lower() != ".safetensors":
            raise KinemaError(f"the kinema layout is a .safetensors file (it keeps settings in metadata), got {path}")
        metadata = {"kinema_layout": KINEMA_LAYOUT_TAG, "version": version,
                    "motion_settings": json.dumps(named_settings(video_unet_kwargs))}
        return write_state_dict(state_dict, path, metadata, **policy)
    if layout == "original":
        # Other tools read the names alone; kinema also reads the settings back from a .safetensors file's metadata
        # (a module of its own, such as kinema-tiny-ad's 4 heads, is no published version's preset).
        settings = ({"version": version, "motion_settings": json.dumps(named_settings(video_unet_kwargs))}
                    if keeps_settings(layout, path) else None)
        return write_state_dict(with_pe_tables(state_dict, "original", max_frames) if with_pe else state_dict,
                                path, settings, **policy)
    if path.suffix:
        raise KinemaError(f"the diffusers layout is a folder (config.json + {ADAPTER_WEIGHTS_FILE}); give a folder "
                          f"path without an extension, got {path}")
    config = adapter_config(structure, video_unet_kwargs)
    with atomic_folder(path, **policy) as folder:
        write_state_dict(with_pe_tables(state_dict, "diffusers", max_frames), folder / ADAPTER_WEIGHTS_FILE,
                         {"format": "pt"}, kind="motion_module")
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def save_motion_module(
    video_unet: VideoUNet, path: str | os.PathLike, layout: str = "kinema", version: str | None = None, *,
    overwrite: bool = False,
) -> Path:
    """Save a VideoUNet's motion modules alone in `layout` ("kinema", "original" or "diffusers"), with the settings
    its config holds; `overwrite` replaces only an earlier kinema motion module."""
    config = video_unet.unet.config
    if config.in_channels != config.out_channels:
        raise KinemaError(f"this VideoUNet takes {config.in_channels} input channels (a PIA image animator's conv_in), "
                          "which a motion module alone does not hold; kinema saves motion modules without it")
    from kinema.loaders.animatediff.motion_lora import loaded_motion_loras

    adapters = [name for name, entry in loaded_motion_loras(video_unet).items() if not entry["merged"]]
    if adapters:  # their peft wrappers rename the projections (to_q.base_layer.weight): a file nothing reads back
        raise KinemaError(f"this VideoUNet carries motion LoRA {', '.join(adapters)} as an adapter, which a motion "
                          "module file does not hold: unload it first (unload_motion_lora) to save the module alone, "
                          "or load it with merge=True to save the module with the LoRA in its weights")
    return write_motion_module(video_unet.motion_state_dict(), video_unet_settings(video_unet), path, layout, version,
                               overwrite=overwrite)


def keeps_settings(layout: str, path: str | os.PathLike) -> bool:
    """Whether a motion module written in `layout` to `path` records every setting for kinema: a kinema file, or
    an original-layout .safetensors file (in its metadata, beside the names other tools read)."""
    return layout == "kinema" or (layout == "original" and Path(path).suffix.lower() == ".safetensors")


def _settings_the_layout_loses(video_unet_kwargs: dict[str, Any], version: str, to: str) -> dict[str, Any]:
    """The settings a module written in layout `to` would be loaded without: where they differ from the module's
    own, `{name: the module's value}`. A kinema file records them all; a MotionAdapter's config.json the frames,
    heads and norm groups (its norms are diffusers' own); an original file only its frame table (the rest is the
    version's preset)."""
    if to == "kinema":
        return {}
    from kinema.models.presets import ANIMATEDIFF_DIFFUSERS_NORMS, ANIMATEDIFF_VERSIONS

    names: tuple[str, ...]
    if to == "diffusers":
        assumed, names = ANIMATEDIFF_DIFFUSERS_NORMS, ("norm_mode", "resnet_norm_mode")
    else:
        assumed = ANIMATEDIFF_VERSIONS[version]
        names = ("norm_mode", "resnet_norm_mode", "num_attention_heads", "norm_num_groups")
    loaded_as = merged(ANIMATEDIFF_VERSIONS[version], assumed)
    own = {name: setting(video_unet_kwargs, name) for name in names}
    return {name: value for name, value in own.items() if value != setting(loaded_as, name)}


def convert_motion_module(
    source: str | os.PathLike | Source, target: str | os.PathLike, to: str, *, overwrite: bool = False
) -> tuple[Path, list[str]]:
    """Rewrite a motion module in another layout without changing a weight; returns the output and notes.
    `overwrite` replaces only an earlier kinema motion module at `target`, never `source`. A described `Source` is
    not read again."""
    motion = read_motion_module(source)
    if motion.image_conv:
        raise KinemaError(f"{motion.path} is a PIA image animator: its conv_in, which no motion-module layout holds "
                          "on its own, would be lost; use the file as it is")
    info, notes = motion.info, []
    lost = {} if keeps_settings(to, target) else _settings_the_layout_loses(info.video_unet_kwargs, info.version, to)
    if lost:
        given = ", ".join(f"{name}={value!r}" for name, value in lost.items())
        notes.append(f"the {to} layout does not record every setting of {info.label}; load the converted "
                     f"{'folder' if to == 'diffusers' else 'file'} with {given} to keep its behaviour (they differ "
                     "from what the layout is loaded with)")
    if info.max_frames_source == "assumed":
        notes.append(f"the file stores no frame table; frame-encoding length {info.max_frames} was assumed")
    out = write_motion_module(motion.state_dict, info.video_unet_kwargs, target, to, info.version,
                              with_pe=info.max_frames_source != "assumed", overwrite=overwrite, inputs=(motion.path,))
    return out, notes
