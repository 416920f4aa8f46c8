"""kinema's text to video (AnimateDiff family): decoded frames equal diffusers' AnimateDiffPipeline on identical
tiny weights, seeds are per video, and bad inputs are refused in one line before the UNet runs."""

import pytest
import torch
from sampling.test_parity import pair  # noqa: F401  (the fixture: diffusers' pipeline and kinema's VideoUNet)

from kinema.errors import KinemaError
from kinema.pipelines.decode import decode_latents
from kinema.pipelines.from_parts import text_to_video
from kinema.pipelines.text_encoding import encode_prompts

FRAMES, STEPS, GUIDANCE, SIZE = 4, 3, 7.5, 32
PROMPT, NEGATIVE = "a red fox runs", "blurry"


@pytest.fixture(scope="module")
def parts(pair):  # noqa: F811
    """The pipeline's tokenizer at SD's 77 tokens (the tiny one reads no config) and the parts kinema takes."""
    pipe, _ = pair
    pipe.tokenizer.model_max_length = 77
    return {"vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}


def ours(video, parts, prompt=PROMPT, **kwargs):
    options = dict(frames=FRAMES, height=SIZE, width=SIZE, steps=STEPS, guidance=GUIDANCE, progress=False)
    return text_to_video(video, parts, prompt, **{**options, **kwargs})


@pytest.mark.parametrize("scheduler_name", ["ddim", "euler"])
def test_frames_equal_diffusers_animatediff_pipeline(pair, parts, scheduler_name):  # noqa: F811
    from kinema.sampling.schedulers import make_scheduler

    pipe, video = pair
    pipe.scheduler = make_scheduler(scheduler_name)
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=FRAMES, height=SIZE, width=SIZE,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt",
                        generator=torch.Generator().manual_seed(5)).frames
    frames = ours(video, parts, negative_prompt=NEGATIVE, seeds=[5], scheduler=scheduler_name)
    assert frames.shape == expected.shape == (1, FRAMES, 3, SIZE, SIZE)
    difference = (frames - expected).abs().max().item()
    print(f"{scheduler_name}: decoded frames' max abs difference {difference:.3g}, frames' std {expected.std():.3g}")
    assert difference <= 1e-3
    # The comparison has teeth: another prompt gives other frames.
    other = ours(video, parts, prompt="x", negative_prompt=NEGATIVE, seeds=[5], scheduler=scheduler_name)
    assert (other - expected).abs().max().item() > 1e-2


def test_decode_divides_by_the_scaling_factor(parts):
    vae = parts["vae"]
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = vae.decode(latents[:, :, 1] / vae.config.scaling_factor).sample
    frames = decode_latents(vae, latents, decode_chunk=1)
    assert frames.shape == (1, 2, 3, 16, 16)
    assert torch.allclose(frames[0, 1], (direct[0] / 2 + 0.5).clamp(0, 1), atol=1e-6)
    assert torch.allclose(frames, decode_latents(vae, latents, decode_chunk=16), atol=1e-5)


def test_a_float16_vae_that_overflows_runs_again_in_float32(caplog):
    import copy
    import logging

    from tiny_sd import tiny_sd_parts

    from kinema.pipelines.decode import overflow_safe

    reference = tiny_sd_parts()["vae"]
    with torch.no_grad():  # activations past float16's 65504, as an SD VAE's outgrow it at large sizes
        reference.decoder.conv_in.weight.mul_(1e5)
    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = decode_latents(reference, latents)
    half = copy.deepcopy(reference).half()
    with torch.no_grad():
        assert not torch.isfinite(half.decode(latents[:, :, 0].half() / half.config.scaling_factor).sample).all()
    with caplog.at_level(logging.WARNING, logger="kinema.pipelines.decode"):
        frames = decode_latents(half, latents, decode_chunk=1)
    assert [record.message for record in caplog.records] == [
        "the VAE overflowed in float16 (NaN or infinity), as Stable Diffusion VAEs can; it runs in float32 from now on "
        "(load the model in bfloat16 or float32 to start there)"]  # once: the VAE stays float32
    assert next(half.parameters()).dtype == torch.float32
    torch.testing.assert_close(frames, expected, rtol=0, atol=2e-3)  # float16 weights, float32 sums
    caplog.clear()
    half.half()  # a later run's precision setup (generate's) casts a cached model's parts again
    with caplog.at_level(logging.WARNING, logger="kinema.pipelines.decode"):
        again = decode_latents(half, latents, decode_chunk=1)
    assert not caplog.records and next(half.parameters()).dtype == torch.float32  # straight to float32, unsaid
    torch.testing.assert_close(again, frames, rtol=0, atol=0)
    healthy = tiny_sd_parts()["vae"].half()  # a float16 VAE that does not overflow keeps float16
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = overflow_safe(healthy, images, lambda chunk: healthy.encode(chunk).latent_dist.mean)
    assert mean.dtype == torch.float16 and next(healthy.parameters()).dtype == torch.float16
    with caplog.at_level(logging.WARNING, logger="kinema.pipelines.decode"):  # not finite already: not the VAE's
        decode_latents(healthy, torch.full((1, 4, 1, 8, 8), float("nan")))
    assert not caplog.records and next(healthy.parameters()).dtype == torch.float16


def test_prompts_pad_to_77_tokens(parts):
    states = encode_prompts(parts["text_encoder"], parts["tokenizer"], ["a", "b" * 200])
    assert states.shape == (2, 77, 32)


def test_seeds_are_per_video_and_deterministic(pair, parts):  # noqa: F811
    _, video = pair
    batch = ours(video, parts, seeds=[3, 4], steps=2)
    assert batch.shape == (2, FRAMES, 3, SIZE, SIZE)
    assert batch.dtype == torch.float32 and batch.min() >= 0 and batch.max() <= 1
    assert torch.equal(ours(video, parts, seeds=[3, 4], steps=2), batch)
    for index, seed in enumerate([3, 4]):
        assert torch.allclose(ours(video, parts, seeds=[seed], steps=2)[0], batch[index], atol=1e-5)
    assert (batch[0] - batch[1]).abs().max().item() > 1e-2


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(height=SIZE + 1), "multiples of 2"),
    (dict(width=0), "multiples of 2"),
    (dict(frames=33), "context windows"),
    (dict(frames=0), "at least 1"),
    (dict(scheduler="nope"), "nope"),
    (dict(steps=0), "at least 1"),
    (dict(output="gif"), "gif"),
    (dict(seeds=[]), "seed"),
])
def test_bad_inputs_are_refused_before_the_unet_runs(pair, parts, kwargs, words):  # noqa: F811
    _, video = pair
    calls = []
    handle = video.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(KinemaError) as raised:
            ours(video, parts, **kwargs)
    finally:
        handle.remove()
    message = str(raised.value)
    assert words in message and "\n" not in message
    assert calls == []
    if "frames" in kwargs and kwargs["frames"] > 1:
        assert "32" in message


def test_a_batch_of_seeds_equals_diffusers_with_one_generator_per_video(pair, parts):  # noqa: F811
    """diffusers draws video b's noise from generator b: kinema's per-video seeds reproduce a batch of them."""
    from kinema.sampling.schedulers import make_scheduler

    pipe, video = pair
    pipe.scheduler = make_scheduler("ddim")
    with torch.no_grad():
        expected = pipe(prompt=[PROMPT] * 2, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=2,
                        guidance_scale=GUIDANCE, output_type="pt",
                        generator=[torch.Generator().manual_seed(seed) for seed in (3, 4)]).frames
    frames = ours(video, parts, seeds=[3, 4], steps=2)
    assert (frames - expected).abs().max().item() <= 1e-3


def test_parts_as_attributes_and_a_missing_part(pair, parts):  # noqa: F811
    from types import SimpleNamespace

    _, video = pair
    latents = ours(video, SimpleNamespace(**parts), seeds=[1], steps=1, output="latent")
    assert latents.shape == (1, 4, FRAMES, SIZE // 2, SIZE // 2)
    with pytest.raises(KinemaError, match="text_encoder"):
        ours(video, {"vae": parts["vae"], "tokenizer": parts["tokenizer"]})
