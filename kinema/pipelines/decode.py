"""Latent videos to frames through the Stable Diffusion VAE, frame by frame in bounded chunks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from kinema.errors import KinemaError

logger = logging.getLogger(__name__)
# Set on a VAE that overflowed in float16: it runs in float32 whatever a later run's precision setup casts it to.
OVERFLOWS_FLOAT16 = "_kinema_overflows_float16"


def overflow_safe(vae: Any, images: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`run(images)` through the SD VAE `vae`, the images in its dtype and on its device. A float16 VAE whose result
    overflowed (NaN or infinity: SD VAEs' activations outgrow float16, the reason for their config's `force_upcast`)
    is cast to float32 for good, with one warning, and `images` run again: A1111's fallback, where a silent NaN would
    make black frames. Float16 otherwise stays, as it halves the VAE's memory. Images that are not finite themselves
    are run as they are: the VAE is not to blame. A VAE marked so is cast again where a later run's precision setup
    made it float16 (a cached model serves many requests), without another warning."""
    from kinema.models.precision import cast_module

    parameter = next(vae.parameters())
    if parameter.dtype == torch.float16 and getattr(vae, OVERFLOWS_FLOAT16, False):
        cast_module(vae, dtype=torch.float32)
    result = run(images.to(device=parameter.device, dtype=parameter.dtype))
    if parameter.dtype == torch.float16 and not bool(torch.isfinite(result).all()) and bool(
            torch.isfinite(images).all()):
        logger.warning("the VAE overflowed in float16 (NaN or infinity), as Stable Diffusion VAEs can; it runs in "
                       "float32 from now on (load the model in bfloat16 or float32 to start there)")
        setattr(vae, OVERFLOWS_FLOAT16, True)
        cast_module(vae, dtype=torch.float32)
        result = run(images.to(device=parameter.device, dtype=torch.float32))
    return result


def decode_latents(vae: Any, latents: torch.Tensor, decode_chunk: int = 16) -> torch.Tensor:
    """Frames `(B, F, 3, H, W)` in [0, 1] (float32) from latents `(B, C, F, h, w)`.

    The latents are divided by the VAE's `scaling_factor`, then decoded as images, `decode_chunk` frames per VAE call
    (so memory stays bounded whatever the video's length), and mapped from [-1, 1] to [0, 1]; a float16 VAE that
    overflows runs again in float32 (`overflow_safe`).
    """
    if latents.dim() != 5:
        raise KinemaError(f"decoding takes latents (B, C, F, h, w); got shape {tuple(latents.shape)}")
    if decode_chunk < 1:
        raise KinemaError(f"decode_chunk must be at least 1 frame, got {decode_chunk}")
    batch, channels, frames, height, width = latents.shape
    images = (latents / vae.config.scaling_factor).permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height,
                                                                                   width)
    video: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, images.shape[0], decode_chunk):
            decoded = overflow_safe(vae, images[start:start + decode_chunk], lambda chunk: vae.decode(chunk).sample)
            if video is None:  # one float32 video, filled chunk by chunk: long videos are not held twice
                video = torch.empty(batch * frames, *decoded.shape[1:])
            video[start:start + decode_chunk] = decoded.float().div_(2).add_(0.5).clamp_(0, 1).cpu()
    assert video is not None
    return video.reshape(batch, frames, *video.shape[1:])
