"""Building blocks of the EasyAnimate V3 Slice VAE: residual blocks, samplers, mid-block attention, encoder, decoder.

Why not diffusers' `AutoencoderKLMagvit` blocks: that class is EasyAnimate V5's VAE. Its `EasyAnimateCausalConv3d`
pads time causally (replicate) and keeps a feature cache that is mutated between calls, its mid block has no
attention, its temporal upsampler is nearest, and it has 16 latent channels. V3 needs 4 latent channels, convs that pad
time with one zero frame on each side (V3's slice mode; that is a plain `nn.Conv3d`), a self-attention in both mid
blocks, a trilinear temporal upsample after the conv, slice encoding of 8 frames -> 2 latents, decoder feature sharing
with the neighbouring slices and the half-slice seam re-decode. None of its blocks computes V3's maths, so the blocks
here are V3's, with V3's state-dict names; diffusers supplies the activation, the posterior and ModelMixin.

Every module maps `(B, C, F, H, W) -> (B, C', F', H', W')`; none holds state between calls.
"""

import torch
import torch.nn.functional as F
from diffusers.models.activations import get_activation
from einops import rearrange
from torch import nn

NORM_EPS = 1e-6


def conv3x3x3(in_channels: int, out_channels: int) -> nn.Conv3d:
    """3x3x3 conv padding one zero on every side, time included.

    V3's `CausalConv3d` in slice mode (the only mode V3 runs) pads time with one zero frame on each side: not causal.
    """
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)


class ResidualBlock3D(nn.Module):
    """(GroupNorm -> act -> conv) x 2 plus a shortcut: `(B, C_in, F, H, W) -> (B, C_out, F, H, W)`.

    GroupNorm sees the 5-D tensor, so its statistics span every frame the block is given, as in V3.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int, act_fn: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = conv3x3x3(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = conv3x3x3(out_channels, out_channels)
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.act = get_activation(act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.shortcut(x)


class Downsampler3D(nn.Module):
    """Halve H and W, and F when `temporal`: `(B, C, F, H, W) -> (B, C, F/2 or F, H/2, W/2)`.

    One zero row and column are added at the bottom/right (as in the SD VAE), time gets one zero frame each side.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        stride = (2 if temporal else 1, 2, 2)
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, stride=stride, padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsampler3D(nn.Module):
    """Nearest 2x in H and W, a conv, then (when `temporal`) trilinear 2x in F.

    `(B, C, F, H, W) -> (B, C, 2F or F, 2H, 2W)`. A single latent frame is an image and stays one frame (V3's
    one-frame mode); a slice always has at least two frames, so the frame count alone tells the two apart.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.conv = conv3x3x3(channels, channels)
        self.temporal = temporal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
        if self.temporal and x.shape[2] > 1:
            x = F.interpolate(x, scale_factor=(2, 1, 1), mode="trilinear")
        return x


# Token layouts of the mid-block attention (V3's `mid_block_attention_type`); "3d" attends over the whole slice.
ATTENTION_LAYOUTS = {"3d": "b (f h w) c", "spatial": "(b f) (h w) c", "temporal": "(b h w) f c"}


class MidAttention(nn.Module):
    """Pre-GroupNorm self-attention with a residual: `(B, C, F, H, W) -> (B, C, F, H, W)`.

    diffusers' `Attention` names its output projection `to_out.0` and V3 checkpoints name it `to_out`, so this is a
    small attention with V3's names; tests/models/test_slice_vae.py shows it equals diffusers' AutoencoderKL
    mid-block attention on identical weights.
    """

    def __init__(self, channels: int, num_heads: int, norm_num_groups: int, layout: str):
        super().__init__()
        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)
        self.num_heads = num_heads
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = x.shape
        layout = ATTENTION_LAYOUTS[self.layout]
        tokens = rearrange(x, f"b c f h w -> {layout}")  # (N, L, C)
        normed = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        q, k, v = (rearrange(proj(normed), "n l (a d) -> n a l d", a=self.num_heads) for proj in
                   (self.to_q, self.to_k, self.to_v))
        attn = rearrange(F.scaled_dot_product_attention(q, k, v), "n a l d -> n l (a d)")
        tokens = tokens + self.to_out(attn)
        return rearrange(tokens, f"{layout} -> b c f h w", b=b, f=f, h=h, w=w)


def residual_stack(in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int,
                   act_fn: str) -> nn.ModuleList:
    """`num_layers` residual blocks, the first one changing the width from `in_channels` to `out_channels`."""
    return nn.ModuleList(
        ResidualBlock3D(in_channels if i == 0 else out_channels, out_channels, norm_num_groups, act_fn)
        for i in range(num_layers)
    )


class MidBlock3D(nn.Module):
    """`num_layers` residual blocks with an attention between each pair: `(B, C, F, H, W) -> (B, C, F, H, W)`."""

    def __init__(self, channels: int, num_layers: int, norm_num_groups: int, act_fn: str,
                 attention_heads: int, attention_layout: str | None):
        super().__init__()
        self.convs = residual_stack(channels, channels, num_layers, norm_num_groups, act_fn)
        self.attentions = nn.ModuleList(
            [] if attention_layout is None else
            [MidAttention(channels, attention_heads, norm_num_groups, attention_layout) for _ in range(num_layers - 1)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs[0](x)
        for i, resnet in enumerate(self.convs[1:]):
            if self.attentions:
                x = self.attentions[i](x)
            x = resnet(x)
        return x


class DownBlock3D(nn.Module):
    """Residual blocks then an optional downsampler: `(B, C_in, F, H, W) -> (B, C_out, F', H', W')`."""

    def __init__(self, convs: nn.ModuleList, downsampler: Downsampler3D | None):
        super().__init__()
        self.convs = convs
        self.downsampler = downsampler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x if self.downsampler is None else self.downsampler(x)


class UpBlock3D(nn.Module):
    """Residual blocks then an optional upsampler: `(B, C_in, F, H, W) -> (B, C_out, F', H', W')`."""

    def __init__(self, convs: nn.ModuleList, upsampler: Upsampler3D | None):
        super().__init__()
        self.convs = convs
        self.upsampler = upsampler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x if self.upsampler is None else self.upsampler(x)


class Encoder3D(nn.Module):
    """Pixels of one slice to posterior moments before `quant_conv`.

    `(B, C_in, F, H, W) -> (B, 2 * latent_channels, F / 2**sum(temporal_down), H / 2**(n-1), W / 2**(n-1))`; an image
    (F = 1) keeps one frame. `temporal_down[i]` says whether block i halves time; the last block never resamples.
    """

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: list[int],
                 temporal_down: list[bool], layers_per_block: int, norm_num_groups: int, act_fn: str,
                 attention_heads: int, attention_layout: str | None):
        super().__init__()
        self.conv_in = conv3x3x3(in_channels, block_out_channels[0])
        self.down_blocks = nn.ModuleList()
        last = len(block_out_channels) - 1
        for i, out_ch in enumerate(block_out_channels):
            in_ch = block_out_channels[max(i - 1, 0)]
            convs = residual_stack(in_ch, out_ch, layers_per_block, norm_num_groups, act_fn)
            self.down_blocks.append(DownBlock3D(convs, Downsampler3D(out_ch, temporal_down[i]) if i < last else None))
        top = block_out_channels[-1]
        self.mid_block = MidBlock3D(top, layers_per_block, norm_num_groups, act_fn, attention_heads, attention_layout)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, top, eps=NORM_EPS)
        self.conv_act = get_activation(act_fn)
        self.conv_out = conv3x3x3(top, 2 * latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder3D(nn.Module):
    """Latents (after `post_quant_conv`) to pixels, in the two stages that slice decoding needs.

    `shared` (conv_in + mid block) runs on the slice plus its neighbours; `upsample` (up blocks + output conv) runs on
    the slice alone. `temporal_up[i]` says whether up block i doubles time; the last block never resamples.
    """

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: list[int],
                 temporal_up: list[bool], layers_per_block: int, norm_num_groups: int, act_fn: str,
                 attention_heads: int, attention_layout: str | None):
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = conv3x3x3(latent_channels, widths[0])
        self.mid_block = MidBlock3D(widths[0], layers_per_block, norm_num_groups, act_fn, attention_heads,
                                    attention_layout)
        self.up_blocks = nn.ModuleList()
        last = len(widths) - 1
        for i, out_ch in enumerate(widths):
            in_ch = widths[max(i - 1, 0)]
            convs = residual_stack(in_ch, out_ch, layers_per_block + 1, norm_num_groups, act_fn)
            self.up_blocks.append(UpBlock3D(convs, Upsampler3D(out_ch, temporal_up[i]) if i < last else None))
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, widths[-1], eps=NORM_EPS)
        self.conv_act = get_activation(act_fn)
        self.conv_out = conv3x3x3(widths[-1], out_channels)

    def shared(self, z: torch.Tensor) -> torch.Tensor:
        """`(B, latent_channels, T, h, w) -> (B, C_top, T, h, w)`: the stages that see neighbouring slices."""
        return self.mid_block(self.conv_in(z))

    def upsample(self, h: torch.Tensor) -> torch.Tensor:
        """`(B, C_top, t, h, w) -> (B, out_channels, t * 2**sum(temporal_up), 8h, 8w)` (one frame stays one)."""
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))
