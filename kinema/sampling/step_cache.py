"""Step caching: reuse a video model's deep features between denoising steps, so most steps run only its shallow
part.

Deep features change slowly from one step to the next (DeepCache, arXiv 2312.00858; Delta-DiT, TeaCache and
FasterCache for transformers), so a full forward every `interval` steps and shallow forwards in between cost little
quality. What each model keeps:
- `VideoUNet` (DeepCache): the output of the up block that feeds the outermost `depth` up blocks. A reuse step runs
  the input conv, the first `depth` down blocks (for their skips) and the last `depth` up blocks only.
- `VideoDiT`: the residual its middle blocks add (output of the span minus its input). The span is the widest run
  of blocks, `depth` blocks in from each end, that no U-ViT long skip crosses (`cached_block_span`): a skip with
  one end inside would need a feature the reuse step never computes. A reuse step runs the blocks outside the span
  and adds the kept residual in its place.

The sampling loop (kinema.sampling.loop.sample, `cache_interval`) makes one `StepCache` per run and enters
`StepCache.step` around each step's model calls; the models find it with `active_step_cache` (a context variable,
like `VideoUNet`'s frame count: no state on the model, so threads and copies stay independent). Entries are kept per
model call within a step (a slot): with context windows each window is its own call, so each window reuses its own
features, which is right only when the windows are the same every step (`caching_disabled_reason`). An entry is
reused only for inputs of the shape it was made from; when guidance stops (batch 2B -> B) the loop keeps the
conditional half (`keep_conditional_half`); a change in the conditioning's keys or shapes (image tokens switched on
part-way) forces a full step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from kinema.errors import KinemaError

_ACTIVE: ContextVar[StepCache | None] = ContextVar("kinema_step_cache", default=None)

# (input latents shape) of a model call: an entry is reused only for the same shape
CallKey = tuple[int, ...]


# The cache's bookkeeping runs outside torch.compile's graphs: traced, its counters and dict became guards, and each
# model call recompiled until dynamo gave up and ran eagerly (78 s of recompiling on kinema-tiny, then no speedup).
@torch.compiler.disable
def active_step_cache() -> StepCache | None:
    """The step cache of the sampling step running in this thread, or None (compute everything)."""
    return _ACTIVE.get()


def check_cache_interval(interval: int | None) -> None:
    """One KinemaError line unless `interval` is None or a whole number >= 1."""
    if interval is None:
        return
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise KinemaError(f"cache_interval must be a whole number >= 1 (1: no caching), got {interval!r}")


class StepCache:
    """Deep features of the last full step of one sampling run, per model call, and which steps reuse them.

    Args:
        interval: a full forward every `interval` steps, shallow forwards reusing its features in between (1: every
            step full, i.e. off).
        depth: how much of the model a reuse step runs: the outermost `depth` block levels of a UNet (default 1),
            `depth` blocks at each end of a DiT (default `max(1, num_layers // 8)`); None: the model's default.
    """

    def __init__(self, interval: int, depth: int | None = None):
        check_cache_interval(interval)
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
            raise KinemaError(f"cache depth must be a whole number >= 1 (block levels kept), got {depth!r}")
        self.interval = interval
        self.depth = depth
        self.full_calls = 0     # model calls that ran in full (and kept their features)
        self.reused_calls = 0   # model calls that reused kept features
        self._entries: dict[int, tuple[CallKey, torch.Tensor]] = {}
        self._last_full_step: int | None = None
        self._signature: Any = None
        self._reuse = False
        self._slot = 0

    @contextmanager
    def step(self, index: int, cond: Mapping[str, torch.Tensor | None]) -> Iterator[None]:
        """Run sampling step `index` (counted from the run's first step) inside this block: its model calls find this
        cache. A full step when `interval` steps have passed since the last one, on the first step, and when the
        conditioning `cond` gives other keys or shapes than at the last full step."""
        signature = sorted((key, tuple(value.shape)) for key, value in cond.items() if value is not None)
        self._reuse = (self._last_full_step is not None and index - self._last_full_step < self.interval
                       and signature == self._signature)
        if not self._reuse:
            self._entries.clear()
            self._last_full_step = index
            self._signature = signature
        self._slot = 0
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    @torch.compiler.disable
    def lookup(self, key: CallKey) -> tuple[int, torch.Tensor | None]:
        """For the next model call of this step, with input latents of shape `key`: its slot and the features to
        reuse, or None to run in full (a full step, or nothing kept for this call and shape) and `keep` them."""
        slot = self._slot
        self._slot += 1
        entry = self._entries.get(slot) if self._reuse else None
        if entry is not None and entry[0] == tuple(key):
            self.reused_calls += 1
            return slot, entry[1]
        self.full_calls += 1
        return slot, None

    @torch.compiler.disable
    def keep(self, slot: int, key: CallKey, features: torch.Tensor) -> None:
        """Keep `features` (batch first) of the full model call in `slot` with input latents of shape `key`."""
        self._entries[slot] = (tuple(key), features)

    def keep_conditional_half(self) -> None:
        """Guidance stopped: keep the conditional half of every entry made from a guided batch (kinema's guidance
        batches the unconditional half first), so the next reuse steps, now batch B, can use them."""
        for slot, (key, features) in list(self._entries.items()):
            if key[0] % 2 == 0:
                half = key[0] // 2
                self._entries[slot] = ((half, *key[1:]), features[features.shape[0] // 2:])


def caching_disabled_reason(denoiser: Any, steps: int) -> str | None:
    """Why step caching cannot run with `denoiser`, or None when it can: context windows that move from step to step
    (the uniform schedule over more frames than one window) have no window of an earlier step to reuse."""
    from kinema.sampling.context import ContextDenoiser, context_windows

    if not isinstance(denoiser, ContextDenoiser):
        return None
    windows: Sequence[list[int]] = context_windows(denoiser.frames, denoiser.options, 0, steps)
    if denoiser.options.schedule == "uniform" and len(windows) > 1:
        return ("step caching keeps each context window's features for later steps, but the uniform context "
                "schedule moves the windows every step; use the static schedule to cache")
    return None


def cached_block_span(num_layers: int, skip_pairs: Sequence[Sequence[int]],
                      depth: int | None = None) -> tuple[int, int]:
    """The blocks `(first, last)` (inclusive) whose residual a DiT's reuse steps take from the cache: the widest run
    of blocks from `depth` blocks in at each end (default `max(1, num_layers // 8)`) that no U-ViT skip crosses
    (a skip with exactly one end inside would need, or feed, a block the reuse step does not run). Symmetric skips
    (kinema's `uvit_skip_pairs`, EasyAnimate V3 at 28 blocks) leave `(depth, num_layers - 1 - depth)` as it is."""
    depth = max(1, num_layers // 8) if depth is None else depth
    inner = range(depth, num_layers - depth)

    def crossed(first: int, last: int) -> bool:
        return any((first <= source <= last) != (first <= target <= last) for source, target in skip_pairs)

    spans = [(first, last) for first in inner for last in inner if first <= last and not crossed(first, last)]
    if not spans:
        raise KinemaError(f"a DiT of {num_layers} blocks has no run of blocks {depth} or more in from each end that "
                          f"its skips {[list(pair) for pair in skip_pairs]} leave whole, so step caching has nothing "
                          "to reuse; use a smaller cache depth, or cache_interval 1")
    return max(spans, key=lambda span: (span[1] - span[0], -span[0]))
