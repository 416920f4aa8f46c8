"""Video DiT: EasyAnimate V3's PixArt-alpha transformer with a motion module in every block and U-ViT long skips.

Built from diffusers' `PatchEmbed`, `AdaLayerNormSingle`, `PixArtAlphaTextProjection`, `Attention` and
`FeedForward`. Frames are folded into the batch for patching (2D patches, sin-cos positions recomputed for any size),
then the clip is one token sequence `(B, F*h*w, C)`: each block attends within frames, runs its motion module across
frames, and cross-attends to the text (+ image) tokens. Parameter names are EasyAnimate V3's, so its
`transformer/diffusion_pytorch_model.safetensors` loads with an identity key map
(`kinema.loaders.easyanimate.transformer`).

Config fields share V3's `transformer/config.json` names where they mean the same thing. V3's block-type switches
(`basic_block_type`, `motion_module_kwargs_even/_odd`, ...) become the per-block `motion_modules` list, and V3's
rule "a CLIP projection exists when in_channels == 12" becomes the explicit `image_embed_dim`, and V3's skips (wired by
block index whatever the depth) become the explicit `skip_pairs` / `num_skip_linears`; the loader translates a V3
config and lists the fields it accepts and refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import PatchEmbed, PixArtAlphaTextProjection
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from einops import rearrange
from torch import nn

from kinema.errors import KinemaError
from kinema.models.motion import check_frame_count, initialize_motion_weights
from kinema.models.precision import cast_module
from kinema.models.presets import easyanimate_v3_xl_2
from kinema.models.video_dit_blocks import (
    MotionModuleSpec,
    VideoDiTBlock,
    check_skip_pairs,
    easyanimate_v3_motion_modules,
    uvit_skip_pairs,
)
from kinema.models.video_model import Timestep, VideoModel, timesteps_per_clip
from kinema.sampling.step_cache import active_step_cache, cached_block_span
from kinema.state_dicts import StrictFromPretrained

if TYPE_CHECKING:  # importing diffusers.models.transformers loads every diffusers transformer: seconds at start-up
    from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

# Modules an inflated model adds to its image DiT; `from_image_dit` leaves them at their initialisation.
VIDEO_ONLY_MODULES = ("attn_temporal", "long_connect_fc", "clip_projection")
# Settings `from_image_dit` takes from the call; every other setting comes from the image model.
VIDEO_SETTINGS = ("in_channels", "enable_uvit", "skip_pairs", "num_skip_linears", "motion_modules", "image_embed_dim",
                  "num_image_tokens")


# Two base-class conflicts mypy reports here, neither a fault of this class: diffusers' ModelMixin sets config_name
# to a str where its ConfigMixin declares it None, and StrictFromPretrained requires the folder path that diffusers'
# from_pretrained lets be None (kinema loads local folders only).
class VideoDiT(VideoModel, StrictFromPretrained, ModelMixin, ConfigMixin):  # type: ignore[misc]
    """EasyAnimate V3 video transformer; defaults are V3-XL/2 InP (1152 wide, 28 blocks, 12 -> 8 channels).

    Its motion modules are `transformer_blocks.{i}.attn_temporal`, one per block (`motion_modules`); `freeze_base`
    leaves only those trainable.

    Args:
        num_attention_heads, attention_head_dim: spatial/cross attention heads; width C is their product.
        in_channels: channels of the noisy latents plus inpaint latents (V3 InP: 4 + 4 mask + 4 masked video = 12).
        out_channels: 8 for V3's learned-sigma output (channels 0-3 are epsilon, 4-7 the variance interpolation).
        num_layers: transformer blocks (28).
        dropout: attention and feed-forward dropout.
        cross_attention_dim: width of the context tokens after projection; must equal C.
        attention_bias: bias on the spatial/cross attention q/k/v projections.
        sample_size: latent size the sin-cos positions were trained at (64 for 512 px); other sizes interpolate.
        patch_size: 2D patch size; latent height and width must be multiples of it.
        activation_fn: feed-forward activation, diffusers name ("gelu-approximate").
        upcast_attention: compute attention scores in fp32.
        norm_elementwise_affine, norm_eps: the blocks' LayerNorms (V3: no affine, 1e-6).
        interpolation_scale: sin-cos position scale; None means `max(sample_size // 64, 1)` as in PixArt and V3.
        caption_channels: width of the text-encoder states (T5-XXL: 4096).
        enable_uvit: add U-ViT long skips, each a zero-initialised Linear; False means none.
        skip_pairs: `(source, target)` blocks of each skip, skip j using linear j: the output of block `source` goes
            through `long_connect_fc[j]` and is added to the input of block `target`. None means the symmetric rule
            `uvit_skip_pairs(num_layers)` of kinema-native models (or none without `enable_uvit`); EasyAnimate V3
            files get `easyanimate_v3_skip_pairs(num_layers)`. Recorded explicitly in the config.
        num_skip_linears: skip linears stored (at least one per pair; V3 always stores 13, unused ones included).
            None means one per pair. Recorded explicitly in the config.
        motion_modules: one motion-module spec per block; None means V3's pattern (`easyanimate_v3_motion_modules`
            with this model's heads), recorded explicitly in the config.
        image_embed_dim: width of the CLIP image embedding projected into image tokens (V3 InP: 768); None for
            models without image conditioning.
        num_image_tokens: image tokens appended after the text tokens (8).
    """

    _supports_gradient_checkpointing = True
    motion_mismatch_advice = ("Check that the motion weights come from a video DiT of the same width, depth and "
                              "motion_modules specs")

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 12,
        out_channels: int = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        cross_attention_dim: int = 1152,
        attention_bias: bool = True,
        sample_size: int = 64,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        caption_channels: int = 4096,
        enable_uvit: bool = True,
        skip_pairs: list[tuple[int, int]] | None = None,
        num_skip_linears: int | None = None,
        motion_modules: Sequence[MotionModuleSpec] | None = None,
        image_embed_dim: int | None = 768,
        num_image_tokens: int = 8,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        if cross_attention_dim != inner_dim:
            raise KinemaError(f"cross_attention_dim {cross_attention_dim} must equal the model width "
                              f"{num_attention_heads} x {attention_head_dim} = {inner_dim}: the caption projection "
                              "maps text states to the model width")
        if motion_modules is None:
            motion_modules = easyanimate_v3_motion_modules(num_layers, num_attention_heads)
            self.register_to_config(motion_modules=motion_modules)
        if len(motion_modules) != num_layers:
            raise KinemaError(f"motion_modules has {len(motion_modules)} specs but the model has {num_layers} blocks; "
                              "give one spec per block")
        if skip_pairs is None:
            skip_pairs = uvit_skip_pairs(num_layers) if enable_uvit else []
        num_skip_linears = len(skip_pairs) if num_skip_linears is None else num_skip_linears
        if not enable_uvit and (skip_pairs or num_skip_linears):
            raise KinemaError(f"enable_uvit is False but skip_pairs {skip_pairs} / num_skip_linears {num_skip_linears} "
                              "ask for skips; set enable_uvit True or leave both unset")
        check_skip_pairs(skip_pairs, num_skip_linears, num_layers)
        skip_pairs = [(source, target) for source, target in skip_pairs]  # a saved config holds them as lists
        self.register_to_config(skip_pairs=[list(pair) for pair in skip_pairs], num_skip_linears=num_skip_linears)

        # 1. Patches, timestep, text and image conditioning
        scale = interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1)
        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=inner_dim, interpolation_scale=scale)
        self.adaln_single = AdaLayerNormSingle(inner_dim, use_additional_conditions=False)
        self.caption_projection = PixArtAlphaTextProjection(in_features=caption_channels, hidden_size=inner_dim)
        # V3's CLIPProjection is the same Linear -> GELU(tanh) -> Linear, with the same parameter names.
        self.clip_projection = (
            PixArtAlphaTextProjection(in_features=image_embed_dim, hidden_size=inner_dim * num_image_tokens)
            if image_embed_dim is not None else None
        )

        # 2. Blocks and long skips
        self.transformer_blocks = nn.ModuleList(
            VideoDiTBlock(inner_dim, num_attention_heads, attention_head_dim, cross_attention_dim, spec,
                          attention_bias=attention_bias, activation_fn=activation_fn,
                          norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps, dropout=dropout,
                          upcast_attention=upcast_attention)
            for spec in motion_modules
        )
        self.skip_pairs = skip_pairs
        self.long_connect_fc = nn.ModuleList(nn.Linear(inner_dim, inner_dim) for _ in range(num_skip_linears))

        # 3. Output
        self.norm_out = nn.LayerNorm(inner_dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, inner_dim))
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * out_channels)

        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt-alpha's initialisation, plus zeros on everything video-only so a fresh model is its image model."""
        inner_dim = self.config["num_attention_heads"] * self.config["attention_head_dim"]

        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier)
        # The patch conv is initialised like the linear it is.
        weight = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        # Timestep and caption MLPs start small, as in PixArt.
        timestep_mlp = self.adaln_single.emb.timestep_embedder
        for linear in (timestep_mlp.linear_1, timestep_mlp.linear_2, self.adaln_single.linear,
                       self.caption_projection.linear_1, self.caption_projection.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        for table in [self.scale_shift_table] + [block.scale_shift_table for block in self._blocks()]:
            nn.init.normal_(table, std=inner_dim**-0.5)
        # PixArt zeroes the cross-attention outputs and the final projection for a stable start.
        zeroed = [cast(nn.Linear, block.attn2.to_out[0]) for block in self._blocks()] + [self.proj_out]
        # Video-only parts start at zero so that they change nothing: skips and the image tokens' last linear
        # (motion modules zero their own output projection).
        zeroed += [cast(nn.Linear, linear) for linear in self.long_connect_fc]
        zeroed += [self.clip_projection.linear_2] if self.clip_projection is not None else []
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for _, module in self.motion_modules():
            initialize_motion_weights(module)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable | None = None):
        # Checkpointing whole blocks covers their motion modules; flagging those as well (as diffusers' default walk
        # over all submodules would) makes the backward pass recompute every motion module a second time.
        self.gradient_checkpointing = enable
        self._gradient_checkpointing_func = gradient_checkpointing_func

    def _blocks(self) -> list[VideoDiTBlock]:
        # nn.ModuleList types its items as plain Modules; every item here is a VideoDiTBlock.
        return cast(list[VideoDiTBlock], list(self.transformer_blocks))

    def motion_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """`(name, module)` for the motion module of every block, `transformer_blocks.{i}.attn_temporal`."""
        for index, block in enumerate(self._blocks()):
            yield f"transformer_blocks.{index}.attn_temporal", block.attn_temporal

    def image_tokens(self, clip_image_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding `(B, image_embed_dim)` -> image tokens `(B, num_image_tokens, C)`.

        V3 appends these after the text tokens only for the last part of sampling (its `clip_apply_ratio` 0.5);
        before that it passes zero embeddings with a zero mask, which is the same as passing none. The sampler
        decides when by passing `clip_image_embeds` / `clip_attention_mask` to `forward`.
        """
        if self.clip_projection is None:
            raise KinemaError("this model has no image projection (image_embed_dim is None), so it cannot take CLIP "
                              "image embeddings; image-to-video needs an EasyAnimate InP model")
        tokens = self.clip_projection(clip_image_embeds)  # (B, T*C)
        return rearrange(tokens, "b (t c) -> b t c", t=self.config["num_image_tokens"])

    def check_inputs(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        inpaint_latents: torch.Tensor | None = None,
        clip_image_embeds: torch.Tensor | None = None,
    ) -> None:
        """Raise one `KinemaError` line for inputs this model cannot take; shapes as in `forward`."""
        in_channels, patch = self.config["in_channels"], self.config["patch_size"]
        caption_channels = self.config["caption_channels"]
        if sample.ndim != 5:
            raise KinemaError(f"latents must be (B, C, F, H, W); got shape {tuple(sample.shape)}")
        batch, channels, frames, height, width = sample.shape
        if inpaint_latents is not None:
            if in_channels <= channels:
                raise KinemaError(f"this model takes {in_channels} input channels in all, so it is not an "
                                  "inpaint (InP) model and cannot take inpaint_latents; image-to-video and video "
                                  "continuation need an EasyAnimate InP model (in_channels 12)")
            if inpaint_latents.shape != (batch, in_channels - channels, frames, height, width):
                raise KinemaError(f"inpaint_latents must be (B, {in_channels - channels}, F, H, W) = "
                                  f"{(batch, in_channels - channels, frames, height, width)} next to latents "
                                  f"{tuple(sample.shape)}; got {tuple(inpaint_latents.shape)}")
        elif channels != in_channels:
            hint = (f"; this is an inpaint (InP) model: pass inpaint_latents (B, {in_channels - channels}, F, H, W)"
                    " (mask latents then masked-video latents)" if channels < in_channels else "")
            raise KinemaError(f"latents have {channels} channels but the model takes {in_channels}{hint}")
        if height % patch or width % patch:
            raise KinemaError(f"latent size {height}x{width} is not divisible by the patch size {patch}; use a pixel "
                              f"height and width that are multiples of {8 * patch} (the VAE downsamples by 8)")
        check_frame_count(frames, self.max_frames, unit="latent frames")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch \
                or encoder_hidden_states.shape[2] != caption_channels:
            raise KinemaError(f"encoder_hidden_states must be (B={batch}, L, {caption_channels}) text-encoder "
                              f"states; got {tuple(encoder_hidden_states.shape)}")
        if clip_image_embeds is not None:
            if self.clip_projection is None:
                raise KinemaError("this model has no image projection (image_embed_dim is None), so it cannot take "
                                  "clip_image_embeds; image-to-video needs an EasyAnimate InP model")
            image_embed_dim = self.config["image_embed_dim"]
            if clip_image_embeds.shape != (batch, image_embed_dim):
                raise KinemaError(f"clip_image_embeds must be (B, {image_embed_dim}) = "
                                  f"{(batch, image_embed_dim)}; got {tuple(clip_image_embeds.shape)}")

    def _context(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        clip_image_embeds: torch.Tensor | None,
        clip_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text (+ image) tokens `(B, L(+T), C)` and their additive attention bias `(B, 1, L(+T))` or None."""
        context = self.caption_projection(encoder_hidden_states)
        mask = encoder_attention_mask
        if clip_image_embeds is not None:
            image = self.image_tokens(clip_image_embeds)
            context = torch.cat([context, image], dim=1)
            if mask is not None or clip_attention_mask is not None:
                ones = context.new_ones
                text_mask = mask if mask is not None else ones(encoder_hidden_states.shape[:2])
                image_mask = clip_attention_mask if clip_attention_mask is not None else ones(image.shape[:2])
                mask = torch.cat([text_mask.to(context.dtype), image_mask.to(context.dtype)], dim=1)
        if mask is None:
            return context, None
        # Same keep=1 / drop=0 -> 0 / -10000 bias as PixArt and V3.
        return context, ((1 - mask.to(context.dtype)) * -10000.0)[:, None, :]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Timestep,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        inpaint_latents: torch.Tensor | None = None,
        clip_image_embeds: torch.Tensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise (and variance) for a clip.

        Args:
            sample: noisy latents `(B, C, F, H, W)` (all `in_channels` when `inpaint_latents` is None).
            timestep: an int, a float, a 0-d tensor (one timestep for every clip) or `(B,)`.
            encoder_hidden_states: text-encoder states `(B, L, caption_channels)`.
            encoder_attention_mask: `(B, L)`, 1 = keep, 0 = padding.
            inpaint_latents: `(B, in_channels - C, F, H, W)`: mask latents, then masked-video latents (InP models).
            clip_image_embeds: CLIP image embedding `(B, image_embed_dim)`, appended as image tokens.
            clip_attention_mask: `(B, num_image_tokens)` mask of the image tokens (default all kept).

        Returns:
            `(B, out_channels, F, H, W)`; with learned sigma, channels `[:out_channels // 2]` are epsilon.
        """
        self.check_inputs(sample, encoder_hidden_states, inpaint_latents, clip_image_embeds)
        cache_key = tuple(sample.shape)
        batch, _, frames, height, width = sample.shape
        patch = self.config["patch_size"]
        rows, cols = height // patch, width // patch

        # 1. Patch every frame; add the 2D sin-cos positions (recomputed by PatchEmbed for new sizes)
        if inpaint_latents is not None:
            sample = torch.cat([sample, inpaint_latents], dim=1)  # (B, C_in, F, H, W)
        x = self.pos_embed(rearrange(sample, "b c f h w -> (b f) c h w"))  # (B*F, h*w, C)
        x = rearrange(x, "(b f) n c -> b (f n) c", b=batch)  # (B, F*h*w, C)

        # 2. Timestep modulation and context tokens
        timestep = timesteps_per_clip(timestep, batch, sample.device)
        modulation, embedded_timestep = self.adaln_single(timestep, None, batch_size=batch, hidden_dtype=x.dtype)
        context, context_bias = self._context(encoder_hidden_states, encoder_attention_mask, clip_image_embeds,
                                              clip_attention_mask)  # (B, L', C), (B, 1, L')

        # 3. Blocks; a U-ViT skip adds a linear of an early block's output to a late block's input
        blocks_args = (modulation, context, context_bias, frames, rows, cols)
        step_cache = active_step_cache()
        if step_cache is None:
            x, _ = self._run_blocks(x, blocks_args)
        else:  # reuse the residual of the middle blocks kept at the last full step, or compute and keep it
            span = cached_block_span(len(self.transformer_blocks), self.skip_pairs, step_cache.depth)
            slot, residual = step_cache.lookup(cache_key)
            x, kept = self._run_blocks(x, blocks_args, span, residual)
            if residual is None:
                assert kept is not None
                step_cache.keep(slot, cache_key, kept)

        # 4. Final adaLN, projection to patches, unpatchify
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)  # (B, 1, C) x2
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, F*h*w, p*p*C_out)
        return rearrange(x, "b (f h w) (p q c) -> b c f (h p) (w q)", f=frames, h=rows, w=cols, p=patch, q=patch)

    def _run_blocks(
        self,
        x: torch.Tensor,
        blocks_args: tuple[Any, ...],
        span: tuple[int, int] | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens `(B, F*h*w, C)` through the blocks and their long skips (`blocks_args`: a block's arguments after
        the tokens). With a `span` of blocks `(first, last)` that no skip crosses, also returns the residual those
        blocks add `(B, F*h*w, C)`; given that `residual`, adds it in their place and runs none of them."""
        skip_into = {target: (index, source) for index, (source, target) in enumerate(self.skip_pairs)}
        skip_sources = {source for source, _ in self.skip_pairs}
        saved: dict[int, torch.Tensor] = {}
        span_input, kept = x, None
        for index, block in enumerate(self.transformer_blocks):
            if span is not None and span[0] <= index <= span[1]:
                if index == span[0]:
                    span_input = x
                    x = x if residual is None else x + residual
                if residual is not None:
                    continue
            if index in skip_into:
                fc_index, source = skip_into[index]
                x = x + self.long_connect_fc[fc_index](saved.pop(source))
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, *blocks_args)
            else:
                x = block(x, *blocks_args)
            if index in skip_sources:
                saved[index] = x
            if span is not None and index == span[1]:
                kept = x - span_input
        return x, kept

    @classmethod
    def from_image_dit(cls, pixart: PixArtTransformer2DModel, **video_kwargs: Any) -> VideoDiT:
        """Inflate a diffusers PixArt-alpha image DiT into a video DiT that, fresh, reproduces it frame by frame.

        Every 2D weight is copied under its own name with a shape check; `pos_embed.proj` gains zero weights for
        extra input channels (e.g. 4 -> 12 for InP); motion modules, skips and the image projection keep their zero
        initialisation. `video_kwargs` may set only `VIDEO_SETTINGS`; `in_channels` defaults to the image model's
        and `image_embed_dim` to None (no image tokens).
        """
        from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

        if not isinstance(pixart, PixArtTransformer2DModel):
            raise KinemaError(f"from_image_dit needs a diffusers PixArtTransformer2DModel, got {type(pixart).__name__}")
        refused = sorted(set(video_kwargs) - set(VIDEO_SETTINGS))
        if refused:
            raise KinemaError(f"from_image_dit settings {refused} come from the image model or do not exist; "
                              f"only {list(VIDEO_SETTINGS)} can be set")
        image_cfg = pixart.config
        if (pixart.use_additional_conditions or image_cfg["attention_type"] != "default"
                or not image_cfg["caption_channels"]):
            raise KinemaError("only PixArt-alpha models without resolution conditioning, with default attention and a "
                              "caption projection can be inflated (e.g. PixArt-XL-2-512x512)")
        shared = ("num_attention_heads", "attention_head_dim", "num_layers", "dropout", "cross_attention_dim",
                  "attention_bias", "sample_size", "patch_size", "activation_fn", "upcast_attention",
                  "norm_elementwise_affine", "norm_eps", "interpolation_scale", "caption_channels")
        config = {name: image_cfg[name] for name in shared}
        config.update(in_channels=image_cfg["in_channels"], out_channels=pixart.out_channels, image_embed_dim=None)
        config.update(video_kwargs)
        if config["in_channels"] < image_cfg["in_channels"]:
            raise KinemaError(f"in_channels {config['in_channels']} is below the image model's "
                              f"{image_cfg['in_channels']}; inflation can only add input channels")
        model = cls(**config)
        cast_module(model, dtype=pixart.dtype)

        state = model.state_dict()
        for name, weight in pixart.state_dict().items():
            target = state.get(name)
            if target is None:
                raise KinemaError(f"image DiT weight {name!r} has no place in the video DiT; is this a PixArt-alpha "
                                  "model?")
            if name == "pos_embed.proj.weight" and target.shape[1] > weight.shape[1]:
                # Extra input channels (mask and masked-video latents) start at zero: they change nothing at first.
                weight = torch.cat([weight, weight.new_zeros(weight.shape[0], target.shape[1] - weight.shape[1],
                                                             *weight.shape[2:])], dim=1)
            if target.shape != weight.shape:
                raise KinemaError(f"image DiT weight {name!r} has shape {tuple(weight.shape)} but the video DiT "
                                  f"expects {tuple(target.shape)}")
            state[name] = weight
        image_names = set(pixart.state_dict())
        uncopied = [name for name in state if name not in image_names
                    and not any(part in name.split(".") for part in VIDEO_ONLY_MODULES)]
        if uncopied:
            raise KinemaError(f"video DiT weights {uncopied[:5]} have no source in the image DiT")
        model.load_state_dict(state, strict=True)
        return model


def video_dit_xl_2_inp(**kwargs: Any) -> VideoDiT:
    """EasyAnimate V3-XL/2 InP: 28 blocks x 1152, in 12 / out 8, 13 long skips, 8 CLIP tokens (settings:
    `kinema.models.presets.easyanimate_v3_xl_2`; `kwargs` override them)."""
    return VideoDiT(**{**easyanimate_v3_xl_2("InP"), **kwargs})


def video_dit_xl_2_t2v(**kwargs: Any) -> VideoDiT:
    """The same transformer for text-to-video only: 4 input channels, no image tokens."""
    return VideoDiT(**{**easyanimate_v3_xl_2("T2V"), **kwargs})


VIDEO_DIT_PRESETS: dict[str, Callable[..., VideoDiT]] = {
    "easyanimate-v3-xl-2-inp": video_dit_xl_2_inp,
    "easyanimate-v3-xl-2-t2v": video_dit_xl_2_t2v,
}
