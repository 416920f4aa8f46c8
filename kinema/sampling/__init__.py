"""Sampling: schedulers by name, a denoiser per model family, classifier-free guidance and the denoising loop.

Each name is imported from its module on first use (kinema.lazy): `kinema.sampling.schedulers` alone imports no torch.
"""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".schedulers": ("SCHEDULERS", "FAMILIES", "make_scheduler"),
    ".denoisers": ("Denoiser", "UNetDenoiser", "DiTDenoiser"),
    ".guidance": ("guided_prediction",),
    ".loop": ("sample", "initial_noise", "generators"),
})
