"""Strict loading of EasyAnimate V3 Slice VAE folders (the `vae/` of an EasyAnimateV3 checkpoint, or a kinema save).

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`, read with `weights_only=True`, or
shards named by an index). V3's config.json is translated into `SliceVAE` arguments here, as config.py does for the
transformer: fields SliceVAE takes pass through, V3's version switches are accepted only at V3's value, fields
without effect are dropped, anything else is refused. Every weight must match the model's name and shape. Anything
wrong raises one KinemaError naming the first few offenders, before any weight is copied.
"""

import ast
import inspect
import logging
import math
from pathlib import Path
from typing import Any

import torch

from kinema.errors import KinemaError
from kinema.fileio import read_json_object
from kinema.loaders.checkpoint_io import WeightFiles, dtype_report, find_weights
from kinema.loaders.checkpoint_io import read_state_dict as read_weights_file
from kinema.loaders.config_values import (
    BOOLEAN,
    FRACTION,
    POSITIVE_INT,
    POSITIVE_INTS,
    POSITIVE_NUMBER,
    check_config_values,
)
from kinema.models.presets import EASYANIMATE_V3_SLICE_VAE
from kinema.models.slice_vae import SliceVAE
from kinema.state_dicts import check_fits, load_strict, shapes

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
# Class names a V3 VAE config is saved under: V3's own class, the AutoencoderKL name some V3 copies carry, and ours.
CLASS_NAMES = {"AutoencoderKLMagvit", "AutoencoderKL", "SliceVAE"}
# SliceVAE's arguments: V3's fields that change the maths, under V3's names and meanings.
SLICE_VAE_FIELDS = tuple(name for name in inspect.signature(SliceVAE.__init__).parameters if name != "self")
LATER_MODE = "a later EasyAnimate VAE mode"
# Accepted only at V3's value (field: (V3's value, what any other value is)): other values are other EasyAnimate
# versions' VAEs or options, with other maths.
V3_FIXED_FIELDS: dict[str, tuple[Any, str]] = {
    "slice_compression_vae": (True, "EasyAnimate V2's MagViT mode (causal padding)"),
    "slice_mag_vae": (False, LATER_MODE),
    "cache_compression_vae": (False, LATER_MODE),
    "cache_mag_vae": (False, LATER_MODE),
    "spatial_group_norm": (False, LATER_MODE),
    "upcast_vae": (False, "a later EasyAnimate option (decode in float32)"),
    "mid_block_type": ("MidBlock3D", "a mid block the V3 Slice VAE does not have"),
}
# The fixed fields that choose between EasyAnimate's VAE versions; detection takes a folder setting one of them
# otherwise for another version's VAE and leaves it alone.
VERSION_SWITCHES = ("slice_compression_vae", "slice_mag_vae", "cache_compression_vae", "cache_mag_vae",
                    "spatial_group_norm")
# Stored in V3 configs without effect on the autoencoder: AutoencoderKL metadata V3's class never reads
# (sample_size), a pipeline hint (force_upcast: decode in float32) and the head count of attention down/up blocks,
# which V3 does not have (num_attention_heads). Fields starting with "_" are diffusers' metadata.
V3_INERT_FIELDS = ("sample_size", "force_upcast", "num_attention_heads")
# Written by later EasyAnimate configs beside `ch` / `ch_mult`, or left at "none": checked, then dropped.
V3_REDUNDANT_FIELDS = ("block_out_channels", "use_gc_blocks")
BLOCK_TYPE_FIELDS = ("down_block_types", "up_block_types")
# Weights of V3's VAE *training loss* (LPIPS + 2D/3D discriminators) that V3 VAE files can carry and V3 drops through
# strict=False. They are not part of the autoencoder; they are dropped by this exact prefix and counted in the log.
TRAINING_ONLY_PREFIXES = ("loss.",)
SHOW = 5  # offending config fields named


def _is_v3_value(value: Any, v3_value: Any) -> bool:
    return value == v3_value or (v3_value is False and value is None)


_CONFIG_RULES = {
    **dict.fromkeys(("in_channels", "out_channels", "ch", "layers_per_block", "latent_channels", "norm_num_groups",
                     "mini_batch_encoder", "mini_batch_decoder", "mid_block_num_attention_heads",
                     "tile_sample_min_size"), POSITIVE_INT),
    "ch_mult": POSITIVE_INTS, "scaling_factor": POSITIVE_NUMBER, "tile_overlap_factor": FRACTION,
    **dict.fromkeys(("mid_block_use_attention", "use_tiling", "use_tiling_encoder", "use_tiling_decoder"), BOOLEAN),
}


def slice_vae_config_from_easyanimate(config: dict[str, Any], where: str = "Slice VAE config") -> dict[str, Any]:
    """EasyAnimate V3 `vae/config.json` (or a kinema SliceVAE config, older ones included) -> `SliceVAE(**kwargs)`.

    Every SliceVAE argument, from the config or, where it is left out, V3's value (`EASYANIMATE_V3_SLICE_VAE`).
    `V3_FIXED_FIELDS` are refused at any value but V3's, `block_out_channels` must equal `ch * ch_mult` and
    `use_gc_blocks` be none or all false, `V3_INERT_FIELDS` are dropped, block types written as one string (V3's
    training YAMLs) are read as the tuple they spell. Unknown fields are refused; `where` names the config in errors.
    """
    config = {name: value for name, value in config.items() if not name.startswith("_")}
    known = set(SLICE_VAE_FIELDS) | set(V3_FIXED_FIELDS) | set(V3_INERT_FIELDS) | set(V3_REDUNDANT_FIELDS)
    unknown = sorted(set(config) - known)
    if unknown:
        raise KinemaError(f"{where} has field(s) the V3 Slice VAE does not know: {unknown[:SHOW]}. They would change "
                          "the model in the code that wrote them; this is probably not a V3 VAE.")
    for name, (v3_value, other) in V3_FIXED_FIELDS.items():
        if name in config and not _is_v3_value(config[name], v3_value):
            raise KinemaError(f"{where}: {name}={config[name]!r} is {other}, not V3's ({v3_value!r}); kinema reads "
                              "EasyAnimate V3 Slice VAEs only")
    kwargs = {**EASYANIMATE_V3_SLICE_VAE, **{name: config[name] for name in SLICE_VAE_FIELDS if name in config}}
    check_config_values(kwargs, _CONFIG_RULES, where, "restore the config.json the VAE came with")
    for name in BLOCK_TYPE_FIELDS:
        if isinstance(kwargs[name], str):
            kwargs[name] = ast.literal_eval(kwargs[name])
    widths = [kwargs["ch"] * m for m in kwargs["ch_mult"]]
    block_out_channels = config.get("block_out_channels")
    if block_out_channels is not None and list(block_out_channels) != widths:
        raise KinemaError(f"{where}: block_out_channels {block_out_channels} disagrees with ch * ch_mult = {widths}; "
                          "fix one of them.")
    if any(config.get("use_gc_blocks") or ()):
        raise KinemaError(f"{where}: use_gc_blocks={config['use_gc_blocks']}: global-context blocks are not part of "
                          "the V3 Slice VAE; kinema reads EasyAnimate V3 Slice VAEs only")
    return kwargs


def _folder(path: str | Path, subfolder: str | None) -> Path:
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise KinemaError(f"{folder} has no {CONFIG_NAME}; point at the VAE folder (e.g. <checkpoint>/vae).")
    return folder


def read_slice_vae_config(folder: str | Path) -> dict[str, Any]:
    """The `SliceVAE` keyword arguments of `folder/config.json` (`slice_vae_config_from_easyanimate`), after
    rejecting class names that are not a V3 VAE's."""
    path = Path(folder) / CONFIG_NAME
    config = read_json_object(path, what="the Slice VAE's config")
    class_name = config.get("_class_name", "SliceVAE")
    if class_name not in CLASS_NAMES:
        raise KinemaError(f"{path} describes a {class_name}, not an EasyAnimate V3 Slice VAE "
                          f"(expected one of {sorted(CLASS_NAMES)}).")
    return slice_vae_config_from_easyanimate(config, where=str(path))


def is_slice_vae_folder(folder: str | Path) -> bool:
    """Detection rule: config.json saved by kinema's SliceVAE, or with `slice_compression_vae: true` and none of the
    V2/V4/V5 modes; 4 latent channels (the default when absent); weights beside it. Never raises."""
    folder = Path(folder)
    try:
        config = read_json_object(folder / CONFIG_NAME)
        weights = find_weights(folder, missing_ok=True)
    except KinemaError:  # a broken config.json or weights index
        return False
    v3_switches = config.get("slice_compression_vae") is True and all(
        _is_v3_value(config.get(name), V3_FIXED_FIELDS[name][0]) for name in VERSION_SWITCHES[1:])
    return (
        (config.get("_class_name") == SliceVAE.__name__ or v3_switches)
        and config.get("latent_channels", 4) == 4
        and weights is not None
    )


def _mismatch_cause(expected: set[str], found: set[str]) -> str:
    """The likely cause of weights not fitting, for the error message: wrong widths or a wrong layout."""
    if expected == found:
        return ("Likely cause: config.json widths (ch, ch_mult, latent_channels, in/out_channels) do not match the "
                "weights.")
    return ("Likely cause: the weights are not a V3 Slice VAE, or config.json describes a different layout (block "
            "types, layers_per_block, mid_block_use_attention).")


def _read_state_dict(weights: WeightFiles) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for path in weights.files:
        state_dict.update(read_weights_file(path))
    return state_dict


def load_slice_vae(path: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                   mmap: bool = False, device: str | torch.device = "cpu") -> SliceVAE:
    """Build a `SliceVAE` from `path[/subfolder]` (a V3 VAE folder or a kinema-saved one) and load its weights
    strictly; returns it in eval mode, in `torch_dtype` (default float32), on `device`.

    Keys under `loss.` (training-only loss networks) are dropped and counted; any other missing, unexpected or
    wrongly shaped key raises KinemaError naming it, before any weight is copied. Weights are read into memory;
    `mmap=True` leaves uncast safetensors weights as views of the memory-mapped file.
    """
    folder = _folder(path, subfolder)
    kwargs = read_slice_vae_config(folder)
    with torch.device("meta"):
        model = SliceVAE(**kwargs)
    state_dict = _read_state_dict(find_weights(folder))
    dropped = [k for k in state_dict if k.startswith(TRAINING_ONLY_PREFIXES)]
    for k in dropped:
        del state_dict[k]
    if dropped:
        logger.info("Dropped %d training-only keys under %s from %s.", len(dropped), TRAINING_ONLY_PREFIXES, folder)
    context = f"{folder} does not match the Slice VAE"
    advice = _mismatch_cause(set(model.state_dict()), set(state_dict))
    check_fits(shapes(model.state_dict()), shapes(state_dict), context, advice=advice)  # before any cast
    # The tensors are cast before they are assigned: diffusers' ModelMixin.to(dtype) warns about modules "that
    # should be kept in float32" on every dtype cast, even for models like this one that list none.
    dtype = torch_dtype or torch.float32
    for name in list(state_dict):  # one tensor at a time, so at most one extra copy is alive
        state_dict[name] = state_dict[name].to(device, dtype, copy=not mmap)
    load_strict(model, state_dict, context, advice=advice, assign=True)
    return model.eval()


def slice_vae_folder(path: str | Path) -> Path | None:
    """The Slice VAE folder `path` names: itself, or the `vae/` of a model folder; None when neither is one."""
    for folder in (Path(path), Path(path) / "vae"):
        if is_slice_vae_folder(folder):
            return folder
    return None


def describe_slice_vae(path: str | Path) -> dict[str, Any] | None:
    """What `kinema inspect` prints for a V3 Slice VAE folder (or a model folder holding `vae/`); None otherwise.

    Reads config.json and the weights' names and shapes (the safetensors headers only, never tensor data), and
    checks every name and shape against the SliceVAE the config builds, as a load does.
    """
    folder = slice_vae_folder(path)
    if folder is None:
        return None
    config = read_slice_vae_config(folder)
    weights = find_weights(folder)
    header = weights.header()
    kept = {k: shape for k, (shape, _) in header.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    with torch.device("meta"):  # every name and shape against the model config.json builds, as a load checks them
        expected = shapes(SliceVAE(**config).state_dict())
    check_fits(expected, kept, f"{folder} does not match the Slice VAE", advice=_mismatch_cause(set(expected),
                                                                                               set(kept)))
    return {
        "kind": "slice_vae", "format": "easyanimate-v3-vae", "path": str(weights.index or weights.files[0]),
        "keys": len(kept), "parameters": sum(math.prod(shape) for shape in kept.values()),
        "training_only_keys": len(header) - len(kept),
        "dtype": dtype_report(dtype for k, (_, dtype) in header.items() if k in kept),
        **{name: config[name] for name in ("latent_channels", "scaling_factor", "mini_batch_encoder",
                                           "mini_batch_decoder", "use_tiling")},
    }
