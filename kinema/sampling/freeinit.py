"""FreeInit (Wu et al., arXiv 2312.07537): sample, then sample again from better initial noise, a few times.

Each later iteration diffuses the previous result back to the last training timestep, keeps the low spatio-temporal
frequencies of that (a 3D FFT low-pass over frames, height and width) and takes the high frequencies from fresh noise.
In training, even the noisiest latents keep some of the video's low frequencies; pure Gaussian noise has none, and
that gap shows as frames that do not hold together. It costs `iterations` times the sampling.

The filters and the noise rule follow diffusers' Apache-2.0 FreeInitMixin (pipelines/free_init_utils.py) so that
results match its AnimateDiffPipeline with `enable_free_init`; "box" is kinema's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError

if TYPE_CHECKING:
    import torch

FREE_INIT_METHODS = ("butterworth", "gaussian", "ideal", "box")


# Each iteration is a whole sampling run; the paper's gains level off by 5 (its figures stop there).
MAX_ITERATIONS = 10


@dataclass(frozen=True)
class FreeInitOptions:
    """FreeInit settings (defaults are the paper's and diffusers').

    iterations: sampling runs in all (1 is plain sampling). method: the low-pass filter, one of `FREE_INIT_METHODS`.
    spatial_stop, temporal_stop: the normalised stop frequencies d_s and d_t, in (0, 1]. order: the Butterworth
    filter's order (higher is sharper). fast_sampling: diffusers' coarse-to-fine schedule, iteration i of n running
    `int(steps / n * (i + 1))` steps (at least 1) instead of `steps`.
    """

    iterations: int = 3
    method: str = "butterworth"
    spatial_stop: float = 0.25
    temporal_stop: float = 0.25
    order: int = 4
    fast_sampling: bool = False

    def check(self) -> None:
        """One KinemaError line for a setting out of range."""
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or \
                not 1 <= self.iterations <= MAX_ITERATIONS:
            raise KinemaError(f"FreeInit (--free-init, free_init.iterations) runs from 1 (plain sampling) to "
                              f"{MAX_ITERATIONS} iterations, each a whole sampling run (3 to 5 are usual), got "
                              f"{self.iterations!r}")
        check_filter(self.method, self.spatial_stop, self.temporal_stop, self.order)

    def steps_at(self, iteration: int, steps: int) -> int:
        """Sampling steps of iteration `iteration` (from 0): `steps`, or fewer for the early iterations under
        fast_sampling."""
        if not self.fast_sampling:
            return steps
        return max(1, int(steps / self.iterations * (iteration + 1)))


def check_filter(method: str, spatial_stop: float, temporal_stop: float, order: int) -> None:
    """One KinemaError line for an unknown filter or a setting out of range."""
    if method not in FREE_INIT_METHODS:
        raise KinemaError(f"unknown FreeInit filter {method!r}; known: {', '.join(FREE_INIT_METHODS)}")
    for name, stop in (("spatial", spatial_stop), ("temporal", temporal_stop)):
        if not isinstance(stop, (int, float)) or isinstance(stop, bool) or not 0 < stop <= 1:
            raise KinemaError(f"FreeInit's {name} stop frequency must be in (0, 1], got {stop!r} (0.25 is usual)")
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise KinemaError(f"FreeInit's Butterworth order must be a whole number of at least 1, got {order!r}")


def frequency_filter(shape: Sequence[int], method: str = "butterworth", spatial_stop: float = 0.25,
                     temporal_stop: float = 0.25, order: int = 4, device: torch.device | str = "cpu"
                     ) -> torch.Tensor:
    """The low-pass filter `(F, H, W)` (float32) for latents whose last three dimensions are `shape[-3:]` =
    (F, H, W), in the centred layout of `torch.fft.fftshift` (zero frequency at index n // 2 of each axis).

    Frequency index k of an axis of length n sits at u = 2k/n - 1 in [-1, 1); the temporal u is scaled by
    spatial_stop / temporal_stop, so one radius d^2 = u_f^2 + u_h^2 + u_w^2 measures both (as diffusers does).
    With d_s = spatial_stop:
      - butterworth: 1 / (1 + (d^2 / d_s^2)^order)
      - gaussian: exp(-d^2 / (2 d_s^2))
      - ideal: 1 where d^2 <= 2 d_s (diffusers' threshold, wider than the Butterworth half-power radius d_s), else 0
      - box: 1 where |u_h| <= d_s, |u_w| <= d_s and the unscaled temporal |u_f| <= temporal_stop, else 0 (kinema's
        own: diffusers has no box filter).
    """
    import torch

    check_filter(method, spatial_stop, temporal_stop, order)
    if len(shape) < 3 or any(int(n) < 1 for n in shape[-3:]):
        raise KinemaError(f"a FreeInit filter needs a shape ending in (F, H, W), each at least 1; got {tuple(shape)}")
    frames, height, width = (int(n) for n in shape[-3:])

    # Float64 with the same operation order as diffusers' per-element Python floats, cast to float32 at the end.
    def axis(n: int) -> torch.Tensor:
        return 2 * torch.arange(n, dtype=torch.float64) / n - 1

    u_f, u_h, u_w = axis(frames)[:, None, None], axis(height)[None, :, None], axis(width)[None, None, :]
    if method == "box":
        mask = (u_f.abs() <= temporal_stop) & (u_h.abs() <= spatial_stop) & (u_w.abs() <= spatial_stop)
        return mask.to(torch.float32).to(device)
    radius_squared = ((spatial_stop / temporal_stop) * u_f) ** 2 + u_h ** 2 + u_w ** 2
    if method == "butterworth":
        mask = 1 / (1 + (radius_squared / spatial_stop ** 2) ** order)
    elif method == "gaussian":
        mask = torch.exp(-1 / (2 * spatial_stop ** 2) * radius_squared)
    else:  # ideal
        mask = (radius_squared <= spatial_stop * 2).to(torch.float64)
    return mask.to(torch.float32).to(device)


def diffusion_coefficients(scheduler: Any) -> tuple[float, float, int]:
    """`(sqrt(alpha_bar), sqrt(1 - alpha_bar), timestep)` at the scheduler's last training timestep T - 1, where
    FreeInit diffuses a result back to; a KinemaError line for a scheduler without a discrete noise schedule."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if alphas_cumprod is None or train_steps is None:
        raise KinemaError(f"FreeInit needs a scheduler with a discrete noise schedule (alphas_cumprod and "
                          f"num_train_timesteps); {type(scheduler).__name__} has none. Use one of kinema's "
                          f"schedulers (kinema.sampling.make_scheduler)")
    timestep = int(train_steps) - 1
    # float32 as diffusers' add_noise computes it for float32 latents, so results match it to the last bit
    alpha_bar = alphas_cumprod[timestep].float()
    return float(alpha_bar ** 0.5), float((1 - alpha_bar) ** 0.5), timestep


def reinitialize_noise(clean_latents: torch.Tensor, initial_noise: torch.Tensor, fresh_noise: torch.Tensor,
                       scheduler: Any, low_pass: torch.Tensor) -> torch.Tensor:
    """FreeInit's new initial noise `(B, C, F, H, W)` for the next sampling run.

    Args:
        clean_latents: the previous run's result `(B, C, F, H, W)`.
        initial_noise: the first run's unit-variance initial noise `(B, C, F, H, W)`: FreeInit (the paper and
            diffusers) diffuses the result with the same noise it started from.
        fresh_noise: unit Gaussian noise `(B, C, F, H, W)` for the high frequencies.
        scheduler: a diffusers scheduler with `alphas_cumprod` (any of kinema's).
        low_pass: the filter `(F, H, W)` from `frequency_filter` (centred layout).

    Returns:
        `z = sqrt(a) x0 + sqrt(1 - a) eps` at the last training timestep (a = alpha_bar there, x0 the clean latents,
        eps the initial noise), low-passed in 3D (frames, height, width), plus the high-passed fresh noise; in the
        clean latents' dtype. This is diffusers' rule for variance-preserving schedulers (DDIM, DPM-Solver, UniPC,
        PNDM, LCM): theirs calls `scheduler.add_noise`, which for sigma schedulers (Euler) works in sigma units
        instead; here z is always unit-variance, like the noise `kinema.sampling.sample` takes (it scales by
        `init_noise_sigma` itself).
    """
    import torch

    shape = tuple(clean_latents.shape)
    if clean_latents.ndim != 5:
        raise KinemaError(f"FreeInit takes latents (B, C, F, H, W), got shape {shape}")
    for name, tensor in (("initial noise", initial_noise), ("fresh noise", fresh_noise)):
        if tuple(tensor.shape) != shape:
            raise KinemaError(f"FreeInit's {name} has shape {tuple(tensor.shape)}, the latents {shape}; draw it with "
                              "the latents' shape")
    if tuple(low_pass.shape) != shape[-3:]:
        raise KinemaError(f"FreeInit's filter has shape {tuple(low_pass.shape)}, the latents' (F, H, W) is "
                          f"{shape[-3:]}; build it with frequency_filter(latents.shape)")
    signal, noise_scale, _ = diffusion_coefficients(scheduler)
    diffused = signal * clean_latents.float() + noise_scale * initial_noise.float()
    fresh = fresh_noise.float()
    dims = (-3, -2, -1)
    low_pass = low_pass.to(device=fresh.device, dtype=torch.float32)

    def centred_spectrum(x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)

    # Two spectra mixed, not the one of (diffused - fresh) that linearity would allow: the same rounding as
    # diffusers, whose results then match to the bit (sampling amplifies a 1e-7 difference a hundredfold).
    mixed = centred_spectrum(diffused) * low_pass + centred_spectrum(fresh) * (1 - low_pass)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real.to(clean_latents.dtype)


def seeded_fresh_noise(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype | None = None,
                       device: torch.device | str = "cpu") -> Callable[[int], torch.Tensor]:
    """Fresh noise for iteration i >= 1 as `fresh(i)` `(B, C, F, H, W)`: video b's i-th draw after its initial noise
    from a CPU generator seeded `seeds[b]`, in float32 then cast and moved.

    With the initial noise from `kinema.sampling.initial_noise(shape, seeds)` (draw 0 of the same generators), this
    is the noise diffusers' AnimateDiffPipeline draws with `generator=[torch.Generator().manual_seed(s) for s in
    seeds]` and FreeInit, for schedulers that draw no noise while stepping (DDIM, DPM-Solver++, UniPC, PNDM).
    Each call re-seeds, so calls in any order give the same noise.
    """
    import torch

    shape = tuple(int(n) for n in shape)
    if len(shape) != 5:
        raise KinemaError(f"fresh noise takes a latent shape (B, C, F, H, W); got {shape}")
    if len(seeds) != shape[0]:
        raise KinemaError(f"{len(seeds)} seed(s) for a batch of {shape[0]} video(s); give one seed per video")

    def fresh(iteration: int) -> torch.Tensor:
        if iteration < 1:
            raise KinemaError(f"fresh noise is for FreeInit iterations 1 and later, got {iteration}")
        videos = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))
            for _ in range(iteration):  # the initial noise, then the fresh noise of iterations 1 .. iteration - 1
                torch.randn(shape[1:], generator=generator, dtype=torch.float32)
            videos.append(torch.randn(shape[1:], generator=generator, dtype=torch.float32))
        return torch.stack(videos).to(device=device, dtype=dtype or torch.float32)

    return fresh


def free_init_sample(run: Callable[[torch.Tensor, int], torch.Tensor], noise: torch.Tensor, scheduler: Any,
                     options: FreeInitOptions, steps: int, fresh_noise: Callable[[int], torch.Tensor],
                     callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Sample `options.iterations` times, each run after the first starting from `reinitialize_noise` of the last.

    Args:
        run: `run(noise, steps)` samples from unit-variance noise `(B, C, F, H, W)` in `steps` steps and returns the
            clean latents `(B, C, F, H, W)`, e.g. `lambda z, n: sample(denoiser, scheduler, z, cond, uncond, n, g)`.
        noise: the first run's unit-variance initial noise `(B, C, F, H, W)` (`initial_noise`).
        scheduler: the scheduler `run` uses (only its noise schedule is read here).
        options: FreeInitOptions; checked here, before any sampling.
        steps: sampling steps per run (fewer in early runs under `options.fast_sampling`).
        fresh_noise: `fresh_noise(i)` gives unit noise `(B, C, F, H, W)` for iteration i >= 1
            (`seeded_fresh_noise`).
        callback: called as `callback(iteration, latents)` after each run.

    Returns:
        the last run's latents `(B, C, F, H, W)`.
    """
    options.check()
    if steps < 1:
        raise KinemaError(f"sampling needs at least 1 step, got {steps}")
    if options.iterations > 1:
        diffusion_coefficients(scheduler)  # a scheduler FreeInit cannot use fails now, not after the first run
    low_pass = frequency_filter(noise.shape, options.method, options.spatial_stop, options.temporal_stop,
                                options.order, device=noise.device)
    latents = run(noise, options.steps_at(0, steps))
    if callback is not None:
        callback(0, latents)
    for iteration in range(1, options.iterations):
        start = reinitialize_noise(latents, noise, fresh_noise(iteration), scheduler, low_pass)
        latents = run(start, options.steps_at(iteration, steps))
        if callback is not None:
            callback(iteration, latents)
    return latents
