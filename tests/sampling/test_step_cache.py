"""Step caching (kinema.sampling.step_cache) and CFG truncation in the sampling loop.

Off is today's path bit for bit; a shallow pass fed the deep features of its own input reproduces the full forward
(features taken from diffusers' forward by hooks, for the UNet, and from the blocks' own inputs and outputs, for the
DiT); on the tiny models caching stays near the uncached result while really skipping the deep blocks; truncated
guidance runs batch B after its cut and equals a loop written out by hand.
"""

import logging

import pytest
import torch
from sampling.test_sampling import Counting
from tiny_models import perturb, tiny_video_unet

from kinema.bundled import bundled_model_path
from kinema.errors import KinemaError
from kinema.models.video_dit import VideoDiT
from kinema.models.video_dit_blocks import easyanimate_v3_skip_pairs, uvit_skip_pairs
from kinema.sampling.context import ContextDenoiser, ContextOptions
from kinema.sampling.denoisers import DiTDenoiser, UNetDenoiser
from kinema.sampling.guidance import guided_steps
from kinema.sampling.loop import initial_noise, sample
from kinema.sampling.schedulers import make_scheduler
from kinema.sampling.step_cache import StepCache, cached_block_span

SHAPE = (2, 4, 2, 8, 8)  # B, C, F, H, W for the tiny video UNet: small, as its forwards are most of this file's time
T = torch.tensor(500)


@pytest.fixture(scope="module")
def moving_unet(unet2d):
    """The tiny video UNet with perturbed motion modules, so frames interact; shared by this module's tests (none
    changes it)."""
    torch.manual_seed(0)
    model = tiny_video_unet(unet2d)
    for _, module in model.motion_modules():
        perturb(module, seed=4, scale=0.1)
    return model


@pytest.fixture(scope="module")
def tiny_dit():
    """The bundled kinema-tiny transformer (6 blocks, skips (1, 4) and (0, 5)): trained weights."""
    return VideoDiT.from_pretrained(bundled_model_path("kinema-tiny") / "transformer").eval()


def unet_texts(batch=SHAPE[0], seed=3):
    gen = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(batch, 7, 32, generator=gen), torch.randn(batch, 7, 32, generator=gen)
    return UNetDenoiser.conditioning(cond), UNetDenoiser.conditioning(uncond)


def dit_inputs(model, batch=1, frames=4, seed=3):
    """Noise `(B, 8, F, 8, 8)` and the text-to-video (cond, uncond) of kinema-tiny: random text states, the inpaint
    latents of nothing kept (zeros stand in for the VAE's)."""
    gen = torch.Generator().manual_seed(seed)
    channels = model.config["in_channels"] // 3
    inpaint = torch.zeros(batch, 2 * channels, frames, 8, 8)
    text = torch.randn(2, batch, 32, model.config["caption_channels"], generator=gen)
    cond, uncond = (DiTDenoiser.conditioning(states, inpaint_latents=inpaint) for states in text)
    return initial_noise((batch, channels, frames, 8, 8), seeds=list(range(batch))), cond, uncond


def run(denoiser, noise, cond, uncond, steps=6, guidance=5.0, family="animatediff", **options):
    with torch.no_grad():
        return sample(denoiser, make_scheduler("ddim", family), noise, cond, uncond, steps, guidance,
                      progress=False, **options)


def relative_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


class CallCounter:
    """Counts the forward calls of named submodules through forward hooks."""

    def __init__(self, model, names):
        self.calls = dict.fromkeys(names, 0)
        self.handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name):
        def count(module, inputs, output):
            self.calls[name] += 1
        return count

    def remove(self):
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------- off is today's path


def test_interval_one_and_none_are_bit_identical_to_plain_sampling(moving_unet, tiny_dit):
    cond, uncond = unet_texts()
    noise = initial_noise(SHAPE, seeds=[1, 2])
    plain = run(UNetDenoiser(moving_unet), noise, cond, uncond, steps=4)
    for options in ({"cache_interval": None, "cfg_truncation": None}, {"cache_interval": 1, "cfg_truncation": 1.0}):
        assert torch.equal(run(UNetDenoiser(moving_unet), noise, cond, uncond, steps=4, **options), plain), options
    noise, cond, uncond = dit_inputs(tiny_dit)
    plain = run(DiTDenoiser(tiny_dit), noise, cond, uncond, steps=3, family="easyanimate")
    assert torch.equal(run(DiTDenoiser(tiny_dit), noise, cond, uncond, steps=3, family="easyanimate",
                           cache_interval=1, cfg_truncation=1.0), plain)


def test_a_full_step_under_the_cache_equals_the_plain_forward(moving_unet, tiny_dit):
    # The UNet's cached path has its own written-out forward: on a full step it runs diffusers' calls in order.
    x, text = torch.randn(SHAPE), torch.randn(SHAPE[0], 7, 32)
    with torch.no_grad():
        for depth in (1, 2):
            out, deep = moving_unet.forward_deep_cached(x, T, text, depth=depth)
            assert torch.equal(out, moving_unet(x, T, text))
            assert deep.shape == ((2, 64, 2, 8, 8) if depth == 1 else (2, 64, 2, 4, 4))
        noise, cond, _ = dit_inputs(tiny_dit)
        cache = StepCache(interval=2)
        with cache.step(0, cond):
            cached = tiny_dit(noise, T, **cond)
        assert torch.equal(cached, tiny_dit(noise, T, **cond)) and cache.full_calls == 1


# ---------------------------------------------------------------- the shallow pass is wired right


@pytest.mark.parametrize("depth", [1, 2])
def test_shallow_unet_pass_fed_the_deep_features_of_its_input_equals_diffusers_forward(moving_unet, depth):
    # Independent of kinema's split: the deep features are what diffusers' own forward feeds the outer up blocks,
    # caught by a hook on the up block before them (depth 2 on this 2-level UNet: the mid block's output).
    x, text = torch.randn(SHAPE), torch.randn(SHAPE[0], 7, 32)
    unet = moving_unet.unet
    feeder = unet.up_blocks[len(unet.up_blocks) - depth - 1] if depth < len(unet.up_blocks) else unet.mid_block
    caught = []
    handle = feeder.register_forward_hook(lambda module, inputs, output: caught.append(output))
    with torch.no_grad():
        reference = moving_unet(x, T, text)
        handle.remove()
        deep = caught[0].reshape(2, 2, *caught[0].shape[1:]).transpose(1, 2)  # (B*F, C, h, w) -> (B, C, F, h, w)
        counter = CallCounter(moving_unet, ["unet.mid_block", "unet.down_blocks.1", "unet.up_blocks.1"])
        shallow, given = moving_unet.forward_deep_cached(x, T, text, depth=depth, deep_features=deep)
        counter.remove()
    assert given is deep
    # The same kernels on the same numbers: equal to float rounding (exactly, on this machine).
    torch.testing.assert_close(shallow, reference, atol=1e-6, rtol=0)
    assert counter.calls == {"unet.mid_block": 0, "unet.down_blocks.1": depth - 1, "unet.up_blocks.1": 1}
    with torch.no_grad():  # and the features are used: others give another output
        assert not torch.allclose(moving_unet.forward_deep_cached(x, T, text, depth=depth,
                                                                  deep_features=deep * 1.5)[0], reference)


def test_shallow_dit_pass_fed_the_residual_of_its_input_equals_the_full_forward(tiny_dit):
    # The residual is read off the plain forward by hooks on the span's first and last blocks: independent of
    # how the model keeps it.
    noise, cond, _ = dit_inputs(tiny_dit)
    first, last = cached_block_span(6, tiny_dit.skip_pairs)
    assert (first, last) == (1, 4)
    blocks = tiny_dit.transformer_blocks
    seen = {}
    handles = [blocks[first].register_forward_pre_hook(lambda module, args: seen.update(entry=args[0])),
               blocks[last].register_forward_hook(lambda module, args, output: seen.update(exit=output))]
    with torch.no_grad():
        reference = tiny_dit(noise, T, **cond)
        for handle in handles:
            handle.remove()
        cache = StepCache(interval=2)
        with cache.step(0, cond):
            tiny_dit(noise * 0.5, T, **cond)  # a full step on another input, so its residual is not the one used
        cache.keep(0, tuple(noise.shape), seen["exit"] - seen["entry"])
        counter = CallCounter(tiny_dit, [f"transformer_blocks.{i}" for i in range(6)])
        with cache.step(1, cond):
            shallow = tiny_dit(noise, T, **cond)
        counter.remove()
    torch.testing.assert_close(shallow, reference, atol=1e-5, rtol=0)  # (x + r) vs x + r computed in blocks
    assert counter.calls == {f"transformer_blocks.{i}": int(i in (0, 5)) for i in range(6)}
    assert (cache.full_calls, cache.reused_calls) == (1, 1)


# ---------------------------------------------------------------- sampling with caching on


def test_cached_unet_sampling_stays_close_and_skips_the_deep_blocks(moving_unet):
    cond, uncond = unet_texts()
    noise = initial_noise(SHAPE, seeds=[1, 2])
    reference = run(UNetDenoiser(moving_unet), noise, cond, uncond, steps=6)
    names = ["unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0", "unet.up_blocks.1"]
    for interval, full_steps in ((2, 3), (3, 2)):
        counter = CallCounter(moving_unet, names)
        cached = run(UNetDenoiser(moving_unet), noise, cond, uncond, steps=6, cache_interval=interval)
        counter.remove()
        deep = {name: full_steps for name in names[1:4]}
        assert counter.calls == {"unet.down_blocks.0": 6, **deep, "unet.up_blocks.1": 6}
        # Measured 0.024 (interval 2) and 0.028 (3) relative L2; for scale, 3 instead of 6 steps moves it by 0.53.
        # Twice the measured figure leaves room for other seeds and BLAS kernels.
        assert relative_l2(cached, reference) < 0.06, interval
        assert not torch.equal(cached, reference)


def test_cached_dit_sampling_stays_close_and_skips_the_middle_blocks(tiny_dit):
    noise, cond, uncond = dit_inputs(tiny_dit)
    reference = run(DiTDenoiser(tiny_dit), noise, cond, uncond, steps=8, family="easyanimate")
    names = [f"transformer_blocks.{i}" for i in range(6)]
    counter = CallCounter(tiny_dit, names)
    cached = run(DiTDenoiser(tiny_dit), noise, cond, uncond, steps=8, family="easyanimate", cache_interval=2)
    counter.remove()
    assert counter.calls == {name: 8 if name[-1] in "05" else 4 for name in names}
    # Measured 0.14 relative L2 (interval 3: 0.27); for scale, 4 instead of 8 steps moves it by 0.53. The deep
    # blocks of a trained model (4 of 6 here) move more from step to step than the tiny UNet's random ones.
    assert 0 < relative_l2(cached, reference) < 0.25


def test_a_compiled_dit_under_the_cache_compiles_once_and_equals_eager(tmp_path):
    # Traced, the cache's counters and entries became guards: each call recompiled until dynamo's limit (9 graphs
    # for 8 steps), then ran eagerly.
    from torch._dynamo.testing import CompileCounter

    from kinema.models.optimize import compile_model

    model = VideoDiT.from_pretrained(bundled_model_path("kinema-tiny") / "transformer").eval()
    noise, cond, uncond = dit_inputs(model)
    eager = run(DiTDenoiser(model), noise, cond, uncond, steps=8, family="easyanimate", cache_interval=2)
    torch._dynamo.reset()
    counter = CompileCounter()
    try:
        compile_model(model, cache_dir=tmp_path, backend=counter)
        compiled = run(DiTDenoiser(model), noise, cond, uncond, steps=8, family="easyanimate", cache_interval=2)
        first = counter.frame_count
        run(DiTDenoiser(model), noise * 0.5, cond, uncond, steps=8, family="easyanimate", cache_interval=2)
    finally:
        torch._dynamo.reset()
    assert first <= 4, first  # the full and the reuse step's graphs, split around the cache's bookkeeping
    assert counter.frame_count == first
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_reuse_is_kept_per_context_window(moving_unet):
    # Static windows are the same every step, so each keeps its own features: a reuse step on the same input
    # reproduces the full step exactly, which it could not if a window took another's features.
    cond, _ = unet_texts()
    x = torch.randn(2, 4, 3, 8, 8)
    windows = ContextDenoiser(UNetDenoiser(moving_unet), ContextOptions(2, 1, schedule="static"), frames=3, steps=4)
    cache = StepCache(interval=2)
    with torch.no_grad():
        with cache.step(0, cond):
            full = windows(x, T, cond)
        with cache.step(1, cond):
            reused = windows(x, T, cond)
        with cache.step(1, cond):
            other = windows(x * 0.5, T, cond)
    assert (cache.full_calls, cache.reused_calls) == (2, 4)  # windows [0, 1] and [1, 2]
    assert torch.equal(reused, full) and not torch.equal(other, full)


def test_uniform_context_windows_turn_caching_off_and_say_why(moving_unet, caplog):
    cond, uncond = unet_texts()
    noise = initial_noise((2, 4, 3, 8, 8), seeds=[1, 2])
    windows = ContextDenoiser(UNetDenoiser(moving_unet), ContextOptions(2, 1), frames=3, steps=2)
    plain = run(windows, noise, cond, uncond, steps=2)
    with caplog.at_level(logging.WARNING, logger="kinema.sampling.loop"):
        cached = run(windows, noise, cond, uncond, steps=2, cache_interval=2)
    assert torch.equal(cached, plain)
    assert "step caching off: " in caplog.text and "uniform context schedule moves the windows" in caplog.text


def test_other_conditioning_or_batch_forces_a_full_step(moving_unet):
    cond, _ = unet_texts()
    x = torch.randn(SHAPE)
    cache = StepCache(interval=4)
    with torch.no_grad():
        with cache.step(0, cond):
            moving_unet(x, T, cond["encoder_hidden_states"])
        with cache.step(1, cond):
            moving_unet(x[:1], T, cond["encoder_hidden_states"][:1])  # another shape: nothing kept for it
        with cache.step(2, {"encoder_hidden_states": torch.zeros(2, 9, 32)}):  # other keys or shapes: full step
            moving_unet(x, T, torch.zeros(2, 9, 32))
        with cache.step(3, {"encoder_hidden_states": torch.zeros(2, 9, 32)}):
            moving_unet(x, T, torch.zeros(2, 9, 32))
    assert (cache.full_calls, cache.reused_calls) == (3, 1)


# ---------------------------------------------------------------- CFG truncation


def test_cfg_truncation_runs_batch_b_after_the_cut_and_equals_a_hand_written_loop(moving_unet):
    cond, uncond = unet_texts()
    noise = initial_noise(SHAPE, seeds=[1, 2])
    steps, guidance = 4, 5.0
    counting = Counting(moving_unet)
    truncated = run(counting, noise, cond, uncond, steps=steps, guidance=guidance, cfg_truncation=0.3)
    assert counting.batches == [4, 4, 2, 2]  # ceil(0.3 * 4) = 2 guided steps

    scheduler = make_scheduler("ddim", "animatediff")
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    text, negative = cond["encoder_hidden_states"], uncond["encoder_hidden_states"]
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            if index < 2:
                both = moving_unet(torch.cat([latents, latents]), t, torch.cat([negative, text]))
                eps_uncond, eps_cond = both.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            else:
                eps = moving_unet(latents, t, text)
            latents = scheduler.step(eps, t, latents).prev_sample
    assert torch.equal(truncated, latents)


def test_guided_steps_rounds_up_and_refuses_fractions_outside_zero_to_one():
    assert [guided_steps(10, f) for f in (None, 1.0, 1, 0.6, 0.61, 0.01)] == [10, 10, 10, 6, 7, 1]
    assert guided_steps(25, 0.8) == 20 and guided_steps(7, 0.7) == 5
    for bad in (0, -0.5, 1.5, True, "0.5"):
        with pytest.raises(KinemaError, match=r"cfg_truncation must be in \(0, 1\]"):
            guided_steps(10, bad)


def test_truncation_under_caching_keeps_the_conditional_half(moving_unet):
    # After the cut the features kept from the guided (2B) full step serve the conditional batch B: the reuse
    # step then equals a shallow pass fed the conditional half's own features.
    cond, uncond = unet_texts()
    x, text, negative = torch.randn(SHAPE), cond["encoder_hidden_states"], uncond["encoder_hidden_states"]
    cache = StepCache(interval=2)
    with torch.no_grad():
        with cache.step(0, cond):
            moving_unet(torch.cat([x, x]), T, torch.cat([negative, text]))
        cache.keep_conditional_half()
        with cache.step(1, cond):
            reused = moving_unet(x, T, text)
        _, own = moving_unet.forward_deep_cached(x, T, text)
        expected, _ = moving_unet.forward_deep_cached(x, T, text, deep_features=own)
    assert (cache.full_calls, cache.reused_calls) == (1, 1)
    # The conditional half of a batch of 4 vs a batch of 2: GEMM blocking moves the last bits only.
    torch.testing.assert_close(reused, expected, atol=1e-5, rtol=0)

    counting = Counting(moving_unet)
    noise = initial_noise(SHAPE, seeds=[1, 2])
    reference = run(UNetDenoiser(moving_unet), noise, cond, uncond, steps=4, cfg_truncation=0.75)
    both = run(counting, noise, cond, uncond, steps=4, cfg_truncation=0.75, cache_interval=2)
    assert counting.batches == [4, 4, 4, 2]  # full steps 0 and 2; step 3 reuses step 2's conditional half
    assert relative_l2(both, reference) < 0.06  # measured 0.024, as caching alone


# ---------------------------------------------------------------- settings


def test_cached_block_span_keeps_skips_whole():
    assert cached_block_span(6, uvit_skip_pairs(6)) == (1, 4)
    assert cached_block_span(6, uvit_skip_pairs(6), depth=2) == (2, 3)
    assert cached_block_span(28, easyanimate_v3_skip_pairs(28)) == (3, 24)
    # V3's wiring at 20 blocks is lopsided (12..8 -> 15..19): the span holds the three innermost whole.
    first, last = cached_block_span(20, easyanimate_v3_skip_pairs(20), depth=2)
    assert (first, last) == (10, 17)
    assert all((first <= s <= last) == (first <= t <= last) for s, t in easyanimate_v3_skip_pairs(20))
    with pytest.raises(KinemaError, match="no run of blocks 3 or more in from each end"):
        cached_block_span(6, uvit_skip_pairs(6), depth=3)


@pytest.mark.parametrize("options, message", [
    ({"cache_interval": 0}, "cache_interval must be a whole number >= 1 (1: no caching), got 0"),
    ({"cache_interval": 2.5}, "cache_interval must be a whole number >= 1 (1: no caching), got 2.5"),
    ({"cache_interval": 2, "cache_depth": 0}, "cache depth must be a whole number >= 1"),
    ({"cache_interval": 2, "cache_depth": 3}, "cache depth 3 is not between 1 and the UNet's 2 levels"),
    ({"cfg_truncation": 0}, "cfg_truncation must be in (0, 1]"),
], ids=["interval-0", "interval-float", "depth-0", "depth-too-deep", "truncation-0"])
def test_bad_settings_are_one_line(moving_unet, options, message):
    cond, uncond = unet_texts()
    with pytest.raises(KinemaError) as err:
        run(UNetDenoiser(moving_unet), initial_noise(SHAPE, seeds=[1, 2]), cond, uncond, steps=2, **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_unet_features_caching_does_not_cover_are_refused(moving_unet):
    with pytest.raises(KinemaError, match="step caching runs SD1.5-style UNets only, and this call uses "
                                          "down_intrablock_additional_residuals; turn step caching off"):
        moving_unet.forward_deep_cached(torch.randn(SHAPE), T, torch.randn(2, 7, 32),
                                        down_intrablock_additional_residuals=[])
