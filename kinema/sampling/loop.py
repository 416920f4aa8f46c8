"""The denoising loop over a diffusers scheduler, and per-video initial noise."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from tqdm import tqdm

from kinema.errors import KinemaError
from kinema.interrupt import stop_if_requested
from kinema.sampling.denoisers import Conditioning, Denoiser
from kinema.sampling.guidance import guided_prediction, guided_steps
from kinema.sampling.step_cache import StepCache, caching_disabled_reason, check_cache_interval

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
# step index -> the (cond, uncond) of that step, for conditioning that changes while sampling (V3's image tokens)
ConditioningAt = Callable[[int], tuple[Conditioning, Conditioning | None]]
# (step index, latents after the step) -> latents to go on with (repaint: put the known frames back)
AfterStep = Callable[[int, torch.Tensor], torch.Tensor]


def generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per video, seeded with its own seed."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def step_generators(seeds: Sequence[int], shape: Sequence[int], drawn: int = 1) -> list[torch.Generator]:
    """One generator per video for the noise a stochastic sampler (euler_a, lcm) adds while stepping: seeded
    `seeds[b]` and past the `drawn` draws of one video's `shape[1:]` made from that seed before (the initial noise,
    `initial_noise(shape, seeds)`; FreeInit's fresh noise after it), as diffusers' pipelines go on drawing from the
    generator that drew the latents. A generator seeded afresh would add the initial noise again at the first step."""
    found = generators(seeds)
    for generator in found:
        for _ in range(drawn):
            torch.randn(tuple(int(n) for n in shape[1:]), generator=generator, dtype=torch.float32)
    return found


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
           progress: bool = True, generator: torch.Generator | list[torch.Generator] | None = None,
           first_step: int = 0, conditioning_at: ConditioningAt | None = None,
           after_step: AfterStep | None = None, cache_interval: int | None = None, cache_depth: int | None = None,
           cfg_truncation: float | None = None, guidance_rescale: float | None = None) -> torch.Tensor:
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
        first_step: start at this step of the `steps` schedule (video-to-video): `latents` are then already noised to
            `scheduler.timesteps[first_step]` (see `noised_to`) and are not scaled again.
        conditioning_at: when given, `conditioning_at(step)` gives that step's (cond, uncond) in place of both.
        after_step: when given, `after_step(step, latents)` replaces the latents after each step (repaint).
        cache_interval: step caching (kinema.sampling.step_cache): the model's deep features are computed every
            `cache_interval` steps and reused by shallow forwards in between; None or 1: every step runs in full.
            Off, with a logged reason, under context windows that move every step.
        cache_depth: how much of the model a reuse step runs (`StepCache`'s `depth`); None: the model's default.
        cfg_truncation: guidance runs on the first `cfg_truncation` share of the `steps` (rounded up) and the rest
            run the conditional half only (guidance 1); None: every step.
        guidance_rescale: the guided prediction's rescale towards the conditional one's spread, in [0, 1]
            (`guided_prediction`'s `rescale`); None or 0: none.
    """
    if steps < 1:
        raise KinemaError(f"sampling needs at least 1 step, got {steps}")
    if not 0 <= first_step < steps:
        raise KinemaError(f"first_step must be in [0, {steps}), got {first_step}")
    check_cache_interval(cache_interval)
    cut = guided_steps(steps, cfg_truncation)
    step_cache = StepCache(cache_interval, cache_depth) if cache_interval is not None and cache_interval > 1 else None
    if step_cache is not None and (reason := caching_disabled_reason(denoiser, steps)) is not None:
        logger.warning("step caching off: %s", reason)
        step_cache = None
    scheduler.set_timesteps(steps, device=latents.device)
    step_kwargs: dict[str, Any] = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator
    if first_step:
        if hasattr(scheduler, "set_begin_index"):  # multistep schedulers count their steps from here
            scheduler.set_begin_index(first_step * scheduler.order)
    else:
        latents = latents * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps[first_step * scheduler.order:]
    with tqdm(timesteps, desc="sampling", unit="step", disable=None if progress else True) as bar:
        for index, timestep in enumerate(bar, start=first_step):
            stop_if_requested()
            if conditioning_at is not None:
                cond, uncond = conditioning_at(index)
            model_input = scheduler.scale_model_input(latents, timestep)
            step_guidance = guidance if index < cut else 1.0
            if step_cache is not None and index == cut and guidance != 1:
                step_cache.keep_conditional_half()
            with nullcontext() if step_cache is None else step_cache.step(index - first_step, cond):
                eps = guided_prediction(denoiser, model_input, timestep, cond, uncond, step_guidance,
                                        guidance_rescale)
            latents = scheduler.step(eps, timestep, latents, **step_kwargs, return_dict=False)[0]
            if after_step is not None:
                latents = after_step(index, latents)
            if callback is not None:
                callback(index, timestep, latents)
    return latents


def noised_to(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """`clean` latents `(B, C, F, H, W)` noised with unit `noise` to the timestep the sampler runs at `step` of
    `steps` (the scheduler's own `add_noise`, so it fits DDIM's and Euler's parametrisations alike); `step == steps`
    gives `clean` itself (the end of sampling). It sets the scheduler's timesteps: call it before `sample`, not from
    inside (`repaint_step` is the in-loop form)."""
    if step >= steps:
        return clean
    scheduler.set_timesteps(steps, device=clean.device)
    timestep = scheduler.timesteps[step * scheduler.order]
    return scheduler.add_noise(clean, noise, timestep.reshape(1))


def repaint_step(scheduler: Any, known: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor, steps: int) -> AfterStep:
    """An `after_step` that puts the known latents back after every step, noised to the next step's level
    (repaint-style conditioning for models without inpaint channels) and clean after the last step.

    Args:
        known: clean latents `(B, C, F, H, W)`; only the frames where `keep` is True are used.
        keep: `(F,)` bool, the latent frames to hold, or `(F, H, W)`, the latent pixels to hold.
        noise: unit noise `(B, C, F, H, W)` used to re-noise them (fixed for the whole run).
    """
    def put_back(index: int, latents: torch.Tensor) -> torch.Tensor:
        following = index + 1
        if following >= steps:
            level = known
        else:
            # Schedulers that track their step (Euler, DPM++) noise to the step they are at, which after step()
            # is this following one; the others read the timestep given.
            level = scheduler.add_noise(known, noise, scheduler.timesteps[following * scheduler.order].reshape(1))
        mask = keep.to(latents.device).view(1, 1, keep.shape[0], *(keep.shape[1:] or (1, 1)))
        return torch.where(mask, level.to(latents.dtype), latents)

    return put_back
