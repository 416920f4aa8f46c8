"""A motion module's settings in their one form: `VideoUNet` keyword arguments.

    {"motion_module": {"type": "temporal", "max_frames": 32, "num_transformer_blocks": 1, "num_attention_heads": 8,
                       "norm_num_groups": 32, "norm_mode": "per_frame"},
     "motion_mid_block": True, "resnet_norm_mode": "per_frame"}

Detection starts from the version's preset (kinema.models.presets.ANIMATEDIFF_VERSIONS), lays over it what the weights
and the file say, and the caller's overrides after that; the VideoUNet built from them keeps them in its config, and
saving reads them back from there. Files keep settings in their own terms (a kinema file's `motion_settings`
metadata, a MotionAdapter's config.json); this module is the only place that translates.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

from kinema.errors import KinemaError
from kinema.models.motion.norms import NORM_MODES
from kinema.models.motion.temporal import TemporalMotionModule

# Where each named setting sits in the keyword arguments: `motion_module.<key>` inside the motion-module spec, or a
# keyword argument of its own. The names are those callers override and kinema files store (`motion_settings`).
SETTING_PLACES: dict[str, str] = {
    "max_frames": "motion_module.max_frames",
    "mid_block": "motion_mid_block",
    "transformer_blocks": "motion_module.num_transformer_blocks",
    "num_attention_heads": "motion_module.num_attention_heads",
    "norm_num_groups": "motion_module.norm_num_groups",
    "norm_mode": "motion_module.norm_mode",
    "resnet_norm_mode": "resnet_norm_mode",
    "attention_kinds": "motion_module.attention_kinds",
    "cross_attention_dim": "motion_module.cross_attention_dim",
}
# Settings that may be left out (kinema.json entries and kwargs written before they existed): their value then. The
# default attentions are every published module's, two temporal self-attentions; a `text` one (AnimateDiff's
# `Temporal_Cross`) reads prompt tokens of width `cross_attention_dim`.
SETTING_DEFAULTS: dict[str, Any] = {"attention_kinds": ["temporal", "temporal"], "cross_attention_dim": None}
# The structure (mid block, blocks per module, their attentions) is fixed by the weights; the rest is the caller's.
STRUCTURAL = ("mid_block", "transformer_blocks", "attention_kinds", "cross_attention_dim")
OVERRIDABLE = tuple(name for name in SETTING_PLACES if name not in STRUCTURAL)


def merged(video_unet_kwargs: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`video_unet_kwargs` with `update` (some of the same keyword arguments) laid over it, a fresh dict; the
    motion-module spec is merged key by key, so `{"motion_module": {"norm_mode": ...}}` changes that key alone."""
    spec = {**video_unet_kwargs.get("motion_module", {}), **update.get("motion_module", {})}
    return {**video_unet_kwargs, **update, "motion_module": spec}


def setting(video_unet_kwargs: Mapping[str, Any], name: str) -> Any:
    """The value of the named setting (a key of SETTING_PLACES), e.g. `setting(kwargs, "max_frames")`; attention
    kinds as a list. One left out that has a default (SETTING_DEFAULTS) reads as that default."""
    outer, _, inner = SETTING_PLACES[name].partition(".")
    holder = video_unet_kwargs[outer] if inner else video_unet_kwargs
    key = inner or outer
    value = holder[key] if key in holder or name not in SETTING_DEFAULTS else SETTING_DEFAULTS[name]
    if name == "attention_kinds":  # None in a module spec means the module's own default
        return list(value or SETTING_DEFAULTS[name])
    return value


def named_settings(video_unet_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every named setting, `{"max_frames": 32, "mid_block": True, ...}`: what a kinema file's metadata and a
    kinema.json's "motion" store. Those at their default (SETTING_DEFAULTS) are left out, so a plain module's entry
    reads as it did before they existed."""
    named = {name: setting(video_unet_kwargs, name) for name in SETTING_PLACES}
    return {name: value for name, value in named.items()
            if name not in SETTING_DEFAULTS or not _same(value, SETTING_DEFAULTS[name])}


def with_settings(video_unet_kwargs: Mapping[str, Any], **settings: Any) -> dict[str, Any]:
    """`video_unet_kwargs` with named settings (keys of SETTING_PLACES) changed, a fresh dict. A setting given at its
    default (SETTING_DEFAULTS) that the kwargs leave out stays out, so plain modules keep their plain kwargs."""
    update: dict[str, Any] = {"motion_module": {}}
    for name, value in settings.items():
        if name in SETTING_DEFAULTS and _same(value, SETTING_DEFAULTS[name]) and _same(
                setting(video_unet_kwargs, name), value):
            continue
        outer, _, inner = SETTING_PLACES[name].partition(".")
        if inner:
            update[outer][inner] = value
        else:
            update[outer] = value
    return merged(video_unet_kwargs, update)


def _same(a: Any, b: Any) -> bool:
    """Equal, with lists and tuples alike (JSON holds attention kinds as lists)."""
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def overridden(video_unet_kwargs: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`video_unet_kwargs` with the caller's `overrides` (any of OVERRIDABLE) applied."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise KinemaError(f"unknown motion-module setting(s) {unknown}; you can set {list(OVERRIDABLE)}")
    check_setting_values(overrides, "the motion-module settings given")
    return with_settings(video_unet_kwargs, **overrides)


def check_setting_values(settings: Mapping[str, Any], where: str, channels: Sequence[int] = ()) -> None:
    """One KinemaError line, naming `where` the settings come from, for an overridable setting no module can be
    built with: counts that are not positive whole numbers, an unknown norm mode, or (given the module's
    `channels`) heads or norm groups that do not divide every level's width."""
    for name in ("max_frames", "num_attention_heads", "norm_num_groups"):
        value = settings.get(name)
        if name in settings and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KinemaError(f"{where}: {name} is {value!r}, which must be a positive whole number")
    for name in ("norm_mode", "resnet_norm_mode"):
        if name in settings and settings[name] not in NORM_MODES:
            raise KinemaError(f"{where}: {name} is {settings[name]!r}; it is one of {', '.join(NORM_MODES)}")
    for name in ("num_attention_heads", "norm_num_groups"):
        odd = [width for width in channels if name in settings and width % settings[name]]
        if odd:
            raise KinemaError(f"{where}: {name} {settings[name]} does not divide the module's width {odd[0]}; give "
                              f"a divisor of {', '.join(map(str, channels))}")


# ---------------------------------------------------------------- what files store


def kinema_file_settings(metadata: Mapping[str, str] | None) -> tuple[str, dict[str, Any]]:
    """(version, overridable settings) from a kinema file's safetensors metadata; its `motion_settings` is the JSON
    of `named_settings` (files written before settings became keyword arguments hold the same fields)."""
    metadata = metadata or {}
    try:
        stored = json.loads(metadata["motion_settings"])
        return metadata["version"], {name: stored[name] for name in OVERRIDABLE}
    except (KeyError, ValueError, TypeError) as err:
        raise KinemaError(f"kinema motion-module metadata is incomplete ({err}); re-save the module") from None


def adapter_file_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a diffusers MotionAdapter config.json holds, with diffusers' defaults for those it leaves out."""
    return {"max_frames": config.get("motion_max_seq_length", 32),
            "num_attention_heads": config.get("motion_num_attention_heads", 8),
            "norm_num_groups": config.get("motion_norm_num_groups", 32)}


def check_adapter_config(config: Mapping[str, Any], structure: Mapping[str, Any], pe_length: int | None,
                         image_channels: int | None = None) -> None:
    """Refuse a MotionAdapter config.json that disagrees with its weights (`structure`, see `motion_structure`, the
    stored frame-table length and PIA's conv_in input channels) or asks for what kinema does not build (per-level
    heads)."""
    if (config.get("conv_in_channels") or None) != image_channels:
        raise KinemaError(f"config.json says conv_in_channels={config.get('conv_in_channels')!r} but the weights "
                          f"have {'no conv_in' if image_channels is None else f'a {image_channels}-channel conv_in'}")
    if structure["attention_kinds"] != SETTING_DEFAULTS["attention_kinds"]:
        raise KinemaError(f"the weights hold {structure['attention_kinds']} attentions, which a diffusers "
                          "MotionAdapter cannot: its blocks hold two temporal self-attentions")
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


def adapter_config(structure: Mapping[str, Any], video_unet_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json of a diffusers MotionAdapter holding the modules `structure` describes with these settings."""
    import diffusers

    down, up = structure["modules_per_level"]
    if up != down + 1:
        raise KinemaError(f"a diffusers MotionAdapter needs one more up module than down modules per level, "
                          f"this module has {down} and {up}")
    spec = video_unet_kwargs["motion_module"]
    if setting(video_unet_kwargs, "attention_kinds") != SETTING_DEFAULTS["attention_kinds"]:
        raise KinemaError(f"a diffusers MotionAdapter holds two temporal self-attentions per block, not "
                          f"{setting(video_unet_kwargs, 'attention_kinds')}; save in the original or kinema layout")
    return {"_class_name": "MotionAdapter", "_diffusers_version": diffusers.__version__,
            "block_out_channels": list(structure["channels"]), "motion_layers_per_block": down,
            "motion_transformer_layers_per_block": spec["num_transformer_blocks"],
            "motion_mid_block_layers_per_block": 1,
            "motion_transformer_layers_per_mid_block": spec["num_transformer_blocks"],
            "motion_num_attention_heads": spec["num_attention_heads"],
            "motion_norm_num_groups": spec["norm_num_groups"], "motion_max_seq_length": spec["max_frames"],
            "use_motion_mid_block": video_unet_kwargs["motion_mid_block"], "conv_in_channels": None}


# ---------------------------------------------------------------- what a VideoUNet was built with


def video_unet_settings(video_unet: Any) -> dict[str, Any]:
    """The keyword arguments `video_unet` (a `VideoUNet`) was built with, read from its config, the motion-module
    spec completed with the temporal module's own defaults; KinemaError unless its modules are AnimateDiff's."""
    config = video_unet.config
    spec = dict(config.motion_module or {"type": "temporal"})
    if spec.get("type") != "temporal":
        raise KinemaError("only AnimateDiff temporal motion modules can be saved as motion-module files")
    parameters = inspect.signature(TemporalMotionModule).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    spec = {**defaults, **spec}
    kinds = tuple(spec["attention_kinds"] or TemporalMotionModule.default_attention_kinds)
    if "global" in kinds:
        raise KinemaError(f"AnimateDiff layouts hold temporal attentions (and `text` ones, Temporal_Cross), "
                          f"not {kinds}")
    return {"motion_module": spec, "motion_mid_block": bool(config.motion_mid_block),
            "resnet_norm_mode": config.resnet_norm_mode}
