"""The EasyAnimate V3 family for the generation pipeline: VideoDiT, T5 text, Slice VAE, inpaint latents, CLIP tokens.

The text encoder may also be another masked encoder that a model folder's kinema.json names (kinema's bundled models:
MiniLM, a BERT), encoded the same way with the entry's token count and lower-casing.

What is V3's is as its inference pipeline does it (`EasyAnimateInpaintPipeline`, EasyAnimate @616a354, with
`get_image_to_video_latent` and the `predict_*.py` scripts):

- Text: prompts are lower-cased and stripped, then T5-encoded with padding to 120 tokens and the attention mask.
  The rest of PixArt's caption cleaning (URLs, HTML, @names, CJK characters, odd punctuation, ftfy) is left out:
  prompts holding such things encode differently from V3.
- Inpaint conditioning (InP models, 12 input channels): the mask video is 1 on the frames to generate and 0 on the
  kept ones (binarised, *not* mapped to [-1, 1]), tiled to 3 channels and encoded by the Slice VAE like a video; the
  masked video is the video in [-1, 1] on kept frames and -1 elsewhere, encoded the same way; both are multiplied by
  the scaling factor and concatenated (mask first). V3 draws a sample of each posterior; kinema takes the posterior
  mean, so a seed gives one video (the difference is the VAE's posterior noise).
- Text-to-video with an InP model: every frame to generate (mask all 1, masked video all -1) and no image tokens.
  V3 passes zero CLIP embeddings with a zero token mask there, which the attention bias of -10000 removes, the same
  as passing none.
- CLIP image tokens: the conditional side gets the image's `image_embeds` with a mask of ones, the unconditional side
  zero embeddings with a zero mask; both get the same inpaint latents. The tokens are used only from step
  `ceil(steps / 2)` on (`clip_apply_ratio` 0.5, `image_tokens_from`).
- Decoding: divide by the scaling factor, decode slice by slice, clamp, smooth the seams between slices (V3's
  `smooth_output`, always on in V3; kinema re-encodes with the posterior mean), map to [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch

from kinema.errors import KinemaError
from kinema.memory import video_bytes
from kinema.pipelines.family import Conditioning, VideoFamily, decode_call_bytes
from kinema.pipelines.jobs import check_size_multiple, check_slice_frames
from kinema.pipelines.text_encoding import T5_TEXT_LENGTH, PromptWorld, cut_off_text, encode_masked_prompts
from kinema.sampling.denoisers import Denoiser, DiTDenoiser

# V3's share of the sampling steps, counted from the end, that get the CLIP image tokens.
CLIP_APPLY_RATIO = 0.5


class EasyAnimateFamily(VideoFamily):
    """EasyAnimate V3's parts for `generate()`.

    Args:
        transformer: the `VideoDiT` (12 input channels for InP models: latents, mask latents, masked-video latents).
        vae: the `SliceVAE`: video `(B, 3, F, H, W)` in [-1, 1] with F = 1 or 8k <-> latents `(B, 4, F', H/8, W/8)`
            with F' = 1 or 2k.
        text_encoder, tokenizer: T5 (`T5EncoderModel`) and its tokenizer, or another encoder taking ids and an
            attention mask and giving `last_hidden_state` (a BERT); its width (`d_model` / `hidden_size`) must be
            the transformer's `caption_channels`.
        image_encoder, image_processor: CLIP vision with projection and its image processor (InP folders'
            `image_encoder/`); needed only to condition on an image's CLIP embedding.
        source: the model's folder, recorded in the settings.
        vae_tiling: encode and decode in spatial tiles of the VAE config's size and overlap (`tile_sample_min_size`,
            `tile_overlap_factor`); False leaves tiling as the VAE's config says (off in V3's folders).
        text_max_length: tokens per prompt (None: V3's 120).
        lowercase: lower-case and strip prompts before tokenizing (None: True, as V3 does).
        world: a `PromptWorld` whose prompts the model knows (models trained on the synthetic dataset); prompts
            outside it get one warning. None: no check.
    """

    family = "easyanimate"
    # V3's predict_t2v.py / predict_i2v.py sample with "DPM++": diffusers' DPMSolverMultistepScheduler at its defaults
    # (dpmsolver++, second order).
    default_scheduler = "dpmpp_2m"
    world: PromptWorld | None = None

    def __init__(self, transformer: Any, vae: Any, text_encoder: Any, tokenizer: Any, image_encoder: Any = None,
                 image_processor: Any = None, source: str | None = None, vae_tiling: bool = False, *,
                 text_max_length: int | None = None, lowercase: bool | None = None,
                 world: PromptWorld | None = None) -> None:
        caption_channels = int(transformer.config.caption_channels)
        # T5 names its width d_model, BERT and CLIP hidden_size (T5's config answers both).
        encoder_config = getattr(text_encoder, "config", None)
        text_width = getattr(encoder_config, "d_model", None) or getattr(encoder_config, "hidden_size", None)
        if text_width is not None and text_width != caption_channels:
            raise KinemaError(f"the text encoder gives {text_width}-wide states but the transformer takes "
                              f"{caption_channels} (caption_channels); use the text encoder the transformer was "
                              "trained with (the V3 folder's text_encoder/, or the one its kinema.json names)")
        if text_max_length is not None and text_max_length < 1:
            raise KinemaError(f"text_max_length must be at least 1 token, got {text_max_length}")
        latent_channels, in_channels = int(vae.config.latent_channels), int(transformer.config.in_channels)
        if in_channels not in (latent_channels, 3 * latent_channels):
            raise KinemaError(f"the transformer takes {in_channels} input channels but the VAE gives "
                              f"{latent_channels}-channel latents; expected {latent_channels} (text-to-video) or "
                              f"{3 * latent_channels} (InP); use the vae/ of the same V3 folder")
        if (image_encoder is None) != (image_processor is None):
            raise KinemaError("give the CLIP image_encoder and its image_processor together (both from "
                              "image_encoder/), or neither")
        image_embed_dim = transformer.config.image_embed_dim
        projection = getattr(getattr(image_encoder, "config", None), "projection_dim", image_embed_dim)
        if image_encoder is not None and image_embed_dim is not None and projection != image_embed_dim:
            raise KinemaError(f"the CLIP image encoder gives {projection}-d embeddings but the transformer takes "
                              f"{image_embed_dim} (image_embed_dim); use the image_encoder/ of the same V3 folder")
        self.model = transformer
        # The Slice VAE's 3D convolutions run 1.7x faster channels-last on CPU (oneDNN): measured on the encoder at
        # 64x64x16, the cost that dominates training on cached latents and short generations.
        self.vae = vae.to(memory_format=torch.channels_last_3d)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        self.source = source
        self.vae_tiling = vae_tiling
        self.spatial_factor = int(vae.spatial_ratio)
        self.text_max_length = T5_TEXT_LENGTH if text_max_length is None else int(text_max_length)
        self.lowercase = True if lowercase is None else bool(lowercase)
        self.world = world

    @classmethod
    def from_model(cls, model: Any, source: str | None = None, vae_tiling: bool = False,
                   world: PromptWorld | None = None) -> EasyAnimateFamily:
        """The family of a loaded V3 folder (`kinema.loaders.easyanimate.EasyAnimateModel`), with the prompt settings
        its kinema.json text encoder entry gives (V3's when it has none)."""
        return cls(model.transformer, model.vae, model.text_encoder, model.tokenizer, model.image_encoder,
                   model.image_processor, source=source, vae_tiling=vae_tiling,
                   text_max_length=model.text_max_length, lowercase=model.lowercase, world=world)

    @property
    def transformer(self) -> Any:
        """The `VideoDiT` (the same object as `model`)."""
        return self.model

    def denoiser(self) -> Denoiser:
        """A `DiTDenoiser` over the transformer: latents `(B, 4, F', h, w)`, T5 states, inpaint latents and CLIP
        embeddings -> epsilon (the first half of the learned-sigma output)."""
        return DiTDenoiser(self.model)

    # ------------------------------------------------------------------ sizes

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels (4); an InP transformer takes three times as many (inpaint latents on top)."""
        return int(self.vae.config.latent_channels)

    @property
    def _slice(self) -> tuple[int, int]:
        """(pixel frames, latent frames) of one VAE slice: (8, 2) in V3."""
        return int(self.vae.config.mini_batch_encoder), int(self.vae.config.mini_batch_decoder)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a video of `frames` pixel frames: 1 -> 1 (an image), 8k -> 2k; any other count raises
        one KinemaError line naming the nearest counts V3 can make."""
        pixels, latents = self._slice
        check_slice_frames(frames, pixels)
        return 1 if frames == 1 else frames // pixels * latents

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from `latent_frames`: 1 -> 1, 2k -> 8k (one KinemaError line for other counts)."""
        pixels, latents = self._slice
        if latent_frames == 1:
            return 1
        if latent_frames >= latents and latent_frames % latents == 0:
            return latent_frames // latents * pixels
        raise KinemaError(f"EasyAnimate V3 latents hold 1 or a multiple of {latents} frames; {latent_frames} is not "
                          f"(latents from encode_frames always are)")

    @property
    def max_frames(self) -> int:
        """The most pixel frames one pass denoises: the motion modules' frame tables (in latent frames), rounded down
        to whole VAE slices."""
        pixels, latents = self._slice
        latent_max = int(self.model.max_frames)
        return latent_max // latents * pixels if latent_max >= latents else 1

    def check_size(self, height: int, width: int) -> None:
        """One KinemaError line unless height and width are positive multiples of 16 (the VAE's 8x downscale times
        the transformer's 2x2 patches), naming the nearest smaller size."""
        patch = int(self.model.config.patch_size)
        check_size_multiple(height, width, self.spatial_factor * patch, f"the VAE's {self.spatial_factor}x downscale "
                            f"times the transformer's {patch}x{patch} patches")

    # ------------------------------------------------------------------ text and images

    def cut_off_text(self, prompt: str) -> str | None:
        """The end of `prompt` (as encoded: lower-cased when `lowercase`) past `text_max_length` tokens."""
        return cut_off_text(self.tokenizer, prompt.lower().strip() if self.lowercase else prompt,
                            self.text_max_length)

    def encode_text(self, prompts: list[str], clip_skip: int = 1) -> Conditioning:
        """`{"encoder_hidden_states": (B, L, D), "encoder_attention_mask": (B, L)}` with L = `text_max_length` (V3:
        120): each prompt lower-cased and stripped as V3's pipeline does (unless `lowercase` is False), then encoded
        with its attention mask (`encode_masked_prompts`)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise KinemaError("prompts must be a list of strings (one per video)")
        if clip_skip != 1:
            raise KinemaError(f"clip_skip {clip_skip} skips layers of a CLIP text encoder, and {self.name} is an "
                              "EasyAnimate model, whose text encoder is not CLIP: drop clip_skip (--clip-skip)")
        # T5's vocabulary is case-sensitive and V3 was trained and sampled on lower-cased captions.
        texts = [p.lower().strip() for p in prompts] if self.lowercase else list(prompts)
        states, mask = encode_masked_prompts(self.text_encoder, self.tokenizer, texts, max_length=self.text_max_length)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings `(B, image_embed_dim)` float32 of images `(B, 3, H, W)` in [0, 1]: the image
        encoder's `image_embeds` of `image_processor`'s pixels."""
        if self.image_encoder is None or self.image_processor is None:
            raise KinemaError("this EasyAnimate model has no CLIP image encoder; conditioning on an image needs an "
                              "InP folder with image_encoder/")
        from kinema.pipelines.clip_image import clip_pixels

        parameter = next(self.image_encoder.parameters())
        inputs = clip_pixels(self.image_processor, images)
        with torch.no_grad():
            embeds = self.image_encoder(pixel_values=inputs.to(parameter.device, parameter.dtype)).image_embeds
        return embeds.float()

    # ------------------------------------------------------------------ VAE

    def _tiling(self) -> Any:
        return self.vae.config_tiling if self.vae_tiling else "config"

    def _check_frames(self, frames: torch.Tensor, what: str) -> None:
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise KinemaError(f"{what} takes frames (B, F, 3, H, W) in [0, 1]; got shape {tuple(frames.shape)}")
        self.latent_frames(frames.shape[1])
        self.check_size(frames.shape[-2], frames.shape[-1])

    def _encode_pixels(self, video: torch.Tensor) -> torch.Tensor:
        """Scaled posterior means `(B, 4, F', h, w)` float32 of a video `(B, 3, F, H, W)` as the VAE takes it."""
        parameter = next(self.vae.parameters())
        with torch.no_grad():
            pixels = video.to(parameter.device, parameter.dtype, memory_format=torch.channels_last_3d)
            posterior = self.vae.encode(pixels, tiling=self._tiling()).latent_dist
        return posterior.mean.float() * self.vae.config.scaling_factor

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Scaled latents `(B, 4, F', H/8, W/8)` float32 of frames `(B, F, 3, H, W)` in [0, 1] (F = 1 or 8k): the
        Slice VAE's posterior mean times its scaling factor."""
        self._check_frames(frames, "encoding")
        return self._encode_pixels(frames.permute(0, 2, 1, 3, 4) * 2 - 1)

    def decode_bytes(self, videos: int, frames: int, height: int, width: int) -> int | None:
        """See VideoFamily.decode_bytes: a slice of every video a call, into the whole video held on the VAE's
        device, then its float32 copies in [0, 1] (three videos at once)."""
        config = self.vae.config
        tiling = self.vae.resolve_tiling(self._tiling(), "decoder")
        element = next(self.vae.parameters()).element_size()
        return 3 * video_bytes(videos, frames, height, width) + decode_call_bytes(
            config.ch * config.ch_mult[min(1, len(config.ch_mult) - 1)], videos * min(frames, self._slice[0]),
            height, width, None if tiling is None else tiling.tile_size, element)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames `(B, F, 3, H, W)` float32 in [0, 1] from scaled latents `(B, 4, F', h, w)` (F' = 1 or 2k): divided
        by the scaling factor, decoded with V3's seam smoothing, clamped to [-1, 1] and mapped to [0, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise KinemaError(f"decoding takes latents (B, {self.latent_channels}, F', h, w); got shape "
                              f"{tuple(latents.shape)}")
        self.pixel_frames(latents.shape[2])
        parameter = next(self.vae.parameters())
        unscaled = (latents / self.vae.config.scaling_factor).to(parameter.device, parameter.dtype,
                                                                   memory_format=torch.channels_last_3d)
        with torch.no_grad():
            video = self.vae.decode(unscaled, tiling=self._tiling(), smooth_seams=True).sample
        return (video.float().clamp(-1, 1) / 2 + 0.5).permute(0, 2, 1, 3, 4).contiguous()

    # ------------------------------------------------------------------ inpaint conditioning

    @property
    def inpaints(self) -> bool:
        """Whether the transformer takes inpaint latents (V3 InP: 12 input channels for 4 latent channels)."""
        return int(self.model.config.in_channels) > self.latent_channels

    def inpaint_conditioning(self, video: torch.Tensor, keep: torch.Tensor,
                             clip_image: torch.Tensor | None) -> tuple[Conditioning, Conditioning]:
        """V3's inpaint inputs for frames to keep and frames to generate.

        Args:
            video: `(B, F, 3, H, W)` in [0, 1] (F = 1 or 8k): the kept frames at their places; the other frames'
                pixels are ignored.
            keep: `(F,)` bool, True for the pixel frames to keep (all False: text-to-video), or `(F, H, W)`, True
                for the pixels to keep (video inpainting: V3's mask video, per pixel).
            clip_image: `(B, 3, H, W)` (or `(1, 3, H, W)` for all) in [0, 1]: the image whose CLIP embedding
                conditions (V3: the start image), or None for no image tokens.
        Returns:
            `(cond, uncond)`: both with the same `inpaint_latents` `(B, 8, F', h, w)` (mask latents, then
            masked-video latents, scaled); with `clip_image`, cond has `clip_image_embeds` `(B, D)` and
            `clip_attention_mask` ones `(B, num_image_tokens)`, uncond zeros of both.
        """
        if not self.inpaints:
            return super().inpaint_conditioning(video, keep, clip_image)
        self._check_frames(video, "inpaint conditioning")
        batch, frames, _, height, width = video.shape
        if keep.shape not in ((frames,), (frames, height, width)) or keep.dtype != torch.bool:
            raise KinemaError(f"keep must be a bool tensor (F,) = ({frames},), one flag per pixel frame, or (F, H, W) "
                              f"= ({frames}, {height}, {width}), one per pixel; got {keep.dtype} {tuple(keep.shape)}")
        if clip_image is not None and (clip_image.dim() != 4 or clip_image.shape[0] not in (1, batch)):
            raise KinemaError(f"clip_image must be (B, 3, H, W) with B = {batch} (or 1 for all videos); got shape "
                              f"{tuple(clip_image.shape)}")
        kept = keep.to(video.device).view(1, 1, frames, *(keep.shape[1:] or (1, 1)))  # (1, 1, F, 1 or H, 1 or W)
        # V3's mask video: 1 = generate, 0 = keep, binarised and left in [0, 1], on all 3 channels.
        mask_video = (~kept).to(video.dtype).expand(batch, 3, frames, height, width)
        pixels = video.permute(0, 2, 1, 3, 4) * 2 - 1
        masked_video = torch.where(kept, pixels, torch.full_like(pixels, -1.0))
        inpaint = torch.cat([self._encode_pixels(mask_video), self._encode_pixels(masked_video)], dim=1)
        cond: Conditioning = {"inpaint_latents": inpaint}
        uncond: Conditioning = {"inpaint_latents": inpaint}
        # A model without image tokens (kinema-tiny: InP, no CLIP) takes the start image through the masked video
        # alone.
        if clip_image is not None and self.model.config.image_embed_dim is not None:
            embeds = self.encode_image(clip_image).to(inpaint.device).expand(batch, -1)
            tokens = int(self.model.config.num_image_tokens)
            cond.update(clip_image_embeds=embeds, clip_attention_mask=embeds.new_ones(batch, tokens))
            uncond.update(clip_image_embeds=torch.zeros_like(embeds),
                          clip_attention_mask=embeds.new_zeros(batch, tokens))
        return cond, uncond

    def text_to_video_conditioning(self, batch: int, frames: int, height: int,
                                   width: int) -> tuple[Conditioning, Conditioning]:
        """V3's inputs for text-to-video with an InP model: every frame to generate (mask latents of an all-1 mask,
        masked-video latents of an all -1 video), no image tokens; `inpaint_latents` `(batch, 8, F', h, w)` on both
        sides. This is `inpaint_conditioning` with `keep` all False and no CLIP image, which is how it is computed
        (so `generate()` may call either); it exists for callers that have no video."""
        if batch < 1:
            raise KinemaError(f"batch must be at least 1 video, got {batch}")
        blank = torch.zeros(batch, frames, 3, height, width)
        return self.inpaint_conditioning(blank, torch.zeros(frames, dtype=torch.bool), None)

    def image_tokens_from(self, step: int, steps: int) -> bool:
        """Whether step `step` (0-based) of `steps` gets the CLIP image tokens. V3 withholds them while
        `step < steps * (1 - clip_apply_ratio)` with clip_apply_ratio 0.5, so from step ceil(steps / 2) on: steps
        5-9 of 10, 13-24 of 25, none of 1. `steps` is the number of steps run (after a strength cut). Models without
        image tokens answer True."""
        if not 0 <= step < steps:
            raise KinemaError(f"step {step} is outside the {steps} sampling steps (0 to {steps - 1})")
        if self.model.config.image_embed_dim is None:
            return True
        return not step < steps * (1 - CLIP_APPLY_RATIO)

