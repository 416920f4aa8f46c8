"""AnimateDiff motion modules: recognise a file, resolve its settings, load it into a VideoUNet, save it back.

Three layouts hold the same weights:
- "animatediff-original": published `.ckpt`/`.safetensors`, names `...motion_modules.N.temporal_transformer...` plus a
  sinusoidal `pos_encoder.pe` buffer [1, L, C] per attention.
- "animatediff-diffusers": a `MotionAdapter` folder (config.json + diffusion_pytorch_model.safetensors), diffusers
  names plus one `pos_embed.pe` per transformer block.
- "kinema": `.safetensors` with the original names, no `pe`, and the motion settings in its metadata.
The `pe` buffers only tell the frame-encoding length L; they are checked against the sinusoidal table and dropped,
because kinema recomputes the table. No file records the norm semantics, so they come from the version table below.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from kinema.errors import KinemaError, naming
from kinema.fileio import atomic_folder, read_json_object
from kinema.loaders.animatediff.keys import check_frame_table, is_pe_key, pe_places, rename_state_dict, with_pe_tables
from kinema.loaders.checkpoint_io import read_checkpoint, write_state_dict
from kinema.models.motion import build_motion_module
from kinema.models.video_unet import VideoUNet
from kinema.state_dicts import key_problems, problems_phrase, shapes

LAYOUTS = ("original", "diffusers", "kinema")  # what `save_motion_module` / `kinema convert --to` write
ADAPTER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                   "diffusion_pytorch_model.bin")
KINEMA_LAYOUT_TAG = "motion-module"

# What each version was trained with (docs/reference: AnimateDiff configs, AnimateLCM loaders). A stored `pe`
# overrides max_frames; norms are never stored. v1 normalises resnets across frames, later SD1.5 versions per frame;
# the SDXL branch normalises its motion modules across frames.
VERSION_DEFAULTS: dict[str, dict[str, Any]] = {
    "v1": {"max_frames": 24, "norm_mode": "per_frame", "resnet_norm_mode": "across_frames"},
    "v2": {"max_frames": 32, "norm_mode": "per_frame", "resnet_norm_mode": "per_frame"},
    "v3": {"max_frames": 32, "norm_mode": "per_frame", "resnet_norm_mode": "per_frame"},
    "animatelcm": {"max_frames": 64, "norm_mode": "per_frame", "resnet_norm_mode": "per_frame"},
    "sdxl-beta": {"max_frames": 32, "norm_mode": "across_frames", "resnet_norm_mode": "per_frame"},
}
# diffusers' AnimateDiffTransformer3D normalises across frames and its resnets per frame, whatever the version.
DIFFUSERS_NORMS = {"norm_mode": "across_frames", "resnet_norm_mode": "per_frame"}

# Related files kinema cannot load yet: (regex searched in the keys, what the file is). First match wins.
UNSUPPORTED: list[tuple[str, str]] = [
    (r"controlnet_cond_embedding\.conv_in\.weight$", "a SparseCtrl scribble encoder (sparsectrl-scribble)"),
    (r"controlnet_cond_embedding\.weight$", "a SparseCtrl RGB encoder (sparsectrl-rgb)"),
    (r"temporal_attentions\.|pos_encoder\.positional_encoding", "a HotShot-XL temporal module"),
    (r"^conv_in\.weight$", "a PIA motion adapter (its own 9-channel conv_in)"),
]
# Guesses for files that are not motion modules: (regex searched in the keys, what the file looks like).
LOOKS_LIKE: list[tuple[str, str]] = [
    (r"(?i)lora", "a LoRA"),
    (r"^model\.diffusion_model\.", "a full Stable Diffusion checkpoint (original layout)"),
    (r"^(first_stage_model\.|encoder\.down(_blocks)?\.|decoder\.up(_blocks)?\.)", "a VAE"),
    (r"^(cond_stage_model\.|text_model\.|conditioner\.)", "a text encoder"),
    (r"^(down_blocks|up_blocks|mid_block)\.\d*\.?(resnets|attentions)\.", "an image UNet (diffusers layout)"),
    (r"^(transformer_blocks|blocks)\.\d+\.", "a transformer (DiT) checkpoint"),
]
# What each kind of difference from the layout a file's structure describes usually means.
LIKELY_CAUSES = {
    "missing": "the file is incomplete (an interrupted download, or an export that skipped tensors)",
    "unexpected": "the file holds tensors AnimateDiff motion modules do not have (another architecture, or another "
                  "model's tensors saved with them)",
    "mismatched": "tensors were reshaped or replaced (a faulty merge or edit), or the file is damaged",
}
_MODULE = re.compile(r"^(?P<module>(?:down_blocks\.(?P<down>\d+)|up_blocks\.(?P<up>\d+)|mid_block)"
                     r"\.motion_modules\.\d+)\.temporal_transformer\.")


@dataclass(frozen=True)
class MotionModuleInfo:
    """What a motion-module file holds. `max_frames` is the frame-encoding (PE) length; `max_frames_source` says
    whether it was read from `pe` buffers ("file"), the folder config or kinema metadata, or "assumed"."""

    format: str
    version: str
    max_frames: int
    max_frames_source: str
    mid_block: bool
    channels: tuple[int, ...]
    modules_per_level: tuple[int, int]  # (down, up) modules per UNet level
    transformer_blocks: int
    num_attention_heads: int
    norm_num_groups: int
    norm_mode: str
    resnet_norm_mode: str
    num_keys: int
    num_params: int
    dtype: str

    @property
    def label(self) -> str:
        return motion_label(self.version, self.format)


def motion_label(version: str, fmt: str) -> str:
    """`AnimateDiff v2 (animatediff-original)`: how messages name a detected motion module."""
    return f"AnimateDiff {version} ({fmt})"


@dataclass(frozen=True)
class MotionSettings:
    """How to build the VideoUNet for a motion module; the fields in OVERRIDABLE can be set by the caller."""

    max_frames: int
    mid_block: bool
    transformer_blocks: int = 1
    num_attention_heads: int = 8
    norm_num_groups: int = 32
    norm_mode: str = "per_frame"
    resnet_norm_mode: str = "per_frame"

    def video_config(self) -> dict[str, Any]:
        """Keyword arguments of `VideoUNet` / `VideoUNet.from_unet2d`."""
        spec = {"type": "temporal", "max_frames": self.max_frames, "num_transformer_blocks": self.transformer_blocks,
                "num_attention_heads": self.num_attention_heads, "norm_num_groups": self.norm_num_groups,
                "norm_mode": self.norm_mode}
        return {"motion_module": spec, "motion_mid_block": self.mid_block, "resnet_norm_mode": self.resnet_norm_mode}


# The structure (mid block, blocks per module) is fixed by the weights; the rest is the caller's to choose.
OVERRIDABLE = tuple(f.name for f in fields(MotionSettings) if f.name not in ("mid_block", "transformer_blocks"))


def _first_match(keys: list[str], table: list[tuple[str, str]]) -> str | None:
    return next((what for pattern, what in table if any(re.search(pattern, k) for k in keys)), None)


def guess_kind(keys: list[str]) -> str:
    """`"it looks like a LoRA (12 tensors, e.g. ...)"`: a best guess at what a non-motion-module file is."""
    what = _first_match(keys, LOOKS_LIKE) or "an unknown kind of checkpoint"
    return f"it looks like {what} ({len(keys)} tensors, e.g. {', '.join(keys[:2]) or 'none'})"


def _refuse_other_kinds(keys: list[str]) -> None:
    motion_keys = [k for k in keys if ".motion_modules." in k]
    # Only files with temporal layers are checked: an image UNet has a conv_in.weight too.
    unsupported = _first_match(keys, UNSUPPORTED) if motion_keys or any("temporal" in k for k in keys) else None
    if unsupported:
        raise KinemaError(f"this is {unsupported}; it is not supported yet (kinema loads AnimateDiff v1/v2/v3, "
                          "SDXL beta and AnimateLCM motion modules)")
    if not motion_keys:
        raise KinemaError(f"this is not an AnimateDiff motion module: {guess_kind(keys)}. Give a motion module file "
                          "(e.g. mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt) or a diffusers MotionAdapter folder")
    lora = [k for k in motion_keys if "lora" in k.lower()]
    if lora:
        raise KinemaError(f"this is a motion LoRA ({len(lora)} LoRA tensors, e.g. {lora[0]}), not a motion module: "
                          "load a motion module first and apply the LoRA on top of it "
                          "(kinema.loaders.animatediff.motion_lora)")


def _split_pe(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    weights = {k: v for k, v in state_dict.items() if not is_pe_key(k)}
    return weights, {k: v for k, v in state_dict.items() if is_pe_key(k)}


def _layout_of(keys: list[str], metadata: dict[str, str] | None) -> str:
    keys = [k for k in keys if ".motion_modules." in k]
    original = any(".temporal_transformer." in k for k in keys)
    diffusers = any(re.search(r"\.(attn1|norm3)\.", k) for k in keys)
    if original and diffusers:
        raise KinemaError("this file mixes original AnimateDiff names (temporal_transformer.) and diffusers names "
                          "(attn1/norm3); re-export it in one layout")
    if diffusers:
        return "animatediff-diffusers"
    if not original:
        raise KinemaError(f"motion-module keys in an unknown layout (e.g. {keys[0]}); "
                          "expected original AnimateDiff (temporal_transformer.) or diffusers (attn1/norm3) names")
    is_kinema = (metadata or {}).get("kinema_layout") == KINEMA_LAYOUT_TAG
    return "kinema" if is_kinema else "animatediff-original"


def _structure(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Channels per level, module counts, mid block and transformer blocks, from kinema-named weights."""
    modules: dict[str, tuple[str | None, str | None]] = {}
    stray = []
    for key in weights:
        m = _MODULE.match(key)
        if m:
            modules[m["module"]] = (m["down"], m["up"])
        else:
            stray.append(key)
    if stray:
        raise KinemaError(f"besides motion modules the file holds {len(stray)} other tensors; {guess_kind(stray)}. "
                          "kinema loads bare motion modules: save them alone (VideoUNet.motion_state_dict)")
    down = Counter(int(d) for d, _ in modules.values() if d is not None)
    up = Counter(int(u) for _, u in modules.values() if u is not None)
    levels = len(down)
    if sorted(down) != list(range(levels)) or sorted(up) != list(range(levels)) or len(set(down.values())) != 1:
        raise KinemaError(f"unexpected motion-module placement: down levels {dict(down)}, up levels {dict(up)}; "
                          "AnimateDiff has the same number of modules on every down level and up level")
    blocks = {k.split(".transformer_blocks.")[1].split(".")[0] for k in weights
              if k.startswith("down_blocks.0.motion_modules.0.") and ".transformer_blocks." in k}
    return {"channels": _level_widths(weights, levels), "mid_block": "mid_block.motion_modules.0" in modules,
            "modules_per_level": (down[0], up[0]), "transformer_blocks": max(len(blocks), 1)}


def _level_widths(weights: dict[str, torch.Tensor], levels: int) -> tuple[int, ...]:
    """Width C of each UNet level: the most common length of its modules' `temporal_transformer.norm.weight` (C,)
    (down level i, up level L-1-i, and the mid block for the deepest). Taking the majority means one damaged or
    missing tensor is reported as such, rather than setting the width every other tensor is compared with."""
    votes: list[Counter] = [Counter() for _ in range(levels)]
    for key, tensor in weights.items():
        found = _MODULE.match(key)
        if found and key.endswith(".temporal_transformer.norm.weight") and tensor.ndim == 1:
            level = (int(found["down"]) if found["down"] is not None
                     else levels - 1 - int(found["up"]) if found["up"] is not None else levels - 1)
            votes[level][tensor.shape[0]] += 1
    unread = [level for level, count in enumerate(votes) if not count]
    if unread:
        raise KinemaError(f"no motion module of UNet level {unread[0]} has a temporal_transformer.norm.weight of "
                          "shape (C,), which gives the level's width C: the file is incomplete or damaged")
    return tuple(count.most_common(1)[0][0] for count in votes)


def expected_motion_shapes(structure: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """`{kinema name: shape}` of every weight of the motion modules `structure` describes (see `_structure`), taken
    from kinema's own module built on the meta device: no memory, so checking a full-size SD1.5 module is quick."""
    channels = structure["channels"]
    down, up = structure["modules_per_level"]
    # AnimateDiff's placement (kinema.models.video_unet.motion_slots): up level i is as wide as down level L-1-i.
    places = [(f"down_blocks.{i}.motion_modules.{j}", c) for i, c in enumerate(channels) for j in range(down)]
    places += [(f"up_blocks.{i}.motion_modules.{j}", c) for i, c in enumerate(reversed(channels)) for j in range(up)]
    if structure["mid_block"]:
        places.append(("mid_block.motion_modules.0", channels[-1]))
    # Heads and norm groups change no shape; one of each builds a module of any width.
    spec = {"type": "temporal", "num_transformer_blocks": structure["transformer_blocks"],
            "num_attention_heads": 1, "norm_num_groups": 1}
    with torch.device("meta"):
        per_width = {c: shapes(build_motion_module(spec, c).state_dict()) for c in dict.fromkeys(channels)}
    return {f"{prefix}.{name}": shape for prefix, c in places for name, shape in per_width[c].items()}


def _check_weights(weights: dict[str, torch.Tensor], structure: dict[str, Any], fmt: str, label: str) -> None:
    """Refuse weights (`pe` buffers left out) whose names or shapes differ from the modules `structure` describes,
    named in the file's own layout."""
    expected = expected_motion_shapes(structure)
    if fmt == "animatediff-diffusers":
        expected = rename_state_dict(expected, "kinema", "diffusers")
    problems = key_problems(expected, shapes(weights))
    if problems:
        down, up = structure["modules_per_level"]
        mid = " and a mid-block module" if structure["mid_block"] else ""
        raise KinemaError(
            f"the weights do not match detected {label}, checked against {len(structure['channels'])} levels of "
            f"widths {structure['channels']} with {down} down / {up} up modules each{mid}: "
            f"{problems_phrase(problems)}. Likely cause: {'; '.join(LIKELY_CAUSES[kind] for kind in problems)}. "
            "Download the file again, or re-export it from the original")


def _pe_length(pe: dict, weights: dict, layout: str) -> int | None:
    """Check the stored frame tables sit where the layout puts them, with one length and the right widths."""
    if not pe:
        return None
    places = pe_places(list(weights), "diffusers" if layout == "animatediff-diffusers" else "original")
    missing, extra = sorted(set(places) - set(pe)), sorted(set(pe) - set(places))
    if missing or extra:
        raise KinemaError(f"frame-encoding buffers do not match the modules: {len(missing)} missing "
                          f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    lengths = Counter()
    for key, table in pe.items():
        width = weights[places[key]].shape[0]
        if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != width:
            raise KinemaError(f"{key} has shape {tuple(table.shape)}, expected [1, L, {width}]")
        lengths[table.shape[1]] += 1
    if len(lengths) > 1:
        raise KinemaError(f"frame-encoding lengths disagree between modules: {dict(lengths)} (length: count)")
    return next(iter(lengths))


def _common_pe_length(pe: dict[str, torch.Tensor]) -> int | None:
    """The frame-encoding length most `pe` tables [1, L, C] have (all of them, once `_pe_length` has passed)."""
    lengths = Counter(table.shape[1] for table in pe.values() if table.ndim == 3)
    return lengths.most_common(1)[0][0] if lengths else None


def _classify(levels: int, mid_block: bool, pe_length: int | None) -> str:
    """The published detection rules (diffusers single_file_utils, sd-webui, ComfyUI-AD), in their order."""
    if pe_length is None:  # no `pe` at all: AnimateLCM, or a re-save that dropped the buffers
        return "animatelcm" if mid_block else "sdxl-beta" if levels == 3 else "v3"
    if mid_block:
        return "animatelcm" if pe_length == 64 else "v2"
    if levels == 3:  # SDXL: 3 levels, i.e. up_blocks.2 has the first level's width (320)
        return "sdxl-beta"
    return "v1" if pe_length == 24 else "v3"


def _stored_settings(fmt: str, metadata: dict[str, str] | None, config: dict | None) -> dict[str, Any]:
    if fmt == "kinema":
        try:
            stored = json.loads(metadata["motion_settings"])
            return {"version": metadata["version"], **{k: stored[k] for k in OVERRIDABLE}}
        except (KeyError, ValueError, TypeError) as err:
            raise KinemaError(f"kinema motion-module metadata is incomplete ({err}); re-save the module") from None
    if config is not None:
        return {"max_frames": config.get("motion_max_seq_length", 32),
                "num_attention_heads": config.get("motion_num_attention_heads", 8),
                "norm_num_groups": config.get("motion_norm_num_groups", 32)}
    return {}


def _check_adapter_config(config: dict, structure: dict, pe_length: int | None) -> None:
    if config.get("conv_in_channels"):
        raise KinemaError("this is a PIA motion adapter (conv_in_channels set); it is not supported yet")
    heads = config.get("motion_num_attention_heads", 8)
    if not isinstance(heads, int):
        raise KinemaError(f"per-level motion_num_attention_heads {heads} are not supported; kinema uses one value")
    checks = {"block_out_channels": (tuple(config.get("block_out_channels", ())), structure["channels"]),
              "use_motion_mid_block": (bool(config.get("use_motion_mid_block", True)), structure["mid_block"]),
              "motion_max_seq_length": (config.get("motion_max_seq_length", 32), pe_length or
                                        config.get("motion_max_seq_length", 32))}
    for name, (said, found) in checks.items():
        if said != found:
            raise KinemaError(f"config.json says {name}={said!r} but the weights have {found!r}")


def detect_motion_module(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, config: dict | None = None
) -> MotionModuleInfo:
    """Recognise a motion-module state dict (any layout); `metadata` is a kinema file's safetensors metadata,
    `config` a MotionAdapter folder's config.json. Raises KinemaError for other files, naming what they look like."""
    keys = list(state_dict)
    _refuse_other_kinds(keys)
    fmt = _layout_of(keys, metadata)
    weights, pe = _split_pe(state_dict)
    structure = _structure(rename_state_dict(weights, "diffusers" if fmt == "animatediff-diffusers" else "kinema",
                                             "kinema"))
    stored = _stored_settings(fmt, metadata, config)
    version = stored.pop("version", None) or _classify(len(structure["channels"]), structure["mid_block"],
                                                       _common_pe_length(pe))
    if version not in VERSION_DEFAULTS:
        raise KinemaError(f"unknown motion-module version {version!r} in the file's metadata; known: "
                          f"{list(VERSION_DEFAULTS)}")
    # Every weight is checked before the frame tables, whose places are found beside the weights.
    _check_weights(weights, structure, fmt, motion_label(version, fmt))
    pe_length = _pe_length(pe, weights, fmt)
    if config is not None:
        _check_adapter_config(config, structure, pe_length)
    defaults = {**VERSION_DEFAULTS[version], **(DIFFUSERS_NORMS if fmt == "animatediff-diffusers" else {})}
    source = "file" if pe_length else "metadata" if fmt == "kinema" else "config" if config else "assumed"
    settings = {"num_attention_heads": 8, "norm_num_groups": 32, **defaults, **stored}
    if pe_length:
        settings["max_frames"] = pe_length
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()})
    return MotionModuleInfo(
        format=fmt, version=version, max_frames=settings["max_frames"], max_frames_source=source,
        mid_block=structure["mid_block"], channels=structure["channels"],
        modules_per_level=structure["modules_per_level"], transformer_blocks=structure["transformer_blocks"],
        num_attention_heads=settings["num_attention_heads"], norm_num_groups=settings["norm_num_groups"],
        norm_mode=settings["norm_mode"], resnet_norm_mode=settings["resnet_norm_mode"], num_keys=len(keys),
        num_params=sum(v.numel() for v in weights.values()), dtype="+".join(dtypes),
    )


def motion_settings(info: MotionModuleInfo, **overrides: Any) -> MotionSettings:
    """The VideoUNet settings for a detected module, with the caller's `overrides` (any of OVERRIDABLE) applied."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise KinemaError(f"unknown motion-module setting(s) {unknown}; you can set {list(OVERRIDABLE)}")
    base = MotionSettings(**{f.name: getattr(info, f.name) for f in fields(MotionSettings)})
    return replace(base, **overrides)


def check_frame_tables(pe: dict[str, torch.Tensor]) -> None:
    """Refuse stored `pe` buffers `(1, L, C)` that are not the sinusoidal table kinema computes, at the precision
    of their dtype."""
    for key, table in pe.items():
        tolerance = max(1e-4, torch.finfo(table.dtype).eps) if table.is_floating_point() else 1e-4
        check_frame_table(key, table, tolerance)


def to_kinema_motion_state_dict(
    state_dict: dict[str, torch.Tensor], info: MotionModuleInfo, check_pe_values: bool = True
) -> dict[str, torch.Tensor]:
    """Motion weights under kinema names (the published original names), `pe` buffers checked and dropped."""
    weights, pe = _split_pe(state_dict)
    if check_pe_values:
        check_frame_tables(pe)
    return rename_state_dict(weights, "diffusers" if info.format == "animatediff-diffusers" else "kinema", "kinema")


@dataclass
class MotionModuleFile:
    """A read motion module: where from, what it is, its weights under kinema names, what was dropped."""

    path: Path
    info: MotionModuleInfo
    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, str]


def adapter_files(path: Path) -> tuple[dict[str, Any], Path]:
    """A diffusers MotionAdapter folder's config and its weights file; KinemaError when it is not one."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise KinemaError(f"{path} is a folder without config.json; a diffusers MotionAdapter folder holds "
                          f"config.json and {ADAPTER_WEIGHTS[0]}")
    config = read_json_object(config_path, "a model config")
    if config.get("_class_name") != "MotionAdapter":
        raise KinemaError(f"{path} holds a {config.get('_class_name')!r}, not a diffusers MotionAdapter")
    weights = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise KinemaError(f"{path} has no weights file; expected one of {list(ADAPTER_WEIGHTS)}")
    return config, weights


def read_motion_module(source: str | os.PathLike) -> MotionModuleFile:
    """Read and recognise a motion-module file or MotionAdapter folder; errors name the file."""
    path = Path(source)
    try:
        if path.is_dir():
            config, weights = adapter_files(path)
            tensors, metadata, dropped = read_checkpoint(weights).tensors, None, {}
        else:
            checkpoint = read_checkpoint(path)
            config, tensors, metadata, dropped = None, checkpoint.tensors, checkpoint.metadata, checkpoint.dropped
        info = detect_motion_module(tensors, metadata, config)
        state_dict = to_kinema_motion_state_dict(tensors, info)
    except KinemaError as err:
        raise naming(path, err) from None
    return MotionModuleFile(path, info, state_dict, dropped)


# ---------------------------------------------------------------- loading into a VideoUNet


def _base_unet(unet: VideoUNet | UNet2DConditionModel) -> tuple[dict, dict[str, torch.Tensor]]:
    if isinstance(unet, VideoUNet):
        base = {k: v for k, v in unet.unet.state_dict().items() if ".motion_modules." not in k}
        return dict(unet.config.unet_config), base
    if isinstance(unet, UNet2DConditionModel):
        return {k: v for k, v in unet.config.items() if not k.startswith("_")}, unet.state_dict()
    raise KinemaError(f"load_motion_module needs a VideoUNet or diffusers UNet2DConditionModel, got {type(unet)}")


def _check_fits(info: MotionModuleInfo, unet_config: dict, source: Path) -> None:
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


def load_motion_module(
    source: str | os.PathLike, unet: VideoUNet | UNet2DConditionModel, **overrides: Any
) -> VideoUNet:
    """Build a VideoUNet from `unet`'s 2D weights and the motion module at `source` (file or MotionAdapter folder).

    Settings come from the detected version (see VERSION_DEFAULTS) and can be overridden, e.g. `norm_mode=
    "per_frame"`. The load is strict; errors name the file, the detected version and the first bad keys. The
    result takes latents `(B, C, F, H, W)` with F up to the module's frame-encoding length.
    """
    motion = read_motion_module(source)
    settings = motion_settings(motion.info, **overrides)
    unet_config, base = _base_unet(unet)
    _check_fits(motion.info, unet_config, motion.path)
    device = next(iter(base.values())).device
    with torch.device(device):  # a meta-device base builds a meta model: checks keys without memory
        video = VideoUNet(unet_config=unet_config, **settings.video_config())
    video.unet.load_state_dict({**base, **video.motion_state_dict()}, strict=True)
    try:
        video.load_motion_state_dict(motion.state_dict)
    except KinemaError as err:
        raise KinemaError(f"{motion.path} (detected {motion.info.label}): {err}") from None
    dtype = next(iter(base.values())).dtype
    return video if dtype == torch.float32 else video.to(dtype)


# ---------------------------------------------------------------- saving


def _settings_of(video_unet: VideoUNet) -> MotionSettings:
    modules = [m for _, m in video_unet.motion_modules()]
    if not modules or not all(hasattr(m, "temporal_transformer") for m in modules):
        raise KinemaError("only AnimateDiff temporal motion modules can be saved as motion-module files")
    core = modules[0].temporal_transformer
    block = core.transformer_blocks[0]
    if block.attention_kinds != ("temporal", "temporal"):
        raise KinemaError(f"AnimateDiff layouts hold two temporal attentions per block, not {block.attention_kinds}")
    return MotionSettings(
        max_frames=core.max_frames, mid_block=bool(video_unet.config.motion_mid_block),
        transformer_blocks=len(core.transformer_blocks), num_attention_heads=block.attention_blocks[0].heads,
        norm_num_groups=core.norm.num_groups, norm_mode=core.norm_mode,
        resnet_norm_mode=video_unet.config.resnet_norm_mode)


def _adapter_config(structure: dict, settings: MotionSettings) -> dict[str, Any]:
    import diffusers

    down, up = structure["modules_per_level"]
    if up != down + 1:
        raise KinemaError(f"a diffusers MotionAdapter needs one more up module than down modules per level, "
                          f"this module has {down} and {up}")
    return {"_class_name": "MotionAdapter", "_diffusers_version": diffusers.__version__,
            "block_out_channels": list(structure["channels"]), "motion_layers_per_block": down,
            "motion_transformer_layers_per_block": settings.transformer_blocks, "motion_mid_block_layers_per_block": 1,
            "motion_transformer_layers_per_mid_block": settings.transformer_blocks,
            "motion_num_attention_heads": settings.num_attention_heads,
            "motion_norm_num_groups": settings.norm_num_groups, "motion_max_seq_length": settings.max_frames,
            "use_motion_mid_block": settings.mid_block, "conv_in_channels": None}


def write_motion_module(
    state_dict: dict[str, torch.Tensor], settings: MotionSettings, path: str | os.PathLike,
    layout: str = "kinema", version: str | None = None, with_pe: bool = True, *, overwrite: bool = False,
    inputs: tuple = (),
) -> Path:
    """Write kinema-named motion weights in `layout`: "kinema" (.safetensors + settings metadata), "original"
    (.ckpt/.safetensors with `pos_encoder.pe`, omitted when `with_pe` is False) or "diffusers" (a folder), under
    kinema's output policy (`overwrite` replaces only an earlier kinema motion module; never one of `inputs`)."""
    policy = {"kind": "motion_module", "overwrite": overwrite, "inputs": inputs}
    if layout not in LAYOUTS:
        raise KinemaError(f"unknown layout {layout!r}; choose from {list(LAYOUTS)}")
    path = Path(path)
    structure = _structure(state_dict)
    version = version or _classify(len(structure["channels"]), settings.mid_block, settings.max_frames)
    if layout == "kinema":
        if path.suffix.lower() != ".safetensors":
            raise KinemaError(f"the kinema layout is a .safetensors file (it keeps settings in metadata), got {path}")
        metadata = {"kinema_layout": KINEMA_LAYOUT_TAG, "version": version,
                    "motion_settings": json.dumps(asdict(settings))}
        return write_state_dict(state_dict, path, metadata, **policy)
    if layout == "original":
        return write_state_dict(with_pe_tables(state_dict, "original", settings.max_frames) if with_pe else state_dict,
                                path, **policy)
    if path.suffix:
        raise KinemaError(f"the diffusers layout is a folder (config.json + {ADAPTER_WEIGHTS[0]}); give a folder "
                          f"path without an extension, got {path}")
    config = _adapter_config(structure, settings)
    with atomic_folder(path, **policy) as folder:
        write_state_dict(with_pe_tables(state_dict, "diffusers", settings.max_frames), folder / ADAPTER_WEIGHTS[0],
                         {"format": "pt"}, kind="motion_module")
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def save_motion_module(
    video_unet: VideoUNet, path: str | os.PathLike, layout: str = "kinema", version: str | None = None, *,
    overwrite: bool = False,
) -> Path:
    """Save a VideoUNet's motion modules alone in `layout` ("kinema", "original" or "diffusers"); `overwrite`
    replaces only an earlier kinema motion module."""
    return write_motion_module(video_unet.motion_state_dict(), _settings_of(video_unet), path, layout, version,
                               overwrite=overwrite)


def convert_motion_module(
    source: str | os.PathLike, target: str | os.PathLike, to: str, *, overwrite: bool = False
) -> tuple[Path, list[str]]:
    """Rewrite a motion module in another layout without changing a weight; returns the output and notes.
    `overwrite` replaces only an earlier kinema motion module at `target`, never `source`."""
    motion = read_motion_module(source)
    info, notes = motion.info, []
    settings = motion_settings(info)
    if to == "diffusers" and info.norm_mode == "per_frame":
        notes.append(f"{info.label} normalises its motion modules per frame, diffusers' MotionAdapter across frames; "
                     "load the converted folder with norm_mode='per_frame' to keep the original behaviour")
    if info.max_frames_source == "assumed":
        notes.append(f"the file stores no frame table; frame-encoding length {info.max_frames} was assumed")
    out = write_motion_module(motion.state_dict, settings, target, to, info.version,
                              with_pe=info.max_frames_source != "assumed", overwrite=overwrite, inputs=(source,))
    return out, notes
