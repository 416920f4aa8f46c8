"""Text to video for the AnimateDiff family: CLIP prompt, VideoUNet denoising loop, SD VAE decoding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kinema.errors import KinemaError
from kinema.models.motion import check_frame_count
from kinema.pipelines.decode import decode_latents
from kinema.pipelines.text_encoding import encode_prompts
from kinema.sampling.denoisers import UNetDenoiser
from kinema.sampling.loop import StepCallback, generators, initial_noise, sample
from kinema.sampling.schedulers import make_scheduler

OUTPUTS = ("tensor", "latent")


def _part(parts: Any, name: str) -> Any:
    """Component `name` of a `StableDiffusionComponents`, any object with that attribute, or a mapping."""
    found = parts.get(name) if isinstance(parts, Mapping) else getattr(parts, name, None)
    if found is None:
        raise KinemaError(f"text to video needs the base model's {name}; pass StableDiffusionComponents or "
                          f"parts with vae, text_encoder and tokenizer")
    return found


def _vae_factor(vae: Any) -> int:
    """How much the VAE downscales (8 for SD1.5): 2 per block after the first."""
    return int(2 ** (len(vae.config.block_out_channels) - 1))


def _prompts(prompt: str | Sequence[str], videos: int, what: str) -> list[str]:
    """One prompt per video: a string for all, or a list of one per video."""
    batch = [prompt] * videos if isinstance(prompt, str) else list(prompt)
    if len(batch) == 1:
        batch = batch * videos
    if len(batch) != videos or not all(isinstance(p, str) for p in batch):
        raise KinemaError(f"{what} must be a string or a list of one string per seed ({videos}); got {prompt!r}")
    return batch


def text_to_video(video_unet: Any, components_or_parts: Any, prompt: str | Sequence[str], *,
                  negative_prompt: str | Sequence[str] = "", frames: int = 16, height: int = 512, width: int = 512,
                  steps: int = 25, guidance: float = 7.5, seeds: Sequence[int] = (0,), scheduler: str = "ddim",
                  callback: StepCallback | None = None, progress: bool = True, output: str = "tensor",
                  decode_chunk: int = 16) -> torch.Tensor:
    """Generate one video per seed from a text prompt with an AnimateDiff `VideoUNet` on an SD1.5 base.

    Args:
        video_unet: a `VideoUNet` (the SD UNet inflated with motion modules).
        components_or_parts: `StableDiffusionComponents`, or anything with `vae`, `text_encoder` and `tokenizer`
            (attributes or mapping keys).
        prompt, negative_prompt: a string for every video, or a list of one per seed; the negative prompt is the
            unconditional side of classifier-free guidance (empty by default, as in diffusers).
        frames, height, width: the video's size; height and width multiples of the VAE's downscale (8 for SD1.5),
            frames within `video_unet.max_frames`.
        steps, guidance, scheduler: sampling steps, guidance scale, scheduler name (kinema.sampling.SCHEDULERS).
        seeds: one video per seed; a seed gives the same video whatever the batch.
        callback, progress: see `kinema.sampling.sample`.
        output: "tensor" for frames `(B, F, 3, H, W)` float32 in [0, 1]; "latent" for the final latents
            `(B, 4, F, h, w)`.
        decode_chunk: frames per VAE call.
    """
    vae = _part(components_or_parts, "vae")
    text_encoder = _part(components_or_parts, "text_encoder")
    tokenizer = _part(components_or_parts, "tokenizer")
    factor = _vae_factor(vae)
    if height < factor or width < factor or height % factor or width % factor:
        raise KinemaError(f"height and width must be positive multiples of {factor} (the VAE's downscale); "
                          f"got {height}x{width}")
    if frames < 1:
        raise KinemaError(f"frames must be at least 1, got {frames}")
    check_frame_count(frames, video_unet.max_frames)  # the model's own limit, checked before any text is encoded
    if steps < 1:
        raise KinemaError(f"steps must be at least 1, got {steps}")
    if output not in OUTPUTS:
        raise KinemaError(f"unknown output {output!r}; known outputs: {', '.join(OUTPUTS)}")
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise KinemaError("give at least one seed (one video per seed)")
    sampler = make_scheduler(scheduler, "animatediff")
    prompts = _prompts(prompt, len(seeds), "prompt")
    negatives = _prompts(negative_prompt, len(seeds), "negative_prompt")

    device = next(video_unet.parameters()).device
    cond = encode_prompts(text_encoder, tokenizer, prompts).to(device)
    uncond = encode_prompts(text_encoder, tokenizer, negatives).to(device) if guidance != 1 else None
    channels = int(video_unet.unet.config.in_channels)
    noise = initial_noise((len(seeds), channels, frames, height // factor, width // factor), seeds, device=device)
    with torch.no_grad():
        latents = sample(UNetDenoiser(video_unet), sampler, noise, UNetDenoiser.conditioning(cond),
                         None if uncond is None else UNetDenoiser.conditioning(uncond), steps, guidance,
                         callback=callback, progress=progress, generator=generators(seeds))
    if output == "latent":
        return latents
    return decode_latents(vae, latents, decode_chunk)
