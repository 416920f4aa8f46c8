"""The live preview of a generation: the current latents as a small picture, made at every sampling step.

Not a VAE decode: decoding costs about as much as the final decode of the whole clip (the Slice VAE decodes in
frame slices, SD's VAE per frame), at every step, on the device the sampler is using; a fixed linear map of the
latent channels to RGB costs a (C x 3) product over h x w pixels, which is nothing beside a denoiser step, and
still shows the layout and the motion settling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kinema.errors import KinemaError

if TYPE_CHECKING:
    import numpy as np
    import torch

# Stable Diffusion 1.5's 4 latent channels -> RGB, the least-squares fit of decoded colours that ComfyUI and A1111
# previews use: SD-family previews get roughly the right colours.
SD_LATENT_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                 (-0.2120, -0.2616, -0.7177))
PREVIEW_SIZE = 256
_PROJECTION_SEED = 0


def latent_projection(channels: int) -> torch.Tensor:
    """The fixed `(channels, 3)` map from latent channels to RGB: SD1.5's fitted one for 4 channels, else a seeded
    random projection (VAEs of other channel counts have no published fit; the colours are arbitrary but the same
    at every step and in every run)."""
    import torch

    if channels == len(SD_LATENT_RGB):
        return torch.tensor(SD_LATENT_RGB)
    generator = torch.Generator().manual_seed(_PROJECTION_SEED)
    return torch.randn(channels, 3, generator=generator) / channels**0.5


def latent_preview(latents: torch.Tensor, size: int = PREVIEW_SIZE) -> np.ndarray:
    """The first latent frame of the first video of `latents` `(B, C, F', h, w)` as an RGB picture: uint8
    `(h * k, w * k, 3)`, each colour stretched to the full range, enlarged by a whole factor k (nearest
    neighbour) so its longer side is about `size` pixels."""
    import torch

    if latents.ndim != 5:
        raise KinemaError(f"expected latents shaped (B, C, F', h, w), got {tuple(latents.shape)}")
    frame = latents[0, :, 0].detach().float().cpu()  # (C, h, w)
    frame = torch.nan_to_num(frame, nan=0.0, posinf=0.0, neginf=0.0)  # one NaN stretched every colour to black
    rgb = torch.einsum("chw,ck->hwk", frame, latent_projection(frame.shape[0]))
    low = rgb.amin(dim=(0, 1), keepdim=True)
    high = rgb.amax(dim=(0, 1), keepdim=True)
    rgb = (rgb - low) / (high - low).clamp_min(1e-6)
    scale = max(1, size // max(frame.shape[1:]))
    rgb = rgb.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
    return (rgb * 255).round().to(torch.uint8).numpy()
