"""AnimateDiff's temporal motion module, built from diffusers' `Attention` and `FeedForward`.

Layout and parameter names follow the published AnimateDiff checkpoints exactly
(`temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight`, ...), so original files load
with an identity key map. The sinusoidal frame encoding is recomputed for the frames at hand instead of being
stored: published files carry it as a `pos_encoder.pe` buffer, which the loaders check and drop.

Hidden states inside the module are kept as `(B, F, N, C)` (N = H*W positions); each attention regroups that
into sequences by its *kind*: `temporal` attends over the F frames at each position, `global` over all F*N tokens,
and `text` cross-attends from every token to its frame's prompt tokens: the original code's `Temporal_Cross` block
type (`cross_attention_dim` set only for block names ending in `_Cross`), which no published file uses. It gives the
module the prompt directly, where a plain module sees it only through the image layers' features; a host passes the
prompt to a module whose `takes_text` is true.
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
from kinema.models.motion.strength import MotionAttnProcessor, current_motion_strength

AttentionKind = Literal["temporal", "global", "text"]

# How each attention kind groups (B, F, N, C) hidden states into (batch, sequence, C) for attention. A `text`
# attention's queries are independent of each other, so grouping them by frame lets each frame read its own prompt
# (prompt travel) with the text states as the UNet holds them, `(B*F, L, D)`.
_SEQUENCE_PATTERNS: dict[str, tuple[str, str]] = {
    "temporal": ("b f n c -> (b n) f c", "(b n) f c -> b f n c"),
    "global": ("b f n c -> b (f n) c", "b (f n) c -> b f n c"),
    "text": ("b f n c -> (b f) n c", "(b f) n c -> b f n c"),
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

    def __init__(self, dim: int, num_attention_heads: int, attention_kinds: Sequence[AttentionKind], ff_mult: int = 4,
                 cross_attention_dim: int | None = None):
        super().__init__()
        self.attention_kinds = tuple(attention_kinds)
        self.attention_blocks = nn.ModuleList(
            Attention(query_dim=dim, heads=num_attention_heads, dim_head=dim // num_attention_heads, bias=False,
                      cross_attention_dim=cross_attention_dim if kind == "text" else None,
                      processor=MotionAttnProcessor())  # type: ignore[arg-type]  # diffusers annotates one class
            for kind in self.attention_kinds
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.attention_kinds)
        self.ff = FeedForward(dim, mult=ff_mult, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)
        self.attention_chunk_size: int | None = None

    def _attend(self, attention: Attention, x: torch.Tensor, kind: str, text: torch.Tensor | None) -> torch.Tensor:
        to_sequences, from_sequences = _SEQUENCE_PATTERNS[kind]
        frames, positions = x.shape[1], x.shape[2]
        seq = rearrange(x, to_sequences)
        context = text if kind == "text" else None  # one row of text per sequence: (B*F, L, D)
        # Chunking bounds the attention's working memory; sequences are independent along dim 0. Unchunked, the
        # output is used as it is: a cat of one part would copy the whole activation once more.
        chunk = self.attention_chunk_size
        if chunk is None or chunk >= seq.shape[0]:
            out = attention(seq, encoder_hidden_states=context)
        else:
            parts = seq.split(chunk)
            contexts = context.split(chunk) if context is not None else [None] * len(parts)
            out = torch.cat([attention(part, encoder_hidden_states=rows)
                             for part, rows in zip(parts, contexts, strict=True)], dim=0)
        return rearrange(out, from_sequences, f=frames, n=positions)

    def forward(self, x: torch.Tensor, frame_encoding: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, F, N, C)` hidden states, an `(F, C)` frame encoding and, for `text` attentions, the prompt tokens of
        every frame `(B*F, L, D)` -> `(B, F, N, C)`."""
        for kind, norm, attention in zip(self.attention_kinds, self.norms, self.attention_blocks, strict=True):
            x = x + self._attend(cast(Attention, attention), norm(x) + frame_encoding[None, :, None, :], kind, text)
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
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        if channels % num_attention_heads:
            raise KinemaError(f"motion module channels {channels} are not divisible by {num_attention_heads} heads")
        if channels % norm_num_groups:
            raise KinemaError(f"motion module channels {channels} are not divisible by {norm_num_groups} norm groups")
        unknown = set(attention_kinds) - set(_SEQUENCE_PATTERNS)
        if unknown:
            raise KinemaError(f"unknown attention kind(s) {sorted(unknown)}; use {sorted(_SEQUENCE_PATTERNS)}")
        self.takes_text = "text" in attention_kinds
        if self.takes_text != (cross_attention_dim is not None):
            raise KinemaError("a `text` attention needs cross_attention_dim (the width of the prompt tokens), and "
                              "cross_attention_dim needs a `text` attention kind; set both or neither")
        check_norm_mode("norm_mode", norm_mode)
        self.max_frames = max_frames
        self.norm_mode = norm_mode
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            MotionBlock(channels, num_attention_heads, attention_kinds, ff_mult, cross_attention_dim)
            for _ in range(num_transformer_blocks)
        )
        self.proj_out = nn.Linear(channels, channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # A zero output projection makes the whole module an identity, so inserting it leaves the image model intact.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, C, F, H, W)` and, when it `takes_text`, the prompt tokens of every frame `(B*F, L, D)` (row b*F + f
        for frame f of clip b) -> `(B, C, F, H, W)`."""
        frames, height = x.shape[2], x.shape[3]
        check_frame_count(frames, self.max_frames)
        text = self._checked_text(text, x.shape[0] * frames)
        h = rearrange(video_group_norm(self.norm, x, self.norm_mode), "b c f h w -> b f (h w) c")
        h = self.proj_in(h)
        encoding = sinusoidal_frame_encoding(frames, h.shape[-1], device=h.device, dtype=h.dtype)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, encoding, text, use_reentrant=False)
            else:
                h = block(h, encoding, text)
        h = self.proj_out(h)
        effect = current_motion_strength().effect
        if effect != 1:
            h = h * effect
        return x + rearrange(h, "b f (h w) c -> b c f h w", h=height)

    def _checked_text(self, text: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        if not self.takes_text:
            return None
        if text is None:
            raise KinemaError("this motion module attends to the prompt (a `text` attention) but was given no prompt "
                              "tokens; run it inside its VideoUNet, or pass text=(B*F, L, D)")
        if text.ndim != 3 or text.shape[0] != rows:
            raise KinemaError(f"the motion module's prompt tokens have shape {tuple(text.shape)}; it needs one row "
                              f"per frame, ({rows}, L, D)")
        return text


@register_motion_module("temporal")
class TemporalMotionModule(nn.Module):
    """AnimateDiff motion module: temporal self-attentions over frames at every spatial position.

    Args:
        channels: width C of the hidden states it sees.
        num_attention_heads: heads per attention (AnimateDiff: 8).
        num_transformer_blocks: motion blocks in sequence (AnimateDiff: 1).
        attention_kinds: one entry per attention in a block, `temporal`, `global` or `text` (cross-attention to the
            prompt, AnimateDiff's `Temporal_Cross`).
        max_frames: length of the frame encoding the weights were trained with (24 for v1, 32 for v2/v3);
            more frames than this is refused with advice to use context windows.
        norm_mode: GroupNorm statistics `per_frame` (original SD1.5 AnimateDiff) or `across_frames` (diffusers).
        norm_num_groups: GroupNorm groups (32).
        ff_mult: feed-forward inner width as a multiple of C (4).
        cross_attention_dim: width D of the prompt tokens a `text` attention reads (None without one).
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
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        # The child's name matches the `temporal_transformer.` level of published checkpoints.
        self.temporal_transformer = TemporalTransformer(
            channels, num_attention_heads, num_transformer_blocks,
            attention_kinds or self.default_attention_kinds, max_frames, norm_mode, norm_num_groups, ff_mult,
            cross_attention_dim,
        )

    @property
    def max_frames(self) -> int:
        return self.temporal_transformer.max_frames

    @property
    def takes_text(self) -> bool:
        """Whether `forward` needs the prompt tokens (a `text` attention)."""
        return self.temporal_transformer.takes_text

    def initialize_weights(self) -> None:
        self.temporal_transformer.initialize_weights()

    def set_attention_chunk_size(self, chunk_size: int | None) -> None:
        """Attend over at most `chunk_size` sequences at a time (less memory, same result); None for all at once."""
        for block in self.temporal_transformer.transformer_blocks:
            cast(MotionBlock, block).attention_chunk_size = chunk_size

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, C, F, H, W)` -> `(B, C, F, H, W)`; identity at initialisation. `text`: the prompt tokens of every
        frame `(B*F, L, D)`, needed (and read) only when the module `takes_text`."""
        return self.temporal_transformer(x, text)
