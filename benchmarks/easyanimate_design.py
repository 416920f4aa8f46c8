"""EasyAnimate V3's Slice VAE decode as V3's own code runs it, on a kinema `SliceVAE`'s modules and weights.

The reference benchmarks time kinema's decode against (`bench_vae_decode.py`), in the same process and on the same
weights; tests/models/test_slice_vae.py proves it equals the outputs of EasyAnimate's real code
(tests/fixtures/easyanimate_v3/vae_io.safetensors). Not part of the kinema package: it exists to be measured.

What it copies from EasyAnimate at 616a35425d3100d3e10adb58dc554794f8a7e9cb (the design, not the code):
- `AutoencoderKLMagvit._decode` runs `post_quant_conv` once on the whole clip, then `Decoder.forward`.
- `Decoder.forward` (slice_compression_vae): an odd clip's first latent is decoded alone (the image path); then every
  2-latent slice is `torch.concat`-ed on time with the previous slice's and the next slice's latents, `conv_in` and
  the mid block run on that concatenation (recomputed for every slice), the slice's own frames are cut out, and the
  up blocks, `conv_norm_out`, the activation and `conv_out` run on the slice alone. The slices' videos are kept in a
  list and `torch.cat`-ed at the end.
- `CausalConv3d` in slice mode (`padding_flag` 1 or 2) first `F.pad`s one zero frame on each side of time (a new
  tensor), then runs `nn.Conv3d` with padding (0, 1, 1).
- `ResidualBlock3D` computes its shortcut first, then norm1, act, conv1, norm2, act, dropout (identity in eval),
  conv2, and returns `(x + shortcut) / output_scale_factor` (1.0, still a new tensor).
- `SpatialUpsampler3D`: nearest 2x in H, W, then the conv; `SpatialTemporalUpsampler3D` (padding_flag 2) then adds
  a trilinear 2x in time; a single frame (padding_flag 1) gets no time step.
- `Attention3D` with `AttnProcessor2_0` (group norm, q/k/v, SDPA, to_out, residual) is the maths of kinema's
  `MidAttention`, which is reused as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinema.models.slice_vae import SliceVAE
from kinema.models.slice_vae_blocks import Decoder3D, MidBlock3D, ResidualBlock3D, Upsampler3D

V3_OUTPUT_SCALE_FACTOR = 1.0  # ResidualBlock3D's default, which V3's VAE keeps


def conv_padding_time_first(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """V3's CausalConv3d in slice mode: a zero frame padded on each side of time, then the conv pads H and W."""
    return F.conv3d(F.pad(x, (0, 0, 0, 0, 1, 1)), conv.weight, conv.bias, padding=(0, 1, 1))


def residual_block(block: ResidualBlock3D, x: torch.Tensor) -> torch.Tensor:
    shortcut = block.shortcut(x)
    h = conv_padding_time_first(block.conv1, block.act(block.norm1(x)))
    h = conv_padding_time_first(block.conv2, block.act(block.norm2(h)))
    return (h + shortcut) / V3_OUTPUT_SCALE_FACTOR


def upsampler(up: Upsampler3D, x: torch.Tensor) -> torch.Tensor:
    x = conv_padding_time_first(up.conv, F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
    if up.temporal and x.shape[2] > 1:
        x = F.interpolate(x, scale_factor=(2, 1, 1), mode="trilinear")
    return x


def mid_block(block: MidBlock3D, x: torch.Tensor) -> torch.Tensor:
    x = residual_block(block.convs[0], x)
    for i, resnet in enumerate(block.convs[1:]):
        if block.attentions:
            x = block.attentions[i](x)
        x = residual_block(resnet, x)
    return x


def decode_one_slice(decoder: Decoder3D, z: torch.Tensor, previous: torch.Tensor | None,
                     following: torch.Tensor | None) -> torch.Tensor:
    """V3's `Decoder.single_forward`: `(B, C_lat, t, h, w)` plus optional neighbours -> `(B, 3, 4t or 1, 8h, 8w)`."""
    t = z.shape[2]
    start = 0 if previous is None else previous.shape[2]
    parts = [part for part in (previous, z, following) if part is not None]
    x = torch.concat(parts, 2) if len(parts) > 1 else z
    x = mid_block(decoder.mid_block, conv_padding_time_first(decoder.conv_in, x))
    x = x[:, :, start:start + t]
    for block in decoder.up_blocks:
        for resnet in block.convs:
            x = residual_block(resnet, x)
        if block.upsampler is not None:
            x = upsampler(block.upsampler, x)
    return conv_padding_time_first(decoder.conv_out, decoder.conv_act(decoder.conv_norm_out(x)))


@torch.no_grad()
def decode_like_easyanimate_v3(vae: SliceVAE, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents `(B, 4, F', h, w)` the way EasyAnimate V3 does: video `(B, 3, F, 8h, 8w)`.

    F' = 1 gives one frame, F' = 2k gives 8k frames (an odd F' > 1, which kinema refuses, gives 1 + 4(F' - 1)).
    """
    z = vae.post_quant_conv(latents)
    per_slice = vae.config.mini_batch_decoder
    f = z.shape[2]
    videos, start = [], 0
    if f % 2:
        videos.append(decode_one_slice(vae.decoder, z[:, :, :1], None, None))
        start = 1
    previous = None
    for i in range(start, f, per_slice):
        following = z[:, :, i + per_slice:i + 2 * per_slice] if i + per_slice < f else None
        videos.append(decode_one_slice(vae.decoder, z[:, :, i:i + per_slice], previous, following))
        previous = z[:, :, i:i + per_slice]
    return torch.cat(videos, dim=2)
