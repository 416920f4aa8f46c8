"""Sampling: schedulers by name, a denoiser per model family, classifier-free guidance, the denoising loop, context
windows, noise (FreeNoise), prompt travel and FreeInit.

Each name is imported from its module on first use (kinema.lazy): `kinema.sampling.schedulers` and
`kinema.sampling.prompt_travel`'s parsing alone import no torch.
"""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".schedulers": ("SCHEDULERS", "FAMILIES", "make_scheduler"),
    ".denoisers": ("Denoiser", "UNetDenoiser", "DiTDenoiser"),
    ".guidance": ("guided_prediction",),
    ".loop": ("sample", "initial_noise", "generators", "step_generators", "noised_to", "repaint_step"),
    ".context": ("ContextOptions", "ContextDenoiser", "context_windows", "fuse_weights", "fusion_weights"),
    ".noise": ("freenoise_noise", "freenoise_initial_noise"),
    ".prompt_travel": ("PromptSchedule", "parse_prompt_schedule", "interpolate_states", "schedule_table"),
    ".freeinit": ("FreeInitOptions", "free_init_sample", "frequency_filter", "reinitialize_noise"),
})
