"""Latent videos to frames through the Stable Diffusion VAE, frame by frame in bounded chunks."""

from __future__ import annotations

from typing import Any

import torch

from kinema.errors import KinemaError


def decode_latents(vae: Any, latents: torch.Tensor, decode_chunk: int = 16) -> torch.Tensor:
    """Frames `(B, F, 3, H, W)` in [0, 1] (float32) from latents `(B, C, F, h, w)`.

    The latents are divided by the VAE's `scaling_factor`, then decoded as images, `decode_chunk` frames per VAE call
    (so memory stays bounded whatever the video's length), and mapped from [-1, 1] to [0, 1].
    """
    if latents.dim() != 5:
        raise KinemaError(f"decoding takes latents (B, C, F, h, w); got shape {tuple(latents.shape)}")
    if decode_chunk < 1:
        raise KinemaError(f"decode_chunk must be at least 1 frame, got {decode_chunk}")
    batch, channels, frames, height, width = latents.shape
    parameter = next(vae.parameters())
    images = (latents / vae.config.scaling_factor).permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height,
                                                                                   width)
    video: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, images.shape[0], decode_chunk):
            chunk = images[start:start + decode_chunk].to(device=parameter.device, dtype=parameter.dtype)
            decoded = vae.decode(chunk).sample
            if video is None:  # one float32 video, filled chunk by chunk: long videos are not held twice
                video = torch.empty(batch * frames, *decoded.shape[1:])
            video[start:start + decode_chunk] = decoded.float().div_(2).add_(0.5).clamp_(0, 1).cpu()
    assert video is not None
    return video.reshape(batch, frames, *video.shape[1:])
