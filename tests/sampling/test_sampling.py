"""The sampling core: schedulers by name, guidance, denoisers, per-video seeds and clean stops in the loop."""

import copy
import signal
import subprocess
import sys

import pytest
import torch
from tiny_models import perturb, tiny_video_dit

from kinema.errors import KinemaError
from kinema.interrupt import Terminated, stop_on_signals
from kinema.pipelines.request import GenerationRequest
from kinema.sampling.denoisers import DiTDenoiser, UNetDenoiser
from kinema.sampling.guidance import guided_prediction
from kinema.sampling.loop import generators, initial_noise, sample
from kinema.sampling.schedulers import FAMILIES, SCHEDULERS, SPACING_FIXED, TIMESTEP_SPACINGS, make_scheduler

SHAPE = (2, 4, 3, 16, 16)  # B, C, F, H, W for the tiny video UNet


@pytest.fixture
def moving_unet(video_unet):
    """The tiny video UNet with perturbed motion modules, so frames interact."""
    for _, module in video_unet.motion_modules():
        perturb(module, seed=4, scale=0.1)
    return video_unet


def texts(batch=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 7, 32, generator=gen), torch.randn(batch, 7, 32, generator=gen)  # cond, uncond


class Counting(UNetDenoiser):
    """A UNet denoiser that records the batch size of each forward."""

    def __init__(self, model):
        super().__init__(model)
        self.batches = []

    def predict(self, latents, timestep, cond):
        self.batches.append(latents.shape[0])
        return super().predict(latents, timestep, cond)


# ---------------------------------------------------------------- schedulers


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_builds_and_runs_two_steps(video_unet, name):
    cond, uncond = texts()
    noise = initial_noise(SHAPE, seeds=[1, 2])
    with torch.no_grad():
        out = sample(UNetDenoiser(video_unet), make_scheduler(name), noise, UNetDenoiser.conditioning(cond),
                     UNetDenoiser.conditioning(uncond), steps=2, guidance=5.0, progress=False,
                     generator=generators([1, 2]))
    assert out.shape == SHAPE and torch.isfinite(out).all()
    assert (out - noise).abs().max().item() > 1e-3


def test_family_noise_schedules_and_overrides():
    animatediff = make_scheduler("ddim", "animatediff")
    assert (animatediff.config.beta_schedule, animatediff.config.beta_start, animatediff.config.beta_end) == (
        "linear", 0.00085, 0.012)
    assert animatediff.config.clip_sample is False and animatediff.config.steps_offset == 1
    easyanimate = make_scheduler("euler", "easyanimate")
    assert (easyanimate.config.beta_schedule, easyanimate.config.beta_start, easyanimate.config.beta_end) == (
        "linear", 0.0001, 0.02)
    assert torch.allclose(easyanimate.betas, torch.linspace(1e-4, 0.02, 1000))
    karras = make_scheduler("dpmpp_2m_karras", timestep_spacing="trailing")
    assert karras.config.use_karras_sigmas and karras.config.timestep_spacing == "trailing"
    assert not make_scheduler("dpmpp_2m").config.use_karras_sigmas
    assert set(FAMILIES) == {"animatediff", "easyanimate"}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_spacing_moves_the_steps_of_every_scheduler_but_those_that_place_their_own(name):
    placed = set()
    for spacing in TIMESTEP_SPACINGS:
        scheduler = make_scheduler(name, timestep_spacing=spacing)
        scheduler.set_timesteps(4)
        placed.add(tuple(float(t) for t in scheduler.timesteps))
    assert (len(placed) == 1) == (name in SPACING_FIXED)
    if name in SPACING_FIXED:  # refused before any work, so that no video records a setting that did nothing
        with pytest.raises(KinemaError, match=f"timestep spacing has no effect on the {name} scheduler"):
            GenerationRequest(prompt="a cat", scheduler=name, timestep_spacing="trailing").check()
    else:
        GenerationRequest(prompt="a cat", scheduler=name, timestep_spacing="trailing").check()


@pytest.mark.parametrize("call, message", [
    (lambda: make_scheduler("heun"), "unknown scheduler 'heun'; known schedulers: ddim, euler, euler_a, dpmpp_2m, "
                                     "dpmpp_2m_karras, unipc, pndm, lcm"),
    (lambda: make_scheduler("ddim", "sdxl"), "unknown model family 'sdxl'; known model families: animatediff, "
                                             "easyanimate"),
    (lambda: make_scheduler("euler", use_karras=True), "scheduler 'euler' (EulerDiscreteScheduler) has no setting "
                                                        "use_karras;"),
], ids=["scheduler", "family", "setting"])
def test_unknown_names_are_one_line_listing_the_known_ones(call, message):
    with pytest.raises(KinemaError) as err:
        call()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_scheduler_names_are_plain_data_without_torch():
    # For CLI choices: the package and its scheduler table import no torch (a fresh interpreter's modules are clean).
    code = ("import sys, kinema.sampling; from kinema.sampling.schedulers import SCHEDULERS, FAMILIES; "
            "print(','.join(SCHEDULERS), any(m.startswith(('torch', 'diffusers')) for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [",".join(SCHEDULERS), "False"]


# ---------------------------------------------------------------- seeds, guidance


def test_the_same_seed_gives_the_same_video_whatever_the_batch(moving_unet):
    both = initial_noise(SHAPE, seeds=[1, 2])
    singles = [initial_noise((1, *SHAPE[1:]), seeds=[seed]) for seed in (1, 2)]
    assert torch.equal(both, torch.cat(singles))
    assert not torch.equal(both[0], both[1])
    assert initial_noise(SHAPE, [1, 2], dtype=torch.float16).dtype == torch.float16
    with pytest.raises(KinemaError, match="1 seed\\(s\\) for a batch of 2"):
        initial_noise(SHAPE, seeds=[1])

    cond, uncond = texts()
    denoiser = UNetDenoiser(moving_unet)
    for name in ("ddim", "euler_a"):  # euler_a adds noise each step: one generator per video keeps it per video
        def run(noise, text, negative, seeds, name=name):
            with torch.no_grad():
                return sample(denoiser, make_scheduler(name), noise, UNetDenoiser.conditioning(text),
                              UNetDenoiser.conditioning(negative), steps=3, guidance=4.0, progress=False,
                              generator=generators(seeds))
        batch = run(both, cond, uncond, [1, 2])
        for b, seed in enumerate((1, 2)):
            single = run(singles[b], cond[b:b + 1], uncond[b:b + 1], [seed])
            # Same kernels on a batch of 1 instead of 2: GEMM blocking moves the last bits only.
            torch.testing.assert_close(batch[b:b + 1], single, atol=1e-4, rtol=0, msg=f"{name}, video {b}")


def test_guidance_one_is_the_conditional_result_in_one_forward_per_step(moving_unet):
    cond, uncond = texts()
    noise = initial_noise(SHAPE, seeds=[1, 2])
    latents, t = noise * 3, torch.tensor(500)
    with torch.no_grad():
        direct = moving_unet(latents, t, cond)
        counting = Counting(moving_unet)
        guided = guided_prediction(counting, latents, t, UNetDenoiser.conditioning(cond),
                                   UNetDenoiser.conditioning(uncond), guidance=1)
        assert torch.equal(guided, direct) and counting.batches == [2]
        assert torch.equal(guided_prediction(counting, latents, t, UNetDenoiser.conditioning(cond), None, 1), direct)

        # Guidance g: uncond + g (cond - uncond), both halves in one forward of 2B.
        counting.batches.clear()
        strong = guided_prediction(counting, latents, t, UNetDenoiser.conditioning(cond),
                                   UNetDenoiser.conditioning(uncond), guidance=6.0)
        assert counting.batches == [4]
        negative = moving_unet(latents, t, uncond)
        torch.testing.assert_close(strong, negative + 6.0 * (direct - negative), atol=1e-4, rtol=0)

        counting.batches.clear()
        sample(counting, make_scheduler("ddim"), noise, UNetDenoiser.conditioning(cond),
               UNetDenoiser.conditioning(uncond), steps=3, guidance=1, progress=False)
        assert counting.batches == [2, 2, 2]
        counting.batches.clear()
        sample(counting, make_scheduler("ddim"), noise, UNetDenoiser.conditioning(cond),
               UNetDenoiser.conditioning(uncond), steps=3, guidance=7.5, progress=False)
        assert counting.batches == [4, 4, 4]
    with pytest.raises(KinemaError, match="guidance 7.5 needs unconditional inputs"):
        guided_prediction(counting, latents, t, UNetDenoiser.conditioning(cond), None, 7.5)


def test_guidance_rescale_matches_each_videos_spread_to_the_conditional_prediction(moving_unet):
    """Lin et al. 2023, section 3.4, written out here in plain torch: per video, the guided prediction scaled to the
    conditional one's standard deviation, blended with the guided one by the rescale share."""
    cond, uncond = texts()
    latents, t = initial_noise(SHAPE, seeds=[1, 2]) * 3, torch.tensor(500)
    with torch.no_grad():
        on_text = moving_unet(latents, t, cond)
        negative = moving_unet(latents, t, uncond)

        def guided(rescale):
            return guided_prediction(UNetDenoiser(moving_unet), latents, t, UNetDenoiser.conditioning(cond),
                                     UNetDenoiser.conditioning(uncond), guidance=9.0, rescale=rescale)

        plain = negative + 9.0 * (on_text - negative)
        torch.testing.assert_close(guided(None), plain, atol=1e-4, rtol=0)
        assert torch.equal(guided(0.0), guided(None))
        for video in range(SHAPE[0]):  # std over (C, F, H, W) of each video alone
            ratio = on_text[video].std() / plain[video].std()
            expected = 0.7 * plain[video] * ratio + 0.3 * plain[video]
            torch.testing.assert_close(guided(0.7)[video], expected, atol=1e-4, rtol=0)
            torch.testing.assert_close(guided(1.0)[video].std(), on_text[video].std(), atol=1e-4, rtol=0)
        assert not torch.allclose(guided(0.7), plain, atol=1e-2)


def test_a_half_precision_model_runs_under_a_float32_loop(moving_unet):
    cond, uncond = texts()
    noise = initial_noise(SHAPE, seeds=[1, 2])

    def run(model):
        with torch.no_grad():
            return sample(UNetDenoiser(model), make_scheduler("ddim"), noise, UNetDenoiser.conditioning(cond),
                          UNetDenoiser.conditioning(uncond), steps=2, guidance=3.0, progress=False)

    reference = run(moving_unet)
    half = run(copy.deepcopy(moving_unet).to(torch.bfloat16))
    assert half.dtype == torch.float32
    error = (half - reference).abs().max().item() / reference.abs().max().item()
    print(f"bfloat16 model: relative max error {error:.3g}")
    assert error < 0.05


# ---------------------------------------------------------------- the DiT denoiser


@pytest.fixture
def inpaint_dit():
    """A tiny V3-style InP DiT (4 + 8 inpaint channels, image tokens from 16-wide CLIP embeddings), perturbed so
    that every input matters."""
    return perturb(tiny_video_dit(in_channels=12, image_embed_dim=16), seed=6, scale=0.1)


def test_dit_denoiser_takes_the_epsilon_half_and_passes_its_conditioning(inpaint_dit):
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 2, 8, 8, generator=gen)
    inpaint = torch.randn(2, 8, 2, 8, 8, generator=gen)
    text, mask = torch.randn(2, 5, 48, generator=gen), torch.ones(2, 5)
    image = torch.randn(2, 16, generator=gen)
    cond = DiTDenoiser.conditioning(text, mask, inpaint_latents=inpaint, clip_image_embeds=image,
                                    clip_attention_mask=torch.ones(2, 8))
    denoiser = DiTDenoiser(inpaint_dit)
    with torch.no_grad():
        full = inpaint_dit(latents, 300, text, encoder_attention_mask=mask, inpaint_latents=inpaint,
                           clip_image_embeds=image, clip_attention_mask=torch.ones(2, 8))
        eps = denoiser(latents, 300, cond)
        assert full.shape[1] == 8 and torch.equal(eps, full[:, :4])
        # The inpaint latents and the image embeddings reach the model.
        assert (denoiser(latents, 300, {**cond, "inpaint_latents": inpaint * 0}) - eps).abs().max() > 1e-3
        assert (denoiser(latents, 300, {**cond, "clip_image_embeds": image * 0}) - eps).abs().max() > 1e-3
        # Guided: both halves carry their own conditioning in one batch; the unconditional one here has no image
        # (its mask switches the image tokens off, as V3 does) but the same inpaint latents.
        uncond = {**cond, "clip_attention_mask": torch.zeros(2, 8)}
        guided = guided_prediction(denoiser, latents, 300, cond, uncond, guidance=3.0)
        negative = denoiser(latents, 300, uncond)
        torch.testing.assert_close(guided, negative + 3.0 * (eps - negative), atol=1e-4, rtol=0)
        out = sample(denoiser, make_scheduler("ddim", "easyanimate"), latents, cond, uncond, steps=2, guidance=3.0,
                     progress=False)
    assert out.shape == latents.shape
    with pytest.raises(KinemaError, match="DiTDenoiser takes no conditioning added_cond_kwargs"):
        denoiser(latents, 300, {**cond, "added_cond_kwargs": text})
    with pytest.raises(KinemaError, match="conditional and unconditional inputs must give the same conditioning"):
        guided_prediction(denoiser, latents, 300, cond, {**cond, "inpaint_latents": None}, guidance=3.0)


# ---------------------------------------------------------------- stopping


def test_a_stop_swallowed_mid_loop_is_raised_at_the_next_step(video_unet):
    cond, uncond = texts()
    counting = Counting(video_unet)
    seen = []

    def swallowing_callback(step, timestep, latents):
        seen.append(step)
        if step == 1:  # a SIGTERM arrives during step 1 and a library swallows its exception
            try:
                signal.raise_signal(signal.SIGTERM)
            except Terminated:
                pass

    with stop_on_signals(), torch.no_grad(), pytest.raises(Terminated):
        sample(counting, make_scheduler("ddim"), initial_noise(SHAPE, [1, 2]), UNetDenoiser.conditioning(cond),
               UNetDenoiser.conditioning(uncond), steps=5, guidance=2.0, callback=swallowing_callback, progress=False)
    assert seen == [0, 1] and len(counting.batches) == 2  # step 2 never ran its forward
