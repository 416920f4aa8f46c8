"""kinema's sampling loop equals diffusers' AnimateDiffPipeline on identical tiny weights, at the latent level."""

import json

import pytest
import torch
from diffusers import AnimateDiffPipeline, AutoencoderKL, MotionAdapter, UNetMotionModel
from tiny_models import perturb
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kinema.loaders.animatediff.keys import diffusers_to_original_key
from kinema.models.video_unet import VideoUNet
from kinema.sampling.denoisers import UNetDenoiser
from kinema.sampling.loop import generators, initial_noise, sample, step_generators
from kinema.sampling.schedulers import make_scheduler

FRAMES, STEPS, GUIDANCE = 4, 4, 7.5


def tiny_tokenizer(folder) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: the pipeline wants one, the prompt embeddings given make it idle."""
    folder.mkdir(parents=True, exist_ok=True)
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps(dict(zip(tokens, range(len(tokens)), strict=True))))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder)


def tiny_pipeline_parts(tokenizer_folder) -> dict:
    """The VAE, text encoder and tokenizer an AnimateDiffPipeline needs, tiny and seeded (the tests pass their own
    prompt embeddings, so the text side is idle)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                        layers_per_block=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=1, num_attention_heads=4,
                                                max_position_embeddings=77))
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tiny_tokenizer(tokenizer_folder)}


@pytest.fixture(scope="module")
def pair(unet2d, tmp_path_factory):
    """diffusers' pipeline (it builds its UNetMotionModel from the 2D UNet and a perturbed MotionAdapter) and kinema's
    VideoUNet carrying the same motion weights."""
    adapter = perturb(MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2,
                                    motion_num_attention_heads=8, motion_norm_num_groups=32,
                                    motion_max_seq_length=32, use_motion_mid_block=False), seed=3, scale=0.1)
    pipe = AnimateDiffPipeline(**tiny_pipeline_parts(tmp_path_factory.mktemp("tokenizer")), unet=unet2d,
                               motion_adapter=adapter, scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet, UNetMotionModel)
    video = VideoUNet.from_unet2d(unet2d, motion_mid_block=False, resnet_norm_mode="per_frame",
                                  motion_module={"type": "temporal", "norm_mode": "across_frames", "max_frames": 32})
    video.load_motion_state_dict({diffusers_to_original_key(k): v for k, v in pipe.unet.state_dict().items()
                                  if ".motion_modules." in k and not k.endswith("pos_embed.pe")})
    return pipe, video.eval()


def embeddings():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2, 7, 32, generator=gen), torch.randn(2, 7, 32, generator=gen)  # cond, uncond


def diffusers_latents(pipe, scheduler_name, noise):
    cond, uncond = embeddings()
    pipe.scheduler = make_scheduler(scheduler_name)
    with torch.no_grad():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.clone(), num_frames=FRAMES,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32, output_type="latent",
                    return_dict=False)[0]


def kinema_latents(video, scheduler_name, noise):
    cond, uncond = embeddings()
    with torch.no_grad():
        return sample(UNetDenoiser(video), make_scheduler(scheduler_name), noise, UNetDenoiser.conditioning(cond),
                      UNetDenoiser.conditioning(uncond), STEPS, GUIDANCE, progress=False)


@pytest.mark.parametrize("scheduler_name", ["euler_a", "lcm"])
def test_samplers_that_add_noise_equal_diffusers_drawing_latents_and_step_noise_from_one_generator(pair,
                                                                                                  scheduler_name):
    """diffusers draws the latents, then each step's noise, from the generators it is given; kinema's step noise
    (`step_generators`) goes on past the initial noise, where a generator seeded afresh added the initial noise
    again at the first step."""
    pipe, video = pair
    seeds, shape = [11, 12], (2, 4, FRAMES, 16, 16)
    cond, uncond = embeddings()
    pipe.scheduler = make_scheduler(scheduler_name)
    with torch.no_grad():
        expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, generator=generators(seeds),
                        num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
                        output_type="latent", return_dict=False)[0]
        ours = sample(UNetDenoiser(video), make_scheduler(scheduler_name), initial_noise(shape, seeds),
                      UNetDenoiser.conditioning(cond), UNetDenoiser.conditioning(uncond), STEPS, GUIDANCE,
                      progress=False, generator=step_generators(seeds, shape))
        again = sample(UNetDenoiser(video), make_scheduler(scheduler_name), initial_noise(shape, seeds),
                       UNetDenoiser.conditioning(cond), UNetDenoiser.conditioning(uncond), STEPS, GUIDANCE,
                       progress=False, generator=generators(seeds))
    assert (ours - expected).abs().max().item() <= 1e-3
    assert (again - expected).abs().max().item() > 1e-2  # the initial noise added again ends elsewhere


@pytest.mark.parametrize("scheduler_name", ["ddim", "euler"])
def test_loop_equals_diffusers_animatediff_pipeline(pair, unet2d, scheduler_name):
    pipe, video = pair
    noise = initial_noise((2, 4, FRAMES, 16, 16), seeds=[11, 12])
    expected = diffusers_latents(pipe, scheduler_name, noise)
    ours = kinema_latents(video, scheduler_name, noise)
    assert ours.shape == expected.shape == noise.shape
    difference = (ours - expected).abs().max().item()
    print(f"{scheduler_name}: max abs difference {difference:.3g}, latents' mean abs {expected.abs().mean():.3g}")
    assert difference <= 1e-3
    # The comparison has teeth: the loop moved the latents, and the motion weights count (a fresh inflation, with
    # identity motion modules, ends elsewhere).
    assert (expected - noise).abs().mean().item() > 0.1
    fresh = VideoUNet.from_unet2d(unet2d, motion_mid_block=False).eval()
    assert (kinema_latents(fresh, scheduler_name, noise) - expected).abs().max().item() > 1e-2
