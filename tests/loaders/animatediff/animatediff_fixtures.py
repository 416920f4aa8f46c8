"""Random-weight AnimateDiff motion modules with the exact published key layout, and tiny SD-like UNets.

The layout is written out here from the reference notes (one module = 26 parameters + 2 `pe` buffers), not taken
from kinema's model, so the loader tests check kinema against the published names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import SinusoidalPositionalEmbedding

SD15_CHANNELS = (320, 640, 1280, 1280)
TINY_CHANNELS = (32, 64, 64, 64)  # 4 levels like SD1.5; widths divisible by 8 heads and 32 norm groups
TINY_SDXL_CHANNELS = (32, 64, 64)  # 3 levels like SDXL

# Tensor suffix after `<module>.temporal_transformer.` -> shape for width C (reference notes §3).
_ATTENTION = {"to_q.weight": lambda c: (c, c), "to_k.weight": lambda c: (c, c), "to_v.weight": lambda c: (c, c),
              "to_out.0.weight": lambda c: (c, c), "to_out.0.bias": lambda c: (c,)}
MODULE_TENSORS: dict[str, Callable[[int], tuple[int, ...]]] = {
    "norm.weight": lambda c: (c,), "norm.bias": lambda c: (c,),
    "proj_in.weight": lambda c: (c, c), "proj_in.bias": lambda c: (c,),
    **{f"transformer_blocks.0.attention_blocks.{a}.{k}": s for a in (0, 1) for k, s in _ATTENTION.items()},
    **{f"transformer_blocks.0.norms.{n}.{p}": (lambda c: (c,)) for n in (0, 1) for p in ("weight", "bias")},
    "transformer_blocks.0.ff.net.0.proj.weight": lambda c: (8 * c, c),
    "transformer_blocks.0.ff.net.0.proj.bias": lambda c: (8 * c,),
    "transformer_blocks.0.ff.net.2.weight": lambda c: (c, 4 * c),
    "transformer_blocks.0.ff.net.2.bias": lambda c: (c,),
    "transformer_blocks.0.ff_norm.weight": lambda c: (c,), "transformer_blocks.0.ff_norm.bias": lambda c: (c,),
    "proj_out.weight": lambda c: (c, c), "proj_out.bias": lambda c: (c,),
}
PE_SUFFIXES = [f"transformer_blocks.0.attention_blocks.{a}.pos_encoder.pe" for a in (0, 1)]


def temporal_cross_tensors(text_width: int) -> dict[str, Callable[[int], tuple[int, ...]]]:
    """A module whose blocks are the original code's ("Temporal_Self", "Temporal_Cross", "Temporal_Self"): a third
    attention and norm, and the middle attention's keys and values projected from the prompt's `text_width`."""
    tensors = {k: v for k, v in MODULE_TENSORS.items() if ".attention_blocks." not in k and ".norms." not in k}
    for a in (0, 1, 2):
        for k, shape in _ATTENTION.items():
            cross = a == 1 and k in ("to_k.weight", "to_v.weight")
            tensors[f"transformer_blocks.0.attention_blocks.{a}.{k}"] = (
                (lambda c: (c, text_width)) if cross else shape)
        for p in ("weight", "bias"):
            tensors[f"transformer_blocks.0.norms.{a}.{p}"] = lambda c: (c,)
    return tensors

# version -> (mid-block module, stored PE length or None when the file stores no `pe`)
VERSIONS: dict[str, tuple[bool, int | None]] = {
    "v1": (False, 24), "v2": (True, 32), "v3": (False, 32), "animatelcm": (True, None), "sdxl-beta": (False, 32),
}


def module_prefixes(channels: tuple[int, ...], mid_block: bool) -> list[tuple[str, int]]:
    """AnimateDiff's modules: 2 per down level, 3 per up level (widest first), optionally 1 in the mid block."""
    down = [(f"down_blocks.{i}.motion_modules.{j}", c) for i, c in enumerate(channels) for j in range(2)]
    up = [(f"up_blocks.{i}.motion_modules.{j}", c) for i, c in enumerate(reversed(channels)) for j in range(3)]
    mid = [("mid_block.motion_modules.0", channels[-1])] if mid_block else []
    return down + up + mid


def module_params(c: int) -> int:
    """Parameters of one module of width C: 22 C^2 + 21 C (reference notes §3)."""
    return 22 * c * c + 21 * c


def original_motion_state_dict(
    version: str, channels: tuple[int, ...] = TINY_CHANNELS, dtype: torch.dtype = torch.float32, seed: int = 0,
    text_width: int | None = None,
) -> dict[str, torch.Tensor]:
    """A published-layout motion module of `version` with random weights and diffusers-computed `pe` tables; with
    `text_width`, of the original code's Temporal_Cross blocks instead (`temporal_cross_tensors`)."""
    mid_block, pe_length = VERSIONS[version]
    gen = torch.Generator().manual_seed(seed)
    state_dict: dict[str, torch.Tensor] = {}
    tensors = MODULE_TENSORS if text_width is None else temporal_cross_tensors(text_width)
    pe_suffixes = PE_SUFFIXES if text_width is None else [
        f"transformer_blocks.0.attention_blocks.{a}.pos_encoder.pe" for a in (0, 1, 2)]
    for prefix, c in module_prefixes(channels, mid_block):
        for suffix, shape in tensors.items():
            values = torch.randn(shape(c), generator=gen) * (0.5 / c**0.5 if len(shape(c)) == 2 else 0.1)
            if "norm" in suffix and suffix.endswith("weight"):  # norm scales near 1, like trained ones
                values = values + 1.0
            state_dict[f"{prefix}.temporal_transformer.{suffix}"] = values.to(dtype)
        if pe_length is not None:
            for suffix in pe_suffixes:
                table = SinusoidalPositionalEmbedding(c, pe_length).pe
                state_dict[f"{prefix}.temporal_transformer.{suffix}"] = table.to(dtype)
    return state_dict


def tiny_unet(channels: tuple[int, ...] = TINY_CHANNELS, seed: int = 0) -> UNet2DConditionModel:
    """An SD-shaped 2D UNet (cross-attention on all but the deepest level) at small widths, 8x8 latents."""
    torch.manual_seed(seed)
    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1), norm_num_groups=32,
        attention_head_dim=8,
    ).eval()


def video_inputs(frames: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents `(1, 4, F, 8, 8)`, a timestep and text tokens `(1, 5, 32)`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, frames, 8, 8, generator=gen), torch.tensor([500]), torch.randn(1, 5, 32, generator=gen)


LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")  # what a MotionLoRA adapts in each temporal attention


def published_motion_lora(modules: dict[str, int], rank: int, seed: int | None = 0,
                          scale: float = 0.15) -> dict[str, torch.Tensor]:
    """A MotionLoRA in AnimateDiff's released layout (down `(r, C)`, up `(C, r)`); seed None = shapes only (meta)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    state = {}
    for module, c in modules.items():
        for attention in (0, 1):
            for proj in LORA_PROJECTIONS:
                prefix = (f"{module}.temporal_transformer.transformer_blocks.0.attention_blocks.{attention}"
                          f".processor.{proj}_lora")
                for part, shape in (("down", (rank, c)), ("up", (c, rank))):
                    state[f"{prefix}.{part}.weight"] = (torch.empty(shape, device="meta") if gen is None
                                                        else torch.randn(shape, generator=gen) * scale)
    return state
