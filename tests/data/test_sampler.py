import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from kinema.data.sampler import BatchOrder
from kinema.errors import KinemaError

# 24 entries in three groups of 8, 6 and 10 (interleaved, as a dataset lists them), and 6 images in two groups.
VIDEO_GROUPS = [("video", 0), ("video", 1), ("video", 2)] * 6 + [("video", 0), ("video", 2)] * 2 + [("video", 2)] * 2
IMAGE_GROUPS = [("image", 0), ("image", 1)] * 3
MIXED = VIDEO_GROUPS + IMAGE_GROUPS
IMAGES = {("image", 0), ("image", 1)}


def members(groups):
    by_group = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    return by_group


def test_group_sizes():
    assert {g: len(m) for g, m in members(MIXED).items()} == {
        ("video", 0): 8, ("video", 1): 6, ("video", 2): 10, ("image", 0): 3, ("image", 1): 3}


def test_answers_are_a_pure_function_of_seed_step_and_rank():
    order = BatchOrder(MIXED, batch_size=2, seed=5, world_size=2, image_ratio=0.4, image_groups=IMAGES)
    steps = range(order.epoch_start(4))
    in_order = {(t, r): order.batch(t, r) for t in steps for r in range(2)}
    shuffled = list(in_order)
    random.Random(0).shuffle(shuffled)
    fresh = BatchOrder(MIXED, batch_size=2, seed=5, world_size=2, image_ratio=0.4, image_groups=IMAGES)
    assert {key: fresh.batch(*key) for key in shuffled} == in_order
    # A resumed run asks for a late step first, with nothing cached.
    late = BatchOrder(MIXED, batch_size=2, seed=5, world_size=2, image_ratio=0.4, image_groups=IMAGES)
    assert late.batch(steps[-1], 1) == in_order[steps[-1], 1]
    assert late.batch(1000, 0) == BatchOrder(MIXED, 2, 5, 2, 0.4, IMAGES).batch(1000, 0)


def test_ranks_split_the_global_batch_disjointly():
    # The plan depends on batch_size * world_size only, so one process with the whole global batch is the reference.
    whole = BatchOrder(VIDEO_GROUPS, batch_size=6, seed=1)
    split = BatchOrder(VIDEO_GROUPS, batch_size=2, seed=1, world_size=3)
    for step in range(3 * split.batches_per_epoch()):
        parts = [split.batch(step, rank) for rank in range(3)]
        indices, group, epoch = whole.batch(step)
        assert [i for part, _, _ in parts for i in part] == indices
        assert all(len(part) == 2 and g == group and e == epoch for part, g, e in parts)
        # Every group here has at least one global batch of entries, so no entry is read twice in a step.
        assert len(set(indices)) == 6


def test_every_entry_once_per_epoch_when_group_sizes_divide():
    groups = [("video", 0)] * 8 + [("video", 1)] * 4 + [("image", 0)] * 6
    order = BatchOrder(groups, batch_size=1, seed=3, world_size=2)
    assert order.batches_per_epoch() == 4 + 2 + 3
    for epoch in range(3):
        seen = [i for step in range(order.epoch_start(epoch), order.epoch_start(epoch + 1)) for rank in range(2)
                for i in order.batch(step, rank)[0]]
        assert sorted(seen) == list(range(len(groups)))
        assert {order.batch(step)[2] for step in range(order.epoch_start(epoch), order.epoch_start(epoch + 1))} == {
            epoch}


def test_remainders_cycle_the_shuffle():
    # Group 0: 5 entries in global batches of 2 -> 3 batches, one entry twice; group 1: 1 entry -> [i, i].
    groups = [0] * 5 + [1]
    order = BatchOrder(groups, batch_size=2, seed=0)
    assert order.batches_per_epoch() == 4
    for epoch in range(4):
        counts = Counter(i for step in range(4 * epoch, 4 * epoch + 4) for i in order.batch(step)[0])
        assert counts[5] == 2 and sorted(counts[i] for i in range(5)) == [1, 1, 1, 1, 2]


def test_batches_never_mix_groups():
    order = BatchOrder(MIXED, batch_size=3, seed=2, world_size=2, image_groups=IMAGES)
    for step in range(50):
        for rank in range(2):
            indices, group, _ = order.batch(step, rank)
            assert len(indices) == 3 and all(MIXED[i] == group for i in indices)


def test_image_ratio_none_follows_the_data():
    order = BatchOrder(MIXED, batch_size=2, seed=4, image_groups=IMAGES)
    # ceil(8/2) + ceil(6/2) + ceil(10/2) video batches, ceil(3/2) + ceil(3/2) image batches.
    assert order.batches_per_epoch() == 12 + 4
    kinds = Counter(order.batch(step)[1][0] for step in range(order.epoch_start(3)))
    assert kinds == {"video": 36, "image": 12}


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.9])
def test_image_ratio_sets_the_fraction_of_image_batches(ratio):
    order = BatchOrder(MIXED, batch_size=2, seed=4, image_ratio=ratio, image_groups=IMAGES)
    video_per_epoch = 12
    image_total = 0
    for epoch in range(12):
        steps = range(order.epoch_start(epoch), order.epoch_start(epoch + 1))
        kinds = Counter(order.batch(step)[1][0] for step in steps)
        # Every video batch once per epoch; images fill in.
        assert kinds["video"] == video_per_epoch
        image_total += kinds["image"]
        # The reference: epochs 0..e hold round((e + 1) * 12 * r / (1 - r)) image batches, halves rounded up.
        expected = math.floor((epoch + 1) * video_per_epoch * Fraction(ratio) / (1 - Fraction(ratio)) + Fraction(1, 2))
        assert image_total == expected
    fraction = image_total / (image_total + 12 * video_per_epoch)
    assert abs(fraction - ratio) < 1 / (image_total + 12 * video_per_epoch)


def test_image_stream_covers_every_image_and_reads_passes_afresh():
    # At ratio 0.5 an epoch has 12 image batches and an image pass 4 (2 groups of 3 in batches of 2): each image
    # is read in several passes per epoch, each pass a fresh shuffle with its own read epoch.
    order = BatchOrder(MIXED, batch_size=2, seed=9, image_ratio=0.5, image_groups=IMAGES)
    image_batches = [order.batch(step) for step in range(order.epoch_start(1)) if order.batch(step)[1][0] == "image"]
    assert len(image_batches) == 12
    passes = Counter(epoch for _, _, epoch in image_batches)
    assert passes == {0: 4, 1: 4, 2: 4}
    for image_pass in range(3):
        seen = {i for indices, _, e in image_batches if e == image_pass for i in indices}
        assert seen == set(range(24, 30))


def test_image_ratio_zero_and_one():
    only_video = BatchOrder(MIXED, batch_size=2, seed=0, image_ratio=0.0, image_groups=IMAGES)
    only_image = BatchOrder(MIXED, batch_size=2, seed=0, image_ratio=1.0, image_groups=IMAGES)
    assert only_video.batches_per_epoch() == 12 and only_image.batches_per_epoch() == 4
    assert {only_video.batch(t)[1][0] for t in range(40)} == {"video"}
    assert {only_image.batch(t)[1][0] for t in range(40)} == {"image"}


def test_epochs_and_seeds_differ():
    order = BatchOrder(VIDEO_GROUPS, batch_size=2, seed=0)
    per_epoch = order.batches_per_epoch()
    epoch0 = [order.batch(t) for t in range(per_epoch)]
    epoch1 = [order.batch(t) for t in range(per_epoch, 2 * per_epoch)]
    assert [b[0] for b in epoch0] != [b[0] for b in epoch1]
    assert {b[2] for b in epoch0} == {0} and {b[2] for b in epoch1} == {1}
    other = BatchOrder(VIDEO_GROUPS, batch_size=2, seed=1)
    assert [other.batch(t)[0] for t in range(per_epoch)] != [b[0] for b in epoch0]
    # Within an epoch the groups are interleaved, not read one after the other.
    group_runs = sum(1 for a, b in zip(epoch0, epoch0[1:], strict=False) if a[1] != b[1])
    assert group_runs > 2


def test_epoch_bookkeeping_agrees():
    order = BatchOrder(MIXED, batch_size=2, seed=0, image_ratio=0.3, image_groups=IMAGES)
    lengths = [order.batches_per_epoch(e) for e in range(20)]
    assert set(lengths) <= {12 + 5, 12 + 6} and sum(lengths) == order.epoch_start(20)
    for step in range(order.epoch_start(20)):
        epoch = order.epoch_of(step)
        assert order.epoch_start(epoch) <= step < order.epoch_start(epoch + 1)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(groups=[], batch_size=1, seed=0), "no entries to batch"),
    (dict(groups=[0], batch_size=0, seed=0), "batch_size and world_size must be >= 1, got batch_size=0"),
    (dict(groups=[0], batch_size=1, seed=0, world_size=0), "world_size=0"),
    (dict(groups=[0], batch_size=1, seed=-1), "seed must be >= 0"),
    (dict(groups=[0, 1], batch_size=1, seed=0, image_ratio=1.5, image_groups={1}), "must be in .0, 1., got 1.5"),
    (dict(groups=[0, 1], batch_size=1, seed=0, image_ratio=float("nan"), image_groups={1}), "got nan"),
    (dict(groups=[0, 0], batch_size=1, seed=0, image_ratio=0.2), "no entry is an image"),
    (dict(groups=[1, 1], batch_size=1, seed=0, image_ratio=0.2, image_groups={1}), "every entry is an image"),
])
def test_bad_arguments_are_one_line(kwargs, message):
    with pytest.raises(KinemaError, match=message) as caught:
        BatchOrder(**kwargs)
    assert "\n" not in str(caught.value)


def test_bad_rank_and_step():
    order = BatchOrder([0, 0, 0, 0], batch_size=1, seed=0, world_size=2)
    with pytest.raises(KinemaError, match=r"rank 2 is outside the world of 2 processes"):
        order.batch(0, 2)
    with pytest.raises(KinemaError, match="rank -1"):
        order.batch(0, -1)
    with pytest.raises(KinemaError, match="micro_step must be >= 0"):
        order.batch(-1)
