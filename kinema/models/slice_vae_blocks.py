"""Building blocks of the EasyAnimate V3 Slice VAE: residual blocks, samplers, mid-block attention, encoder, decoder.

Why not diffusers' `AutoencoderKLMagvit` blocks: that class is EasyAnimate V5's VAE. Its `EasyAnimateCausalConv3d`
pads time causally (replicate) and keeps a feature cache that is mutated between calls, its mid block has no
attention, its temporal upsampler is nearest, and it has 16 latent channels. V3 needs 4 latent channels, convs that pad
time with one zero frame on each side (V3's slice mode; that is a plain `nn.Conv3d`), a self-attention in both mid
blocks, a trilinear temporal upsample after the conv, slice encoding of 8 frames -> 2 latents, decoder feature sharing
with the neighbouring slices and the half-slice seam re-decode. None of its blocks computes V3's maths, so the blocks
here are V3's, with V3's state-dict names; diffusers supplies the activation, the posterior and ModelMixin.

Every module maps `(B, C, F, H, W) -> (B, C', F', H', W')`; none holds state between calls.

Speed (float32, the same maths up to rounding; tests/models/test_slice_vae.py compares with V3's decode design in
benchmarks/easyanimate_design.py): the 3x3x3 convs always run on oneDNN, the upsamplers' nearest-then-conv is four
sub-pixel convs on the low-resolution input (12 of 27 taps) written straight into the output, and under no_grad the
activations and residual adds run in place.
"""

import torch
import torch.nn.functional as F
from diffusers.models.activations import get_activation
from einops import rearrange
from torch import nn

NORM_EPS = 1e-6


def onednn_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  padding: tuple[int, int, int] = (1, 1, 1)) -> torch.Tensor:
    """`F.conv3d(x, weight, bias, padding=padding)` (stride 1), through oneDNN for float32 on CPU.

    torch's own choice sends a float32 3D conv with batch 1 and fewer than 20480 values in its first four dimensions
    to its vol2col + GEMM kernel: the full V3 decoder's 512-wide first up blocks (1.3-1.6x slower there than oneDNN)
    and nearly every conv of a narrow VAE such as kinema-tiny's (its whole decode ran 6x slower). oneDNN has autograd
    too, so training takes the same path.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, padding=padding)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether `x` `(B, C, F, H, W)` is laid out channels-last (3D) rather than contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


class Conv3x3x3(nn.Conv3d):
    """3x3x3 conv padding one zero on every side, time included: `(B, C_in, F, H, W) -> (B, C_out, F, H, W)`.

    V3's `CausalConv3d` in slice mode (the only mode V3 runs) pads time with one zero frame on each side: not causal.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_conv3d(x, self.weight, self.bias)


def conv3x3x3(in_channels: int, out_channels: int) -> Conv3x3x3:
    """A `Conv3x3x3` (V3's slice-mode conv)."""
    return Conv3x3x3(in_channels, out_channels)


def activate(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`act(x)`, in place when nothing records `x` for a backward pass (`x` must be a temporary)."""
    if isinstance(act, nn.SiLU) and not torch.is_grad_enabled():
        return F.silu(x, inplace=True)
    return act(x)


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
        h = self.conv1(activate(self.act, self.norm1(x)))
        h = self.conv2(activate(self.act, self.norm2(h)))
        return h.add_(self.shortcut(x)) if not torch.is_grad_enabled() else h + self.shortcut(x)


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


def subpixel_kernel(weight: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """The `(C_out, C_in, 3, 2, 2)` kernel that gives output rows of parity p and columns of parity q of a 3x3x3
    `weight` applied after a nearest 2x upsample in H and W, as a conv on the low-resolution input.

    Output row 2i sees input rows (i-1, i, i) through taps (0, 1, 2), so it takes (w0, w1 + w2) on rows (i-1, i);
    row 2i+1 sees (i, i, i+1) and takes (w0 + w1, w2) on rows (i, i+1). Columns likewise.
    """
    def two_taps(w: torch.Tensor, dim: int, parity: int) -> torch.Tensor:
        first, middle, last = w.unbind(dim)
        return torch.stack([first, middle + last] if parity == 0 else [first + middle, last], dim)

    return two_taps(two_taps(weight, 3, p), 4, q)


class Upsampler3D(nn.Module):
    """Nearest 2x in H and W, a conv, then (when `temporal`) trilinear 2x in F.

    `(B, C, F, H, W) -> (B, C, 2F or F, 2H, 2W)`. A single latent frame is an image and stays one frame (V3's
    one-frame mode); a slice always has at least two frames, so the frame count alone tells the two apart.

    The nearest-then-conv runs as four sub-pixel convs on the input (`subpixel_kernel`): 12 of the 27 taps per output
    value, the same sums up to float32 rounding; each writes its pixels straight into the output, upsampled in time on
    the way when `temporal`. The four kernels are derived at every call (a few % of the conv's time at 64 px), not
    kept: kept, they would add 113 MB to the full V3 decoder.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.conv = conv3x3x3(channels, channels)
        self.temporal = temporal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = x.shape
        layout = torch.channels_last_3d if is_channels_last(x) else torch.contiguous_format
        frames = 2 * f if self.temporal and f > 1 else f
        channels = self.conv.out_channels
        # Laid out as x is, so the next conv gets the layout it was given; each phase writes its pixels into a view.
        out = torch.empty(b, channels, frames, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=layout)
        by_phase = out.unflatten(4, (w, 2)).unflatten(3, (h, 2))  # (B, C, F', h, row parity, w, column parity)
        # One zero frame each side of time, one zero row and column each side of space: phase (p, q) is a
        # (3, 2, 2) conv over the h x w windows that start at row p, column q.
        padded = F.pad(x, (1, 1, 1, 1, 1, 1))
        for p in (0, 1):
            for q in (0, 1):
                # Summed in float32 (bfloat16 weights are rounded once), in x's layout (oneDNN would copy it there).
                kernel = subpixel_kernel(self.conv.weight.float(), p, q).to(x.dtype, memory_format=layout)
                phase = onednn_conv3d(padded[..., p:p + h + 1, q:q + w + 1], kernel, self.conv.bias, (0, 0, 0))
                if frames == f:
                    by_phase[:, :, :, :, p, :, q] = phase
                else:
                    double_time_into(phase, by_phase[:, :, :, :, p, :, q])
        return out


def double_time_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write x `(B, C, F, ...)` upsampled 2x in time into `out` `(B, C, 2F, ...)`: the values of
    `F.interpolate(x, scale_factor=(2, 1, 1), mode="trilinear")` (align_corners False: frame 2t is 3/4 of t and 1/4 of
    t - 1, frame 2t + 1 is 3/4 of t and 1/4 of t + 1, the ends repeat), without its pass over the spatial weights."""
    if torch.is_grad_enabled():  # out= has no autograd; assignments to views have
        out[:, :, 0::2] = torch.add(x * 0.75, torch.cat([x[:, :, :1], x[:, :, :-1]], 2), alpha=0.25)
        out[:, :, 1::2] = torch.add(x * 0.75, torch.cat([x[:, :, 1:], x[:, :, -1:]], 2), alpha=0.25)
        return
    even, odd = out[:, :, 0::2], out[:, :, 1::2]
    torch.mul(x, 0.75, out=even)
    even[:, :, 1:].add_(x[:, :, :-1], alpha=0.25)
    even[:, :, :1].add_(x[:, :, :1], alpha=0.25)
    torch.mul(x, 0.75, out=odd)
    odd[:, :, :-1].add_(x[:, :, 1:], alpha=0.25)
    odd[:, :, -1:].add_(x[:, :, -1:], alpha=0.25)


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
        return self.conv_out(activate(self.conv_act, self.conv_norm_out(x)))


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
        return self.conv_out(activate(self.conv_act, self.conv_norm_out(h)))
