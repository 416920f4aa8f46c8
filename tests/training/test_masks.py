"""Inpaint training masks (kinema/training/masks.py): V3's mask kinds, k ranges and frequencies, images with every
frame generated, reproducible draws from the generator alone, the CLIP switch and frame, and batched conditioning
equal to the inference family's `inpaint_conditioning` sample by sample.

References are written here from V3's training (EasyAnimate @616a354, get_random_mask and scripts/train.py): a video
draws "all generated", "first k kept" or "first and last k kept" with equal chance and k uniform in 1..4; the CLIP
frame is uniform over the clip; the CLIP tokens are on half the time.
"""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from tiny_easyanimate import source_model, write_full_folder

from kinema.errors import KinemaError
from kinema.loaders.easyanimate import load_easyanimate
from kinema.pipelines.easyanimate import EasyAnimateFamily
from kinema.training.masks import MASK_KINDS, sample_clip, sample_keep, training_inpaint_conditioning

# The same maths on a batch and on one sample: float32 rounding apart. The family runs its Slice VAE channels-last,
# where oneDNN picks convolution kernels by batch size: up to about 2e-5 apart on these unit-scale latents.
ULPS = dict(rtol=1e-4, atol=1e-4)


def expected_row(kind: str, kept: int, frames: int) -> torch.Tensor:
    """V3's keep row (True = given to the model) for a kind and k, written from its mask code."""
    row = torch.zeros(frames, dtype=torch.bool)
    if kind == "first_frames":
        row[:kept] = True  # V3: mask[k:] = 1
    elif kind == "first_and_last":
        row[:kept] = True  # V3: mask[k:-k] = 1
        row[frames - kept:] = True
    return row


def kept_at_start(row: torch.Tensor) -> int:
    return int(row.int().cumprod(0).sum())


# ------------------------------------------------------------------ sample_keep


def test_kinds_rows_and_k_follow_v3_with_equal_thirds_and_uniform_k():
    samples, frames = 3000, 16
    keep, kinds = sample_keep(["video"] * samples, frames, torch.Generator().manual_seed(0))
    assert keep.shape == (samples, frames) and keep.dtype == torch.bool and len(kinds) == samples
    counts = {kind: Counter() for kind in MASK_KINDS}
    for row, kind in zip(keep, kinds, strict=True):
        kept = kept_at_start(row)
        assert torch.equal(row, expected_row(kind, kept, frames)), (kind, row)
        counts[kind][kept] += 1
    assert set(counts["text_to_video"]) == {0}
    assert set(counts["first_frames"]) == set(counts["first_and_last"]) == {1, 2, 3, 4}
    # Binomial spreads at n = 3000: 1/3 +- 0.009, so +- 0.04 is over 4 standard deviations.
    for kind in MASK_KINDS:
        assert abs(sum(counts[kind].values()) / samples - 1 / 3) < 0.04, kind
    for kind in ("first_frames", "first_and_last"):
        total = sum(counts[kind].values())
        for kept in range(1, 5):
            assert abs(counts[kind][kept] / total - 1 / 4) < 0.06, (kind, kept)


def test_weights_set_the_frequencies_and_images_keep_nothing():
    samples = 2000
    types = ["video", "image"] * (samples // 2)
    keep, kinds = sample_keep(types, 8, torch.Generator().manual_seed(1),
                              weights={"first_frames": 3, "text_to_video": 1})
    video_kinds = Counter(kinds[0::2])
    assert set(video_kinds) == {"first_frames", "text_to_video"}
    assert abs(video_kinds["first_frames"] / (samples // 2) - 0.75) < 0.06
    assert set(kinds[1::2]) == {"text_to_video"} and not keep[1::2].any()
    # At 8 frames first_and_last keeps at most 3 at each end (V3 would keep 4 + 4: every frame).
    keep, kinds = sample_keep(["video"] * 400, 8, torch.Generator().manual_seed(2), weights={"first_and_last": 1})
    assert set(kinds) == {"first_and_last"}
    assert {kept_at_start(row) for row in keep} == {1, 2, 3} and not keep.all(dim=1).any()


def test_kinds_that_cannot_leave_a_frame_to_generate_fall_back_to_text_to_video():
    generator = torch.Generator().manual_seed(3)
    keep, kinds = sample_keep(["video"] * 50, 1, generator)  # a one-frame clip is an image for V3
    assert set(kinds) == {"text_to_video"} and not keep.any()
    keep, kinds = sample_keep(["video"] * 50, 2, generator, weights={"first_and_last": 1})
    assert set(kinds) == {"text_to_video"} and not keep.any()
    keep, kinds = sample_keep(["video"] * 50, 2, generator, weights={"first_frames": 1})
    assert set(kinds) == {"first_frames"} and keep.tolist() == [[True, False]] * 50


def test_draws_come_from_the_generator_alone_and_do_not_depend_on_types():
    types = ["video", "image", "video", "video"]
    first = sample_keep(types, 16, torch.Generator().manual_seed(7))
    again = sample_keep(types, 16, torch.Generator().manual_seed(7))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert not torch.equal(first[0], sample_keep(types * 8, 16, torch.Generator().manual_seed(8))[0][:4])
    # Two uniform draws per sample whatever the types: the generator ends in the same state.
    after = []
    for sample_types in (types, ["image"] * 4):
        generator = torch.Generator().manual_seed(7)
        sample_keep(sample_types, 16, generator)
        after.append(generator.get_state())
    reference = torch.Generator().manual_seed(7)
    torch.rand(4, 2, generator=reference, dtype=torch.float64)
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], reference.get_state())


def test_bad_arguments_are_refused_in_one_line():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(KinemaError, match="unknown sample type 'clip'; use video or image"):
        sample_keep(["video", "clip"], 8, generator)
    with pytest.raises(KinemaError, match="unknown mask kind 'middle'"):
        sample_keep(["video"], 8, generator, weights={"middle": 1})
    with pytest.raises(KinemaError, match="not all 0"):
        sample_keep(["video"], 8, generator, weights={"first_frames": 0})
    with pytest.raises(KinemaError, match="at least 0"):
        sample_keep(["video"], 8, generator, weights={"first_frames": -1, "text_to_video": 2})
    with pytest.raises(KinemaError, match="frames must be a whole number of at least 1, got 0"):
        sample_keep(["video"], 0, generator)
    with pytest.raises(KinemaError, match="torch.Generator"):
        sample_keep(["video"], 8, 0)
    with pytest.raises(KinemaError, match="one per sample"):
        sample_keep("video", 8, generator)
    with pytest.raises(KinemaError, match="from 0 to 1, got 1.5"):
        sample_clip(torch.zeros(2, 8, dtype=torch.bool), generator, 1.5)


# ------------------------------------------------------------------ sample_clip


def test_clip_is_on_at_the_probability_from_a_uniform_frame():
    samples, frames = 4000, 8
    keep = torch.zeros(samples, frames, dtype=torch.bool)
    use_clip, clip_frame = sample_clip(keep, torch.Generator().manual_seed(0))
    assert use_clip.dtype == torch.bool and clip_frame.dtype == torch.long and clip_frame.shape == (samples,)
    assert abs(use_clip.float().mean().item() - 0.5) < 0.035
    share = torch.bincount(clip_frame, minlength=frames).float() / samples
    assert share.shape == (frames,) and (share - 1 / frames).abs().max() < 0.03
    use_clip, _ = sample_clip(keep, torch.Generator().manual_seed(0), probability=0.2)
    assert abs(use_clip.float().mean().item() - 0.2) < 0.03
    assert not sample_clip(keep, torch.Generator(), 0.0)[0].any() and sample_clip(keep, torch.Generator(), 1.0)[0].all()
    first = sample_clip(keep[:5], torch.Generator().manual_seed(4))
    again = sample_clip(keep[:5], torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# ------------------------------------------------------------------ batched conditioning


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> EasyAnimateFamily:
    root = tmp_path_factory.mktemp("easyanimate_v3")
    write_full_folder(root, source_model())
    return EasyAnimateFamily.from_model(load_easyanimate(root))


def per_sample_reference(family, video, keep, use_clip, clip_frame) -> list[dict]:
    """`family.inpaint_conditioning` on each sample alone, with its CLIP frame or no image."""
    out = []
    for b in range(video.shape[0]):
        clip = video[b:b + 1, int(clip_frame[b])] if use_clip[b] else None
        out.append(family.inpaint_conditioning(video[b:b + 1], keep[b], clip)[0])
    return out


def test_batched_conditioning_equals_the_family_sample_by_sample(family):
    generator = torch.Generator().manual_seed(5)
    video = torch.randint(0, 256, (5, 16, 3, 64, 48), generator=generator).float() / 255
    rows = [("first_frames", 1), ("first_and_last", 2), ("text_to_video", 0), ("first_frames", 1),
            ("first_frames", 4)]
    keep = torch.stack([expected_row(kind, kept, 16) for kind, kept in rows])  # rows 0 and 3 share a mask
    use_clip = torch.tensor([True, False, True, True, False])
    clip_frame = torch.tensor([0, 3, 9, 15, 2])
    cond = training_inpaint_conditioning(family, video, keep, use_clip, clip_frame)
    assert set(cond) == {"inpaint_latents", "clip_image_embeds", "clip_attention_mask"}
    assert cond["inpaint_latents"].shape == (5, 8, 4, 8, 6) and cond["inpaint_latents"].dtype == torch.float32
    assert cond["clip_image_embeds"].shape == (5, 768) and cond["clip_attention_mask"].shape == (5, 8)
    for b, reference in enumerate(per_sample_reference(family, video, keep, use_clip, clip_frame)):
        torch.testing.assert_close(cond["inpaint_latents"][b:b + 1], reference["inpaint_latents"], **ULPS)
        if use_clip[b]:
            torch.testing.assert_close(cond["clip_image_embeds"][b:b + 1], reference["clip_image_embeds"], **ULPS)
            assert torch.equal(cond["clip_attention_mask"][b:b + 1], reference["clip_attention_mask"])
        else:
            assert "clip_image_embeds" not in reference
            assert not cond["clip_image_embeds"][b].any() and not cond["clip_attention_mask"][b].any()


def test_images_and_drawn_masks_match_the_family_and_no_image_encoder_omits_clip(family):
    generator = torch.Generator().manual_seed(6)
    images = torch.rand(3, 1, 3, 32, 32, generator=generator)
    keep, _ = sample_keep(["image"] * 3, 1, generator)
    use_clip, clip_frame = sample_clip(keep, generator, probability=0.5)
    cond = training_inpaint_conditioning(family, images, keep, use_clip, clip_frame)
    for b, reference in enumerate(per_sample_reference(family, images, keep, use_clip, clip_frame)):
        torch.testing.assert_close(cond["inpaint_latents"][b:b + 1], reference["inpaint_latents"], **ULPS)

    no_clip = EasyAnimateFamily(family.model, family.vae, family.text_encoder, family.tokenizer)
    video = torch.rand(2, 8, 3, 32, 32, generator=generator)
    keep, _ = sample_keep(["video"] * 2, 8, generator)
    cond = training_inpaint_conditioning(no_clip, video, keep, torch.tensor([True, True]), torch.tensor([0, 1]))
    assert set(cond) == {"inpaint_latents"}
    for b in range(2):
        reference = family.inpaint_conditioning(video[b:b + 1], keep[b], None)[0]["inpaint_latents"]
        torch.testing.assert_close(cond["inpaint_latents"][b:b + 1], reference, **ULPS)


def test_bad_conditioning_inputs_are_refused_in_one_line(family):
    video = torch.rand(2, 8, 3, 32, 32)
    keep = torch.zeros(2, 8, dtype=torch.bool)
    use_clip, clip_frame = torch.tensor([True, False]), torch.tensor([0, 1])
    with pytest.raises(KinemaError, match="does not take inpaint latents"):
        training_inpaint_conditioning(SimpleNamespace(inpaints=False), video, keep, use_clip, clip_frame)
    with pytest.raises(KinemaError, match=r"keep must be a bool tensor \(B, F\) = \(2, 8\)"):
        training_inpaint_conditioning(family, video, keep[:, :4], use_clip, clip_frame)
    with pytest.raises(KinemaError, match="use_clip must be a bool tensor"):
        training_inpaint_conditioning(family, video, keep, use_clip.float(), clip_frame)
    with pytest.raises(KinemaError, match="outside 0..7"):
        training_inpaint_conditioning(family, video, keep, use_clip, torch.tensor([0, 8]))
    with pytest.raises(KinemaError, match="12 is not: use 8 or 16"):
        training_inpaint_conditioning(family, torch.rand(2, 12, 3, 32, 32), torch.zeros(2, 12, dtype=torch.bool),
                                      use_clip, clip_frame)
