"""EasyAnimate V3's Slice VAE: a 3D-conv KL autoencoder that encodes and decodes video one time slice at a time.

The arguments are the ones of V3's `AutoencoderKLMagvit` that change the maths, under V3's names; the state-dict
names are V3's too. V3's own `vae/config.json` also holds switches with one allowed value and fields without effect:
reading those folders (checking the switches, dropping the rest) is `kinema.loaders.easyanimate.vae`'s job, while
`SliceVAE.from_pretrained` reads folders kinema saved. What V3 needs that diffusers' `AutoencoderKLMagvit` (V5)
lacks is listed at the top of `slice_vae_blocks.py`.

Contract: video `(B, 3, F, H, W)` in [-1, 1] with F = 1 (an image) or a multiple of 8, H and W multiples of 8 ->
latents `(B, 4, F', H/8, W/8)` with F' = 1 or F/4. Each 8-frame slice is encoded on its own. Decoding turns each
2-latent slice into 8 frames; its conv_in and mid block also see the previous and next slice (feature sharing).
Seam smoothing and spatial tiling are arguments of `decode`/`encode`, never module state.
"""

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import ACT2CLS
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from kinema.errors import KinemaError
from kinema.fileio import read_json_object
from kinema.models.distributions import DecoderOutput, DiagonalGaussianDistribution
from kinema.models.presets import EASYANIMATE_V3_SLICE_VAE
from kinema.models.slice_vae_blocks import ATTENTION_LAYOUTS, Decoder3D, Encoder3D
from kinema.models.slice_vae_tiling import Tiling, tiled_map
from kinema.state_dicts import StrictFromPretrained

V3 = EASYANIMATE_V3_SLICE_VAE  # the defaults below
V3_DOWN_BLOCKS, V3_UP_BLOCKS = V3["down_block_types"], V3["up_block_types"]
# Block type -> does it resample time as well as space.
DOWN_BLOCK_TEMPORAL = {"SpatialDownBlock3D": False, "SpatialTemporalDownBlock3D": True}
UP_BLOCK_TEMPORAL = {"SpatialUpBlock3D": False, "SpatialTemporalUpBlock3D": True}

TilingArg = Tiling | Literal["config", "off"]


def _block_types(types: Sequence[str], known: dict[str, bool], field: str, n: int) -> list[bool]:
    if len(types) != n:
        raise KinemaError(f"{field} has {len(types)} entries but ch_mult has {n}; give one block type per width.")
    unknown = [t for t in types if t not in known]
    if unknown:
        raise KinemaError(f"{field} has unsupported block type(s) {unknown}; the Slice VAE supports {sorted(known)}.")
    return [known[t] for t in types]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KinemaError(message)


# diffusers' ModelMixin sets config_name to a str where ConfigMixin declares it None: a conflict inside diffusers.
class SliceVAE(StrictFromPretrained, ModelMixin, ConfigMixin):  # type: ignore[misc]
    """EasyAnimate V3 Slice VAE (defaults: V3's, `kinema.models.presets.EASYANIMATE_V3_SLICE_VAE`, 246M parameters).

    Args:
        in_channels, out_channels: pixel channels (3).
        ch, ch_mult: block widths are `ch * m` for m in `ch_mult` (128, 256, 512, 512).
        down_block_types, up_block_types: "Spatial*Block3D" (H, W only) or "SpatialTemporal*Block3D" (also F) per
            width; the last block of each side never resamples. V3: 8x spatial, 4x temporal.
        mid_block_use_attention: attention between the mid-block resnets.
        mid_block_attention_type: "3d" (over F*H*W, V3), "spatial" (per frame) or "temporal" (per pixel).
        mid_block_num_attention_heads: heads of that attention (1 in V3).
        layers_per_block: resnets per encoder block and mid block; decoder blocks get one more.
        act_fn: activation (diffusers names).
        latent_channels: 4. norm_num_groups: GroupNorm groups (32).
        scaling_factor: multiply latents by this before the diffusion model (V3 config: 0.18215).
        mini_batch_encoder, mini_batch_decoder: frames per encoder slice (8) and latents per decoder slice (2); their
            ratio must equal the temporal compression.
        use_tiling, use_tiling_encoder, use_tiling_decoder, tile_sample_min_size, tile_overlap_factor: the tiling used
            when `encode`/`decode` are called with `tiling="config"`.
    """

    # diffusers' FrozenDict of the __init__ arguments, read by attribute (`self.config.latent_channels`); diffusers
    # types it as a plain dict.
    config: Any

    @register_to_config
    def __init__(
        self,
        in_channels: int = V3["in_channels"],
        out_channels: int = V3["out_channels"],
        ch: int = V3["ch"],
        ch_mult: Sequence[int] = V3["ch_mult"],
        down_block_types: Sequence[str] = V3_DOWN_BLOCKS,
        up_block_types: Sequence[str] = V3_UP_BLOCKS,
        mid_block_use_attention: bool = V3["mid_block_use_attention"],
        mid_block_attention_type: str = V3["mid_block_attention_type"],
        mid_block_num_attention_heads: int = V3["mid_block_num_attention_heads"],
        layers_per_block: int = V3["layers_per_block"],
        act_fn: str = V3["act_fn"],
        latent_channels: int = V3["latent_channels"],
        norm_num_groups: int = V3["norm_num_groups"],
        scaling_factor: float = V3["scaling_factor"],
        mini_batch_encoder: int = V3["mini_batch_encoder"],
        mini_batch_decoder: int = V3["mini_batch_decoder"],
        use_tiling: bool = V3["use_tiling"],
        use_tiling_encoder: bool = V3["use_tiling_encoder"],
        use_tiling_decoder: bool = V3["use_tiling_decoder"],
        tile_sample_min_size: int = V3["tile_sample_min_size"],
        tile_overlap_factor: float = V3["tile_overlap_factor"],
    ):
        super().__init__()
        # 1. Validate: every setting is implemented for every value accepted here.
        widths = [ch * m for m in ch_mult]
        _require(len(widths) >= 1 and all(w > 0 for w in widths), f"ch * ch_mult must be positive; got {widths}.")
        temporal_down = _block_types(down_block_types, DOWN_BLOCK_TEMPORAL, "down_block_types", len(widths))
        temporal_up = _block_types(up_block_types, UP_BLOCK_TEMPORAL, "up_block_types", len(widths))
        n_down, n_up = sum(temporal_down[:-1]), sum(temporal_up[:-1])
        _require(n_down == n_up, f"The encoder halves time {n_down} times but the decoder doubles it {n_up} times; "
                                 "down_block_types and up_block_types must mirror each other.")
        _require(mid_block_attention_type in ATTENTION_LAYOUTS,
                 f"mid_block_attention_type {mid_block_attention_type!r} is not supported; use one of "
                 f"{sorted(ATTENTION_LAYOUTS)}.")
        _require(widths[-1] % mid_block_num_attention_heads == 0,
                 f"mid_block_num_attention_heads={mid_block_num_attention_heads} must divide {widths[-1]}.")
        _require(layers_per_block >= 1, f"layers_per_block must be >= 1; got {layers_per_block}.")
        _require(act_fn.lower() in ACT2CLS, f"act_fn {act_fn!r} is unknown; use one of {sorted(ACT2CLS)}.")
        _require(all(w % norm_num_groups == 0 for w in widths),
                 f"norm_num_groups={norm_num_groups} must divide every block width {widths}.")
        _require(scaling_factor > 0, f"scaling_factor must be positive; got {scaling_factor}.")
        _require(mini_batch_decoder >= 2, f"mini_batch_decoder={mini_batch_decoder}: a one-latent slice cannot be told "
                                          "apart from an image, so slices must hold at least 2 latent frames.")
        _require(mini_batch_encoder == mini_batch_decoder * 2**n_down,
                 f"mini_batch_encoder ({mini_batch_encoder}) must be mini_batch_decoder ({mini_batch_decoder}) x the "
                 f"temporal compression {2**n_down}.")
        self.spatial_ratio = 2 ** (len(widths) - 1)
        self.config_tiling = Tiling(tile_sample_min_size, tile_overlap_factor)
        self.config_tiling.latent_grid(self.spatial_ratio)

        # 2. Modules, named as in V3 checkpoints.
        layout = mid_block_attention_type if mid_block_use_attention else None
        common: dict[str, Any] = dict(layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, act_fn=act_fn,
                      attention_heads=mid_block_num_attention_heads, attention_layout=layout)
        self.encoder = Encoder3D(in_channels, latent_channels, widths, temporal_down, **common)
        self.decoder = Decoder3D(latent_channels, out_channels, widths, temporal_up, **common)
        self.quant_conv = nn.Conv3d(2 * latent_channels, 2 * latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, kernel_size=1)

    # ------------------------------------------------------------------ checks and strategies

    def check_frames(self, frames: int) -> None:
        """One KinemaError line when encode cannot take `frames` frames: 1 or a multiple of its time slice."""
        n = self.config.mini_batch_encoder
        fix = f"pad to {n}" if frames < n else f"trim or pad to {frames // n * n} or {(frames // n + 1) * n}"
        _require(frames == 1 or frames % n == 0, f"F must be 1 or a multiple of {n}; got {frames} — {fix}.")

    def _check_video(self, video: torch.Tensor) -> None:
        c = self.config
        _require(video.ndim == 5 and video.shape[1] == c.in_channels,
                 f"encode expects video (B, {c.in_channels}, F, H, W); got shape {tuple(video.shape)}.")
        f, h, w = video.shape[2:]
        self.check_frames(f)
        r = self.spatial_ratio
        _require(h % r == 0 and w % r == 0, f"H and W must be multiples of {r}; got {h}x{w} — resize or crop to "
                                            f"{h // r * r}x{w // r * r}.")

    def _check_latents(self, latents: torch.Tensor) -> None:
        c = self.config
        _require(latents.ndim == 5 and latents.shape[1] == c.latent_channels,
                 f"decode expects latents (B, {c.latent_channels}, F', h, w); got shape {tuple(latents.shape)}.")
        f = latents.shape[2]
        n = c.mini_batch_decoder
        _require(f == 1 or f % n == 0, f"latent F' must be 1 or a multiple of {n}; got {f}. Latents from encode "
                                       "always are; check how they were sliced.")

    def resolve_tiling(self, tiling: TilingArg, side: Literal["encoder", "decoder"]) -> Tiling | None:
        """The tiles `encode` or `decode` (`side`) use for `tiling`: None for none."""
        if isinstance(tiling, Tiling):
            return tiling
        if tiling == "off":
            return None
        if tiling == "config":
            c = self.config
            on = c.use_tiling or (c.use_tiling_encoder if side == "encoder" else c.use_tiling_decoder)
            return self.config_tiling if on else None
        raise KinemaError(f"tiling must be a Tiling, 'config' or 'off'; got {tiling!r}.")

    def _spatial(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiling: Tiling | None,
                 up: bool) -> torch.Tensor:
        """Run `fn` on `x` whole, or tiled when `tiling` is set and x is larger than a tile (as in V3)."""
        if tiling is None:
            return fn(x)
        tile, stride = tiling.latent_grid(self.spatial_ratio)
        r = self.spatial_ratio
        if up:
            if max(x.shape[-2:]) <= tile:
                return fn(x)
            return tiled_map(fn, x, tile, stride, tile * r, stride * r)
        if max(x.shape[-2:]) <= tile * r:
            return fn(x)
        return tiled_map(fn, x, tile * r, stride * r, tile, stride)

    # ------------------------------------------------------------------ encode

    def _encode_moments(self, video: torch.Tensor, tiling: Tiling | None) -> torch.Tensor:
        """`(B, 3, F, H, W) -> (B, 2 * latent_channels, F', H/8, W/8)`, one independent slice at a time."""
        c = self.config
        b, _, f, h, w = video.shape
        frames, latents = (1, 1) if f == 1 else (c.mini_batch_encoder, c.mini_batch_decoder)
        r = self.spatial_ratio
        moments = video.new_empty(b, 2 * c.latent_channels, f // frames * latents, h // r, w // r)
        for i in range(f // frames):
            clip = video[:, :, i * frames:(i + 1) * frames]
            moments[:, :, i * latents:(i + 1) * latents] = self._spatial(self._encode_slice, clip, tiling, up=False)
        return moments

    def _encode_slice(self, clip: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(clip))

    @apply_forward_hook
    def encode(self, video: torch.Tensor, tiling: TilingArg = "config",
               return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Encode video `(B, 3, F, H, W)` in [-1, 1] to a posterior over latents `(B, 4, F', H/8, W/8)`.

        F = 1 gives F' = 1 (an image); F = 8k gives F' = 2k, each 8-frame slice encoded on its own. `tiling`:
        a `Tiling`, "off", or "config" (the config's use_tiling / use_tiling_encoder). Raises KinemaError for any
        other F or for H, W not multiples of 8, before any conv runs.
        """
        self._check_video(video)
        moments = self._encode_moments(video.to(self.dtype), self.resolve_tiling(tiling, "encoder"))
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    # ------------------------------------------------------------------ decode

    def _decode_context(self, context: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """Decode latents `context[:, :, start:start+length]` while conv_in and the mid block see all of `context`.

        `(B, 4, T, h, w) -> (B, 3, length * 4 or 1, 8h, 8w)`.
        """
        shared = self.decoder.shared(self.post_quant_conv(context))
        return self.decoder.upsample(shared[:, :, start:start + length])

    def _decode_into(self, latents: torch.Tensor, out: torch.Tensor, tiling: Tiling | None, average: bool) -> None:
        """Decode `(B, 4, F', h, w)` slice by slice into `out` `(B, 3, F, 8h, 8w)` (replace, or average when asked).

        Slice s is decoded with latent slices s-1 and s+1 as context, so only three slices' latents and one slice's
        activations are alive at a time.
        """
        c = self.config
        f = latents.shape[2]
        per_slice, frames = (1, 1) if f == 1 else (c.mini_batch_decoder, c.mini_batch_encoder)
        n = f // per_slice
        for s in range(n):
            lo, hi = max(s - 1, 0) * per_slice, min(s + 2, n) * per_slice
            decode = partial(self._decode_context, start=s * per_slice - lo, length=per_slice)
            pixels = self._spatial(decode, latents[:, :, lo:hi], tiling, up=True)
            dest = out[:, :, s * frames:(s + 1) * frames]
            dest.copy_((dest + pixels) / 2 if average else pixels)

    @apply_forward_hook
    def decode(self, latents: torch.Tensor, tiling: TilingArg = "config", smooth_seams: bool = False,
               return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Decode latents `(B, 4, F', h, w)` (unscaled: divide by `scaling_factor` first) to video `(B, 3, F, 8h, 8w)`.

        F' = 1 gives one frame; F' = 2k gives F = 8k. The output is preallocated and filled one slice at a time.
        `tiling`: a `Tiling`, "off", or "config" (the config's use_tiling / use_tiling_decoder).
        `smooth_seams` (V3's `smooth_output`, for F > 8): clamp the video to [-1, 1], re-encode frames 4 .. F-4 (the
        clip shifted by half a slice), decode that, average it with the first decode over those frames, clamp again.
        Frames 0-3 and the last 4 keep the first decode. The re-encoded latents are the posterior mean; V3 samples.
        """
        self._check_latents(latents)
        c = self.config
        latents = latents.to(self.dtype)
        b, _, f, h, w = latents.shape
        frames = 1 if f == 1 else f // c.mini_batch_decoder * c.mini_batch_encoder
        r = self.spatial_ratio
        out = latents.new_empty(b, c.out_channels, frames, h * r, w * r)
        decoder_tiling = self.resolve_tiling(tiling, "decoder")
        self._decode_into(latents, out, decoder_tiling, average=False)
        if smooth_seams and frames > c.mini_batch_encoder:
            out.clamp_(-1, 1)
            before = c.mini_batch_encoder // 2
            middle = out[:, :, before:frames - (c.mini_batch_encoder - before)]
            # Encode every shifted slice before any of `out` is overwritten.
            shifted = DiagonalGaussianDistribution(self._encode_moments(middle, self.resolve_tiling(tiling, "encoder")))
            self._decode_into(shifted.mode(), middle, decoder_tiling, average=True)
            out.clamp_(-1, 1)
        return DecoderOutput(sample=out) if return_dict else (out,)

    @classmethod
    def from_pretrained(  # type: ignore[override]  # kinema loads local folders, so a path is required
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> Any:
        """Load a folder kinema saved (`save_pretrained`) strictly: a KinemaError names any missing, unexpected or
        mis-shaped weight. Options are diffusers' (`subfolder`, `torch_dtype`, ...).

        EasyAnimate's own V3 `vae/` folders are read by `kinema.load` (or `kinema.loaders.easyanimate.load_slice_vae`),
        which checks the switches their config.json holds; this refuses them, as it refuses any other class's folder.
        """
        config_file = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "", "config.json")
        class_name = read_json_object(config_file).get("_class_name") if config_file.is_file() else cls.__name__
        if class_name != cls.__name__:
            raise KinemaError(f"{pretrained_model_name_or_path} is not a kinema-saved {cls.__name__} (its config.json "
                              f"names {class_name}): read EasyAnimate V3 VAE folders with kinema.load(path)")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
