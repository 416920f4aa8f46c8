"""Pieces of the video DiT: its transformer block, the U-ViT skip rules and EasyAnimate V3's motion-module pattern.

Everything is built from diffusers' `Attention` and `FeedForward` plus kinema's motion-module registry. Parameter
names equal EasyAnimate V3's `TemporalTransformerBlock` (`norm1`, `attn1`, `attn_temporal`, `norm2`, `attn2`, `ff`,
`scale_shift_table`), which are also PixArt's names, so both checkpoints map onto it without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from einops import rearrange
from torch import nn

from kinema.errors import KinemaError
from kinema.models.motion import build_motion_module, run_motion_module

MotionModuleSpec = str | dict[str, Any]


def uvit_skip_pairs(num_layers: int) -> list[tuple[int, int]]:
    """Symmetric U-ViT long skips as `(source, target)` block pairs; the position in the list is the skip linear's
    index. This is the rule of kinema-native models.

    The output of block `i` is added (through a linear) to the input of block `num_layers - 1 - i` for the first
    `num_layers // 2 - 1` blocks, so the two middle blocks stay unlinked. At 28 blocks this equals EasyAnimate V3's
    wiring (`easyanimate_v3_skip_pairs`), 13 skips (12, 15), (11, 16), ..., (0, 27); at other depths the two differ.
    Skip `j` is consumed in increasing target order, so it pairs the most recent source with the first target.
    """
    num_skips = max(num_layers // 2 - 1, 0)
    return [(num_skips - 1 - j, num_layers - num_skips + j) for j in range(num_skips)]


# EasyAnimate V3's Transformer3DModel always builds 13 skip linears, keeps the outputs of blocks 0-12 on a stack and,
# before each block from 15 on, adds linear `block - 15` of the most recently kept output: its depth-28 numbers.
EASYANIMATE_V3_SKIP_LINEARS = 13
EASYANIMATE_V3_FIRST_SKIP_TARGET = 15


def easyanimate_v3_skip_pairs(num_layers: int) -> list[tuple[int, int]]:
    """EasyAnimate V3's long skips at any depth, as `(source, target)` pairs indexed like `uvit_skip_pairs`.

    V3 wires skips by block index, not by depth: block `k` (15 <= k < min(num_layers, 28)) gets linear `k - 15` of
    the output of block `27 - k`. So 20 blocks link 12..8 -> 15..19, 15 or fewer blocks link nothing, and the file
    still holds all `EASYANIMATE_V3_SKIP_LINEARS` linears. Beyond 28 blocks V3's forward runs out of linears and
    fails, so such a model has no V3 rule to follow and is refused.
    """
    last_target = 2 * EASYANIMATE_V3_FIRST_SKIP_TARGET - 3  # 27: the target of the first kept output, block 0
    if num_layers > last_target + 1:
        raise KinemaError(f"EasyAnimate V3 wires its {EASYANIMATE_V3_SKIP_LINEARS} U-ViT skip linears into blocks "
                          f"{EASYANIMATE_V3_FIRST_SKIP_TARGET}-{last_target}, so with enable_uvit it runs at most "
                          f"{last_target + 1} blocks (its forward fails at block {last_target + 1}); this config has "
                          f"num_layers {num_layers}, which no EasyAnimate V3 code can run")
    return [(last_target - k, k) for k in range(EASYANIMATE_V3_FIRST_SKIP_TARGET, min(num_layers, last_target + 1))]


def check_skip_pairs(skip_pairs: Sequence[Sequence[int]], num_skip_linears: int, num_layers: int) -> None:
    """Raise one KinemaError line unless every skip is a `(source, target)` pair of blocks, earlier to later, no
    block sends or receives two skips, and there is a linear for each (extra linears are allowed: V3 stores 13)."""
    malformed = [pair for pair in skip_pairs if not (
        isinstance(pair, list | tuple) and len(pair) == 2
        and all(isinstance(block, int) and not isinstance(block, bool) for block in pair))]
    if malformed:
        raise KinemaError(f"skip_pairs entries {malformed[:3]} are not [source, target] pairs of block indices")
    if not isinstance(num_skip_linears, int) or isinstance(num_skip_linears, bool) or num_skip_linears < 0:
        raise KinemaError(f"num_skip_linears must be a whole number >= 0, got {num_skip_linears!r}")
    sources = [source for source, _ in skip_pairs]
    targets = [target for _, target in skip_pairs]
    bad = [pair for pair in skip_pairs if not 0 <= pair[0] < pair[1] < num_layers]
    if bad:
        raise KinemaError(f"skip_pairs {bad} are not (source, target) blocks with 0 <= source < target < num_layers "
                          f"= {num_layers}; a skip carries an earlier block's output to a later block's input")
    if len(set(sources)) != len(sources) or len(set(targets)) != len(targets):
        raise KinemaError(f"skip_pairs {skip_pairs} use a block twice as a source or as a target; each block sends "
                          "and receives at most one skip")
    if num_skip_linears < len(skip_pairs):
        raise KinemaError(f"num_skip_linears {num_skip_linears} is below the {len(skip_pairs)} skip_pairs; skip j "
                          "uses linear j, so give at least one linear per pair")


def easyanimate_v3_motion_modules(
    num_layers: int, num_attention_heads: int = 16, max_frames: int = 4096, norm_num_groups: int = 32
) -> list[dict[str, Any]]:
    """EasyAnimate V3's per-block motion modules: temporal in even blocks, hybrid (temporal + global) in odd ones.

    This is V3's `motion_module_kwargs_even` / `motion_module_kwargs_odd` as one spec per block. V3 adds the frame
    encoding (length 4096) to every motion attention and normalises each frame on its own.
    """
    return [
        {
            "type": "temporal" if index % 2 == 0 else "hybrid",
            "num_attention_heads": num_attention_heads,
            "max_frames": max_frames,
            "norm_mode": "per_frame",
            "norm_num_groups": norm_num_groups,
        }
        for index in range(num_layers)
    ]


class VideoDiTBlock(nn.Module):
    """PixArt-alpha block with a motion module between the spatial self-attention and the text cross-attention.

    adaLN-single: the six shift/scale/gate vectors are the model-wide timestep projection plus this block's learned
    `scale_shift_table`. Spatial attention sees one frame at a time; the motion module mixes frames; all video tokens
    of a clip then attend jointly to the context tokens. Hidden states are `(B, F*N, C)` with N = h*w patches.

    Args:
        dim: width C.
        num_attention_heads / attention_head_dim: spatial and cross-attention heads (their product is `dim`).
        cross_attention_dim: width of the context tokens.
        motion_module: registry spec of the motion module, e.g. `{"type": "hybrid", "max_frames": 4096}`.
        attention_bias: bias on q/k/v projections. activation_fn: feed-forward activation (diffusers name).
        norm_elementwise_affine / norm_eps: the two LayerNorms. dropout: attention and feed-forward dropout.
        upcast_attention: compute attention scores in fp32.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        motion_module: MotionModuleSpec,
        attention_bias: bool = True,
        activation_fn: str = "gelu-approximate",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        upcast_attention: bool = False,
    ):
        super().__init__()
        # torch's LayerNorm already accumulates in fp32 for half inputs, so V3's FP32LayerNorm is not needed.
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
                               bias=attention_bias, upcast_attention=upcast_attention)
        self.attn_temporal = build_motion_module(motion_module, dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn2 = Attention(query_dim=dim, cross_attention_dim=cross_attention_dim, heads=num_attention_heads,
                               dim_head=attention_head_dim, dropout=dropout, bias=attention_bias,
                               upcast_attention=upcast_attention)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_bias: torch.Tensor | None,
        num_frames: int,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """`(B, F*h*w, C)` tokens, `(B, 6*C)` timestep projection, `(B, L, C)` context with `(B, 1, L)` additive
        bias (or None) -> `(B, F*h*w, C)`."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)
        ).chunk(6, dim=1)  # each (B, 1, C)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        h = self.attn1(rearrange(h, "b (f n) c -> (b f) n c", f=num_frames))  # attention within each frame
        x = x + gate_msa * rearrange(h, "(b f) n c -> b (f n) c", f=num_frames)
        video = rearrange(x, "b (f h w) c -> b c f h w", f=num_frames, h=height, w=width)
        x = rearrange(run_motion_module(self.attn_temporal, video), "b c f h w -> b (f h w) c")
        # No norm before cross-attention: PixArt (and V3) feed the raw hidden states.
        x = x + self.attn2(x, encoder_hidden_states=context, attention_mask=context_bias)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(h)
