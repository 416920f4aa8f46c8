"""AnimateDiffFamily on tiny random parts: text, frame encoding and decoding equal diffusers' own calls per frame."""

import pytest
import torch
from tiny_models import tiny_video_unet
from tiny_sd import tiny_sd_parts

from kinema.errors import KinemaError
from kinema.loaders.stable_diffusion import load_tokenizer
from kinema.pipelines.animatediff import AnimateDiffFamily
from kinema.pipelines.decode import decode_latents
from kinema.pipelines.text_encoding import encode_prompts
from kinema.sampling.denoisers import UNetDenoiser


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from loaders.test_stable_diffusion import write_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return {**tiny_sd_parts(), "tokenizer": load_tokenizer(folder)}


def family(parts, **options):
    return AnimateDiffFamily(tiny_video_unet(parts["unet"]), parts["vae"], parts["text_encoder"], parts["tokenizer"],
                             **options)


def random_frames(batch, count, size, seed=0):
    return torch.rand(batch, count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_family_basics(parts):
    ours = family(parts, source="models/tiny-sd", motion_module="mm.ckpt", loras=[("a.safetensors", 0.5)])
    assert (ours.family, ours.default_scheduler, ours.latent_channels) == ("animatediff", "ddim", 4)
    assert not ours.inpaints and ours.repaint_fallback
    assert ours.latent_frames(7) == 7 and ours.pixel_frames(7) == 7
    assert ours.max_frames == ours.model.max_frames
    denoiser = ours.denoiser()
    assert isinstance(denoiser, UNetDenoiser) and denoiser.model is ours.model is ours.video_unet
    assert ours.settings() == {"model": "models/tiny-sd", "family": "animatediff", "motion_module": "mm.ckpt",
                               "loras": [{"path": "a.safetensors", "weight": 0.5}]}
    assert family(parts).settings() == {"model": "VideoUNet", "family": "animatediff"}
    with pytest.raises(KinemaError, match="frames must be at least 1, got 0"):
        ours.latent_frames(0)
    with pytest.raises(KinemaError, match="decode_chunk must be at least 1 frame"):
        family(parts, decode_chunk=0)


def test_encode_text_is_encode_prompts(parts):
    ours = family(parts)
    prompts = ["the cat", "a dog"]
    states = ours.encode_text(prompts)
    assert list(states) == ["encoder_hidden_states"]
    expected = encode_prompts(parts["text_encoder"], parts["tokenizer"], prompts)
    assert states["encoder_hidden_states"].shape == (2, 77, 32)
    assert torch.equal(states["encoder_hidden_states"], expected)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the prompts reach the states


@pytest.mark.parametrize("decode_chunk", [1, 4, 16])
def test_encode_frames_is_the_scaled_posterior_mean_of_each_frame(parts, decode_chunk):
    vae = parts["vae"]
    frames = random_frames(2, 3, 16)
    latents = family(parts, decode_chunk=decode_chunk).encode_frames(frames)
    assert latents.shape == (2, 4, 3, 8, 8)  # the tiny VAE downscales by 2 and latents.dtype == torch.float32
    with torch.no_grad():
        for b in range(2):
            for f in range(3):
                image = frames[b, f][None] * 2 - 1
                expected = vae.encode(image).latent_dist.mean[0] * vae.config.scaling_factor
                torch.testing.assert_close(latents[b, :, f], expected, rtol=1e-5, atol=1e-5)


def test_decode_is_decode_latents_and_the_round_trip_keeps_shapes(parts):
    ours = family(parts, decode_chunk=2)
    frames = random_frames(1, 3, 16, seed=1)
    latents = ours.encode_frames(frames)
    decoded = ours.decode(latents)
    assert decoded.shape == frames.shape and decoded.dtype == torch.float32
    assert 0 <= decoded.min() and decoded.max() <= 1
    torch.testing.assert_close(decoded, decode_latents(parts["vae"], latents, 5), rtol=1e-5, atol=1e-5)


def test_bad_frames_are_refused(parts):
    ours = family(parts)
    with pytest.raises(KinemaError, match=r"encoding takes frames \(B, F, 3, H, W\).*got shape \(3, 3, 16, 16\)"):
        ours.encode_frames(torch.rand(3, 3, 16, 16))
    assert ours.spatial_factor == 2
    with pytest.raises(KinemaError, match="multiples of 2.*got 16x13: use 16x12"):
        ours.encode_frames(torch.rand(1, 1, 3, 13, 16))


def test_vae_tiling_is_diffusers_tiled_vae(parts):
    """The tiny VAE's tiles are 32 pixels (its sample_size), 16 latents. Below that, tiled is untiled exactly; above,
    each frame goes through diffusers' own tiled encode/decode (with random weights the tiles' group norms differ
    from the whole frame's, so tiled and untiled differ by far more than rounding: what they compute is not equal)."""
    vae = parts["vae"]
    tiled, whole = family(parts, vae_tiling=True), family(parts)
    assert whole.vae_tiling is False and vae.use_tiling is False
    small, small_latents = random_frames(1, 2, 16, seed=2), torch.randn(1, 4, 2, 8, 8)
    tiled.vae_tiling = True
    small_tiled = (tiled.encode_frames(small), tiled.decode(small_latents))
    tiled.vae_tiling = False
    assert torch.equal(small_tiled[0], whole.encode_frames(small))
    assert torch.equal(small_tiled[1], whole.decode(small_latents))

    large = random_frames(1, 2, 48, seed=3)
    latents = torch.randn(1, 4, 2, 24, 24, generator=torch.Generator().manual_seed(4))
    untiled = (whole.encode_frames(large), whole.decode(latents))
    tiled.vae_tiling = True
    assert vae.use_tiling is True
    got = (tiled.encode_frames(large), tiled.decode(latents))
    with torch.no_grad():
        for f in range(2):
            encoded = vae._tiled_encode(large[0, f][None] * 2 - 1)[:, :4] * vae.config.scaling_factor
            decoded = vae.tiled_decode(latents[:, :, f] / vae.config.scaling_factor).sample
            torch.testing.assert_close(got[0][0, :, f], encoded[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1][0, f], (decoded[0] / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)
    assert (got[1] - untiled[1]).abs().max() > 1e-2  # the tiled path ran
    tiled.vae_tiling = False
    assert vae.use_tiling is False


def test_clip_skip_is_a_clip_with_its_last_layers_cut_off(parts):
    """clip_skip N (A1111's and prompt travel's count: 1 is the last layer; diffusers' N - 1) equals transformers'
    own CLIPTextModel with its last N - 1 layers removed: its output passes the final layer norm as usual. (diffusers'
    encode_prompt(clip_skip=...) would be the other reference, but it reads `text_encoder.text_model`, which
    transformers 5 no longer has.)"""
    import copy

    encoder = parts["text_encoder"]
    prompts = ["the cat", "a dog"]
    layers = encoder.config.num_hidden_layers
    assert layers >= 2
    ids = parts["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    for skip in range(1, layers + 1):
        cut = copy.deepcopy(encoder)
        stack = getattr(cut, "text_model", cut).encoder
        stack.layers = stack.layers[:layers - (skip - 1)]
        with torch.no_grad():
            theirs = cut(ids).last_hidden_state
        ours = family(parts).encode_text(prompts, skip)["encoder_hidden_states"]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (family(parts).encode_text(prompts, 2)["encoder_hidden_states"]
            - family(parts).encode_text(prompts)["encoder_hidden_states"]).abs().max() > 1e-3
    with pytest.raises(KinemaError, match=rf"clip_skip {layers + 1} is more layers than the text encoder's {layers}"):
        family(parts).encode_text(prompts, layers + 1)


def test_clip_skip_with_a_text_encoder_that_is_not_clip_is_one_line():
    from transformers import BertConfig, BertModel

    from kinema.pipelines.text_encoding import check_clip_skip

    bert = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=16))
    check_clip_skip(bert, 1)
    with pytest.raises(KinemaError, match=r"^clip_skip 2 skips layers of a CLIP text encoder, and this model's is "
                                          r"BertModel: drop clip_skip \(--clip-skip\)"):
        check_clip_skip(bert, 2)


def test_cut_off_text_is_what_clip_truncation_drops(parts):
    ours = family(parts)
    tokenizer = parts["tokenizer"]
    words = [f"w{i}" for i in range(120)]
    for count in (10, 75, 76, 120):
        prompt = " ".join(words[:count])
        # Independent: the ids the encoder gets (start, 75 tokens, end) against the prompt's own.
        fed = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        whole = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
        dropped = whole[len([i for i in fed if i not in (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id)]):]
        cut = ours.cut_off_text(prompt)
        assert cut == (tokenizer.decode(dropped).strip() if dropped else None), count
    assert ours.cut_off_text("w1 w2") is None and ours.cut_off_text(" ".join(words)) is not None
