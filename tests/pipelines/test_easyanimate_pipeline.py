"""EasyAnimateFamily (kinema/pipelines/easyanimate.py) on a tiny V3 InP folder (tests/tiny_easyanimate.py) loaded
with load_easyanimate: T5 prompts, frame counts, the Slice VAE both ways, V3's inpaint and CLIP conditioning, and a
short denoise.

The references are written here from V3's inference pipeline (EasyAnimateInpaintPipeline @616a354 with
get_image_to_video_latent): the mask video is 1 on frames to generate and 0 on kept ones on all 3 channels, the
masked video is the video in [-1, 1] on kept frames and -1 elsewhere, each goes through the Slice VAE as a video and
is multiplied by the scaling factor, mask latents first; CLIP embeds the start image (an 8-bit PIL image) on the
conditional side and zeros with a zero token mask on the unconditional one; text is T5 on lower-cased prompts padded
to 120 tokens with the attention mask.
"""

import pytest
import torch
from PIL import Image
from tiny_easyanimate import PE_LEN, TINY_FOLDER_VAE, source_model, write_full_folder
from tiny_models import tiny_video_dit

from kinema.errors import KinemaError
from kinema.loaders.easyanimate import load_easyanimate
from kinema.models.slice_vae import SliceVAE
from kinema.models.slice_vae_tiling import Tiling
from kinema.pipelines.easyanimate import EasyAnimateFamily
from kinema.pipelines.text_encoding import encode_t5_prompts
from kinema.sampling.denoisers import DiTDenoiser
from kinema.sampling.loop import initial_noise, sample
from kinema.sampling.schedulers import SCHEDULERS, make_scheduler

EXACT = dict(rtol=0, atol=0)
# Same maths on different batch shapes (a prompt alone vs padded in a batch): a few float32 ulps apart.
ULPS = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("easyanimate_v3")
    write_full_folder(root, source_model())
    return load_easyanimate(root)


@pytest.fixture(scope="module")
def family(loaded) -> EasyAnimateFamily:
    return EasyAnimateFamily.from_model(loaded, source="tiny-v3")


def scaled_posterior_mean(vae: SliceVAE, video: torch.Tensor) -> torch.Tensor:
    """V3's VAE encoding of a pixel video `(B, 3, F, H, W)` as the pipeline takes it, times the scaling factor
    (the posterior mean where V3 draws a sample)."""
    with torch.no_grad():
        return vae.encode(video).latent_dist.mean * vae.config.scaling_factor


def uint8_image(generator: torch.Generator, height: int = 64, width: int = 64) -> torch.Tensor:
    """An image `(1, 3, H, W)` in [0, 1] holding 8-bit values, as an image read from a file is."""
    return torch.randint(0, 256, (1, 3, height, width), generator=generator).float() / 255


# ------------------------------------------------------------------ text


def test_t5_states_equal_a_direct_encoder_call_padded_to_120_with_the_mask(loaded):
    states, mask = encode_t5_prompts(loaded.text_encoder, loaded.tokenizer, ["a cat runs on grass", "a cat"])
    assert states.shape == (2, 120, 48) and states.dtype == torch.float32 and mask.shape == (2, 120)
    # The tiny vocabulary gives these ids (end token 1, padding 0); the mask marks the real tokens and only them.
    ids = torch.zeros(2, 120, dtype=torch.long)
    ids[0, :6], ids[1, :3] = torch.tensor([3, 4, 5, 6, 7, 1]), torch.tensor([3, 4, 1])
    assert torch.equal(mask, (ids != 0).long())
    with torch.no_grad():
        direct = loaded.text_encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        alone = loaded.text_encoder(input_ids=torch.tensor([[3, 4, 1]])).last_hidden_state
    torch.testing.assert_close(states, direct, **EXACT)
    # The encoder ran with the mask: a padded prompt's real tokens are the prompt's states without any padding.
    torch.testing.assert_close(states[1, :3], alone[0], **ULPS)
    long_states, long_mask = encode_t5_prompts(loaded.text_encoder, loaded.tokenizer, "a cat " * 100)
    assert long_states.shape == (1, 120, 48) and bool(long_mask.all())  # truncated to 120


def test_family_lower_cases_prompts_as_v3_does(family, loaded):
    cond = family.encode_text(["  A Cat RUNS on grass ", ""])
    assert set(cond) == {"encoder_hidden_states", "encoder_attention_mask"}
    states, mask = encode_t5_prompts(loaded.text_encoder, loaded.tokenizer, ["a cat runs on grass", ""])
    assert torch.equal(cond["encoder_hidden_states"], states) and torch.equal(cond["encoder_attention_mask"], mask)
    assert mask[1].tolist() == [1] + [0] * 119  # an empty prompt is its end token
    cased, _ = encode_t5_prompts(loaded.text_encoder, loaded.tokenizer, ["A Cat RUNS on grass"])
    assert not torch.allclose(cased[0], states[0])  # T5's vocabulary is case-sensitive: lower-casing matters


# ------------------------------------------------------------------ sizes


def test_frame_counts_follow_the_slice_vae_and_other_counts_name_the_nearest(family):
    assert [family.latent_frames(f) for f in (1, 8, 16, 144)] == [1, 2, 4, 36]
    assert [family.pixel_frames(f) for f in (1, 2, 4, 36)] == [1, 8, 16, 144]
    assert family.max_frames == PE_LEN // 2 * 8  # the frame tables hold 64 latent frames: 32 slices of 8 frames
    with pytest.raises(KinemaError) as err:
        family.latent_frames(20)
    assert str(err.value) == "EasyAnimate V3 makes 1 or a multiple of 8 frames; 20 is not: use 16 or 24"
    for frames, nearest in ((5, "use 1 or 8"), (0, "use 1 or 8"), (9, "use 8 or 16")):
        with pytest.raises(KinemaError, match=f"; {frames} is not: {nearest}$"):
            family.latent_frames(frames)
    with pytest.raises(KinemaError, match="latents hold 1 or a multiple of 2 frames; 3 is not"):
        family.pixel_frames(3)
    family.check_size(64, 48)
    with pytest.raises(KinemaError, match="multiples of 16 .* got 40x72: use 32x64$"):
        family.check_size(72, 40)


# ------------------------------------------------------------------ VAE


def test_encode_frames_is_the_scaled_posterior_mean(family, loaded):
    frames = torch.rand(2, 8, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    latents = family.encode_frames(frames)
    assert latents.shape == (2, 4, 2, 8, 6) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, scaled_posterior_mean(loaded.vae, frames.permute(0, 2, 1, 3, 4) * 2 - 1),
                               **EXACT)
    assert family.encode_frames(frames[:, :1]).shape == (2, 4, 1, 8, 6)  # an image
    with pytest.raises(KinemaError, match="12 is not: use 8 or 16"):
        family.encode_frames(frames.repeat(1, 2, 1, 1, 1)[:, :12])


def test_decode_is_the_slice_vae_decode_with_seam_smoothing_in_0_1(family, loaded):
    video = torch.rand(1, 16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    latents = family.encode_frames(video)
    frames = family.decode(latents)
    assert frames.shape == (1, 16, 3, 64, 64) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1
    vae, scale = loaded.vae, loaded.vae.config.scaling_factor
    with torch.no_grad():
        smoothed = vae.decode(latents / scale, smooth_seams=True).sample
        plain = vae.decode(latents / scale).sample
    torch.testing.assert_close(frames, ((smoothed.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4), **EXACT)
    assert (smoothed - plain).abs().max() > 0.1  # two slices: V3's smoothing changed the frames around the seam
    assert family.decode(latents[:, :, :2]).shape == (1, 8, 3, 64, 64)
    with pytest.raises(KinemaError, match=r"decoding takes latents \(B, 4, F', h, w\)"):
        family.decode(latents[:, :3])


def test_vae_tiling_uses_the_vae_configs_tiles(loaded):
    torch.manual_seed(0)
    vae = SliceVAE(**TINY_FOLDER_VAE, tile_sample_min_size=32, tile_overlap_factor=0.25).eval()
    parts = (loaded.transformer, vae, loaded.text_encoder, loaded.tokenizer)
    tiled, whole = EasyAnimateFamily(*parts, vae_tiling=True), EasyAnimateFamily(*parts)
    frames = torch.rand(1, 8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    video = frames.permute(0, 2, 1, 3, 4) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(video, tiling=Tiling(32, 0.25)).latent_dist.mean * vae.config.scaling_factor
        decoded = vae.decode(expected / vae.config.scaling_factor, tiling=Tiling(32, 0.25), smooth_seams=True).sample
    latents = tiled.encode_frames(frames)
    torch.testing.assert_close(latents, expected, **EXACT)
    assert not torch.allclose(whole.encode_frames(frames), expected)  # 64 px is over the 32 px tile: tiling shows
    torch.testing.assert_close(tiled.decode(latents), ((decoded.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4),
                               **EXACT)


# ------------------------------------------------------------------ inpaint and CLIP conditioning


def test_image_to_video_conditioning_follows_v3(family, loaded):
    generator = torch.Generator().manual_seed(3)
    start = uint8_image(generator)
    video = torch.rand(1, 16, 3, 64, 64, generator=generator)
    video[:, 0] = start[0]
    keep = torch.zeros(16, dtype=torch.bool)
    keep[0] = True
    cond, uncond = family.inpaint_conditioning(video, keep, start)

    mask_video = torch.ones(1, 3, 16, 64, 64)  # 1 = generate ...
    mask_video[:, :, 0] = 0  # ... 0 = keep
    masked_video = torch.full((1, 3, 16, 64, 64), -1.0)
    masked_video[:, :, 0] = start[0] * 2 - 1
    expected = torch.cat([scaled_posterior_mean(loaded.vae, mask_video),
                          scaled_posterior_mean(loaded.vae, masked_video)], dim=1)
    assert cond["inpaint_latents"].shape == (1, 8, 4, 8, 8)
    torch.testing.assert_close(cond["inpaint_latents"], expected, **EXACT)
    assert torch.equal(uncond["inpaint_latents"], cond["inpaint_latents"])  # V3 gives both sides the same

    # The frames to generate are ignored, and the kept frame reaches only its own 8-frame slice: the second slice's
    # latents are those of a video with every frame to generate.
    other = video.clone()
    other[:, 1:] = torch.rand(1, 15, 3, 64, 64, generator=generator)
    assert torch.equal(family.inpaint_conditioning(other, keep, None)[0]["inpaint_latents"], cond["inpaint_latents"])
    all_generated = family.text_to_video_conditioning(1, 16, 64, 64)[0]["inpaint_latents"]
    assert torch.equal(cond["inpaint_latents"][:, :, 2:], all_generated[:, :, 2:])
    assert not torch.allclose(cond["inpaint_latents"][:, :, :2], all_generated[:, :, :2])

    # CLIP: the start image as an 8-bit PIL image through the processor; zeros with a zero mask when unconditional.
    pil = Image.fromarray((start[0] * 255).round().byte().permute(1, 2, 0).numpy())
    with torch.no_grad():
        embeds = loaded.image_encoder(
            pixel_values=loaded.image_processor(images=pil, return_tensors="pt").pixel_values).image_embeds
    torch.testing.assert_close(cond["clip_image_embeds"], embeds, **EXACT)
    assert torch.equal(cond["clip_attention_mask"], torch.ones(1, 8))
    assert torch.equal(uncond["clip_image_embeds"], torch.zeros(1, 768))
    assert torch.equal(uncond["clip_attention_mask"], torch.zeros(1, 8))


def test_text_to_video_on_an_inp_model_generates_every_frame_without_image_tokens(family, loaded):
    cond, uncond = family.text_to_video_conditioning(2, 8, 64, 64)
    assert set(cond) == set(uncond) == {"inpaint_latents"}
    expected = torch.cat([scaled_posterior_mean(loaded.vae, torch.ones(2, 3, 8, 64, 64)),
                          scaled_posterior_mean(loaded.vae, torch.full((2, 3, 8, 64, 64), -1.0))], dim=1)
    torch.testing.assert_close(cond["inpaint_latents"], expected, **EXACT)
    anything = torch.rand(2, 8, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    same, _ = family.inpaint_conditioning(anything, torch.zeros(8, dtype=torch.bool), None)
    assert torch.equal(same["inpaint_latents"], cond["inpaint_latents"])


def test_zero_clip_embeds_with_a_zero_mask_are_no_image_tokens(family):
    # V3 passes zero embeddings with a zero mask where there is no image; kinema passes none: the same output.
    generator = torch.Generator().manual_seed(5)
    text = family.encode_text(["a cat", ""])
    inpaint = family.text_to_video_conditioning(2, 8, 64, 64)[0]["inpaint_latents"]
    sample_latents = torch.randn(2, 4, 2, 8, 8, generator=generator)
    model = family.transformer
    with torch.no_grad():
        without = model(sample_latents, 500, **text, inpaint_latents=inpaint)
        zeroed = model(sample_latents, 500, **text, inpaint_latents=inpaint, clip_image_embeds=torch.zeros(2, 768),
                       clip_attention_mask=torch.zeros(2, 8))
        image = model(sample_latents, 500, **text, inpaint_latents=inpaint,
                      clip_image_embeds=torch.randn(2, 768, generator=generator), clip_attention_mask=torch.ones(2, 8))
    torch.testing.assert_close(zeroed, without, **ULPS)
    assert not torch.allclose(image, without)  # the image tokens do reach the model when unmasked


def test_image_tokens_only_in_the_second_half_of_sampling(family):
    assert [family.image_tokens_from(step, 10) for step in range(10)] == [False] * 5 + [True] * 5
    assert [family.image_tokens_from(step, 25) for step in range(25)] == [False] * 13 + [True] * 12
    assert [family.image_tokens_from(step, 3) for step in range(3)] == [False, False, True]
    assert [family.image_tokens_from(step, 1) for step in range(1)] == [False]
    with pytest.raises(KinemaError, match="step 10 is outside the 10 sampling steps"):
        family.image_tokens_from(10, 10)


def test_text_to_video_model_has_no_inpaint_inputs(loaded):
    family = EasyAnimateFamily(tiny_video_dit(), loaded.vae, loaded.text_encoder, loaded.tokenizer)
    assert not family.inpaints and family.image_tokens_from(0, 10)
    with pytest.raises(KinemaError, match="is not an inpaint model"):
        family.inpaint_conditioning(torch.rand(1, 8, 3, 64, 64), torch.zeros(8, dtype=torch.bool), None)
    with pytest.raises(KinemaError, match="has no CLIP image encoder; .* needs an InP folder with image_encoder/"):
        family.encode_image(torch.rand(1, 3, 64, 64))


def test_mismatched_parts_are_refused_in_one_line(loaded):
    parts = (loaded.vae, loaded.text_encoder, loaded.tokenizer)
    with pytest.raises(KinemaError, match="text encoder gives 48-wide states but the transformer takes 32") as err:
        EasyAnimateFamily(tiny_video_dit(caption_channels=32), *parts)
    assert "\n" not in str(err.value)
    with pytest.raises(KinemaError, match="takes 8 input channels but the VAE gives 4-channel latents"):
        EasyAnimateFamily(tiny_video_dit(in_channels=8, caption_channels=48), *parts)
    with pytest.raises(KinemaError, match="image_encoder and its image_processor together"):
        EasyAnimateFamily(loaded.transformer, *parts, image_encoder=loaded.image_encoder)


# ------------------------------------------------------------------ end to end


def test_two_steps_of_sampling_on_the_tiny_inp_model_give_a_video(family):
    assert family.family == "easyanimate" and family.default_scheduler in SCHEDULERS
    assert isinstance(family.denoiser(), DiTDenoiser) and family.latent_channels == 4 and family.inpaints
    generator = torch.Generator().manual_seed(6)
    start = uint8_image(generator)
    video = start[:, None].expand(1, 8, 3, 64, 64)  # V3 tiles the start image over the clip
    keep = torch.zeros(8, dtype=torch.bool)
    keep[0] = True
    inpaint, inpaint_uncond = family.inpaint_conditioning(video, keep, start)
    text, negative = family.encode_text(["a cat runs on grass"]), family.encode_text([""])
    noise = initial_noise((1, family.latent_channels, family.latent_frames(8), 8, 8), [0])

    def run(cond, uncond):
        scheduler = make_scheduler(family.default_scheduler, family.family)
        with torch.no_grad():
            return sample(family.denoiser(), scheduler, noise, {**text, **cond}, {**negative, **uncond}, 2, 7.0,
                          progress=False)

    latents = run(inpaint, inpaint_uncond)
    assert latents.shape == (1, 4, 2, 8, 8) and bool(latents.isfinite().all())
    t2v = run(*family.text_to_video_conditioning(1, 8, 64, 64))
    assert not torch.allclose(latents, t2v)  # the start frame conditions the result
    frames = family.decode(latents)
    assert frames.shape == (1, 8, 3, 64, 64) and 0 <= frames.min() and frames.max() <= 1
    assert family.name == "tiny-v3" and family.settings() == {"model": "tiny-v3", "family": "easyanimate"}
