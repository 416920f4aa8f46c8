"""Another VAE for a Stable Diffusion 1.5 model: the VAE files people keep beside their checkpoints, read strictly
and without unpickling code. Many fine-tunes ship a VAE that washes colours out, or none that suits them, so the
original AnimateDiff configs, prompt travel (`vae_path`), A1111 and ComfyUI all let the user swap it.

Three layouts:
- one file in the original (LDM) layout: stabilityai's `vae-ft-mse-840000-ema-pruned.safetensors`/`.ckpt`, and the
  `.pt` VAEs of anime models (`encoder.down.N.block.M.*`, `decoder.up.*`, `quant_conv.*`, `post_quant_conv.*`; a torch
  pickle may wrap them in `state_dict`). Training files also hold the discriminator and LPIPS (`loss.*`) and
  `model_ema.decay`/`model_ema.num_updates`, which are no part of the VAE and are left out, as A1111 leaves them. Names
  may carry a `first_stage_model.` or `vae.` prefix (a VAE cut out of a checkpoint).
- one file of diffusers names (`encoder.down_blocks.N.resnets.M.*`), older ones with the mid attention's
  `query`/`key`/`value`/`proj_attn` names, which diffusers renames as it loads a folder and which are renamed here too.
- a diffusers `AutoencoderKL` folder (stabilityai/sd-vae-ft-mse: `config.json` and
  `diffusion_pytorch_model.safetensors`).

A file carries no config: its VAE is built like the model's own VAE (SD1.5's by default), and diffusers' own key map
(`convert_ldm_vae_checkpoint`, the function behind `AutoencoderKL.from_single_file`) renames original names. A folder
brings its config, which must share the model's latent space: the same latent channels, downscale and scaling factor
(SDXL's VAE has SD1.5's architecture but another latent space, and its scaling factor tells it apart).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError, naming
from kinema.loaders.config_values import check_config_values, is_positive_int, is_positive_ints, is_positive_number

if TYPE_CHECKING:  # torch and diffusers load when a file is read
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from kinema.loaders.source import Source

CONFIG_CLASS = "AutoencoderKL"
PREFIXES = ("first_stage_model.", "vae.")
PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# What every VAE file holds, in either naming.
MARKERS = ("encoder.conv_in.weight", "decoder.conv_out.weight")
# Entries of a VAE training file that are not the VAE (A1111's sd_vae drops the same).
TRAINING_ONLY_PREFIX = "loss."
TRAINING_ONLY = ("model_ema.decay", "model_ema.num_updates")
# The settings a swapped VAE must share with the model's own: its latents are the model's.
LATENT_SPACE = ("latent_channels", "scaling_factor")
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ADVICE = "Is it a VAE for Stable Diffusion 1.x or 2.x (SDXL's differs), and complete?"


def is_training_only(name: str) -> bool:
    """A name of a VAE training file that is no part of the VAE (its loss networks, EMA counters)."""
    bare = _unprefixed(name)
    return bare.startswith(TRAINING_ONLY_PREFIX) or bare in TRAINING_ONLY


def _unprefixed(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def vae_file_layout(names: list[str]) -> str | None:
    """"original" or "diffusers" from a file's tensor names when the file holds an image VAE and nothing else (its
    training-only entries aside); None for anything else (a whole checkpoint has UNet names beside these)."""
    kept = [_unprefixed(name) for name in names if not is_training_only(name)]
    if not kept or not all(name.startswith(PARTS) for name in kept) or not set(MARKERS) <= set(kept):
        return None
    prefixes = {name[:len(name) - len(_unprefixed(name))] for name in names if not is_training_only(name)}
    if len(prefixes) > 1:
        return None  # two VAEs' names side by side: not one VAE
    if any(name.startswith("encoder.down.") for name in kept):
        return "original"
    return "diffusers" if any(name.startswith("encoder.down_blocks.") for name in kept) else None


def is_image_vae(source: Source) -> bool:
    """An image VAE folder or file by its config's class or its tensor names (headers only), not yet checked; a
    video VAE's file (3D convolutions: EasyAnimate's Slice VAE) is not one."""
    from kinema.loaders.checkpoint_io import folder_config_class

    if source.path.is_dir():
        return folder_config_class(source.path) == CONFIG_CLASS
    if not (source.is_weights_file and vae_file_layout(source.names) is not None):
        return False
    tensors, _ = source.layout
    conv_in = next(tensor for name, tensor in tensors.items() if _unprefixed(name) == MARKERS[0])
    return conv_in.ndim == 4


def other_vae_problem(source: Source) -> str | None:
    """What keeps a weights file that holds a VAE's tensors (`encoder.conv_in.weight`, `decoder.conv_out.weight`)
    from being an SD image VAE, in words: entries beside the VAE's, or 3D convolutions (a video VAE's); None for
    anything else, an image VAE file included."""
    if source.path.is_dir() or not source.is_weights_file:
        return None
    names = source.names
    kept = [name for name in names if not is_training_only(name)]
    if not set(MARKERS) <= {_unprefixed(name) for name in kept}:
        return None
    tensors, _ = source.layout
    if next(tensors[name] for name in kept if _unprefixed(name) == MARKERS[0]).ndim != 4:
        return "its convolutions are 3D, a video VAE's (EasyAnimate's Slice VAE comes in its model's folder)"
    if vae_file_layout(names) is None:
        beside = [name for name in kept if not _unprefixed(name).startswith(PARTS)]
        if not beside:
            return f"it holds {len(kept)} of an image VAE's tensors but no encoder levels (encoder.down.*): part of one"
        return (f"it holds {len(beside)} entries that are no part of an image VAE beside its own (e.g. "
                f"{', '.join(beside[:3])})")
    return None


def sd15_vae_config() -> dict[str, Any]:
    """The VAE config of Stable Diffusion 1.5, shipped with kinema."""
    from kinema.fileio import read_json_object
    from kinema.loaders.stable_diffusion import SD15_CONFIGS

    return read_json_object(SD15_CONFIGS / "vae" / "config.json", "SD1.5's VAE config")


def _weights_source(source: Source) -> Source:
    """The file itself, or a diffusers folder's one weights file (plain, else fp16)."""
    if not source.path.is_dir():
        return source
    from kinema.loaders.checkpoint_io import find_weights

    files = find_weights(source.path, variants=(None, "fp16"))
    if len(files.files) > 1:
        raise KinemaError("it holds sharded VAE weights; kinema reads one weights file (an SD VAE is 335 MB, never "
                          "sharded): give the folder as downloaded")
    return source.file_inside(files.files[0])


def _folder_config(source: Source) -> dict[str, Any]:
    """A folder's config as the model it builds has it: its values checked, diffusers' defaults for those left out
    (a config without `scaling_factor` decodes at diffusers' 0.18215, whatever the model's latents are)."""
    from kinema.fileio import read_json_object

    config = read_json_object(source.path / "config.json", "the VAE's config")
    check_config_values(config, _CONFIG_RULES, "its config.json", "restore the config.json the VAE came with")
    return dict(_empty_model(config).config)


# What an AutoencoderKL takes, checked before diffusers reads the config: it would fail later with a bare TypeError,
# or carry a string into the decode.
_CONFIG_RULES = {
    "scaling_factor": (is_positive_number, "a number above 0 (SD1.5's VAEs: 0.18215)"),
    "latent_channels": (is_positive_int, "a positive whole number (SD1.5's VAEs: 4)"),
    "block_out_channels": (lambda value: isinstance(value, list) and is_positive_ints(value),
                           "a list of positive whole numbers, one per level (SD1.5's: [128, 256, 512, 512])"),
}


def _diffusers_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers names with the mid attention's current names (`to_q`, ...), a file's prefix off; 1x1-convolution
    attention weights of an old diffusers file become the linears they stand for, as diffusers' loader does."""
    renamed = {}
    for name, tensor in state.items():
        bare = _unprefixed(name)
        found = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", bare)
        if found:
            bare = f"{found[1]}.{_DEPRECATED_ATTENTION[found[2]]}.{found[3]}"
            tensor = tensor[:, :, 0, 0] if tensor.ndim == 4 else tensor
        renamed[bare] = tensor
    return renamed


def _renamed(layout: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The VAE's tensors under diffusers' names, its training-only entries left out; KinemaError for a tensor the
    original names' map has no place for."""
    kept = {name: tensor for name, tensor in state.items() if not is_training_only(name)}
    if layout != "original":
        return _diffusers_names(kept)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from kinema.loaders.stable_diffusion import storage_of

    converted = convert_ldm_vae_checkpoint(kept, dict(config))
    taken = {storage_of(tensor) for tensor in converted.values()}  # the map copies or views, never recomputes
    left = [name for name, tensor in kept.items() if storage_of(tensor) not in taken]
    if left or len(converted) != len(kept):  # the map is one to one: fewer out means some had no place
        named = f" (e.g. {', '.join(left[:3])})" if left else ""
        raise KinemaError(f"{len(kept) - len(converted)} tensors have no place in the VAE{named}. {_ADVICE}")
    return converted


def _empty_model(config: Mapping[str, Any]) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from kinema.errors import library_error_message
    from kinema.state_dicts import empty_model

    # Without diffusers' private keys: `_use_default_values` would put back its defaults over the values given.
    settings = {name: value for name, value in config.items() if not name.startswith("_")}
    try:
        return empty_model(AutoencoderKL, settings)
    except (IndexError, KeyError, TypeError, ValueError) as err:  # settings that disagree (levels vs block types)
        raise KinemaError(f"its config does not build an AutoencoderKL ({library_error_message(err)}): restore the "
                          "config.json the VAE came with") from None


def _fits(model: AutoencoderKL, state: Mapping[str, torch.Tensor], against: str) -> None:
    from kinema.state_dicts import check_fits, shapes

    check_fits(shapes(model.state_dict()), shapes(state), f"its weights do not fit {against}", advice=_ADVICE)


def downscale_of(config: Mapping[str, Any]) -> int:
    """How many pixels a latent pixel covers per side: 2 ** (levels - 1)."""
    return 2 ** (len(config.get("block_out_channels") or ()) - 1)


def check_latent_space(config: Mapping[str, Any], model_config: Mapping[str, Any]) -> None:
    """One KinemaError line unless a VAE of `config` makes the latents of a model whose own VAE has `model_config`:
    the same latent channels, downscale and scaling factor."""
    if downscale_of(config) != downscale_of(model_config):
        raise KinemaError(f"it downscales {downscale_of(config)}x and the model's VAE {downscale_of(model_config)}x, "
                          "so its latents are not the model's: use a VAE made for this model's family (SD1.5 VAEs "
                          "for SD1.5 models)")
    for name in LATENT_SPACE:  # both as their models have them: defaults filled, values checked
        ours, theirs = config.get(name), model_config.get(name)
        if ours != theirs:
            raise KinemaError(f"its {name} is {ours} and the model's VAE's {theirs}, so it works in another latent "
                              "space (SDXL's VAE has scaling factor 0.13025, SD1.5's 0.18215): use a VAE made for "
                              "this model's family")


def _checked(source: Source, model_config: Mapping[str, Any] | None, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], AutoencoderKL]:
    """`(layout, config, renamed tensors, empty model)` of a VAE, every name and shape checked: a file against a
    VAE of `model_config` (SD1.5's by default), a folder against its own config, which must share `model_config`'s
    latent space when given."""
    if model_config is not None:  # as the model's VAE has it, diffusers' defaults filled
        model_config = dict(_empty_model(model_config).config)
    if source.path.is_dir():
        layout, config = "diffusers-folder", _folder_config(source)
        against = "its config.json"
        if model_config is not None:
            check_latent_space(config, model_config)
    else:
        layout = vae_file_layout(source.names) or "diffusers"
        config = model_config if model_config is not None else sd15_vae_config()
        against = "the model's VAE" if model_config is not None else "Stable Diffusion 1.5's VAE"
    state = _renamed("diffusers" if layout == "diffusers-folder" else layout, tensors, config)
    model = _empty_model(config)
    _fits(model, state, against)
    return layout, config, state, model


def describe_image_vae(source: Source) -> dict[str, Any] | None:
    """The format registry's describer: an image VAE folder or file (an SD1.x VAE), with its layout; None for
    anything else. A file is checked against the VAE of `vae_config=` (the model's own; SD1.5's by default), a
    folder against its own config and, with `vae_config=`, for the model's latent space."""
    if not is_image_vae(source):
        return None
    from kinema.loaders.checkpoint_io import dtype_report

    try:
        weights = _weights_source(source)
        tensors, _ = weights.layout
        layout, config, state, _ = _checked(source, source.options.get("vae_config"), tensors)
    except KinemaError as err:
        raise naming(source.path, err) from None
    ignored = [name for name in tensors if is_training_only(name)]
    return {"kind": "image_vae", "format": layout, "latent_channels": config.get("latent_channels"),
            "downscale": downscale_of(config), "scaling_factor": config.get("scaling_factor"),
            "parameters": sum(tensor.numel() for tensor in state.values()), "ignored_keys": len(ignored),
            "dtype": dtype_report(str(tensors[name].dtype).removeprefix("torch.") for name in tensors
                                  if name not in ignored)}


def read_image_vae(path: str | Path | Source, vae_config: Mapping[str, Any] | None = None, *,
                   dtype: torch.dtype | None = None) -> AutoencoderKL:
    """The image VAE at `path` (a folder or file, or the `Source` a describe read, whose reads are reused: a torch
    pickle is unpickled once), loaded strictly in `dtype` (default float32). A file is built like a VAE of
    `vae_config` (the model's own; SD1.5's by default); a folder from its own config, checked against `vae_config`'s
    latent space when given. It maps images `(N, 3, H, W)` in [-1, 1] to latents `(N, 4, H/8, W/8)` and back."""
    from kinema.loaders.source import Source
    from kinema.state_dicts import assign_checked

    source = path if isinstance(path, Source) else Source(Path(path))
    if not is_image_vae(source):
        raise KinemaError(f"{source.path} is not an image VAE (no AutoencoderKL config.json, nor the tensors of one: "
                          "encoder.conv_in.weight, decoder.conv_out.weight and nothing else); give an SD1.5 VAE "
                          "file or folder, e.g. vae-ft-mse-840000-ema-pruned.safetensors")
    try:
        weights = _weights_source(source)
        names = [name for name in weights.names if not is_training_only(name)]
        _, config, state, model = _checked(source, vae_config, weights.read(names))
        assign_checked(model, state, "the VAE", dtype=dtype, advice=_ADVICE)
    except KinemaError as err:
        raise naming(source.path, err) from None
    return model.eval()


def load_image_vae_source(source: Source, *, vae_config: Mapping[str, Any] | None = None,
                          dtype: torch.dtype | None = None) -> AutoencoderKL:
    """The format registry's loader: `read_image_vae` through the `Source` its describe read."""
    return read_image_vae(source, vae_config, dtype=dtype)
