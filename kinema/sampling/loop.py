"""The denoising loop over a diffusers scheduler, and per-video initial noise."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from kinema.errors import KinemaError
from kinema.interrupt import stop_if_requested
from kinema.sampling.denoisers import Conditioning, Denoiser
from kinema.sampling.guidance import guided_prediction

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per video, seeded with its own seed."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def initial_noise(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit Gaussian noise `(B, C, F, H, W)`, video b drawn from its own generator seeded `seeds[b]`: the same seed
    gives the same video whatever the batch. Drawn in float32 on the CPU, then cast and moved, so it does not depend
    on the device either."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 5:
        raise KinemaError(f"initial noise takes a latent shape (B, C, F, H, W); got {shape}")
    if len(seeds) != shape[0]:
        raise KinemaError(f"{len(seeds)} seed(s) for a batch of {shape[0]} video(s); give one seed per video")
    noise = [torch.randn(shape[1:], generator=gen, dtype=torch.float32) for gen in generators(seeds)]
    return torch.stack(noise).to(device=device, dtype=dtype)


def sample(denoiser: Denoiser, scheduler: Any, latents: torch.Tensor, cond: Conditioning,
           uncond: Conditioning | None, steps: int, guidance: float, *, callback: StepCallback | None = None,
           progress: bool = True, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Denoise `latents` in `steps` scheduler steps; returns the final latents `(B, C, F, H, W)`.

    Args:
        denoiser: a `UNetDenoiser` / `DiTDenoiser` (kinema.sampling.denoisers).
        scheduler: a diffusers scheduler (kinema.sampling.make_scheduler); its timesteps are set here.
        latents: unit-variance initial noise (`initial_noise`); it is scaled by the scheduler's `init_noise_sigma`.
        cond, uncond: the conditional and unconditional conditioning (the denoiser's forward keyword arguments);
            uncond may be None when `guidance` is 1.
        guidance: classifier-free guidance scale; 1 runs the conditional forward only.
        callback: called as `callback(step, timestep, latents)` after each step.
        progress: show a progress bar (on a terminal; tqdm leaves it off where stderr is not one).
        generator: for schedulers that add noise while stepping (euler_a, lcm): a generator, or one per video.
    """
    if steps < 1:
        raise KinemaError(f"sampling needs at least 1 step, got {steps}")
    scheduler.set_timesteps(steps, device=latents.device)
    step_kwargs: dict[str, Any] = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator
    latents = latents * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    with tqdm(timesteps, desc="sampling", unit="step", disable=None if progress else True) as bar:
        for index, timestep in enumerate(bar):
            stop_if_requested()
            model_input = scheduler.scale_model_input(latents, timestep)
            eps = guided_prediction(denoiser, model_input, timestep, cond, uncond, guidance)
            latents = scheduler.step(eps, timestep, latents, **step_kwargs, return_dict=False)[0]
            if callback is not None:
                callback(index, timestep, latents)
    return latents
