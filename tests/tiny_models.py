"""Tiny models, their configs and weight perturbation, shared by the tests (seconds on a CPU).

The pytest fixtures `unet2d`, `video_unet`, `video_dit` and `slice_vae` (tests/conftest.py) build these; tests that
need a variant call the builders here with settings of their own.
"""

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

from kinema.models.slice_vae import SliceVAE
from kinema.models.video_dit import VideoDiT
from kinema.models.video_unet import VideoUNet

# An SD1.5-shaped UNet2DConditionModel: one cross-attention level and one plain level, 16x16 latents.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32, attention_head_dim=8,
)

# A PixArt-shaped DiT: 4 blocks 64 wide (2 heads of 32), 8x8 latents, 48-wide text states.
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=32, num_layers=4, cross_attention_dim=64, sample_size=8,
                caption_channels=48)

# An EasyAnimate V3-shaped Slice VAE (four levels, widths doubling once) at 8 base channels in norm groups of 4.
TINY_SLICE_VAE = dict(ch=8, ch_mult=(1, 2, 2, 2), norm_num_groups=4)
# Smaller still, for tests that only save, load or convert one: one resnet per block, 8 channels throughout.
SMALLEST_SLICE_VAE = dict(TINY_SLICE_VAE, ch_mult=(1, 1, 1, 1), layers_per_block=1)

CUSTOM_MOTION_MODULE_DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_motion_module.md"


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter, so zero-initialised parts stop being identities."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def tiny_unet2d(seed: int = 0) -> UNet2DConditionModel:
    """The `TINY_UNET` 2D UNet with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).eval()


def tiny_video_unet(unet2d: UNet2DConditionModel | None = None, **video_config: Any) -> VideoUNet:
    """`unet2d` (default: `tiny_unet2d()`) inflated with fresh, identity motion modules, in eval mode."""
    return VideoUNet.from_unet2d(unet2d if unet2d is not None else tiny_unet2d(), **video_config).eval()


def tiny_pixart(in_channels: int = 4) -> PixArtTransformer2DModel:
    """A `TINY_DIT`-shaped PixArt-alpha image DiT (learned sigma: 8 output channels), seeded, in eval mode."""
    torch.manual_seed(0)
    return PixArtTransformer2DModel(in_channels=in_channels, out_channels=8, **TINY_DIT).eval()


def tiny_video_dit(**overrides: Any) -> VideoDiT:
    """A freshly initialised `TINY_DIT` video DiT, text-to-video (4 channels, no image tokens) unless `overrides`
    say otherwise, in eval mode."""
    torch.manual_seed(0)
    return VideoDiT(**{**TINY_DIT, "in_channels": 4, "image_embed_dim": None, **overrides}).eval()


def tiny_slice_vae(**settings: Any) -> SliceVAE:
    """A freshly initialised `TINY_SLICE_VAE`, seeded, with `settings` changed (e.g. `**SMALLEST_SLICE_VAE`), in eval
    mode."""
    torch.manual_seed(0)
    return SliceVAE(**{**TINY_SLICE_VAE, **settings}).eval()


def python_blocks(markdown: str) -> list[str]:
    """The code of every ```python block of a Markdown page, in order."""
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


def documented_motion_module(registry_name: str, module_name: str) -> type[torch.nn.Module]:
    """The custom motion module of docs/custom_motion_module.md, `TemporalConv`, run from the page's own first code
    block but registered as `registry_name` (the page's `my_conv` is left to the page's own test).

    The class says it lives in the module `module_name`: bind it there as `TemporalConv` and models using it pickle.
    """
    block = python_blocks(CUSTOM_MOTION_MODULE_DOC.read_text())[0]
    registration = '@register_motion_module("my_conv")'
    assert block.count(registration) == 1, "the page's registration line changed; update this helper"
    namespace: dict = {"__name__": module_name}
    exec(compile(block.replace(registration, f"@register_motion_module({registry_name!r})"),
                 str(CUSTOM_MOTION_MODULE_DOC), "exec"), namespace)
    return namespace["TemporalConv"]
