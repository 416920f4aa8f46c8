"""Context windows: denoise a video longer than the motion module's frame limit in overlapping windows of frames.

Each sampling step runs the whole wrapped model once per window (so activation memory is bounded by the window,
not the video) and fuses the windows' epsilon predictions frame by frame with a weighted average:
`eps[f] = sum_w weight_w[f] * eps_w[f] / sum_w weight_w[f]` over the windows w holding frame f.

Two window schedules, in the vocabulary of AnimateDiff-Evolved's context options:
- "uniform": windows move with the step. Step s shifts them by `round(frames * h(s))` frames, where h is the
  "ordered halving" of s (its 64 bits reversed, as a fraction: 0, 1/2, 1/4, 3/4, 1/8, ...), so the seams land on
  different frames at every step. With `stride` n, windows of frame spacing 2, 4, ... 2^(n-1) are added.
- "static": fixed windows every `length - overlap` frames, the last one aligned to the end of the video.

With `closed_loop` the video is a circle: windows wrap past the last frame back to the first (for looping videos).
Without it no window wraps: one that would is replaced by the window ending where it reached the last frame and,
where its wrapped part is not covered otherwise, the window starting where the wrapped part begins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kinema.errors import KinemaError
from kinema.models.video_model import Timestep
from kinema.sampling.denoisers import Conditioning, Denoiser

SCHEDULES = ("uniform", "static")
FUSE_METHODS = ("flat", "pyramid", "overlap-linear")


@dataclass(frozen=True)
class ContextOptions:
    """How a long video is cut into windows and how their predictions are fused.

    Attributes:
        length: frames per window, counted in the latent frames the model sees (at most its motion modules' limit).
        overlap: frames shared by neighbouring windows (0 <= overlap < length).
        stride: for the "uniform" schedule, how many window spacings to use (1: contiguous windows only; n: also
            windows of every 2nd, 4th ... 2^(n-1)-th frame, as far as such a window fits in the video).
        closed_loop: windows wrap from the last frame back to the first, so the video loops without a seam.
        schedule: "uniform" (windows shift with the step) or "static" (fixed windows).
        fuse: the weight of each position in a window when windows are averaged: "flat" (all 1), "pyramid"
            (1, 2, ..., middle, ..., 2, 1) or "overlap-linear" (1, ramping linearly across the overlap at each end
            that borders another window; no ramp at the first and last frame of a video that does not loop).
        freenoise: start from FreeNoise noise (kinema.sampling.noise.freenoise_initial_noise) instead of
            independent noise per frame; read by the pipeline that draws the initial noise.
    """

    length: int
    overlap: int
    stride: int = 1
    closed_loop: bool = False
    schedule: str = "uniform"
    fuse: str = "flat"
    freenoise: bool = False

    def check(self, frames: int, max_frames: int | None = None) -> None:
        """One KinemaError line for options that cannot cut `frames` frames into windows a model with a frame limit
        of `max_frames` takes (None: no limit)."""
        if frames < 1:
            raise KinemaError(f"context windows need a video of at least 1 frame, got {frames}")
        if self.length < 1:
            raise KinemaError(f"context length must be at least 1 frame, got {self.length}")
        if max_frames is not None and self.length > max_frames:
            raise KinemaError(f"context length {self.length} exceeds the motion modules' frame limit of "
                              f"{max_frames} frames; use a context length of at most {max_frames}")
        if not 0 <= self.overlap < self.length:
            raise KinemaError(f"context overlap must be at least 0 and below the context length {self.length}, got "
                              f"{self.overlap}; use an overlap of 0 to {self.length - 1}")
        if self.stride < 1:
            raise KinemaError(f"context stride must be at least 1, got {self.stride}")
        if self.schedule not in SCHEDULES:
            raise KinemaError(f"unknown context schedule {self.schedule!r}; known schedules: {', '.join(SCHEDULES)}")
        if self.schedule != "uniform" and self.stride != 1:
            raise KinemaError(f"context stride {self.stride} applies to the uniform schedule only; use stride 1 with "
                              f"the {self.schedule!r} schedule")
        if self.fuse not in FUSE_METHODS:
            raise KinemaError(f"unknown context fuse method {self.fuse!r}; known methods: {', '.join(FUSE_METHODS)}")


def ordered_halving(step: int) -> float:
    """`step`'s 64 bits in reverse order, as a fraction of 2**64 in [0, 1): 0, 1/2, 1/4, 3/4, 1/8, 5/8, ... for steps
    0, 1, 2, ...; consecutive steps land far apart, and every 2**k steps visit every multiple of 2**-k."""
    reversed_bits = 0
    for _ in range(64):
        reversed_bits = (reversed_bits << 1) | (step & 1)
        step >>= 1
    return reversed_bits / 2**64


def _spacing_levels(frames: int, length: int, stride: int) -> int:
    """How many window spacings (1, 2, 4, ...) of the `stride` asked for fit: a window of spacing s spans `s * length`
    frames, which must not exceed the video, so that no window holds a frame twice, even in a loop."""
    levels = 1
    while levels < stride and length << levels <= frames:
        levels += 1
    return levels


def _uniform_windows(frames: int, options: ContextOptions, step: int) -> list[list[int]]:
    length, overlap = options.length, options.overlap
    phase = ordered_halving(step)
    shift = round(frames * phase)
    windows: list[list[int]] = []
    for level in range(_spacing_levels(frames, length, options.stride)):
        spacing = 1 << level
        first = shift + int(phase * spacing)
        # Windows go round the circle of frames from `first`, the last reaching past `first` again, so that the
        # frames either side of `first` share a window by `overlap` frames too, loop or not (reaching the frame before
        # it, as AnimateDiff-Evolved's uniform schedule does, left that seam with less overlap, or none). Windows
        # that wrap past the last frame are unwrapped below where the video does not loop.
        end = first + frames
        starts = [start % frames for start in range(first, end, length * spacing - overlap)]
        level_windows = [[start + k * spacing for k in range(length)] for start in starts]
        if options.closed_loop:
            windows += [[index % frames for index in window] for window in level_windows]
        else:
            windows += _unwrapped(level_windows, frames, spacing)
    return windows


def _unwrapped(windows: list[list[int]], frames: int, spacing: int) -> list[list[int]]:
    """`windows` (indices counted on past the last frame) with none wrapping: each that does is replaced by the window
    of the same spacing ending at its last index before the wrap and, unless the windows left cover its wrapped
    part, the window starting at its first wrapped index."""
    kept: list[list[int]] = []
    wrapped_parts: list[list[int]] = []
    for window in windows:
        if window[-1] < frames:
            kept.append(window)
            continue
        before = [index for index in window if index < frames]
        after = [index - frames for index in window if index >= frames]
        kept.append([before[-1] - (len(window) - 1 - k) * spacing for k in range(len(window))])
        wrapped_parts.append(after)
    heads: list[list[int]] = []
    for part in wrapped_parts:
        covered = {index for window in kept + heads for index in window}
        if not set(part) <= covered:
            heads.append([part[0] + k * spacing for k in range(len(windows[0]))])
    return heads + kept


def _static_windows(frames: int, options: ContextOptions) -> list[list[int]]:
    length = options.length
    windows: list[list[int]] = []
    for start in range(0, frames, length - options.overlap):
        if options.closed_loop:
            windows.append([(start + k) % frames for k in range(length)])
        elif start + length >= frames:
            windows.append(list(range(frames - length, frames)))
            break
        else:
            windows.append(list(range(start, start + length)))
    return windows


def context_windows(frames: int, options: ContextOptions, step: int = 0, steps: int = 1) -> list[list[int]]:
    """The frame indices of each window at sampling step `step` of `steps`: lists of `options.length` distinct frame
    indices in `[0, frames)`, ascending (a closed-loop window may wrap: `[14, 15, 0, 1]`), together covering every
    frame. A video of at most `options.length` frames is one window of all its frames."""
    options.check(frames)
    if steps < 1 or not 0 <= step < steps:
        raise KinemaError(f"step {step} is not one of the {steps} sampling steps (0 to {steps - 1}); give a step "
                          f"index below steps")
    if frames <= options.length:
        return [list(range(frames))]
    windows = _uniform_windows(frames, options, step) if options.schedule == "uniform" else \
        _static_windows(frames, options)
    unique: list[list[int]] = []
    for window in windows:
        if window not in unique:
            unique.append(window)
    return unique


def fuse_weights(length: int, method: str, overlap: int = 0) -> torch.Tensor:
    """The weight of each position of a window of `length` frames, float32 `(length,)`: "flat" all 1, "pyramid"
    `min(k + 1, length - k)` (1, 2, ..., middle, ..., 2, 1), "overlap-linear" 1 but for a linear ramp over the
    `overlap` frames at each end, `(k + 1) / (overlap + 1)` rising at the start and its mirror at the end (a rising
    and a falling ramp over the same frames sum to 1; no weight is 0)."""
    if method not in FUSE_METHODS:
        raise KinemaError(f"unknown context fuse method {method!r}; known methods: {', '.join(FUSE_METHODS)}")
    if length < 1 or not 0 <= overlap < length:
        raise KinemaError(f"fuse weights need a window of at least 1 frame and an overlap below it; got length "
                          f"{length}, overlap {overlap}")
    position = torch.arange(length, dtype=torch.float32)
    if method == "flat":
        return torch.ones(length)
    if method == "pyramid":
        return torch.minimum(position + 1, length - position)
    ramp = torch.minimum(position + 1, length - position) / (overlap + 1)
    return ramp.clamp(max=1.0)


def window_weights(window: Sequence[int], frames: int, options: ContextOptions) -> torch.Tensor:
    """`fuse_weights` for one window of `context_windows(frames, options, ...)`, float32 `(len(window),)`. With
    "overlap-linear" a ramp is dropped at an end of the window that is an end of a video that does not loop, as no
    other window overlaps it there."""
    weights = fuse_weights(len(window), options.fuse, min(options.overlap, len(window) - 1))
    if options.fuse == "overlap-linear" and not options.closed_loop:
        ramp = min(options.overlap, len(window))
        if window[0] == 0:
            weights[:ramp] = 1.0
        if window[-1] == frames - 1:
            weights[len(window) - ramp:] = 1.0
    return weights


def fusion_weights(windows: Sequence[Sequence[int]], frames: int, options: ContextOptions) -> torch.Tensor:
    """The share of each window in each frame's fused prediction, float32 `(len(windows), frames)`: window w's
    `window_weights` divided, frame by frame, by the sum over the windows holding that frame (0 where w does not hold
    the frame). Each column sums to 1 for a frame some window holds."""
    shares = torch.zeros(len(windows), frames)
    for row, window in enumerate(windows):
        shares[row].index_add_(0, torch.tensor(list(window)), window_weights(window, frames, options))
    total = shares.sum(0)
    return shares / torch.where(total > 0, total, torch.ones_like(total))


class ContextDenoiser(Denoiser):
    """A denoiser that runs another one window by window (`context_windows`) and fuses the windows' epsilon with
    `fusion_weights`; use it in place of that denoiser in `sample` and `guided_prediction`.

    Per-frame conditioning is sliced along with the latents: `frame_axes` maps a conditioning key to its frame axis,
    e.g. `{"encoder_hidden_states": 1}` for per-frame text states `(B, F, L, D)`. `inpaint_latents` `(B, C', F, H, W)`
    and `control_frames` / `control_mask` `(B, C, F, H, W)` are per frame (axis 2), `ip_image_frame_embeds`
    `(B, F, ...)` (axis 1), unless `frame_axes` says otherwise;
    every other key goes to each window whole.

    The uniform schedule moves the windows with the step. A sampler calls the denoiser once or more per step with the
    step's timestep; the step index is the number of distinct timesteps seen before a timestep first came, modulo
    `steps`, so a second run over the same timesteps gets the same windows.
    """

    def __init__(self, denoiser: Denoiser, options: ContextOptions, frames: int, steps: int,
                 frame_axes: Mapping[str, int] | None = None):
        max_frames = getattr(denoiser.model, "max_frames", None)
        options.check(frames, int(max_frames) if max_frames is not None else None)
        if steps < 1:
            raise KinemaError(f"context windows need the number of sampling steps (at least 1), got {steps}")
        super().__init__(denoiser.model)
        self.denoiser = denoiser
        self.options = options
        self.frames = frames
        self.steps = steps
        self.frame_axes: dict[str, int] = {"inpaint_latents": 2, "control_frames": 2, "control_mask": 2,
                                           "ip_image_frame_embeds": 1, **(frame_axes or {})}
        self.condition_names = denoiser.condition_names
        self.required = denoiser.required
        self._step_of_timestep: dict[tuple[float, ...], int] = {}

    def check(self, cond: Conditioning) -> None:
        """The wrapped denoiser's check, and one KinemaError line for a per-frame tensor that is not `frames` long
        along its frame axis."""
        self.denoiser.check(cond)
        for key, axis in self.frame_axes.items():
            value = cond.get(key)
            if value is None:
                continue
            if not -value.ndim <= axis < value.ndim or value.shape[axis] != self.frames:
                raise KinemaError(f"conditioning {key} {tuple(value.shape)} should hold {self.frames} frames along "
                                  f"axis {axis} (its frame axis in frame_axes); give it per frame, or leave it out "
                                  f"of frame_axes if all frames share it")

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def step_index(self, timestep: Timestep) -> int:
        """The sampling step `timestep` belongs to, counting distinct timesteps in the order they came."""
        key = tuple(float(t) for t in torch.as_tensor(timestep).flatten().tolist())
        if key not in self._step_of_timestep:
            self._step_of_timestep[key] = len(self._step_of_timestep)
        return self._step_of_timestep[key] % self.steps

    def predict(self, latents: torch.Tensor, timestep: Timestep, cond: Conditioning) -> torch.Tensor:
        """Epsilon `(B, C, F, H, W)` for noisy `latents` `(B, C, F, H, W)` with F = `frames`, fused from one call of
        the wrapped denoiser per window (`Denoiser.__call__` checks `cond` first and runs this)."""
        if latents.ndim != 5 or latents.shape[2] != self.frames:
            raise KinemaError(f"the context denoiser was set up for latents (B, C, F={self.frames}, H, W); got "
                              f"{tuple(latents.shape)}")
        windows = context_windows(self.frames, self.options, self.step_index(timestep), self.steps)
        if len(windows) == 1 and windows[0] == list(range(self.frames)):
            return self.denoiser(latents, timestep, cond)
        shares = fusion_weights(windows, self.frames, self.options).to(latents.device)
        fused: torch.Tensor | None = None
        for row, window in enumerate(windows):
            index = torch.tensor(window, device=latents.device)
            window_cond = {key: value.index_select(self.frame_axes[key], index.to(value.device))
                           if value is not None and key in self.frame_axes else value
                           for key, value in cond.items()}
            eps = self.denoiser(latents.index_select(2, index), timestep, window_cond)
            # Summed in float32 at least, so a half-precision run does not lose the small shares.
            eps = eps.to(torch.promote_types(eps.dtype, torch.float32))
            if fused is None:
                fused = eps.new_zeros((*eps.shape[:2], self.frames, *eps.shape[3:]))
            fused.index_add_(2, index, eps * shares[row, index].to(eps.dtype).view(1, 1, -1, 1, 1))
        assert fused is not None
        return fused
