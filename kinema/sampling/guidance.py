"""Classifier-free guidance: `uncond + g * (cond - uncond)`, both halves in one batched forward, optionally rescaled;
and its truncation, guidance on the first steps only."""

from __future__ import annotations

import math

import torch

from kinema.errors import KinemaError
from kinema.models.video_model import Timestep
from kinema.sampling.denoisers import Conditioning, Denoiser


def join_conditioning(uncond: Conditioning, cond: Conditioning) -> dict[str, torch.Tensor | None]:
    """`uncond` then `cond`, concatenated key by key along the batch; both must give the same keys (None in both or
    in neither)."""
    keys = {k for k, v in cond.items() if v is not None}
    uncond_keys = {k for k, v in uncond.items() if v is not None}
    if keys != uncond_keys:
        raise KinemaError(f"the conditional and unconditional inputs must give the same conditioning; "
                          f"conditional: {', '.join(sorted(keys))}; unconditional: {', '.join(sorted(uncond_keys))}")
    joined: dict[str, torch.Tensor | None] = {}
    for key in keys:
        u, c = uncond[key], cond[key]
        assert u is not None and c is not None
        if u.shape != c.shape:
            raise KinemaError(f"conditional and unconditional {key} differ in shape: {tuple(c.shape)} vs "
                              f"{tuple(u.shape)}; pad the unconditional one to the same length")
        joined[key] = torch.cat([u, c])
    return joined


def guided_prediction(denoiser: Denoiser, latents: torch.Tensor, timestep: Timestep, cond: Conditioning,
                      uncond: Conditioning | None, guidance: float, rescale: float | None = None) -> torch.Tensor:
    """The model's prediction (epsilon or velocity) `(B, C, F, H, W)` under classifier-free guidance with scale
    `guidance`. The unconditional and conditional halves run as one batch of 2B; guidance 1 runs the conditional half
    alone (and needs no `uncond`). `rescale` in [0, 1] blends the guided prediction towards itself rescaled to the
    conditional one's standard deviation per video (diffusers' `rescale_noise_cfg`, Lin et al. 2023, section 3.4:
    strong guidance otherwise over-saturates, above all with v-prediction and zero terminal SNR); None or 0: none."""
    if guidance == 1:
        return denoiser(latents, timestep, cond)
    if uncond is None:
        raise KinemaError(f"guidance {guidance} needs unconditional inputs (e.g. a negative prompt's states); pass "
                          "uncond, or guidance 1 for none")
    both = denoiser(torch.cat([latents, latents]), timestep, join_conditioning(uncond, cond))
    eps_uncond, eps_cond = both.chunk(2)
    guided = eps_uncond + guidance * (eps_cond - eps_uncond)
    if rescale:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        guided = rescale_noise_cfg(guided, eps_cond, guidance_rescale=rescale)
    return guided


def guided_steps(steps: int, cfg_truncation: float | None) -> int:
    """How many of the first of `steps` steps run with guidance when it stops after the fraction `cfg_truncation`
    of them (rounded up, so at least that share keeps it); None or 1: all of them. The later steps are where
    guidance matters least (the layout is set early), and each unguided one runs half the batch."""
    if cfg_truncation is None:
        return steps
    if isinstance(cfg_truncation, bool) or not isinstance(cfg_truncation, int | float) \
            or not 0 < cfg_truncation <= 1:
        raise KinemaError(f"cfg_truncation must be in (0, 1] (the share of steps that keep guidance), got "
                          f"{cfg_truncation!r}")
    return min(steps, math.ceil(cfg_truncation * steps - 1e-9))  # a float product can land a hair above a whole number
