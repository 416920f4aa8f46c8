"""Text to video for the AnimateDiff family from its parts in one call: one clip, one window (`generate()` with an
`AnimateDiffFamily`, which does the work)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kinema.errors import KinemaError
from kinema.models.motion import check_frame_count
from kinema.pipelines.animatediff import AnimateDiffFamily
from kinema.pipelines.generation import generate
from kinema.pipelines.request import GenerationRequest
from kinema.sampling.loop import StepCallback

OUTPUTS = ("tensor", "latent")


def _part(parts: Any, name: str) -> Any:
    """Component `name` of a `StableDiffusionComponents`, any object with that attribute, or a mapping."""
    found = parts.get(name) if isinstance(parts, Mapping) else getattr(parts, name, None)
    if found is None:
        raise KinemaError(f"text to video needs the base model's {name}; pass StableDiffusionComponents or "
                          f"parts with vae, text_encoder and tokenizer")
    return found


def text_to_video(video_unet: Any, components_or_parts: Any, prompt: str, *,
                  negative_prompt: str = "", frames: int = 16, height: int = 512, width: int = 512,
                  steps: int = 25, guidance: float = 7.5, seeds: Sequence[int] = (0,), scheduler: str = "ddim",
                  callback: StepCallback | None = None, progress: bool = True, output: str = "tensor",
                  decode_chunk: int = 16) -> torch.Tensor:
    """Generate one video per seed from a text prompt with an AnimateDiff `VideoUNet` on an SD1.5 base.

    Args:
        video_unet: a `VideoUNet` (the SD UNet inflated with motion modules).
        components_or_parts: `StableDiffusionComponents`, or anything with `vae`, `text_encoder` and `tokenizer`
            (attributes or mapping keys).
        prompt, negative_prompt: one string for every video; the negative prompt is the unconditional side of
            classifier-free guidance (empty by default, as in diffusers).
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
    if output not in OUTPUTS:
        raise KinemaError(f"unknown output {output!r}; known outputs: {', '.join(OUTPUTS)}")
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise KinemaError("text_to_video takes one prompt and one negative prompt for every seed; for a prompt "
                          "schedule use kinema.pipelines.generate()")
    if frames >= 1:
        check_frame_count(frames, video_unet.max_frames)  # one window: generate() would bring in context windows
    family = AnimateDiffFamily(video_unet, vae, text_encoder, tokenizer, decode_chunk=decode_chunk)
    request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, frames=frames, height=height,
                                width=width, steps=steps, guidance=guidance, seeds=list(seeds), scheduler=scheduler,
                                decode_chunk=decode_chunk)
    result = generate(family, request, callback=callback, progress=progress,
                      output="latent" if output == "latent" else "tensor")
    return result.latents if output == "latent" else result.frames
