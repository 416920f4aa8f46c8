"""What one model family gives the generation pipeline: its model, text encoding, VAE and conditioning.

`generate()` (kinema.pipelines.generation) drives every mode (text/image/video-to-video, continuation, context
windows, prompt travel) through this one interface, so the modes are written once for both families:
`AnimateDiffFamily` (kinema.pipelines.animatediff: VideoUNet, CLIP text, the SD VAE frame by frame) and
`EasyAnimateFamily` (kinema.pipelines.easyanimate: VideoDiT, T5 text, Slice VAE, inpaint latents, CLIP image tokens).

Frames are float `(B, F, 3, H, W)` in [0, 1] everywhere in the pipelines; latents are `(B, C, F', h, w)`, already
multiplied by the VAE's scaling factor (what the diffusion model sees).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from kinema.errors import KinemaError
from kinema.sampling.denoisers import Denoiser

Conditioning = dict[str, torch.Tensor | None]


class VideoFamily:
    """Base of the per-family pipeline parts. Subclasses set `family` (a key of `kinema.sampling.FAMILIES`: its noise
    schedule) and `default_scheduler`, and implement the methods that raise NotImplementedError here."""

    family: str = ""
    default_scheduler: str = "ddim"
    # How much the VAE shrinks height and width (8 for SD1.5 and the Slice VAE).
    spatial_factor: int = 8
    # The text conditioning key that may be given per frame as (B, F', L, D) for prompt travel.
    text_key: str = "encoder_hidden_states"
    # What the model predicts (kinema.json "prediction_type"): "epsilon" (the published models) or "v_prediction".
    prediction_type: str = "epsilon"
    # The generation settings the model's kinema.json recommends ("defaults": size, frames, steps, guidance,
    # scheduler); `generate()` fills a request's unset fields from them.
    defaults: Mapping[str, Any] = MappingProxyType({})
    # Where a request's `offload` runs each model (its parts wait in CPU memory): None is the first CUDA GPU.
    offload_device: torch.device | None = None

    # The VideoModel (VideoUNet / VideoDiT) the denoiser wraps, and the VAE its latents are decoded by.
    model: Any
    vae: Any

    def denoiser(self) -> Denoiser:
        """The denoiser wrapping this family's model (kinema.sampling.denoisers)."""
        raise NotImplementedError

    def noise_schedule(self) -> dict[str, Any]:
        """The noise schedule the model was trained with (diffusers scheduler settings): the family's, with the
        model's own prediction type."""
        from kinema.sampling.schedulers import FAMILIES

        return {**FAMILIES[self.family], "prediction_type": self.prediction_type}

    @property
    def name(self) -> str:
        """What the settings record as the model (its folder or file, or the class name)."""
        return getattr(self, "source", None) or type(self.model).__name__

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latents (4 for both families; the DiT's inpaint channels come on top)."""
        raise NotImplementedError

    @property
    def max_frames(self) -> int:
        """The most pixel frames the model denoises in one pass (its motion modules' limit, in pixel frames)."""
        return self.pixel_frames(int(self.model.max_frames))

    def latent_frames(self, frames: int) -> int:
        """Latent frames F' for a video of `frames` pixel frames; one KinemaError line naming the nearest valid
        counts when the VAE cannot take `frames`."""
        raise NotImplementedError

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from `latent_frames` latent frames (the inverse of `latent_frames`)."""
        raise NotImplementedError

    def check_size(self, height: int, width: int) -> None:
        """One KinemaError line when the model cannot make `height` x `width` videos (with the nearest sizes)."""
        from kinema.pipelines.jobs import check_size_multiple

        check_size_multiple(height, width, self.spatial_factor, "the VAE's downscale")

    def cut_off_text(self, prompt: str) -> str | None:
        """The end of `prompt` past the tokens the text encoder reads, which changes nothing (None: it fits, or the
        family cannot tell)."""
        return None

    def encode_text(self, prompts: list[str], clip_skip: int = 1) -> Conditioning:
        """Text conditioning for a batch of prompts: the denoiser's keyword arguments, each batched along dim 0
        (`encoder_hidden_states` `(B, L, D)`, and for T5 `encoder_attention_mask` `(B, L)`); `clip_skip` as
        `kinema.pipelines.text_encoding.encode_prompts` takes it (CLIP text encoders only)."""
        raise NotImplementedError

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Latents `(B, C, F', h, w)` (scaled) of frames `(B, F, 3, H, W)` in [0, 1]: the posterior mean."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames `(B, F, 3, H, W)` float32 in [0, 1] from scaled latents `(B, C, F', h, w)`."""
        raise NotImplementedError

    def decode_bytes(self, videos: int, frames: int, height: int, width: int) -> int | None:
        """About the memory decoding `videos` videos of `frames` frames at `height` x `width` takes at once on the
        VAE's device (`decode_call_bytes`, and the decoded video where it is held); None where unknown."""
        return None

    @property
    def inpaints(self) -> bool:
        """Whether the model takes inpaint conditioning (an EasyAnimate InP model): image-to-video and continuation
        then condition through `inpaint_conditioning`; otherwise the pipeline keeps the known frames' latents
        (repaint-style)."""
        return False

    # Whether a model without inpaint channels may hold known frames' latents instead (repaint): AnimateDiff's
    # image-to-video and continuation; EasyAnimate needs its InP model.
    repaint_fallback: bool = False

    def inpaint_conditioning(self, video: torch.Tensor, keep: torch.Tensor,
                             clip_image: torch.Tensor | None) -> tuple[Conditioning, Conditioning]:
        """The conditional and unconditional inpaint inputs for an InP model.

        Args:
            video: `(B, F, 3, H, W)` in [0, 1]: the known frames at their places (the rest is ignored).
            keep: `(F,)` bool, True for the frames to keep, or `(F, H, W)`, True for the pixels to keep (video
                inpainting).
            clip_image: `(B, 3, H, W)` in [0, 1], the image whose CLIP embedding conditions (None: no image tokens).
        Returns:
            `(cond, uncond)` mappings with `inpaint_latents` `(B, 2C, F', h, w)` and, when `clip_image` is given,
            `clip_image_embeds` / `clip_attention_mask` (zeros with a zero mask on the unconditional side).
        """
        raise KinemaError(f"{type(self).__name__} is not an inpaint model; image-to-video keeps the first frame's "
                          "latents instead")

    @property
    def animates_image(self) -> bool:
        """Whether the model is an image animator (AnimateDiff with PIA's conv_in): it makes image-to-video only,
        conditioned through `image_conditioning` on every call."""
        return False

    def image_conditioning(self, image: torch.Tensor, frames: int,
                           pia_motion: int | None = None) -> tuple[Conditioning, Conditioning]:
        """An image animator's inputs for a clip of `frames` frames from its start `image` `(B, 3, H, W)` in [0, 1]:
        `(cond, uncond)` with `inpaint_latents` `(B, 5, F, h, w)` (see `AnimateDiffFamily.image_conditioning`)."""
        raise KinemaError(f"{self.name} is not an image animator (PIA)")

    # An IP-Adapter loaded into the model (kinema.loaders.ip_adapter.IPAdapter), whose image prompt every run needs.
    ip_adapter: Any = None

    def check_image_prompt(self, given: bool) -> None:
        """One KinemaError line when an image prompt is `given` to a model without IP-Adapter, or missing for a
        model with one (its IP layers need image embeddings on every call)."""
        if self.ip_adapter is None and given:
            raise KinemaError(f"{self.name} has no IP-Adapter loaded, so an image prompt (ip_image, --ip-image) has "
                              "nothing to condition; load one with the model (--ip-adapter)")
        if self.ip_adapter is not None and not given:
            raise KinemaError(f"{self.name} is loaded with an IP-Adapter ({self.ip_adapter.path}), which conditions "
                              "on an image prompt: give one (ip_image, --ip-image), or load the model without it")

    # A ControlNet steering the model frame by frame (kinema.models.controlnet.VideoControlNet), whose control
    # images every run needs.
    controlnet: Any = None

    def check_control(self, given: bool) -> None:
        """One KinemaError line when control images are `given` to a model without ControlNet, or missing for a
        model with one."""
        if self.controlnet is None and given:
            raise KinemaError(f"{self.name} has no ControlNet loaded, so control images (control_video, "
                              "--control-video) have nothing to steer; load one with the model (--controlnet), which "
                              "AnimateDiff models take")
        if self.controlnet is not None and not given:
            raise KinemaError(f"{self.name} is loaded with a ControlNet ({self.controlnet.path}), which steers every "
                              "frame by a control image: give them (control_video, --control-video), or load the "
                              "model without it")

    def control_conditioning(self, images: Sequence[torch.Tensor], frames: int,
                             indices: Sequence[int] | None = None, falloff: Sequence[float] | None = None,
                             loop: bool = False) -> Conditioning:
        """The loaded ControlNet's conditioning for a video of `frames` frames from its control images, one
        `(K, 3, H, W)` in [0, 1] at the video's size per ControlNet loaded:
        - a ControlNet: `control_frames` `(1, 3, F, H, W)` (one image per frame, or one for all); several: theirs
          one after another along the channels, `(1, 3N, F, H, W)`. Keyframes at `indices` (shared by several)
          steer their own frames and, at the `falloff` weights, those beside them (`control_weights`): each frame
          holds the image that steers it, and `control_mask` `(1, N, F, 1, 1)` the weight;
        - SparseCtrl: the keyframes at `indices` (default: one per frame, or one image at frame 0) as latents
          `(1, 4, F, h, w)` (RGB: the VAE's posterior mean) or images (scribble), zeros elsewhere, and
          `control_mask` `(1, 1, F, ...)`, 1 at the keyframes."""
        from kinema.models.controlnet import VideoMultiControlNet, VideoSparseControlNet
        from kinema.pipelines.request import SPARSECTRL_FALLOFF, control_places, control_weights

        wanted = len(self.controlnet.nets) if isinstance(self.controlnet, VideoMultiControlNet) else 1
        if len(images) != wanted:
            raise KinemaError(f"{len(images)} control videos for {wanted} ControlNets; give one per ControlNet, in "
                              "their order")
        if not isinstance(self.controlnet, VideoSparseControlNet):
            if indices is None:
                for each in images:
                    control_places(each.shape[0], frames)
                return {"control_frames": torch.cat([each.expand(frames, -1, -1, -1).permute(1, 0, 2, 3)[None]
                                                     for each in images], dim=1)}
            for each in images:
                places = control_places(each.shape[0], frames, indices)
            steering = control_weights(places, frames, falloff, loop)
            sources = torch.tensor([max(image, 0) for image, _ in steering])
            weights = torch.tensor([weight for _, weight in steering], dtype=images[0].dtype,
                                   device=images[0].device)
            control = torch.cat([each[sources].permute(1, 0, 2, 3)[None] for each in images], dim=1)
            return {"control_frames": control, "control_mask": weights.view(1, 1, frames, 1, 1).expand(
                1, wanted, frames, 1, 1).contiguous()}
        if falloff is not None:
            raise KinemaError(SPARSECTRL_FALLOFF)
        [keyframe_images] = images
        count = keyframe_images.shape[0]
        places = [0] if indices is None and count == 1 else control_places(count, frames, indices)
        keyframes = (self.encode_frames(keyframe_images[None]) if self.controlnet.latent_condition
                     else keyframe_images.permute(1, 0, 2, 3)[None])  # (1, C, K, ...)
        control = keyframes.new_zeros(1, keyframes.shape[1], frames, *keyframes.shape[3:])
        mask = keyframes.new_zeros(1, 1, frames, *keyframes.shape[3:])
        control[:, :, places] = keyframes.expand(-1, -1, len(places), -1, -1) if count == 1 else keyframes
        mask[:, :, places] = 1
        return {"control_frames": control, "control_mask": mask}

    def image_prompt(self, image: torch.Tensor, videos: int) -> tuple[Conditioning, Conditioning]:
        """`(cond, uncond)` with `ip_image_embeds`, one row per video, of the image prompt `(1, 3, H, W)` in [0, 1]
        (its IP-Adapter's CLIP embeddings, and the unprompted side's)."""
        self.check_image_prompt(True)
        cond, uncond = self.ip_adapter.embeds(image)
        return ({"ip_image_embeds": cond.expand(videos, *cond.shape[1:])},
                {"ip_image_embeds": uncond.expand(videos, *uncond.shape[1:])})

    def image_prompt_frames(self, images: Sequence[torch.Tensor], places: Sequence[int], frames: int, videos: int,
                            interpolation: str = "linear", hold: float = 0.0, loop: bool = False,
                            window: range | None = None) -> tuple[Conditioning, Conditioning]:
        """`(cond, uncond)` with `ip_image_frame_embeds` `(videos, F, ...)`: the image prompts `(3, H, W)` in [0, 1]
        at the keyframes `places` (ascending) of a video of `frames` frames, their embeddings blended per frame as a
        prompt schedule blends text (kinema.sampling.prompt_travel's `PromptSchedule`: `interpolation`, `hold` and
        `loop`); with `window`, only those frames (F = len(window): a continuation segment's)."""
        from kinema.sampling.prompt_travel import PromptSchedule, interpolate_states

        self.check_image_prompt(True)
        pairs = [self.ip_adapter.embeds(image.float()[None]) for image in images]  # each its own size
        cond, uncond = (torch.cat(side) for side in zip(*pairs, strict=True))
        schedule = PromptSchedule(tuple((place, f"image {index}") for index, place in enumerate(places)),
                                  interpolation, hold, loop)

        def per_frame(embeds: torch.Tensor) -> torch.Tensor:  # (K, 1, D) or (K, 1, T, W) -> (videos, F, ...)
            blended = interpolate_states(embeds.flatten(1, -2), schedule, frames, window)
            return blended.reshape(len(blended), *embeds.shape[1:])[None].expand(videos, *[-1] * embeds.ndim)

        return {"ip_image_frame_embeds": per_frame(cond)}, {"ip_image_frame_embeds": per_frame(uncond)}

    def image_tokens_from(self, step: int, steps: int) -> bool:
        """Whether CLIP image tokens are passed at sampling step `step` of `steps` (V3 applies them only in the last
        part of sampling); families without image tokens answer True (nothing to withhold)."""
        return True

    def modules(self) -> list[torch.nn.Module]:
        """Every model of this family: its own modules, and an IP-Adapter's image encoder (held by the adapter)."""
        found = [value for value in vars(self).values() if isinstance(value, torch.nn.Module)]
        return found + ([] if self.ip_adapter is None else [self.ip_adapter.image_encoder])

    def to(self, device: torch.device | str) -> VideoFamily:
        """Move every model of this family to `device` (for CPU offload between stages)."""
        for module in self.modules():
            module.to(device)
        return self

    def settings(self) -> dict[str, Any]:
        """What to record about the model in a video's settings."""
        return {"model": self.name, "family": self.family}


def decode_call_bytes(channels: int, frames: int, height: int, width: int, tile: int | None,
                      element_bytes: int) -> int:
    """The memory a VAE decoder's call on `frames` frames at `height` x `width` (in tiles of `tile` pixels, None:
    whole) holds at its peak, estimated: its widest full-size activations, `channels` wide (the decoder's second
    level, upsampled to full size) in `element_bytes` elements, about 3.5 of them at once (measured 3.1 to 4.1
    times on SD's and kinema-tiny-ad's VAEs, 3.7 to 4.9 on a Slice VAE's, float32, CPU)."""
    if tile is not None:
        height, width = min(height, tile), min(width, tile)
    return 7 * channels * element_bytes * frames * height * width // 2
