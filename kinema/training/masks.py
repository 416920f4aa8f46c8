"""EasyAnimate V3's inpaint training recipe: which frames each training clip keeps, and whether it gets CLIP tokens.

An InP model learns text-to-video, image-to-video and start-and-end interpolation at once, from one mask drawn per
sample. What is V3's is as its training does it (EasyAnimate @616a354: `get_random_mask` in
easyanimate/data/dataset_image_video.py and the collate and inpaint code of scripts/train.py):

- A video draws one of three kinds with equal chance (`mask_index = randint(1, 4)`; the box-shaped masks 0 and 4
  exist in the function but that draw never reaches them): every frame generated (text-to-video), the first k frames
  kept (image-to-video and continuation), or the first k and the last k frames kept (interpolation), with k uniform
  in 1..4 (`randint(1, 5)`). A one-frame clip (an image) always has every frame generated.
- CLIP embeds a frame drawn uniformly from the whole clip, whatever its mask (`clip_index = randint(0, F)`), so a
  text-to-video sample may still see an image; the CLIP tokens are switched on with probability 0.5.
- The mask video (1 = generate, 0 = keep, on 3 channels, not mapped to [-1, 1]) and the masked video (the clip on
  kept frames, -1 elsewhere) are VAE-encoded and scaled, mask latents first: the same as inference
  (`EasyAnimateFamily.inpaint_conditioning`).

Where kinema differs, on purpose:
- k is capped so that at least one frame is left to generate: at most F - 1 for `first_frames` and (F - 1) // 2 for
  `first_and_last`. V3 lets an 8-frame clip keep its first and last 4, i.e. every frame, which teaches nothing about
  generating. A kind that cannot leave a frame to generate (F = 1, or `first_and_last` with F = 2) falls back to
  text-to-video, as V3 does for one-frame clips.
- The CLIP switch is drawn per sample; V3 draws one switch for the whole batch (same rate, less correlated).
- Switched-off CLIP tokens get zero embeddings with a zero token mask; V3 keeps the frame's embedding under a zero
  mask. The attention bias of -10000 removes those tokens either way.
- The VAE gives its posterior mean (as `EasyAnimateFamily` does at inference); V3 draws a posterior sample.
- CLIP sees the frame rounded to 8 bits (`EasyAnimateFamily.encode_image`); V3 truncates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kinema.errors import KinemaError

MASK_KINDS = ("text_to_video", "first_frames", "first_and_last")
# V3 draws the three kinds with equal chance.
V3_MASK_WEIGHTS: Mapping[str, float] = {kind: 1.0 for kind in MASK_KINDS}
# V3's largest count of kept frames at the start (and at the end).
MAX_KEPT_FRAMES = 4
# V3's chance of CLIP image tokens in a training step.
CLIP_PROBABILITY = 0.5
SAMPLE_TYPES = ("video", "image")


def _checked_weights(weights: Mapping[str, float] | None) -> list[float]:
    if weights is None:
        weights = V3_MASK_WEIGHTS
    unknown = [kind for kind in weights if kind not in MASK_KINDS]
    if unknown:
        raise KinemaError(f"unknown mask kind {unknown[0]!r} in the mask weights; use {', '.join(MASK_KINDS)}")
    values = [float(weights.get(kind, 0.0)) for kind in MASK_KINDS]
    if any(not math.isfinite(value) or value < 0 for value in values) or sum(values) <= 0:
        raise KinemaError(f"mask weights must be finite, at least 0 and not all 0; got {dict(weights)}")
    return values


def _check_generator(generator: Any) -> None:
    if not isinstance(generator, torch.Generator):
        raise KinemaError(f"draws need a torch.Generator (seeded, so that a step can be repeated); got "
                          f"{type(generator).__name__}")


def _most_kept(kind: str, frames: int) -> int:
    """The largest k for `kind` that leaves at least one of `frames` frames to generate (0: the kind cannot)."""
    if kind == "first_frames":
        return min(MAX_KEPT_FRAMES, frames - 1)
    if kind == "first_and_last":
        return min(MAX_KEPT_FRAMES, (frames - 1) // 2)
    return 0


def sample_keep(types: Sequence[str], frames: int, generator: torch.Generator,
                weights: Mapping[str, float] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Draw which pixel frames each training sample keeps (gives to the model), V3's way.

    Args:
        types: one "video" or "image" per sample (the dataset's `type`); images keep nothing.
        frames: F, the pixel frames of every sample in the batch.
        generator: the only source of randomness: two uniform draws per sample, in sample order, whatever the
            types and weights, so a seeded generator gives the same masks every time.
        weights: relative weight of each kind in `MASK_KINDS` (kinds left out weigh 0); None: V3's equal thirds.
    Returns:
        `(keep, kinds)`: keep `(B, F)` bool, True for the frames the model is given; kinds, the kind each sample got
        ("text_to_video" for images, and for a kind that cannot leave a frame to generate at this F).
    """
    if isinstance(types, str) or not all(isinstance(kind, str) for kind in types) or not types:
        raise KinemaError("types must be a non-empty list of strings, one per sample (\"video\" or \"image\")")
    unknown = [kind for kind in types if kind not in SAMPLE_TYPES]
    if unknown:
        raise KinemaError(f"unknown sample type {unknown[0]!r}; use {' or '.join(SAMPLE_TYPES)}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise KinemaError(f"frames must be a whole number of at least 1, got {frames!r}")
    _check_generator(generator)
    kind_weights = _checked_weights(weights)
    total = sum(kind_weights)
    bounds = [sum(kind_weights[: index + 1]) / total for index in range(len(MASK_KINDS))]

    draws = torch.rand(len(types), 2, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    keep = torch.zeros(len(types), frames, dtype=torch.bool)
    kinds: list[str] = []
    for index, (sample_type, (kind_draw, count_draw)) in enumerate(zip(types, draws.tolist(), strict=True)):
        # A kind of zero weight has a zero-width interval, so the first bound above the draw names a kind that can be
        # drawn; the last bound is 1 up to rounding, hence the fallback to the last kind of positive weight.
        chosen = next((kind for kind, bound in zip(MASK_KINDS, bounds, strict=True) if kind_draw < bound),
                      [kind for kind, weight in zip(MASK_KINDS, kind_weights, strict=True) if weight > 0][-1])
        most = _most_kept(chosen, frames)
        if sample_type == "image" or most < 1:
            kinds.append("text_to_video")
            continue
        kept = 1 + min(int(count_draw * most), most - 1)
        keep[index, :kept] = True
        if chosen == "first_and_last":
            keep[index, frames - kept:] = True
        kinds.append(chosen)
    return keep, kinds


def sample_clip(keep: torch.Tensor, generator: torch.Generator,
                probability: float = CLIP_PROBABILITY) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw, per sample, whether it gets CLIP image tokens and which frame CLIP sees, V3's way.

    The frame is uniform over all F frames, kept or not (V3's `clip_index`): the tokens are a hint about the clip's
    content, learned for text-to-video samples too. Each sample takes one uniform draw and then one frame index from
    `generator`, in sample order, whatever `probability`.

    Args:
        keep: `(B, F)` bool, as `sample_keep` gives it (only its shape is used).
        generator: the only source of randomness.
        probability: the chance of the tokens being on (V3: 0.5).
    Returns:
        `(use_clip, clip_frame)`: `(B,)` bool and `(B,)` long frame indices in [0, F).
    """
    if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.dtype != torch.bool or keep.numel() == 0:
        raise KinemaError(f"keep must be a non-empty bool tensor (B, F); got "
                          f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise KinemaError(f"the CLIP probability must be a number from 0 to 1, got {probability!r}")
    _check_generator(generator)
    batch, frames = keep.shape
    switch = torch.rand(batch, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    clip_frame = torch.randint(0, frames, (batch,), generator=generator, device=generator.device).cpu()
    return switch < probability, clip_frame


def training_inpaint_conditioning(family: Any, video: torch.Tensor, keep: torch.Tensor, use_clip: torch.Tensor,
                                  clip_frame: torch.Tensor,
                                  encode_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                  ) -> dict[str, torch.Tensor]:
    """The conditional inpaint inputs of a training batch with one mask per sample, for an EasyAnimate InP model.

    Sample b gets what `family.inpaint_conditioning(video[b:b+1], keep[b], clip)[0]` gives, with clip the frame
    `video[b:b+1, clip_frame[b]]` where `use_clip[b]`, zero embeddings and a zero token mask elsewhere. The VAE work
    is batched: one encoder call for the masked videos and the distinct mask videos (a batch has at most a few: they
    depend only on the keep row), and one CLIP call for the samples that use it.

    Args:
        family: an `EasyAnimateFamily` (kinema.pipelines.easyanimate) whose transformer takes inpaint latents.
        video: `(B, F, 3, H, W)` in [0, 1] (F = 1 or 8k); the pixels of frames not kept are ignored.
        keep: `(B, F)` bool, True for the frames given to the model (`sample_keep`).
        use_clip: `(B,)` bool; clip_frame: `(B,)` integer frame indices (`sample_clip`).
        encode_pixels: what turns videos `(N, 3, F, H, W)` in [-1, 1] into scaled latents `(N, C, F', h, w)`; None:
            the family's VAE (`family._encode_pixels`). The trainer passes one that reads a latent cache first.
    Returns:
        `{"inpaint_latents": (B, 8, F', h, w)}` (mask latents then masked-video latents, scaled, float32), plus
        `clip_image_embeds` `(B, D)` float32 and `clip_attention_mask` `(B, tokens)` float32 (1 where `use_clip`)
        when the family has a CLIP image encoder and the transformer takes image tokens.
    """
    if not getattr(family, "inpaints", False):
        raise KinemaError(f"{type(family).__name__} does not take inpaint latents; inpaint training needs an "
                          "EasyAnimate InP model (12 input channels)")
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[2] != 3:
        raise KinemaError(f"inpaint conditioning takes video (B, F, 3, H, W) in [0, 1]; got shape "
                          f"{tuple(getattr(video, 'shape', ()))}")
    batch, frames, _, height, width = video.shape
    family.latent_frames(frames)
    family.check_size(height, width)
    if not isinstance(keep, torch.Tensor) or keep.shape != (batch, frames) or keep.dtype != torch.bool:
        raise KinemaError(f"keep must be a bool tensor (B, F) = ({batch}, {frames}); got "
                          f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
    if not isinstance(use_clip, torch.Tensor) or use_clip.shape != (batch,) or use_clip.dtype != torch.bool:
        raise KinemaError(f"use_clip must be a bool tensor (B,) = ({batch},); got "
                          f"{getattr(use_clip, 'dtype', type(use_clip).__name__)} "
                          f"{tuple(getattr(use_clip, 'shape', ()))}")
    if (not isinstance(clip_frame, torch.Tensor) or clip_frame.shape != (batch,) or clip_frame.is_floating_point()
            or clip_frame.dtype == torch.bool):
        raise KinemaError(f"clip_frame must be an integer tensor (B,) = ({batch},) of frame indices; got "
                          f"{getattr(clip_frame, 'dtype', type(clip_frame).__name__)} "
                          f"{tuple(getattr(clip_frame, 'shape', ()))}")
    if batch and (int(clip_frame.min()) < 0 or int(clip_frame.max()) >= frames):
        raise KinemaError(f"clip_frame holds frame indices outside 0..{frames - 1}: {clip_frame.tolist()}")

    keep = keep.to(video.device)
    kept = keep[:, None, :, None, None]  # (B, 1, F, 1, 1)
    pixels = video.permute(0, 2, 1, 3, 4) * 2 - 1  # (B, 3, F, H, W)
    masked_videos = torch.where(kept, pixels, torch.full_like(pixels, -1.0))
    # Mask videos depend only on the keep row: encode each distinct one once.
    distinct_keep, mask_of_sample = torch.unique(keep, dim=0, return_inverse=True)
    mask_videos = (~distinct_keep)[:, None, :, None, None].to(video.dtype).expand(-1, 3, frames, height, width)
    latents = (encode_pixels or family._encode_pixels)(torch.cat([masked_videos, mask_videos]))
    masked_latents, mask_latents = latents[:batch], latents[batch:][mask_of_sample.to(latents.device)]
    conditioning = {"inpaint_latents": torch.cat([mask_latents, masked_latents], dim=1)}

    image_embed_dim = family.model.config.image_embed_dim
    if getattr(family, "image_encoder", None) is None or image_embed_dim is None:
        return conditioning
    device = masked_latents.device
    embeds = torch.zeros(batch, int(image_embed_dim), device=device)
    chosen = use_clip.nonzero().flatten().to(video.device)
    if chosen.numel():
        images = video[chosen, clip_frame.to(video.device)[chosen]]  # (n, 3, H, W)
        embeds[chosen.to(device)] = family.encode_image(images).to(device)
    tokens = int(family.model.config.num_image_tokens)
    conditioning["clip_image_embeds"] = embeds
    conditioning["clip_attention_mask"] = use_clip.to(device, torch.float32)[:, None].expand(batch, tokens).clone()
    return conditioning
