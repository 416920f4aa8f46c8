"""Untrained starting folders for kinema's own models (`kinema weights init NAME --out DIR`), the first step of the
bundled models' recipe (docs/bundled.md): `kinema train` then trains them stage by stage.

kinema-tiny is an EasyAnimate V3-family folder (transformer/, vae/) and kinema-tiny-ad a Stable Diffusion-family one
(unet/, vae/, scheduler/); neither holds a text encoder: `kinema.json` names one (kinema.loaders.text_encoder). Every
weight is drawn from `seed`, so the same command always writes the same folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError

INITIAL_MODELS = ("kinema-tiny", "kinema-tiny-ad")
MODEL_FILE = "kinema.json"
# What a folder of either tiny model makes by default (the CLI fills unset options from it).
TINY_DEFAULTS = {"height": 64, "width": 64, "frames": 16, "steps": 25, "guidance": 6.0, "scheduler": "ddim"}
TINY_DESCRIPTION = ("a toy text-to-video model trained by kinema on its synthetic dataset: coloured circles, "
                    "squares and triangles moving over muted backgrounds")


def model_manifest(name: str, family: str, held_out: list[list[str]] | None = None) -> dict[str, Any]:
    """The `kinema.json` of a kinema model folder: its name, family, text encoder, defaults and world."""
    from kinema.models.presets import MINILM_TEXT_ENCODER

    manifest: dict[str, Any] = {"name": name, "family": family, "description": TINY_DESCRIPTION,
                                "text_encoder": dict(MINILM_TEXT_ENCODER), "defaults": dict(TINY_DEFAULTS),
                                "world": "synth"}
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


def write_initial_model(name: str, out: str | os.PathLike, seed: int = 0, vae: str | os.PathLike | None = None,
                        *, scale_data: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write the untrained folder of kinema model `name` (one of `INITIAL_MODELS`) to `out`, its weights drawn from
    `seed`; `vae` puts a trained VAE folder (a stage's `final/vae`) in place of the fresh one, and with `scale_data`
    (a dataset folder) its `scaling_factor` is measured there (`latent_scaling_factor`). `out` follows kinema's
    output policy (new or empty, or with `overwrite` an earlier folder this function wrote). Returns `out`."""
    from kinema.fileio import atomic_folder, check_output

    if name not in INITIAL_MODELS:
        raise KinemaError(f"unknown model {name!r}: kinema can start {', '.join(INITIAL_MODELS)}")
    out = Path(out)
    check_output(out, "model", folder=True, overwrite=overwrite)
    vae_folder = None
    if vae is not None:
        vae_folder = Path(vae)
        if not (vae_folder / "config.json").is_file():
            raise KinemaError(f"{vae_folder} is not a VAE folder (no config.json): give a stage's final/vae")
    if scale_data is not None and vae_folder is None:
        raise KinemaError("the latents' scale is measured on a trained VAE: give the VAE folder too")
    with atomic_folder(out, "model", overwrite=overwrite) as temp:
        if name == "kinema-tiny":
            _write_tiny(temp, seed, vae_folder, scale_data)
        else:
            _write_tiny_ad(temp, seed, vae_folder, scale_data)
    return out


def _write_vae(temp: Path, vae_class: Any, settings: dict, seed: int, vae_folder: Path | None,
               scale_data: str | os.PathLike | None) -> None:
    if vae_folder is None:
        _seeded(seed + 1, lambda: vae_class(**settings)).save_pretrained(temp / "vae")
        return
    vae = vae_class.from_pretrained(vae_folder).eval()
    if scale_data is not None:
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, scale_data))
    vae.save_pretrained(temp / "vae")


def _write_tiny(temp: Path, seed: int, vae_folder: Path | None, scale_data: str | os.PathLike | None) -> None:
    from kinema.models.presets import KINEMA_TINY_SLICE_VAE, kinema_tiny_transformer
    from kinema.models.slice_vae import SliceVAE
    from kinema.models.video_dit import VideoDiT

    _seeded(seed, lambda: VideoDiT(**kinema_tiny_transformer(patch_size=2))).save_pretrained(temp / "transformer")
    _write_vae(temp, SliceVAE, KINEMA_TINY_SLICE_VAE, seed, vae_folder, scale_data)
    (temp / MODEL_FILE).write_text(json.dumps(model_manifest("kinema-tiny", "easyanimate"), indent=1) + "\n")


def _write_tiny_ad(temp: Path, seed: int, vae_folder: Path | None, scale_data: str | os.PathLike | None) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from kinema.models.presets import KINEMA_TINY_AD_UNET, KINEMA_TINY_AD_VAE
    from kinema.sampling.schedulers import FAMILIES

    _seeded(seed, lambda: UNet2DConditionModel(**KINEMA_TINY_AD_UNET)).save_pretrained(temp / "unet")
    _write_vae(temp, AutoencoderKL, KINEMA_TINY_AD_VAE, seed, vae_folder, scale_data)
    DDIMScheduler(**FAMILIES["animatediff"]).save_pretrained(temp / "scheduler")
    (temp / MODEL_FILE).write_text(json.dumps(model_manifest("kinema-tiny-ad", "animatediff"), indent=1) + "\n")
