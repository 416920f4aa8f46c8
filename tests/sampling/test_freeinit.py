"""FreeInit equals diffusers' Apache-2.0 FreeInitMixin: the low-pass filters, the noise re-initialisation, the
coarse-to-fine step counts, and a whole two-iteration run of AnimateDiffPipeline on identical tiny weights."""


import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.free_init_utils import FreeInitMixin
from sampling.test_parity import embeddings, pair  # noqa: F401  (pair: the fixture)

from kinema.errors import KinemaError
from kinema.sampling.denoisers import UNetDenoiser
from kinema.sampling.freeinit import (
    FreeInitOptions,
    free_init_sample,
    frequency_filter,
    reinitialize_noise,
    seeded_fresh_noise,
)
from kinema.sampling.loop import initial_noise, sample
from kinema.sampling.schedulers import make_scheduler

FRAMES, STEPS, GUIDANCE, SEEDS = 4, 3, 7.5, [11, 12]
SHAPE = (2, 4, FRAMES, 8, 8)
# diffusers' DPM-Solver and UniPC schedulers build their sigmas in a way numpy 2 warns about; not kinema's concern.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def diffusers_filter(shape, method, spatial, temporal, order):
    # The method reads nothing from the pipeline: a bare mixin is enough to call it.
    return FreeInitMixin()._get_free_init_freq_filter((1, 4, *shape), "cpu", method, order, spatial, temporal)


@pytest.mark.parametrize("method", ["butterworth", "gaussian", "ideal"])
@pytest.mark.parametrize("shape, spatial, temporal, order", [
    ((4, 16, 16), 0.25, 0.25, 4), ((5, 7, 9), 0.25, 0.5, 2), ((16, 8, 12), 0.4, 0.1, 1), ((1, 4, 4), 1.0, 1.0, 4)])
def test_filter_equals_diffusers(method, shape, spatial, temporal, order):
    expected = diffusers_filter(shape, method, spatial, temporal, order)
    ours = frequency_filter((2, 4, *shape), method, spatial, temporal, order)
    assert ours.shape == shape and ours.dtype == torch.float32
    assert torch.equal(ours.expand_as(expected), expected)
    assert 0 < ours.sum() < ours.numel() or method == "ideal"


def test_box_filter_against_plain_python():
    frames, height, width, spatial, temporal = 6, 8, 10, 0.3, 0.5
    ours = frequency_filter((frames, height, width), "box", spatial, temporal)
    for f in range(frames):
        for h in range(height):
            for w in range(width):
                inside = (abs(2 * f / frames - 1) <= temporal and abs(2 * h / height - 1) <= spatial
                          and abs(2 * w / width - 1) <= spatial)
                assert ours[f, h, w].item() == (1.0 if inside else 0.0), (f, h, w)
    assert ours.sum() == 3 * 3 * 3  # f in 2..4, h in 3..5, w in 4..6: zero frequency at the centre


@pytest.mark.parametrize("options, message", [
    (FreeInitOptions(iterations=0), "from 1 (plain sampling) to 10 iterations"),
    (FreeInitOptions(iterations=11), "from 1 (plain sampling) to 10 iterations"),
    (FreeInitOptions(method="sinc"), "unknown FreeInit filter 'sinc'; known: butterworth, gaussian, ideal, box"),
    (FreeInitOptions(spatial_stop=0), "spatial stop frequency must be in (0, 1], got 0"),
    (FreeInitOptions(temporal_stop=1.5), "temporal stop frequency must be in (0, 1], got 1.5"),
    (FreeInitOptions(order=0), "order must be a whole number of at least 1"),
])
def test_bad_options_fail_in_one_line_before_sampling(options, message):
    def run(noise, steps):
        raise AssertionError("sampled despite bad options")

    with pytest.raises(KinemaError) as error:
        free_init_sample(run, torch.zeros(SHAPE), make_scheduler("ddim"), options, STEPS,
                         seeded_fresh_noise(SHAPE, SEEDS))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_scheduler_without_noise_schedule_fails_before_sampling():
    def run(noise, steps):
        raise AssertionError("sampled with a scheduler FreeInit cannot use")

    with pytest.raises(KinemaError, match="FlowMatchEulerDiscreteScheduler has none"):
        free_init_sample(run, torch.zeros(SHAPE), FlowMatchEulerDiscreteScheduler(), FreeInitOptions(iterations=2),
                         STEPS, seeded_fresh_noise(SHAPE, SEEDS))


def diffusers_reinit(scheduler_name, clean, noise, seed, options, iteration=1, steps=STEPS):
    """diffusers' `_apply_free_init` on a bare mixin: the latents it starts iteration `iteration` from and the
    timesteps it sets. It draws its fresh noise from `generator` in one call of the full shape."""
    mixin = FreeInitMixin()
    mixin.enable_free_init(num_iters=options.iterations, use_fast_sampling=options.fast_sampling,
                           method=options.method, order=options.order, spatial_stop_frequency=options.spatial_stop,
                           temporal_stop_frequency=options.temporal_stop)
    mixin.scheduler = make_scheduler(scheduler_name)
    # As in the pipeline, whose earlier run set them: sigma schedulers (DPM-Solver, UniPC) look the diffusion
    # timestep up among the set timesteps, and a fresh one's sigmas are not yet in the timesteps' order.
    mixin.scheduler.set_timesteps(steps)
    mixin._free_init_initial_noise = noise.clone()
    return mixin._apply_free_init(clean.clone(), iteration, steps, torch.device("cpu"), clean.dtype,
                                  torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpmpp_2m", "unipc", "pndm"])
@pytest.mark.parametrize("method", ["butterworth", "gaussian", "ideal"])
def test_reinitialize_noise_equals_diffusers(scheduler_name, method):
    gen = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    options = FreeInitOptions(iterations=2, method=method, temporal_stop=0.5)
    expected, _ = diffusers_reinit(scheduler_name, clean, noise, seed=5, options=options)
    fresh = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    low_pass = frequency_filter(SHAPE, method, options.spatial_stop, options.temporal_stop, options.order)
    ours = reinitialize_noise(clean, noise, fresh, make_scheduler(scheduler_name), low_pass)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    # Both parts count: the clean latents' low frequencies and the fresh noise's high ones.
    assert (reinitialize_noise(clean + 1, noise, fresh, make_scheduler(scheduler_name), low_pass)
            - ours).abs().max() > 1e-3
    assert (reinitialize_noise(clean, noise, -fresh, make_scheduler(scheduler_name), low_pass)
            - ours).abs().max() > 0.1


def test_reinitialize_noise_in_half_precision_and_bad_shapes():
    gen = torch.Generator().manual_seed(1)
    clean, noise, fresh = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    scheduler, low_pass = make_scheduler("ddim"), frequency_filter(SHAPE)
    full = reinitialize_noise(clean, noise, fresh, scheduler, low_pass)
    half = reinitialize_noise(clean.half(), noise.half(), fresh.half(), scheduler, low_pass)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, rtol=0, atol=1e-2)
    with pytest.raises(KinemaError, match=r"fresh noise has shape \(2, 4, 4, 8, 4\)"):
        reinitialize_noise(clean, noise, fresh[..., :4], scheduler, low_pass)
    with pytest.raises(KinemaError, match="build it with frequency_filter"):
        reinitialize_noise(clean, noise, fresh, scheduler, low_pass[:2])


def test_fast_sampling_steps_equal_diffusers():
    clean = noise = torch.zeros(1, 4, 4, 8, 8)
    for iterations, steps in [(3, 10), (4, 3), (2, 25)]:
        options = FreeInitOptions(iterations=iterations, fast_sampling=True)
        for iteration in range(iterations):
            _, timesteps = diffusers_reinit("ddim", clean, noise, 0, options, iteration, steps)
            assert options.steps_at(iteration, steps) == len(timesteps)
        assert FreeInitOptions(iterations=iterations).steps_at(0, steps) == steps


def test_seeded_fresh_noise_continues_each_videos_generator():
    fresh = seeded_fresh_noise(SHAPE, SEEDS)
    generator = torch.Generator().manual_seed(SEEDS[1])
    draws = [torch.randn(SHAPE[1:], generator=generator) for _ in range(3)]
    assert torch.equal(initial_noise(SHAPE, SEEDS)[1], draws[0])
    assert torch.equal(fresh(2)[1], draws[2]) and torch.equal(fresh(1)[1], draws[1])
    with pytest.raises(KinemaError, match="iterations 1 and later"):
        fresh(0)


# --- a whole run against AnimateDiffPipeline.enable_free_init (on test_parity.py's pair of pipelines) ---

def diffusers_free_init(pipe, options):
    """The pipeline draws the initial noise and then FreeInit's fresh noise from one generator per video."""
    cond, uncond = embeddings()
    pipe.scheduler = make_scheduler("ddim")
    pipe.enable_free_init(num_iters=options.iterations, use_fast_sampling=options.fast_sampling,
                          method=options.method, order=options.order,
                          spatial_stop_frequency=options.spatial_stop,
                          temporal_stop_frequency=options.temporal_stop)
    try:
        with torch.no_grad():
            return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=FRAMES,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=16, width=16,
                        generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="latent",
                        return_dict=False)[0]
    finally:
        pipe.disable_free_init()


def kinema_free_init(video, options):
    cond, uncond = embeddings()
    scheduler, denoiser = make_scheduler("ddim"), UNetDenoiser(video)
    finished = []

    def run(noise, steps):
        return sample(denoiser, scheduler, noise, UNetDenoiser.conditioning(cond), UNetDenoiser.conditioning(uncond),
                      steps, GUIDANCE, progress=False)

    with torch.no_grad():
        latents = free_init_sample(run, initial_noise(SHAPE, SEEDS), scheduler, options, STEPS,
                                   seeded_fresh_noise(SHAPE, SEEDS),
                                   callback=lambda iteration, result: finished.append((iteration, result)))
    assert [i for i, _ in finished] == list(range(options.iterations))
    return latents, finished


def test_free_init_run_equals_diffusers_animatediff_pipeline(pair):  # noqa: F811
    # Three iterations (the third's fresh noise is each generator's third draw) under the coarse-to-fine schedule
    # (1, 2 then 3 steps): as many UNet calls as two full iterations, and every part of the rule in play.
    pipe, video = pair
    options = FreeInitOptions(iterations=3, fast_sampling=True)
    expected = diffusers_free_init(pipe, options)
    ours, finished = kinema_free_init(video, options)
    assert ours.shape == expected.shape == SHAPE
    difference = (ours - expected).abs().max().item()
    print(f"max abs difference {difference:.3g}, latents' mean abs {expected.abs().mean():.3g}")
    assert difference <= 1e-4
    # Each run counts: every one ends away from the one before, and the last one is the result.
    for (_, earlier), (_, later) in zip(finished, finished[1:], strict=False):
        assert (later - earlier).abs().mean().item() > 0.5
    assert torch.equal(finished[-1][1], ours)


def test_sigma_schedulers_reinitialize_in_unit_variance():
    # kinema's rule depends on the noise schedule alone, so Euler (sigma units in its add_noise) gives what DDIM
    # gives: unit-variance noise for `sample`, which scales it by init_noise_sigma itself.
    gen = torch.Generator().manual_seed(2)
    clean, noise, fresh = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    low_pass = frequency_filter(SHAPE)
    ddim = reinitialize_noise(clean, noise, fresh, make_scheduler("ddim"), low_pass)
    assert torch.equal(reinitialize_noise(clean, noise, fresh, make_scheduler("euler"), low_pass), ddim)
    assert 0.9 < ddim.std().item() < 1.1
