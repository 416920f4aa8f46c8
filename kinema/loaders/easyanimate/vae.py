"""Strict loading of EasyAnimate V3 Slice VAE folders (the `vae/` of an EasyAnimateV3 checkpoint, or a kinema save).

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`, read with `weights_only=True`).
Every config field must be a `SliceVAE` argument or listed below as metadata; every weight must match the model's
name and shape. Anything else raises KinemaError naming the first few offenders, before any weight is copied.
"""

import inspect
import logging
import math
from pathlib import Path

import torch

from kinema.errors import KinemaError
from kinema.fileio import read_json_object
from kinema.loaders.checkpoint_io import read_state_dict
from kinema.models.slice_vae import SliceVAE
from kinema.state_dicts import key_mismatch, shapes

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Class names a V3 VAE config is saved under: V3's own class, the AutoencoderKL name some V3 copies carry, and ours.
CLASS_NAMES = {"AutoencoderKLMagvit", "AutoencoderKL", "SliceVAE"}
# Fields that describe the file, and `sample_size` (AutoencoderKL metadata V3's class never read): no effect on maths.
IGNORED_FIELDS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size"}
# Weights of V3's VAE *training loss* (LPIPS + 2D/3D discriminators) that V3 VAE files can carry and V3 drops through
# strict=False. They are not part of the autoencoder; they are dropped by this exact prefix and counted in the log.
TRAINING_ONLY_PREFIXES = ("loss.",)
SHOW = 5  # offending keys named per category


def _folder(path: str | Path, subfolder: str | None) -> Path:
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise KinemaError(f"{folder} has no {CONFIG_NAME}; point at the VAE folder (e.g. <checkpoint>/vae).")
    return folder


def read_slice_vae_config(folder: str | Path) -> dict:
    """The `SliceVAE` keyword arguments in `folder/config.json`, after rejecting unknown fields and class names."""
    path = Path(folder) / CONFIG_NAME
    config = read_json_object(path, what="the Slice VAE's config")
    class_name = config.get("_class_name", "SliceVAE")
    if class_name not in CLASS_NAMES:
        raise KinemaError(f"{path} describes a {class_name}, not an EasyAnimate V3 Slice VAE "
                          f"(expected one of {sorted(CLASS_NAMES)}).")
    params = set(inspect.signature(SliceVAE.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - params - IGNORED_FIELDS)
    if unknown:
        raise KinemaError(f"{path} has field(s) the V3 Slice VAE does not know: {unknown[:SHOW]}. They would change "
                          "the model in the code that wrote them; this is probably not a V3 VAE.")
    return {k: v for k, v in config.items() if k in params}


def is_slice_vae_folder(folder: str | Path) -> bool:
    """Detection rule: config.json with `slice_compression_vae: true`, none of the V2/V4/V5 modes, 4 latent channels
    (the default when absent), and a weights file next to it. Never raises."""
    folder = Path(folder)
    try:
        config = read_json_object(folder / CONFIG_NAME)
    except KinemaError:
        return False
    later_modes = ("slice_mag_vae", "cache_compression_vae", "cache_mag_vae", "spatial_group_norm")
    return (
        config.get("slice_compression_vae") is True
        and not any(config.get(k) for k in later_modes)
        and config.get("latent_channels", 4) == 4
        and any((folder / name).is_file() for name in WEIGHT_NAMES)
    )


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise KinemaError(f"{folder} has no weights; expected one of {list(WEIGHT_NAMES)}.")


def check_state_dict(expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise KinemaError unless `state_dict` has exactly the `expected` names and shapes."""
    found = key_mismatch(expected, shapes(state_dict))
    if found:
        cause = ("config.json widths (ch, ch_mult, latent_channels, in/out_channels) do not match the weights"
                 if set(expected) == set(state_dict) else
                 "the weights are not a V3 Slice VAE, or config.json describes a different layout "
                 "(block types, layers_per_block, mid_block_use_attention)")
        raise KinemaError(f"{source} does not match the Slice VAE: {found}. Likely cause: {cause}.")


def load_slice_vae(path: str | Path, subfolder: str | None = None,
                   torch_dtype: torch.dtype | None = None, mmap: bool = False) -> SliceVAE:
    """Build a `SliceVAE` from `path[/subfolder]` and load its weights strictly; returns it in eval mode, in
    `torch_dtype` (default float32).

    Keys under `loss.` (training-only loss networks) are dropped and counted; any other missing, unexpected or
    wrongly shaped key raises KinemaError naming it, before any weight is copied. Weights are read into memory;
    `mmap=True` leaves uncast safetensors weights as views of the memory-mapped file.
    """
    folder = _folder(path, subfolder)
    kwargs = read_slice_vae_config(folder)
    with torch.device("meta"):
        model = SliceVAE(**kwargs)
    state_dict = _read_weights(folder)
    dropped = [k for k in state_dict if k.startswith(TRAINING_ONLY_PREFIXES)]
    for k in dropped:
        del state_dict[k]
    if dropped:
        logger.info("Dropped %d training-only keys under %s from %s.", len(dropped), TRAINING_ONLY_PREFIXES, folder)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state_dict, str(folder))
    # The tensors are cast before they are assigned: diffusers' ModelMixin.to(dtype) warns about modules "that
    # should be kept in float32" on every dtype cast, even for models like this one that list none.
    dtype = torch_dtype or torch.float32
    for name in list(state_dict):  # one tensor at a time, so at most one extra copy is alive
        state_dict[name] = state_dict[name].to(dtype, copy=not mmap)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def describe_slice_vae(path: str | Path) -> dict | None:
    """What `kinema inspect` prints for a V3 Slice VAE folder (or a model folder holding `vae/`); None otherwise.

    Reads config.json and the weights' names and shapes (the safetensors header only, never tensor data), and
    checks every name and shape against the SliceVAE the config builds (`check_state_dict`, as a load does).
    """
    from kinema.loaders.checkpoint_io import SAFETENSORS_DTYPES, read_safetensors_header

    folder = Path(path)
    if not is_slice_vae_folder(folder):
        folder = folder / "vae"
        if not is_slice_vae_folder(folder):
            return None
    config = read_slice_vae_config(folder)
    weights = next(folder / name for name in WEIGHT_NAMES if (folder / name).is_file())
    if weights.suffix == ".safetensors":
        header = read_safetensors_header(weights)
    else:
        header = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in _read_weights(folder).items()}
    kept = {k: v for k, v in header.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    with torch.device("meta"):  # every name and shape against the model config.json builds, as a load checks them
        expected = shapes(SliceVAE(**config).state_dict())
    check_state_dict(expected, {k: torch.empty(shape, device="meta") for k, (shape, _) in kept.items()}, str(folder))
    dtypes = sorted({SAFETENSORS_DTYPES.get(dtype, dtype) for _, dtype in kept.values()})
    defaults = {name: p.default for name, p in inspect.signature(SliceVAE.__init__).parameters.items()}
    setting = {name: config.get(name, defaults[name]) for name in
               ("latent_channels", "scaling_factor", "mini_batch_encoder", "mini_batch_decoder", "use_tiling")}
    return {
        "kind": "slice_vae", "format": "easyanimate-v3-vae", "path": str(weights), "keys": len(kept),
        "parameters": sum(math.prod(shape) for shape, _ in kept.values()),
        "training_only_keys": len(header) - len(kept),
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed: " + ", ".join(dtypes), **setting,
    }
