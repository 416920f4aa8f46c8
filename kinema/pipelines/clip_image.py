"""CLIP image-encoder input from kinema's frames: EasyAnimate's image tokens and IP-Adapter's image prompt."""

from __future__ import annotations

from typing import Any

import torch

from kinema.errors import KinemaError


def clip_pixels(image_processor: Any, images: torch.Tensor) -> torch.Tensor:
    """The `pixel_values` `(B, 3, S, S)` a transformers `CLIPImageProcessor` makes of images `(B, 3, H, W)` in
    [0, 1], handed to it as 8-bit PIL images as EasyAnimate V3 and diffusers' pipelines hand theirs: it resizes and
    crops those with PIL, and a float tensor would be rescaled by 1/255 a second time."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise KinemaError(f"CLIP takes images (B, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}")
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return image_processor(images=[Image.fromarray(image.numpy()) for image in pixels],
                           return_tensors="pt").pixel_values
