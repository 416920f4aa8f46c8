"""Untrained starting folders for kinema's own models (`kinema weights init NAME --out DIR`), the first step of the
bundled models' recipe (docs/bundled.md): `kinema train` then trains them stage by stage.

kinema-tiny is an EasyAnimate V3-family folder (transformer/, vae/) and kinema-tiny-ad a Stable Diffusion-family one
(unet/, vae/, scheduler/); neither holds a text encoder: `kinema.json` names one (kinema.loaders.text_encoder).
kinema-tiny-ad's kinema.json also names its motion modules' settings ("motion", kinema.pipelines.load
.model_motion_settings), which the motion stage builds its fresh modules with and loading reads back. Every weight is
drawn from `seed`, so the same command always writes the same folder.

The last step, `bundle_model`, assembles the folder kinema ships from the stages' exports, weights stored in float16.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError

INITIAL_MODELS = ("kinema-tiny", "kinema-tiny-ad")
MODEL_FILE = "kinema.json"
# What a folder of either tiny model makes by default (the CLI fills unset options from it).
TINY_SIDE = 64  # pixels: the synthetic world's frames are square
TINY_DEFAULTS = {"height": TINY_SIDE, "width": TINY_SIDE, "frames": 16, "steps": 25, "guidance": 6.0,
                 "scheduler": "ddim"}
# Continuation: the frames each new segment holds. kinema-tiny-ad's motion modules join segments more smoothly
# holding 8 (docs/generation.md); kinema-tiny's DiT, whose latent frames span 4, joins best on 4, the library's.
TINY_OVERLAP_FRAMES = {"kinema-tiny-ad": 8}
TINY_DESCRIPTION = ("a toy text-to-video model trained by kinema on its synthetic dataset: coloured circles, "
                    "squares and triangles moving over muted backgrounds")


def model_manifest(name: str, family: str, held_out: list[list[str]] | None = None,
                   motion: dict[str, Any] | None = None, prediction_type: str | None = None) -> dict[str, Any]:
    """The `kinema.json` of a kinema model folder: its name, family, text encoder, defaults and world, what the model
    predicts when it is not the noise (`prediction_type`), and for an AnimateDiff-family model `motion`, its motion
    modules' `VideoUNet` keyword arguments, stored as their named settings
    (kinema.loaders.animatediff.settings.named_settings)."""
    from kinema.models.presets import MINILM_TEXT_ENCODER

    defaults = dict(TINY_DEFAULTS)
    if name in TINY_OVERLAP_FRAMES:
        defaults["overlap_frames"] = TINY_OVERLAP_FRAMES[name]
    manifest: dict[str, Any] = {"name": name, "family": family, "description": TINY_DESCRIPTION,
                                "text_encoder": dict(MINILM_TEXT_ENCODER), "defaults": defaults, "world": "synth"}
    if prediction_type is not None:
        manifest["prediction_type"] = prediction_type
    if motion is not None:
        from kinema.loaders.animatediff.settings import named_settings
        from kinema.pipelines.load import MOTION_SETTINGS_ENTRY

        manifest[MOTION_SETTINGS_ENTRY] = named_settings(motion)
    if held_out:
        manifest["held_out"] = held_out
    return manifest


def _seeded(seed: int, build: Any) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def latent_scaling_factor(vae: Any, data_root: str | os.PathLike, clips: int = 64, frames: int = 8) -> float:
    """1 / the standard deviation of `vae`'s posterior-mean latents over the first `clips` videos of the dataset at
    `data_root` (their first `frames` frames): the factor that gives the diffusion model latents of unit variance,
    as Stable Diffusion's 0.18215 was measured. Works for a `SliceVAE` (clips) and an `AutoencoderKL` (frames)."""
    import torch

    from kinema.data.video_io import read_video
    from kinema.fileio import read_json

    root = Path(data_root)
    entries = read_json(root / "metadata.json", "the dataset's metadata")
    videos = [root / entry["file_path"] for entry in entries if entry.get("type") == "video"][:clips]
    if not videos:
        raise KinemaError(f"{root} lists no videos to measure the latents' scale on")
    means = []
    with torch.no_grad():
        for path in videos:
            pixels = read_video(path, max_frames=frames).frames  # (F, 3, H, W) in [-1, 1]
            batch = pixels.permute(1, 0, 2, 3)[None] if type(vae).__name__ == "SliceVAE" else pixels
            means.append(vae.encode(batch).latent_dist.mean.flatten())
    return float(1.0 / torch.cat(means).std())


# The VAE each model is made with (its config.json's _class_name).
_VAE_CLASSES = {"kinema-tiny": "SliceVAE", "kinema-tiny-ad": "AutoencoderKL"}


def check_vae_folder(name: str, vae: str | os.PathLike) -> None:
    """One KinemaError line, from its files alone (no torch), when `vae` is no trained VAE folder that model `name`
    takes: no config.json, no weights, or a VAE of the other model's kind (a Slice VAE for kinema-tiny-ad, an image
    VAE for kinema-tiny)."""
    from kinema.errors import with_article
    from kinema.fileio import read_json_object

    vae = Path(vae)
    if not (vae / "config.json").is_file():
        raise KinemaError(f"{vae} is not a VAE folder (no config.json): give a VAE stage's final/vae")
    if not any(vae.glob("*.safetensors")) and not any(vae.glob("*.bin")):
        raise KinemaError(f"{vae} holds a config.json but no weights (.safetensors): give the whole VAE folder "
                          "(a VAE stage's final/vae)")
    made = read_json_object(vae / "config.json", f"the config of the VAE {vae}").get("_class_name")
    wanted = _VAE_CLASSES[name]
    if made != wanted:
        maker = next((model for model, kind in _VAE_CLASSES.items() if kind == made), None)
        whose = f" (a {maker} VAE)" if maker else ""
        raise KinemaError(f"{vae} is {with_article(made or 'VAE of unknown kind')}{whose}, and {name} takes "
                          f"{with_article(wanted)}: give the final/vae of a vae stage trained on a {name} folder")


def write_initial_model(name: str, out: str | os.PathLike, seed: int = 0, vae: str | os.PathLike | None = None,
                        *, scale_data: str | os.PathLike | None = None, overwrite: bool = False,
                        size: Mapping[str, int | None] | None = None) -> Path:
    """Write the untrained folder of kinema model `name` (one of `INITIAL_MODELS`) to `out`, its weights drawn from
    `seed`; `vae` puts a trained VAE folder (a stage's `final/vae`) in place of the fresh one, and with `scale_data`
    (a dataset folder) its `scaling_factor` is measured there (`latent_scaling_factor`). `size` changes kinema-tiny's
    DiT from the shipped `KINEMA_TINY_DIT_SIZE` (keys `layers`, `heads`, `patch_size`; e.g. `{"patch_size": 1}`) or
    kinema-tiny-ad's fresh image VAE (`vae_downsample`: 8, shipped, or 4; `check_size`).
    `out` follows kinema's output policy (new or empty, or with `overwrite` an earlier folder this function wrote).
    Returns `out`."""
    from kinema.fileio import atomic_folder, check_output

    if name not in INITIAL_MODELS:
        raise KinemaError(f"unknown model {name!r}: kinema can start {', '.join(INITIAL_MODELS)}")
    sized = check_size(name, size, trained_vae=vae is not None)
    out = Path(out)
    inputs = tuple(path for path in (vae, scale_data) if path is not None)
    check_output(out, "model", folder=True, overwrite=overwrite, inputs=inputs)
    vae_folder = None
    if vae is not None:
        check_vae_folder(name, vae)
        vae_folder = Path(vae)
    if scale_data is not None and vae_folder is None:
        raise KinemaError("the latents' scale is measured on a trained VAE: give the VAE folder too")
    with atomic_folder(out, "model", overwrite=overwrite, inputs=inputs) as temp:
        if name == "kinema-tiny":
            _write_tiny(temp, seed, vae_folder, scale_data, sized)
        else:
            _write_tiny_ad(temp, seed, vae_folder, scale_data, sized["vae_downsample"])
        # How its starting weights were made, which a trained folder's kinema.json (copied from here) keeps too.
        manifest = json.loads((temp / MODEL_FILE).read_text())
        manifest["initialised_with"] = {
            "seed": seed, "vae": None if vae_folder is None else os.path.abspath(vae_folder),
            "scale_data": None if scale_data is None else os.path.abspath(scale_data),
            **{key: value for key, value in sized.items() if value is not None}}
        (temp / MODEL_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _spelled(key: str) -> str:
    """A size setting as both the Python key and `kinema init-model`'s option: "patch_size (--patch-size)"."""
    return f"{key} (--{key.replace('_', '-')})"


def check_size(name: str, size: Mapping[str, int | None] | None, trained_vae: bool = False) -> dict[str, int]:
    """Model `name`'s size settings with `size`'s changes (a None value changes nothing), each checked (one line per
    problem, before anything is written): kinema-tiny's DiT (`KINEMA_TINY_DIT_SIZE`: layers, heads, patch_size) or
    kinema-tiny-ad's fresh image VAE (`KINEMA_TINY_AD_SIZE`: vae_downsample, which a `trained_vae` fixes)."""
    from kinema.models.presets import KINEMA_TINY_AD_SIZE, KINEMA_TINY_DIT_SIZE

    shipped = {"kinema-tiny": KINEMA_TINY_DIT_SIZE, "kinema-tiny-ad": KINEMA_TINY_AD_SIZE}
    changes = {key: value for key, value in (size or {}).items() if value is not None}
    for key in changes:
        if key not in shipped[name]:
            owner = next((other for other, keys in shipped.items() if key in keys), None)
            takes = ", ".join(map(_spelled, shipped[name]))
            if owner is not None:
                raise KinemaError(f"{_spelled(key)} is {owner}'s setting; {name} takes {takes}")
            raise KinemaError(f"unknown {name} size setting {key!r}; use {takes}")
        value = changes[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KinemaError(f"{name}'s {_spelled(key)} must be a whole number of at least 1, got {value!r}")
    if trained_vae and "vae_downsample" in changes:
        raise KinemaError("a trained VAE keeps the downsampling it was trained with: drop the VAE's downsampling "
                          "(--vae-downsample) or the VAE folder (--vae)")
    merged = {**shipped[name], **changes}
    if name == "kinema-tiny-ad":
        if merged["vae_downsample"] not in (4, 8):
            raise KinemaError(f"the image VAE's downsampling must be 4 or 8, got {merged['vae_downsample']}")
        return merged
    if merged["layers"] < 2:
        raise KinemaError(f"the DiT needs at least 2 layers (a temporal block and a hybrid one), got "
                          f"{merged['layers']}")
    if merged["patch_size"] not in (1, 2, 4):
        raise KinemaError(f"the patch size must be 1, 2 or 4 (it divides the 16x16 latents), got "
                          f"{merged['patch_size']}")
    return merged


def _write_vae(temp: Path, vae_class: Any, settings: dict, seed: int, vae_folder: Path | None,
               scale_data: str | os.PathLike | None) -> Any:
    """Write the folder's `vae/` (fresh from `settings`, or the trained one at `vae_folder`) and return it."""
    if vae_folder is None:
        vae = _seeded(seed + 1, lambda: vae_class(**settings))
    else:
        vae = vae_class.from_pretrained(vae_folder).eval()
        if scale_data is not None:
            vae.register_to_config(scaling_factor=latent_scaling_factor(vae, scale_data))
    vae.save_pretrained(temp / "vae")
    return vae


def _write_tiny(temp: Path, seed: int, vae_folder: Path | None, scale_data: str | os.PathLike | None,
                dit_size: Mapping[str, int]) -> None:
    from kinema.models.presets import KINEMA_TINY_SLICE_VAE, kinema_tiny_transformer
    from kinema.models.slice_vae import SliceVAE
    from kinema.models.video_dit import VideoDiT

    vae = _write_vae(temp, SliceVAE, KINEMA_TINY_SLICE_VAE, seed, vae_folder, scale_data)
    # The DiT is sized from the VAE in the folder, so a trained VAE of another layout gets a DiT that fits it.
    settings = kinema_tiny_transformer(latent_channels=vae.config.latent_channels,
                                       sample_size=TINY_SIDE // vae.spatial_ratio, **dit_size)
    _seeded(seed, lambda: VideoDiT(**settings)).save_pretrained(temp / "transformer")
    # v-prediction: a small DiT trained for an hour or two could not compose a clip from pure noise predicting
    # epsilon (at DDPM's last steps, signal-to-noise 4e-5, x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies every
    # error by 150), so it learns the velocity, whose x0 stays bounded (docs/bundled.md, the fifth session).
    manifest = model_manifest("kinema-tiny", "easyanimate", prediction_type="v_prediction")
    (temp / MODEL_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def _write_tiny_ad(temp: Path, seed: int, vae_folder: Path | None, scale_data: str | os.PathLike | None,
                   vae_downsample: int) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from kinema.models.presets import (
        KINEMA_TINY_AD_MOTION,
        KINEMA_TINY_AD_UNET,
        image_vae_downsample,
        kinema_tiny_ad_vae,
    )
    from kinema.sampling.schedulers import FAMILIES

    vae = _write_vae(temp, AutoencoderKL, kinema_tiny_ad_vae(vae_downsample), seed, vae_folder, scale_data)
    # The UNet's sample_size is the VAE's latent side (eval reads the model's native size from it).
    latent_side = TINY_SIDE // image_vae_downsample(vae.config.block_out_channels)
    _seeded(seed, lambda: UNet2DConditionModel(**{**KINEMA_TINY_AD_UNET, "sample_size": latent_side})).save_pretrained(
        temp / "unet")
    # v-prediction for the reason _write_tiny gives: AnimateDiff's betas end at a signal-to-noise ratio of 1.6e-3, where
    # an epsilon model's x0 multiplies every error by 25, too much for a model trained for an hour.
    DDIMScheduler(**{**FAMILIES["animatediff"], "prediction_type": "v_prediction"}).save_pretrained(temp / "scheduler")
    manifest = model_manifest("kinema-tiny-ad", "animatediff", motion=KINEMA_TINY_AD_MOTION,
                              prediction_type="v_prediction")
    (temp / MODEL_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------- the bundled folder

# Weights a bundle never holds: pickles (kinema ships safetensors only, and never unpickles).
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
BUNDLE_MAX_MEGABYTES = 30.0  # what a bundled model may take on disk (issue: each model at most 30 MB)


def _store_weights(source: Path, target: Path, dtype: Any) -> None:
    """`source`'s tensors written to `target` with floating-point ones cast to `dtype`, metadata kept; KinemaError
    for a weight the cast makes infinite (beyond float16's range)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as weights:
        metadata = weights.metadata()
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}
    stored = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            cast = tensor.to(dtype)
            if bool((torch.isfinite(tensor) & ~torch.isfinite(cast)).any()):
                raise KinemaError(f"{source}: {name} holds values beyond {str(dtype).removeprefix('torch.')}'s "
                                  "range; bundle with storage_dtype='float32'")
            tensor = cast
        stored[name] = tensor.contiguous()
    save_file(stored, str(target), metadata=metadata)


def _copy_part(source: Path, target: Path, dtype: Any) -> None:
    """One part of a bundle (a file, or a folder copied file by file): `.safetensors` through `_store_weights`,
    other files byte for byte, kinema's output manifests left behind (the bundle gets its own); pickled weights are
    refused."""
    from kinema.fileio import MANIFEST

    if source.is_dir():
        target.mkdir()
        for child in sorted(source.iterdir()):
            if child.name != MANIFEST:
                _copy_part(child, target / child.name, dtype)
    elif source.suffix.lower() in _PICKLE_SUFFIXES:
        raise KinemaError(f"{source} is a pickle; a bundle holds safetensors only: save it with safetensors "
                          "(diffusers' save_pretrained does by default)")
    elif source.suffix.lower() == ".safetensors" and dtype is not None:
        _store_weights(source, target, dtype)
    else:
        shutil.copyfile(source, target)


def _folder_bytes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*")) if path.is_file()}


def bundle_model(model: str | os.PathLike, out: str | os.PathLike, *,
                 extra: Mapping[str, str | os.PathLike] | None = None, storage_dtype: str | None = "float16",
                 max_megabytes: float | None = BUNDLE_MAX_MEGABYTES, overwrite: bool = False) -> Path:
    """Assemble a model folder to ship (kinema.bundled) at `out`: everything in `model`, a stage's exported folder
    with its kinema.json (kinema-tiny-ad: the image stage's `final/model`, unet/ vae/ scheduler/; kinema-tiny: the
    DiT stage's `final/model`, transformer/ vae/), plus `extra` parts, each a name in the bundle -> a file or folder
    (kinema-tiny-ad: `{"motion_module.safetensors": the motion stage's final/motion_module.safetensors}`).

    Every `.safetensors` is rewritten with its floating-point tensors in `storage_dtype` (None: as they are);
    kinema's loaders cast weights to the dtype they load in, so a float16 bundle loads as float32. Other files are
    copied byte for byte; pickled weights are refused. `out` follows kinema's output policy (new or empty, or with
    `overwrite` an earlier bundle); nothing is left there when the result would exceed `max_megabytes` (10^6 bytes;
    None: no limit). Returns `out`.
    """
    import torch

    from kinema.fileio import MANIFEST, atomic_folder

    model = Path(model)
    if not (model / MODEL_FILE).is_file():
        raise KinemaError(f"{model} has no {MODEL_FILE}: give a stage's exported final/model (kinema's own models "
                          "carry one naming their text encoder)")
    if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
        raise KinemaError(f"unknown storage_dtype {storage_dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    parts = {child.name: child for child in sorted(model.iterdir()) if child.name != MANIFEST}
    for name, path in (extra or {}).items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise KinemaError(f"bundle part name {name!r} is not a plain file or folder name (no '/')")
        if name in parts:
            raise KinemaError(f"{model} already holds {name}; bundle another name or drop that part from extra")
        if not Path(path).exists():
            raise KinemaError(f"bundle part {name}: {path} does not exist: check the path")
        parts[name] = Path(path)
    dtype = None if storage_dtype is None else getattr(torch, storage_dtype)
    out = Path(out)
    with atomic_folder(out, "model", overwrite=overwrite, inputs=[model, *parts.values()]) as temp:
        for name, path in parts.items():
            _copy_part(path, temp / name, dtype)
        sizes = _folder_bytes(temp)
        total = sum(sizes.values())
        if max_megabytes is not None and total > max_megabytes * 1e6:
            largest = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in
                                sorted(sizes.items(), key=lambda item: -item[1])[:3])
            raise KinemaError(f"the bundle would take {total / 1e6:.1f} MB, over the {max_megabytes:g} MB a bundled "
                              f"model may take (largest: {largest}); store float16 weights or make the model smaller")
    return out
