"""Tiny random-weight Stable Diffusion 1.5 models on disk, in the published layouts, for pipeline tests.

Built from the pieces the loader tests already write out by hand (their layouts are checked there against the
published names): a diffusers folder and an LDM single file (tests/loaders/test_stable_diffusion.py), original-layout
motion modules and motion LoRAs (tests/loaders/animatediff/animatediff_fixtures.py), and a kohya image LoRA. The
UNet is `TINY_UNET` (two levels, 32 and 64 wide, 32-wide text states), so motion modules are made for those widths.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from loaders.animatediff.animatediff_fixtures import module_prefixes, original_motion_state_dict, published_motion_lora
from loaders.test_stable_diffusion import (
    TINY_CLIP,
    TINY_VAE,
    domain_adapter,
    kohya_lora,
    ldm_checkpoint,
    ldm_vae_key,
    write_tokenizer,
)
from safetensors.torch import save_file
from tiny_models import TINY_UNET, perturb
from transformers import CLIPTextConfig, CLIPTextModel

from kinema.loaders.stable_diffusion import SD15_CONFIGS

TINY_SD_WIDTHS = tuple(TINY_UNET["block_out_channels"])


def tiny_sd_parts(seed: int = 1) -> dict[str, torch.nn.Module]:
    """The UNet (`TINY_UNET`), VAE (`TINY_VAE`) and CLIP text encoder (`TINY_CLIP`), initialised and perturbed from
    `seed` (the same weights in every process), eval."""
    torch.manual_seed(seed)
    return {"unet": perturb(UNet2DConditionModel(**TINY_UNET), seed).eval(),
            "vae": perturb(AutoencoderKL(**TINY_VAE), seed + 1).eval(),
            "text_encoder": perturb(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), seed + 2).eval()}


def write_sd_folder(root: Path, parts: dict[str, torch.nn.Module]) -> Path:
    """`parts` as a diffusers SD folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) at `root`."""
    for name, model in parts.items():
        model.save_pretrained(root / name)
    write_tokenizer(root / "tokenizer")
    PNDMScheduler.from_pretrained(SD15_CONFIGS, subfolder="scheduler").save_pretrained(root / "scheduler")
    return root


def write_sd_configs(root: Path, parts: dict[str, torch.nn.Module]) -> Path:
    """The component configs of `parts` laid out like kinema's shipped SD1.5 configs (`config=` of a single file)."""
    for name, model in parts.items():
        (model.save_config if hasattr(model, "save_config") else model.config.save_pretrained)(root / name)
    PNDMScheduler.from_pretrained(SD15_CONFIGS, subfolder="scheduler").save_config(root / "scheduler")
    return root


def write_sd_single_file(path: Path, parts: dict[str, torch.nn.Module]) -> Path:
    """`parts` as one original-layout (LDM) `.safetensors` file, with the training-only entries real files carry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm_checkpoint(parts), path)
    return path


def write_motion_module(path: Path, version: str = "v2", seed: int = 0,
                        widths: tuple[int, ...] = TINY_SD_WIDTHS) -> Path:
    """An original-layout AnimateDiff motion module of `version` for a UNet of `widths`, random weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_motion_state_dict(version, channels=widths, seed=seed), path)
    return path


def write_motion_lora(path: Path, rank: int = 4, seed: int = 0, mid_block: bool = True,
                      widths: tuple[int, ...] = TINY_SD_WIDTHS) -> dict[str, torch.Tensor]:
    """A MotionLoRA in AnimateDiff's released layout for the modules of a UNet of `widths`; returns its tensors."""
    lora = published_motion_lora(dict(module_prefixes(widths, mid_block)), rank=rank, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora, path)
    return lora


def write_kohya_lora(path: Path, seed: int = 0, rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A kohya/civitai image LoRA (two UNet attention projections, one CLIP attention) for `TINY_UNET` and
    `TINY_CLIP`; returns its tensors."""
    lora = kohya_lora(seed=seed, rank=rank, alpha=alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora, path)
    return lora


def write_domain_adapter(path: Path, unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """AnimateDiff v3's domain adapter for `unet` as published (v3_sd15_adapter.ckpt: a pickle of
    `{"state_dict": ..., "animatediff_config": ""}`); returns its tensors."""
    state = domain_adapter(unet)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "animatediff_config": ""}, path)
    return state


_DEPRECATED_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def ldm_vae_state(vae: AutoencoderKL, prefix: str = "", training: bool = False) -> dict[str, torch.Tensor]:
    """`vae`'s tensors under the original (LDM) names of a standalone VAE file, as stabilityai's
    vae-ft-mse-840000-ema-pruned has them (its mid attention as 1x1 convolutions), under `prefix`; with `training`,
    the entries of an unpruned training file too (the discriminator's `loss.*`, the EMA counters)."""
    levels = len(vae.config.block_out_channels)
    state = {}
    for key, value in vae.state_dict().items():
        name = ldm_vae_key(key, levels)
        conv = ".mid.attn_1." in name and value.ndim == 2
        state[prefix + name] = value[:, :, None, None].clone() if conv else value.clone()
    if training:
        state |= {f"{prefix}loss.logvar": torch.zeros(()), f"{prefix}loss.discriminator.main.0.weight":
                  torch.ones(8, 3, 4, 4), "model_ema.decay": torch.tensor(0.9999),
                  "model_ema.num_updates": torch.tensor(840000)}
    return state


def deprecated_vae_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """`vae`'s tensors under diffusers' names before 0.15 (the mid attention's query/key/value/proj_attn), which
    older VAE folders and files still carry."""
    state = {}
    for key, value in vae.state_dict().items():
        for new, old in _DEPRECATED_VAE_ATTENTION.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state[key] = value.clone()
    return state
