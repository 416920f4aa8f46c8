"""Classifier-free guidance: `uncond + g * (cond - uncond)`, both halves in one batched forward."""

from __future__ import annotations

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
                      uncond: Conditioning | None, guidance: float) -> torch.Tensor:
    """Epsilon under classifier-free guidance with scale `guidance`. The unconditional and conditional halves run as
    one batch of 2B; guidance 1 runs the conditional half alone (and needs no `uncond`)."""
    if guidance == 1:
        return denoiser(latents, timestep, cond)
    if uncond is None:
        raise KinemaError(f"guidance {guidance} needs unconditional inputs (e.g. a negative prompt's states); pass "
                          "uncond, or guidance 1 for none")
    both = denoiser(torch.cat([latents, latents]), timestep, join_conditioning(uncond, cond))
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)
