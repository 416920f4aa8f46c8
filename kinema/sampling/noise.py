"""FreeNoise noise rescheduling (Qiu et al., "FreeNoise: Tuning-Free Longer Video Diffusion via Noise Rescheduling",
arXiv 2310.15169) for context windows.

Independent noise per frame gives each window of a long video its own content, so windows drift apart. FreeNoise keeps
the first window's noise and builds the rest from it: the frames after it are filled block by block, each block of
`length - overlap` frames (a window's shift) with the frames of the block one window length earlier, in a shuffled
order. Every window then holds a permutation of the same noise frames, and the video stays one scene.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kinema.errors import KinemaError
from kinema.sampling.loop import generators as seeded_generators


def _check_window(length: int, overlap: int) -> None:
    if length < 1 or not 0 <= overlap < length:
        raise KinemaError(f"FreeNoise needs a context length of at least 1 and an overlap from 0 to length - 1; got "
                          f"length {length}, overlap {overlap}")


def freenoise_noise(noise: torch.Tensor, length: int, overlap: int,
                    generators: Sequence[torch.Generator]) -> torch.Tensor:
    """`noise` `(B, C, F, H, W)` rescheduled by FreeNoise, a new tensor: frames `[0, length)` as they are; then for
    each block start `s = length, length + shift, ...` (shift = `length - overlap`), frames `[s, s + shift)` are
    frames `[s - length, s - length + shift)` of the result so far in the order of a random permutation (cut to the
    frames left for the last block). Video b draws its permutations from `generators[b]` (CPU generators), one
    `randperm(shift)` per block; a video of at most `length` frames is unchanged."""
    if noise.ndim != 5:
        raise KinemaError(f"FreeNoise takes noise (B, C, F, H, W); got shape {tuple(noise.shape)}")
    _check_window(length, overlap)
    if len(generators) != noise.shape[0]:
        raise KinemaError(f"{len(generators)} generator(s) for a batch of {noise.shape[0]} video(s); give one per "
                          f"video")
    frames, shift = noise.shape[2], length - overlap
    rescheduled = noise.clone()
    for video, generator in enumerate(generators):
        for start in range(length, frames, shift):
            order = torch.randperm(shift, generator=generator)[:frames - start] + (start - length)
            # The source block lies wholly before `start` (shift <= length), so it is final when it is read.
            rescheduled[video, :, start:start + len(order)] = rescheduled[video, :, order.to(noise.device)]
    return rescheduled


def freenoise_initial_noise(shape: Sequence[int], seeds: Sequence[int], length: int, overlap: int,
                            dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """FreeNoise initial noise `(B, C, F, H, W)`: for video b, a generator seeded `seeds[b]` draws its unit Gaussian
    noise as `kinema.sampling.initial_noise` does (float32, on the CPU), then the permutations of `freenoise_noise`;
    the same seed gives the same video whatever the batch or device. For one video this is diffusers'
    AnimateDiff FreeNoise "shuffle_context" noise with `context_length=length`, `context_stride=length - overlap`
    and a CPU generator seeded the same."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 5:
        raise KinemaError(f"FreeNoise initial noise takes a latent shape (B, C, F, H, W); got {shape}")
    if len(seeds) != shape[0]:
        raise KinemaError(f"{len(seeds)} seed(s) for a batch of {shape[0]} video(s); give one seed per video")
    _check_window(length, overlap)
    videos = []
    for generator in seeded_generators(seeds):
        noise = torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
        videos.append(freenoise_noise(noise, length, overlap, [generator]))
    return torch.cat(videos).to(device=device, dtype=dtype)
