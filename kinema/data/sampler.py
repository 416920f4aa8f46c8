"""The order of training batches, as a pure function of (seed, micro-step, rank).

A run killed at any step and resumed must continue with the very batches it would have seen, and N data-parallel
processes must split each global batch without talking to each other. So `BatchOrder` keeps no state but a cache:
`batch(micro_step, rank)` answers the same in any process, in any call order, for any fresh object built with the
same arguments.

Groups: every dataset entry belongs to one group (its type and bucket, e.g. `("video", 2)`), and a batch never mixes
groups, as EasyAnimate's sampler makes each batch all-image or all-video and of one aspect/frames bucket, so its
items stack into one tensor.

Epoch `e`: a generator seeded `(seed, e)` shuffles each group's entries (groups in order of first appearance) and
the group is cut into global batches of `batch_size * world_size`. A group of `n` entries gives `ceil(n / G)`
global batches of `G` entries, filled by cycling its shuffled list: the remainder is completed with the first
entries of the same shuffle (seen twice that epoch, which ones changes every epoch), and a group smaller than one
global batch repeats its shuffled list. So every entry is seen at least once per epoch and exactly once when each
group's size divides by `G`. The same generator then draws the order of the epoch's batches. Rank `r` takes
entries `[r * batch_size, (r + 1) * batch_size)` of each global batch.

`image_ratio` (None: batches as the data has them): the fraction of batches drawn from the groups in
`image_groups`. With `0 < image_ratio < 1` an epoch is one pass over the other (video) groups' `V` batches, and
image batches are added to the epoch's order so that epochs `0 .. e-1` hold `round(e * V * image_ratio /
(1 - image_ratio))` image batches in all: exactly the ratio in the long run, within one batch in every epoch. The
image batches come from a separate image stream: image pass `j` shuffles the image groups with a generator seeded
`(seed, j, 1)`, cuts them as above and orders them; the stream runs through passes `0, 1, ...` at its own pace, so
images are repeated (ratio above their share) or spread over several epochs (below it). `image_ratio = 1` trains
on image batches only (an epoch is one image pass), `0` on video batches only.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Sequence
from fractions import Fraction

import numpy as np

from kinema.errors import KinemaError

# Plans kept per BatchOrder: the epoch being read and the one before it (ranks and DataLoader workers run close
# together, and a resumed run starts on a boundary), plus the image passes those epochs draw from.
_CACHED_PLANS = 2
_IMAGE_STREAM = 1
# A planned global batch: (its entries, its group, the pass its entries are read in).
_Planned = tuple[list[int], Hashable, int]


class BatchOrder:
    """Which dataset entries form micro-batch `micro_step` on process `rank`, from `(seed, micro_step, rank)` alone.

    `groups[i]` is the group of dataset entry `i` (e.g. `VideoTextDataset.groups()`); `batch_size` is the per-process
    micro-batch; `world_size` the number of data-parallel processes; `image_ratio` and `image_groups` mix image and
    video batches as the module docstring describes.
    """

    def __init__(self, groups: Sequence[Hashable], batch_size: int, seed: int, world_size: int = 1,
                 image_ratio: float | None = None, image_groups: Collection[Hashable] = ()):
        if not len(groups):
            raise KinemaError("no entries to batch: the dataset is empty; check its metadata and the files it lists")
        if batch_size < 1 or world_size < 1:
            raise KinemaError(f"batch_size and world_size must be >= 1, got batch_size={batch_size}, "
                              f"world_size={world_size}")
        if seed < 0:
            raise KinemaError(f"the batch order's seed must be >= 0, got {seed}; use a non-negative seed")
        image_set = set(image_groups)
        members: dict[Hashable, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        image_keys = [g for g in members if g in image_set]
        video_keys = [g for g in members if g not in image_set]
        if image_ratio is not None:
            if not 0.0 <= image_ratio <= 1.0:  # also refuses NaN
                raise KinemaError(f"image_ratio is a fraction of batches and must be in [0, 1], got {image_ratio}")
            if image_ratio > 0 and not image_keys:
                raise KinemaError(f"image_ratio={image_ratio} asks for image batches but no entry is an image; add "
                                  f"images to the data or leave image_ratio unset")
            if image_ratio < 1 and not video_keys:
                raise KinemaError(f"image_ratio={image_ratio} asks for video batches but every entry is an image; "
                                  f"use image_ratio=1 or leave it unset")
        self.groups = list(groups)
        self.batch_size, self.world_size, self.seed, self.image_ratio = batch_size, world_size, seed, image_ratio
        self.global_size = batch_size * world_size
        self._members = members
        # The anchor groups are read once per epoch; the image stream (only with 0 < image_ratio < 1) fills in.
        self._anchor: list[Hashable]
        self._stream: list[Hashable]
        if image_ratio is None:
            self._anchor, self._stream = list(members), []
        elif image_ratio == 1:
            self._anchor, self._stream = image_keys, []
        elif image_ratio == 0:
            self._anchor, self._stream = video_keys, []
        else:
            self._anchor, self._stream = video_keys, image_keys
        self._anchor_batches = sum(self._batches_of(g) for g in self._anchor)
        self._stream_batches = sum(self._batches_of(g) for g in self._stream)
        ratio = Fraction(image_ratio) if self._stream and image_ratio is not None else Fraction(0)
        # Image batches per epoch, as an exact fraction: the rounding in `_streamed_before` makes the long-run
        # ratio exact however few video batches an epoch has.
        self._stream_per_epoch = self._anchor_batches * ratio / (1 - ratio) if self._stream else Fraction(0)
        self._plans: dict[int, list[_Planned]] = {}
        self._stream_passes: dict[int, list[tuple[list[int], Hashable]]] = {}

    @property
    def drawn_groups(self) -> list[Hashable]:
        """The groups batches are drawn from (image_ratio 1: images only, 0: videos only), in order."""
        return [*self._anchor, *self._stream]

    def batch(self, micro_step: int, rank: int = 0) -> tuple[list[int], Hashable, int]:
        """`(indices, group, epoch)` of global micro-batch `micro_step` on process `rank`.

        `indices` are the `batch_size` dataset entries this rank reads, `group` their group, and `epoch` the pass to
        read them in (VideoTextDataset.load_item's epoch, which seeds the clip start, crop, flip and dropout): the
        micro-step's epoch, except for image batches under `0 < image_ratio < 1`, which carry their image pass so
        that an image repeated within an epoch is augmented afresh each time. Pure: the answer depends only on the
        constructor's arguments, `micro_step` and `rank`; amortised O(1) when steps are read in order.
        """
        if not 0 <= rank < self.world_size:
            raise KinemaError(f"rank {rank} is outside the world of {self.world_size} processes (0 .. "
                              f"{self.world_size - 1}); pass the process index the launcher gives")
        if micro_step < 0:
            raise KinemaError(f"micro_step must be >= 0, got {micro_step}")
        epoch = self.epoch_of(micro_step)
        indices, group, read_epoch = self._plan(epoch)[micro_step - self.epoch_start(epoch)]
        return indices[rank * self.batch_size:(rank + 1) * self.batch_size], group, read_epoch

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Global micro-batches in `epoch`: the same for every epoch unless `0 < image_ratio < 1`, where the image
        batches' rounding makes epochs differ by at most one."""
        return self.epoch_start(epoch + 1) - self.epoch_start(epoch)

    def epoch_start(self, epoch: int) -> int:
        """The first micro-step of `epoch` (so `epoch_start(E)` micro-steps make `E` whole epochs)."""
        if epoch < 0:
            raise KinemaError(f"epoch must be >= 0, got {epoch}")
        return epoch * self._anchor_batches + self._streamed_before(epoch)

    def epoch_of(self, micro_step: int) -> int:
        """The epoch that micro-step `micro_step` belongs to."""
        per_epoch = self._anchor_batches + self._stream_per_epoch
        epoch = math.floor(Fraction(micro_step) / per_epoch)
        # The rounding of image batches can shift a boundary by one step either way.
        while epoch > 0 and self.epoch_start(epoch) > micro_step:
            epoch -= 1
        while self.epoch_start(epoch + 1) <= micro_step:
            epoch += 1
        return epoch

    def _batches_of(self, group: Hashable) -> int:
        return -(-len(self._members[group]) // self.global_size)

    def _streamed_before(self, epoch: int) -> int:
        """Image-stream batches in epochs `0 .. epoch - 1`: round(epoch * per-epoch share), halves rounded up."""
        return math.floor(epoch * self._stream_per_epoch + Fraction(1, 2))

    def _cut(self, keys: list[Hashable], rng: np.random.Generator) -> list[tuple[list[int], Hashable]]:
        """Each group in `keys` shuffled and cut into global batches, a short last batch completed by cycling."""
        batches = []
        for group in keys:
            shuffled = rng.permutation(np.asarray(self._members[group], dtype=np.int64)).tolist()
            count = self._batches_of(group)
            cycled = [shuffled[k % len(shuffled)] for k in range(count * self.global_size)]
            batches += [(cycled[b * self.global_size:(b + 1) * self.global_size], group) for b in range(count)]
        return batches

    def _stream_pass(self, image_pass: int) -> list[tuple[list[int], Hashable]]:
        if image_pass not in self._stream_passes:
            rng = np.random.default_rng((self.seed, image_pass, _IMAGE_STREAM))
            batches = self._cut(self._stream, rng)
            _remember(self._stream_passes, image_pass, [batches[k] for k in rng.permutation(len(batches))],
                      _CACHED_PLANS + 1)
        return self._stream_passes[image_pass]

    def _plan(self, epoch: int) -> list[_Planned]:
        if epoch not in self._plans:
            rng = np.random.default_rng((self.seed, epoch))
            planned: list[_Planned] = [(indices, group, epoch) for indices, group in self._cut(self._anchor, rng)]
            for position in range(self._streamed_before(epoch), self._streamed_before(epoch + 1)):
                image_pass, offset = divmod(position, self._stream_batches)
                indices, group = self._stream_pass(image_pass)[offset]
                planned.append((indices, group, image_pass))
            _remember(self._plans, epoch, [planned[k] for k in rng.permutation(len(planned))], _CACHED_PLANS)
        return self._plans[epoch]


def _remember(cache: dict, key: int, value: list, size: int) -> None:
    cache[key] = value
    while len(cache) > size:
        del cache[next(iter(cache))]
