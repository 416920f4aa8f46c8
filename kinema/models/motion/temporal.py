"""AnimateDiff's temporal motion module, built from diffusers' `Attention` and `FeedForward`.

Layout and parameter names follow the published AnimateDiff checkpoints exactly
(`temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight`, ...), so original files load
with an identity key map. The sinusoidal frame encoding is recomputed for the frames at hand instead of being
stored: published files carry it as a `pos_encoder.pe` buffer, which the loaders check and drop.

Hidden states inside the module are kept as `(B, F, N, C)` (N = H*W positions); each attention regroups that
into sequences by its *kind*: `temporal` attends over the F frames at each position, `global` over all F*N tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, cast

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from kinema.errors import KinemaError
from kinema.models.motion.norms import NormMode, check_norm_mode, video_group_norm
from kinema.models.motion.registry import register_motion_module

AttentionKind = Literal["temporal", "global"]

# How each attention kind groups (B, F, N, C) hidden states into (batch, sequence, C) for attention.
_SEQUENCE_PATTERNS: dict[str, tuple[str, str]] = {
    "temporal": ("b f n c -> (b n) f c", "(b n) f c -> b f n c"),
    "global": ("b f n c -> b (f n) c", "b (f n) c -> b f n c"),
}


def sinusoidal_frame_encoding(
    num_frames: int, dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Transformer sin/cos table for frame indices 0..F-1: `(F, dim)`, sin in even and cos in odd channels."""
    position = torch.arange(num_frames, dtype=torch.float32, device=device)[:, None]
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_frames, dim, dtype=torch.float32, device=device)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table.to(dtype) if dtype is not None else table


def check_frame_count(frames: int, max_frames: int, unit: str = "frames") -> None:
    """Refuse more frames than a frame encoding of `max_frames` covers, pointing at context windows."""
    if frames > max_frames:
        raise KinemaError(
            f"{frames} {unit} exceed the motion modules' frame encoding length {max_frames}; "
            f"generate at most {max_frames} {unit} at once and use context windows for longer videos")


class MotionBlock(nn.Module):
    """Pre-LN attentions (one per kind, frame encoding added to the normed input) then a GEGLU feed-forward."""

    def __init__(self, dim: int, num_attention_heads: int, attention_kinds: Sequence[AttentionKind], ff_mult: int = 4):
        super().__init__()
        self.attention_kinds = tuple(attention_kinds)
        self.attention_blocks = nn.ModuleList(
            Attention(query_dim=dim, heads=num_attention_heads, dim_head=dim // num_attention_heads, bias=False)
            for _ in self.attention_kinds
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.attention_kinds)
        self.ff = FeedForward(dim, mult=ff_mult, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)
        self.attention_chunk_size: int | None = None

    def _attend(self, attention: Attention, x: torch.Tensor, kind: str) -> torch.Tensor:
        to_sequences, from_sequences = _SEQUENCE_PATTERNS[kind]
        frames, positions = x.shape[1], x.shape[2]
        seq = rearrange(x, to_sequences)
        # Chunking bounds the attention's working memory; sequences are independent along dim 0. Unchunked, the
        # output is used as it is: a cat of one part would copy the whole activation once more.
        chunk = self.attention_chunk_size
        if chunk is None or chunk >= seq.shape[0]:
            out = attention(seq)
        else:
            out = torch.cat([attention(part) for part in seq.split(chunk)], dim=0)
        return rearrange(out, from_sequences, f=frames, n=positions)

    def forward(self, x: torch.Tensor, frame_encoding: torch.Tensor) -> torch.Tensor:
        """`(B, F, N, C)` hidden states and an `(F, C)` frame encoding -> `(B, F, N, C)`."""
        for kind, norm, attention in zip(self.attention_kinds, self.norms, self.attention_blocks, strict=True):
            x = x + self._attend(cast(Attention, attention), norm(x) + frame_encoding[None, :, None, :], kind)
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer(nn.Module):
    """GroupNorm -> proj_in -> motion blocks -> zero-initialised proj_out -> residual, on `(B, C, F, H, W)`."""

    def __init__(
        self,
        channels: int,
        num_attention_heads: int = 8,
        num_transformer_blocks: int = 1,
        attention_kinds: Sequence[AttentionKind] = ("temporal", "temporal"),
        max_frames: int = 32,
        norm_mode: NormMode = "per_frame",
        norm_num_groups: int = 32,
        ff_mult: int = 4,
    ):
        super().__init__()
        if channels % num_attention_heads:
            raise KinemaError(f"motion module channels {channels} are not divisible by {num_attention_heads} heads")
        if channels % norm_num_groups:
            raise KinemaError(f"motion module channels {channels} are not divisible by {norm_num_groups} norm groups")
        unknown = set(attention_kinds) - set(_SEQUENCE_PATTERNS)
        if unknown:
            raise KinemaError(f"unknown attention kind(s) {sorted(unknown)}; use {sorted(_SEQUENCE_PATTERNS)}")
        check_norm_mode("norm_mode", norm_mode)
        self.max_frames = max_frames
        self.norm_mode = norm_mode
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            MotionBlock(channels, num_attention_heads, attention_kinds, ff_mult) for _ in range(num_transformer_blocks)
        )
        self.proj_out = nn.Linear(channels, channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # A zero output projection makes the whole module an identity, so inserting it leaves the image model intact.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, F, H, W)` -> `(B, C, F, H, W)`."""
        frames, height = x.shape[2], x.shape[3]
        check_frame_count(frames, self.max_frames)
        h = rearrange(video_group_norm(self.norm, x, self.norm_mode), "b c f h w -> b f (h w) c")
        h = self.proj_in(h)
        encoding = sinusoidal_frame_encoding(frames, h.shape[-1], device=h.device, dtype=h.dtype)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, encoding, use_reentrant=False)
            else:
                h = block(h, encoding)
        h = self.proj_out(h)
        return x + rearrange(h, "b f (h w) c -> b c f h w", h=height)


@register_motion_module("temporal")
class TemporalMotionModule(nn.Module):
    """AnimateDiff motion module: temporal self-attentions over frames at every spatial position.

    Args:
        channels: width C of the hidden states it sees.
        num_attention_heads: heads per attention (AnimateDiff: 8).
        num_transformer_blocks: motion blocks in sequence (AnimateDiff: 1).
        attention_kinds: one entry per attention in a block, `temporal` or `global`.
        max_frames: length of the frame encoding the weights were trained with (24 for v1, 32 for v2/v3);
            more frames than this is refused with advice to use context windows.
        norm_mode: GroupNorm statistics `per_frame` (original SD1.5 AnimateDiff) or `across_frames` (diffusers).
        norm_num_groups: GroupNorm groups (32).
        ff_mult: feed-forward inner width as a multiple of C (4).
    """

    default_attention_kinds: tuple[AttentionKind, ...] = ("temporal", "temporal")

    def __init__(
        self,
        channels: int,
        num_attention_heads: int = 8,
        num_transformer_blocks: int = 1,
        attention_kinds: Sequence[AttentionKind] | None = None,
        max_frames: int = 32,
        norm_mode: NormMode = "per_frame",
        norm_num_groups: int = 32,
        ff_mult: int = 4,
    ):
        super().__init__()
        # The child's name matches the `temporal_transformer.` level of published checkpoints.
        self.temporal_transformer = TemporalTransformer(
            channels, num_attention_heads, num_transformer_blocks,
            attention_kinds or self.default_attention_kinds, max_frames, norm_mode, norm_num_groups, ff_mult,
        )

    @property
    def max_frames(self) -> int:
        return self.temporal_transformer.max_frames

    def initialize_weights(self) -> None:
        self.temporal_transformer.initialize_weights()

    def set_attention_chunk_size(self, chunk_size: int | None) -> None:
        """Attend over at most `chunk_size` sequences at a time (less memory, same result); None for all at once."""
        for block in self.temporal_transformer.transformer_blocks:
            cast(MotionBlock, block).attention_chunk_size = chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, F, H, W)` -> `(B, C, F, H, W)`; identity at initialisation."""
        return self.temporal_transformer(x)
