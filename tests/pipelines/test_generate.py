"""generate(): every mode on tiny random-weight models of both families.

The references are independent of generate(): kinema's text_to_video (equal to diffusers' AnimateDiffPipeline, see
test_text_to_video.py), the families' own encoders called directly, the prompt-travel and context-window functions,
and spies on the models that record what they were given. Bad input fails before the model runs once.
"""

import copy

import numpy
import pytest
import torch
from loaders.test_stable_diffusion import write_tokenizer
from tiny_easyanimate import source_model, write_full_folder
from tiny_models import perturb, tiny_video_dit
from tiny_sd import tiny_sd_parts

import kinema.pipelines.generation as generation_module
from kinema.errors import KinemaError
from kinema.loaders.easyanimate.folder import load_easyanimate
from kinema.loaders.stable_diffusion import load_tokenizer
from kinema.models.video_unet import VideoUNet
from kinema.pipelines.animatediff import AnimateDiffFamily
from kinema.pipelines.easyanimate import EasyAnimateFamily
from kinema.pipelines.generation import generate
from kinema.pipelines.request import ContextSettings, FreeInitSettings, FreeUSettings, GenerationRequest
from kinema.sampling.prompt_travel import interpolate_states, parse_prompt_schedule
from kinema.sampling.schedulers import SCHEDULERS

SIZE = 32


class Spy:
    """Stands in for a model's forward and records every call's latents (and shape), timestep and keyword
    arguments."""

    def __init__(self, forward):
        self.calls = []
        self.forward = forward

    def __call__(self, sample, timestep, **kwargs):
        self.calls.append({"shape": tuple(sample.shape), "timestep": float(torch.as_tensor(timestep).flatten()[0]),
                           "latents": sample.detach().clone(), **kwargs})
        return self.forward(sample, timestep, **kwargs)


@pytest.fixture(scope="module")
def animatediff(tmp_path_factory):
    parts = tiny_sd_parts(seed=1)
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    video = VideoUNet.from_unet2d(parts["unet"], motion_module={"type": "temporal", "max_frames": 24})
    for _, module in video.motion_modules():
        perturb(module, seed=5, scale=0.1)  # motion modules start as the identity; give them an effect
    return AnimateDiffFamily(video.eval(), parts["vae"], parts["text_encoder"], load_tokenizer(folder))


@pytest.fixture(scope="module")
def easyanimate(tmp_path_factory):
    root = tmp_path_factory.mktemp("v3")
    write_full_folder(root, source_model())
    return EasyAnimateFamily.from_model(load_easyanimate(root), source=str(root))


def request(**kwargs) -> GenerationRequest:
    options = dict(prompt="a cat runs", negative_prompt="blurry", frames=4, height=SIZE, width=SIZE, steps=3,
                   guidance=7.5, seeds=[3])
    return GenerationRequest(**{**options, **kwargs})


def run(family, output="tensor", **kwargs):
    return generate(family, request(**kwargs), progress=False, output=output)


def spy_on(family, monkeypatch) -> Spy:
    spy = Spy(family.model.forward)
    monkeypatch.setattr(family.model, "forward", spy, raising=False)
    return spy


# ------------------------------------------------------------------------------------------ text-to-video


def test_animatediff_report_and_settings(animatediff):
    """(Frames equal to diffusers' AnimateDiffPipeline: test_text_to_video.py, whose text_to_video is generate().)"""
    result = run(animatediff, seeds=[3, 4], scheduler="euler")
    assert [s["seed"] for s in result.settings] == [3, 4]
    assert all(s["prompt"] == "a cat runs" and s["scheduler"] == "euler" for s in result.settings)
    assert result.report["mode"] == "text-to-video" and result.report["dtype"] == "float32"
    assert result.report["device"] == "cpu"  # where it ran, as the CLI prints it
    assert result.report["peak_memory_bytes"] > 0


def test_guidance_rescale_reaches_the_sampler_and_is_recorded(animatediff, monkeypatch):
    import kinema.sampling.guidance as guidance

    seen = []
    original = guidance.guided_prediction

    def spy(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs.get("rescale"))
        return original(*args, **kwargs)

    monkeypatch.setattr("kinema.sampling.loop.guided_prediction", spy)
    plain, rescaled = run(animatediff), run(animatediff, guidance_rescale=0.7)
    assert seen == [None] * 3 + [0.7] * 3
    assert rescaled.settings[0]["guidance_rescale"] == 0.7 and plain.settings[0]["guidance_rescale"] is None
    assert not torch.allclose(plain.frames, rescaled.frames, atol=1e-3)
    with pytest.raises(KinemaError, match=r"guidance_rescale must be a number from 0 to 1 .*got 1.5"):
        run(animatediff, guidance_rescale=1.5)


@pytest.mark.parametrize("extend", [False, True, "free_init"])
def test_a_samplers_step_noise_is_drawn_past_the_initial_noise(animatediff, monkeypatch, extend):
    """euler_a and lcm add noise while stepping: the generators generate() gives the sampler were seeded afresh, so
    the first step added the initial noise again (a continuation's segments with the first clip's seeds)."""
    import kinema.pipelines.generation as generation_module

    starts = []
    original = generation_module.sample

    def spy(denoiser, scheduler, latents, *args, generator=None, **kwargs):
        states = [g.get_state() for g in generator]
        next_draws = []
        for state in states:
            copy = torch.Generator().set_state(state)
            next_draws.append(torch.randn(latents.shape[1:], generator=copy))
        starts.append((latents.detach().clone(), torch.stack(next_draws)))
        return original(denoiser, scheduler, latents, *args, generator=generator, **kwargs)

    monkeypatch.setattr(generation_module, "sample", spy)
    video = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    # FreeInit's second run starts from its fresh noise, the draw after the initial noise, which the step noise
    # repeated next (correlation 0.96).
    options = {True: {"video": video, "extend_frames": 4, "overlap_frames": 2, "segment_frames": 4},
               "free_init": {"free_init": FreeInitSettings(iterations=2)}, False: {}}[extend]
    run(animatediff, scheduler="euler_a", seeds=[3, 4], steps=1, frames=4, **options)
    assert len(starts) == (2 if extend is False else 4)  # each seed's video alone, in two segments or runs
    for latents, next_draw in starts:
        scale = latents.flatten(1).std(dim=1).view(-1, 1, 1, 1, 1)  # the scheduler's init sigma
        unit = latents / scale
        for video in range(latents.shape[0]):
            correlation = torch.corrcoef(torch.stack([unit[video].flatten(), next_draw[video].flatten()]))[0, 1]
            assert abs(correlation.item()) < 0.2, f"the step noise repeats the initial noise ({correlation:.2f})"


@pytest.fixture
def family(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("family", ["animatediff", "easyanimate"], indirect=True)
def test_text_to_video_shapes_and_per_video_seeds(family):
    frames = 8
    both = run(family, frames=frames, seeds=[3, 4], steps=2)
    assert both.frames.shape == (2, frames, 3, SIZE, SIZE)
    assert both.frames.min() >= 0 and both.frames.max() <= 1
    alone = run(family, frames=frames, seeds=[4], steps=2)
    # Each seed's video is made alone, so its own settings remake it exactly: a batch of two summed in other orders
    # (up to 9/255 apart after the VAE).
    assert torch.equal(alone.frames[0], both.frames[1]) and torch.equal(alone.latents[0], both.latents[1])
    assert (both.frames[0] - both.frames[1]).abs().max() > 1e-3
    latent_frames = family.latent_frames(frames)
    side = SIZE // family.spatial_factor
    assert both.latents.shape == (2, 4, latent_frames, side, side)
    numpy = run(family, frames=frames, seeds=[4], steps=2, output="numpy").frames
    assert numpy[0].shape == (frames, SIZE, SIZE, 3) and numpy[0].dtype.name == "uint8"
    pil = run(family, frames=frames, seeds=[4], steps=2, output="pil").frames
    assert len(pil[0]) == frames and pil[0][0].size == (SIZE, SIZE)


def test_inp_text_to_video_marks_every_frame_to_generate(easyanimate, monkeypatch):
    spy = spy_on(easyanimate, monkeypatch)
    run(easyanimate, frames=8, steps=2)
    video = torch.zeros(1, 8, 3, SIZE, SIZE)
    expected, _ = easyanimate.inpaint_conditioning(video, torch.zeros(8, dtype=torch.bool), None)
    seen = spy.calls[0]["inpaint_latents"]
    torch.testing.assert_close(seen, torch.cat([expected["inpaint_latents"]] * 2))
    assert all(call.get("clip_image_embeds") is None for call in spy.calls)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampling_reads_the_model_as_its_prediction_type(easyanimate, monkeypatch, prediction_type):
    """A model that answers exactly what it is meant to predict for one clean latent video x0 samples x0, whichever
    of epsilon and v it predicts; read as the other, it does not. The oracle's maths is written here from DDPM's
    linear betas (1e-4 .. 0.02 over 1000 steps), independent of diffusers."""
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    clean = torch.randn(1, 4, easyanimate.latent_frames(8), SIZE // easyanimate.spatial_factor,
                        SIZE // easyanimate.spatial_factor, generator=torch.Generator().manual_seed(0))

    def oracle(answers):
        def forward(sample, timestep, **kwargs):
            a = alpha_bar[int(torch.as_tensor(timestep).flatten()[0])].float()
            noise = (sample - a.sqrt() * clean) / (1 - a).sqrt()
            answer = noise if answers == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * clean
            return answer.expand(sample.shape[0], -1, -1, -1, -1)
        return forward

    monkeypatch.setattr(easyanimate, "prediction_type", prediction_type)
    monkeypatch.setattr(easyanimate.model, "forward", oracle(prediction_type), raising=False)
    got = run(easyanimate, frames=8, steps=10, scheduler="ddim", output="latent").latents
    # DDIM's last step lands on alpha_bar[0] (not 1): x0 plus 1% of the noise.
    torch.testing.assert_close(got, clean, rtol=0, atol=0.05)
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    monkeypatch.setattr(easyanimate.model, "forward", oracle(other), raising=False)
    wrong = run(easyanimate, frames=8, steps=10, scheduler="ddim", output="latent").latents
    # Misread, it lands 0.23 (epsilon read as v) or 4.9 (v read as epsilon) away at the worst latent.
    assert (wrong - clean).abs().max() > 0.15


# ------------------------------------------------------------------------------------------ image-to-video


def test_animatediff_image_to_video_holds_the_first_and_last_frames(animatediff, monkeypatch):
    start = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    end = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    result = run(animatediff, image=start, end_image=end, frames=6)
    with torch.no_grad():
        known = animatediff.encode_frames(torch.stack([start, end])[None])
    torch.testing.assert_close(result.latents[:, :, 0], known[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(result.latents[:, :, -1], known[:, :, 1], rtol=0, atol=0)
    assert (result.latents[:, :, 1] - known[:, :, 0]).abs().max() > 1e-2  # the frames between are generated
    assert result.report["mode"] == "image-to-video"


def repaint_start(family, held: torch.Tensor, seed: int, steps: int) -> tuple[list[float], torch.Tensor]:
    """The timesteps a repaint sample runs and the latents it starts from, written out from their definition: the
    held video `(1, F, 3, H, W)` encoded, noised with the seed's noise to step steps - round(steps * strength)."""
    from kinema.pipelines.generation import REPAINT_START_STRENGTH
    from kinema.sampling.loop import initial_noise
    from kinema.sampling.schedulers import make_scheduler

    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(steps)
    first = steps - round(steps * REPAINT_START_STRENGTH)
    with torch.no_grad():
        clean = family.encode_frames(held)
    noise = initial_noise(clean.shape, [seed])
    timesteps = scheduler.timesteps[first:]
    return [float(t) for t in timesteps], scheduler.add_noise(clean, noise, timesteps[:1])


def test_animatediff_image_to_video_starts_from_the_held_frames(animatediff, monkeypatch):
    start = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    end = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    spy = spy_on(animatediff, monkeypatch)
    run(animatediff, image=start, end_image=end, frames=4, steps=8, guidance=1)
    # Each frame between starts as the last held frame before it: start, start, start, end.
    timesteps, latents = repaint_start(animatediff, torch.stack([start, start, start, end])[None], seed=3, steps=8)
    assert [call["timestep"] for call in spy.calls] == timesteps and len(timesteps) < 8
    torch.testing.assert_close(spy.calls[0]["latents"], latents, rtol=0, atol=1e-5)


def test_inp_image_to_video_conditions_on_the_image(easyanimate, monkeypatch):
    start = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    spy = spy_on(easyanimate, monkeypatch)
    steps = 4
    run(easyanimate, image=start, frames=8, steps=steps)
    video = torch.zeros(1, 8, 3, SIZE, SIZE)
    video[:, 0] = start
    keep = torch.zeros(8, dtype=torch.bool)
    keep[0] = True
    cond, uncond = easyanimate.inpaint_conditioning(video, keep, start[None])
    seen = spy.calls[0]
    torch.testing.assert_close(seen["inpaint_latents"], torch.cat([uncond["inpaint_latents"],
                                                                    cond["inpaint_latents"]]))
    with_image = [call.get("clip_image_embeds") is not None for call in spy.calls]
    assert with_image == [easyanimate.image_tokens_from(step, steps) for step in range(steps)]
    assert any(with_image) and not all(with_image)
    last = spy.calls[-1]
    torch.testing.assert_close(last["clip_image_embeds"], torch.cat([uncond["clip_image_embeds"],
                                                                      cond["clip_image_embeds"]]))


# ------------------------------------------------------------------------------------------ video-to-video


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_video_to_video_starts_at_the_strength(animatediff, monkeypatch, strength):
    from kinema.sampling.schedulers import make_scheduler

    video = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    spy = spy_on(animatediff, monkeypatch)
    result = run(animatediff, video=video, strength=strength, steps=4, guidance=1)
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(4)
    expected = [float(t) for t in scheduler.timesteps[4 - round(4 * strength):]]
    assert [call["timestep"] for call in spy.calls] == expected
    assert result.frames.shape == (1, 4, 3, SIZE, SIZE) and result.report["mode"] == "video-to-video"


@pytest.mark.parametrize("kwargs", [{}, {"free_init": FreeInitSettings(iterations=2)},
                                    {"video": torch.rand(4, 3, SIZE, SIZE), "strength": 0.3},
                                    {"video": torch.rand(4, 3, SIZE, SIZE), "strength": 0.01},
                                    {"seeds": [1, 2]}, {"seeds": [1, 2, 3], "video": torch.rand(4, 3, SIZE, SIZE)}])
def test_a_requests_sampling_steps_are_the_step_callbacks_generate_makes(animatediff, kwargs):
    steps = []
    made = request(steps=5, **kwargs)
    generate(animatediff, made, progress=False, callback=lambda step, timestep, latents: steps.append(step))
    assert made.sampling_steps() == len(steps) > 0  # the progress total the web app and the API show


def test_video_to_video_without_a_size_takes_the_input_videos(animatediff):
    video = torch.rand(4, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    result = generate(animatediff, GenerationRequest(prompt="a cat runs", video=video, steps=1), progress=False)
    assert result.frames.shape == (1, 4, 3, 24, 40)
    assert (result.settings[0]["height"], result.settings[0]["width"]) == (24, 40)


def test_a_request_fills_what_it_leaves_unset_from_the_model_then_the_library():
    bare = GenerationRequest(prompt="a cat runs")
    assert (bare.height, bare.width, bare.frames, bare.steps, bare.guidance) == (None,) * 5
    bare.check()  # None is "the model's default", not a bad value
    model = {"height": 64, "width": 64, "steps": 10, "scheduler": "euler"}
    filled = bare.with_defaults(model)
    assert (filled.height, filled.width, filled.frames, filled.steps, filled.guidance) == (64, 64, 16, 10, 7.5)
    assert filled.scheduler == "euler"
    assert (bare.with_defaults().height, bare.with_defaults().width, bare.with_defaults().scheduler) == (512, 512, None)
    assert GenerationRequest(steps=3, height=32).with_defaults(model).steps == 3  # what the caller set wins
    # An input video brings its size (generate() reads it) and its length; the model's steps still apply.
    video = GenerationRequest(video="in.mp4").with_defaults({**model, "frames": 8})
    assert (video.height, video.width, video.steps) == (None, None, 10)
    # The continuation overlap, in every mode (text-to-video continues past the window): the model's, else 4.
    extend = GenerationRequest(video="in.mp4", extend_frames=8)
    assert extend.with_defaults({"overlap_frames": 8}).overlap_frames == 8
    assert bare.with_defaults({"overlap_frames": 6}).overlap_frames == 6
    assert (extend.with_defaults().overlap_frames, filled.overlap_frames) == (4, 4)
    assert GenerationRequest(overlap_frames=2).with_defaults({"overlap_frames": 8}).overlap_frames == 2


# ------------------------------------------------------------------------------------------ video inpainting


def half_mask(frames: int = 1) -> torch.Tensor:
    """`(frames, SIZE, SIZE)`: the right half white (remade), the left black (held)."""
    mask = torch.zeros(frames, SIZE, SIZE)
    mask[..., SIZE // 2:] = 1
    return mask


def scaled_mean(family, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's scaled posterior mean of `(B, 3, F, H, W)` pixels in [-1, 1], called directly."""
    with torch.no_grad():
        return family.vae.encode(pixels).latent_dist.mean * family.vae.config.scaling_factor


def test_a_pixel_mask_is_v3s_mask_video_per_pixel(easyanimate):
    video = torch.rand(1, 8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    keep = half_mask(8) < 0.5  # (F, H, W): the left half kept
    cond, uncond = easyanimate.inpaint_conditioning(video, keep, None)
    pixels = video.permute(0, 2, 1, 3, 4) * 2 - 1
    kept = keep[None, None].expand(1, 3, -1, -1, -1)
    mask_video = (~kept).float()  # V3: 1 = generate, 0 = keep, on 3 channels
    masked_video = torch.where(kept, pixels, torch.tensor(-1.0))
    expected = torch.cat([scaled_mean(easyanimate, mask_video), scaled_mean(easyanimate, masked_video)], dim=1)
    torch.testing.assert_close(cond["inpaint_latents"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(uncond["inpaint_latents"], cond["inpaint_latents"])
    # A frame mask is the pixel mask that keeps or remakes whole frames.
    frames = torch.tensor([True, True, False, False, False, False, False, False])
    whole = frames[:, None, None].expand(8, SIZE, SIZE)
    torch.testing.assert_close(easyanimate.inpaint_conditioning(video, frames, None)[0]["inpaint_latents"],
                               easyanimate.inpaint_conditioning(video, whole, None)[0]["inpaint_latents"],
                               rtol=0, atol=0)
    with pytest.raises(KinemaError, match=r"keep must be a bool tensor .* or \(F, H, W\)"):
        easyanimate.inpaint_conditioning(video, keep[:, :4], None)


@pytest.mark.parametrize("family", ["animatediff", "easyanimate"], indirect=True)
def test_a_mask_holds_the_kept_latents_and_remakes_the_rest(family, monkeypatch):
    frames = 8
    video = torch.rand(frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    spy = spy_on(family, monkeypatch)
    result = run(family, video=video, mask=half_mask(), strength=1.0, frames=None, steps=3)
    with torch.no_grad():
        clean = family.encode_frames(video[None])
    half = clean.shape[-1] // 2  # the latents of the left half cover held pixels only
    torch.testing.assert_close(result.latents[..., :half], clean[..., :half], rtol=0, atol=1e-5)
    assert (result.latents[..., half:] - clean[..., half:]).abs().mean() > 0.1
    if family.inpaints:  # the model also sees the kept pixels, on both sides of guidance
        reference = family.inpaint_conditioning(video[None], half_mask(frames) < 0.5, None)[0]["inpaint_latents"]
        assert all(torch.equal(call["inpaint_latents"], torch.cat([reference] * 2)) for call in spy.calls)
    plain = run(family, video=video, strength=1.0, frames=None, steps=3)  # no mask: nothing is held
    assert (plain.latents[..., :half] - clean[..., :half]).abs().mean() > 0.1
    assert result.settings[0]["mask"] == "<Tensor>" and plain.settings[0]["mask"] is None
    # The finished frames: the kept pixels are the input's own; the remade ones, the decoded latents'.
    with torch.no_grad():
        decoded = family.decode(result.latents)
    torch.testing.assert_close(result.frames[0, ..., :SIZE // 2], video[..., :SIZE // 2], rtol=0, atol=0)
    torch.testing.assert_close(result.frames[..., SIZE // 2:], decoded[..., SIZE // 2:], rtol=0, atol=1e-6)
    assert (decoded[0, ..., :SIZE // 2] - video[..., :SIZE // 2]).abs().mean() > 0.05  # the VAE's round trip


@pytest.mark.parametrize("blur", [0, 3])
def test_the_kept_pixels_are_put_back_as_diffusers_apply_overlay_does(blur):
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from kinema.pipelines.generation import _composite

    generator = torch.Generator().manual_seed(11)
    made, video = torch.rand(1, 2, 3, SIZE, SIZE, generator=generator), torch.rand(2, 3, SIZE, SIZE,
                                                                                   generator=generator)
    remake = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    remake[0, 4:20, 8:30], remake[1, :, SIZE // 2:] = True, True
    ours = _composite(made, video, remake, blur)

    def pil(image: torch.Tensor) -> Image.Image:
        return Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy())

    processor = VaeImageProcessor()
    for index in range(2):
        mask = Image.fromarray(remake[index].byte().mul(255).numpy())
        if blur:
            mask = processor.blur(mask, blur)
        theirs = processor.apply_overlay(mask, pil(video[index]), pil(made[0, index]))
        expected = torch.from_numpy(numpy.asarray(theirs).copy()).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(ours[0, index], expected, rtol=0, atol=2.5 / 255)  # theirs: 8-bit steps
    if blur:  # feathered: the pixels either side of the edge blend, and far from it each side is its own
        assert 0.05 < (ours[0, 1, :, :, SIZE // 2 - 1] - video[1, :, :, SIZE // 2 - 1]).abs().mean()
        torch.testing.assert_close(ours[0, 1, ..., :SIZE // 2 - 3 * blur], video[1, ..., :SIZE // 2 - 3 * blur],
                                   rtol=0, atol=1 / 255)
        torch.testing.assert_close(ours[0, 1, ..., SIZE // 2 + 3 * blur:], made[0, 1, ..., SIZE // 2 + 3 * blur:],
                                   rtol=0, atol=1 / 255)
    else:
        assert torch.equal(ours[0][~remake[:, None].expand(-1, 3, -1, -1)],
                           video[~remake[:, None].expand(-1, 3, -1, -1)])


def test_a_latent_is_held_only_where_every_pixel_it_covers_is_kept(animatediff):
    from kinema.pipelines.generation import _latent_keep

    keep = torch.ones(2, SIZE, SIZE, dtype=torch.bool)
    factor = animatediff.spatial_factor
    keep[0, factor + 1, 2 * factor] = False  # one pixel of latent (0, 1, 2) is remade
    held = _latent_keep(animatediff, keep)
    assert held.shape == (2, SIZE // factor, SIZE // factor)
    assert held.sum() == held.numel() - 1 and not held[0, 1, 2]


def test_a_frame_folder_of_mixed_sizes_is_fitted_frame_by_frame_with_resize(tmp_path):
    from PIL import Image

    from kinema.pipelines.generation import _path_frames

    pixels = [numpy.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=numpy.uint8)
              for seed, (h, w) in enumerate(((24, 32), (12, 20), (24, 32)))]
    for index, frame in enumerate(pixels):  # as prompt travel's img2img_map folders hold them
        Image.fromarray(frame).save(tmp_path / f"{index:04d}.png")
    with pytest.raises(KinemaError, match=r"frames in .* differ in size; .* --resize \(resize=True\) fits each frame"):
        _path_frames(tmp_path, 24, 32, False, "the input video")
    as_tensors = [torch.from_numpy(frame).permute(2, 0, 1).float()[None] / 255 for frame in pixels]
    fitted = _path_frames(tmp_path, 16, 16, True, "the input video")
    expected = torch.cat([torch.nn.functional.interpolate(frame, size=(16, 16), mode="bicubic", antialias=True)
                          .clamp(0, 1) for frame in as_tensors])
    torch.testing.assert_close(fitted, expected, rtol=0, atol=1e-6)
    own_size = _path_frames(tmp_path, None, None, True, "the input video")  # the first frame's size
    assert own_size.shape == (3, 3, 24, 32)
    torch.testing.assert_close(own_size[0], as_tensors[0][0], rtol=0, atol=0)


def test_mask_files_and_the_refusals_before_any_denoising(animatediff, tmp_path, monkeypatch):
    from PIL import Image

    from kinema.data.video_io import write_video

    video = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    image = tmp_path / "mask.png"
    Image.fromarray((half_mask()[0] * 255).byte().numpy()).save(image)
    from_file = run(animatediff, video=video, mask=str(image), strength=1.0, frames=None, steps=2)
    from_tensor = run(animatediff, video=video, mask=half_mask(), strength=1.0, frames=None, steps=2)
    torch.testing.assert_close(from_file.latents, from_tensor.latents, rtol=0, atol=0)
    assert from_file.settings[0]["mask"] == str(image)
    moving = torch.zeros(4, 3, SIZE, SIZE)
    moving[..., SIZE // 2:] = 1
    write_video(moving * 2 - 1, tmp_path / "mask.mp4", fps=8)  # one mask frame per input frame
    run(animatediff, video=video, mask=str(tmp_path / "mask.mp4"), strength=1.0, frames=None, steps=1)

    spy = spy_on(animatediff, monkeypatch)
    for mask, message in ((half_mask(3), r"the mask has 3 frames and the input video 4: give one mask image"),
                          (torch.zeros(SIZE, SIZE), r"the mask marks no pixel to remake"),
                          (torch.ones(16, 16), r"the mask is 16x16 but the video is 32x32; pass --resize"),
                          (torch.ones(1, 1, 2, SIZE, SIZE), r"the mask must be a path, a PIL image, or an \(H, W\)"),
                          (str(tmp_path / "missing.png"), r"missing.png")):
        with pytest.raises(KinemaError, match=message):
            run(animatediff, video=video, mask=mask, strength=1.0, frames=None, steps=1)
    assert spy.calls == []
    resized = run(animatediff, video=video, mask=torch.ones(16, 16), resize=True, strength=1.0, frames=None, steps=1)
    assert resized.frames.shape == (1, 4, 3, SIZE, SIZE)
    with pytest.raises(KinemaError, match=r"a mask \(--mask\) marks the pixels of an input video to remake"):
        request(mask=half_mask()).check()
    with pytest.raises(KinemaError, match=r"a mask \(--mask\) marks pixels of the input video.s own frames to remake, "
                                          r"and extend_frames appends new ones: give one of them"):
        request(video=video, extend_frames=4, mask=half_mask()).check()
    for blur in (-1, float("nan"), float("inf"), 65, True, "2"):
        with pytest.raises(KinemaError, match=r"mask_blur is the radius in pixels .* from 0 \(a hard edge\) to 64"):
            request(video=video, mask=half_mask(), mask_blur=blur).check()
    with pytest.raises(KinemaError, match=r"mask_blur \(--mask-blur\) feathers the edge of a video-to-video mask: "
                                          r"give the mask \(--mask\) too"):
        request(video=video, mask_blur=4).check()


# ------------------------------------------------------------------------------------------ continuation


def test_animatediff_extend_keeps_the_video_and_cross_fades(animatediff):
    video = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    result = run(animatediff, video=video, extend_frames=5, overlap_frames=2, segment_frames=4, steps=2)
    assert result.frames.shape == (1, 11, 3, SIZE, SIZE) and result.settings[0]["frames"] == 11
    torch.testing.assert_close(result.frames[0, :4], video[:4], rtol=0, atol=0)
    assert result.report["segments"] == 3  # 5 new frames, 2 per 4-frame segment after a 2-frame overlap
    assert result.report["mode"] == "extend"
    # The first segment holds the input's last 2 frames' latents, so its first 2 frames decode to them; they are
    # cross-faded into the input with weights 1/3, 2/3.
    with torch.no_grad():
        held = animatediff.decode(animatediff.encode_frames(video[None, 4:6]))[0]
    ramp = torch.tensor([1 / 3, 2 / 3]).view(2, 1, 1, 1)
    torch.testing.assert_close(result.frames[0, 4:6], video[4:6] * (1 - ramp) + held * ramp, rtol=0, atol=1e-5)


def test_animatediff_extend_starts_each_segment_from_the_last_frames(animatediff, monkeypatch):
    video = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    spy = spy_on(animatediff, monkeypatch)
    run(animatediff, video=video, extend_frames=2, overlap_frames=2, segment_frames=4, steps=8, guidance=1)
    held = video[None, [4, 5, 5, 5]]  # the last 2 frames, then the last one held
    timesteps, latents = repaint_start(animatediff, held, seed=3 + 7919, steps=8)  # the first segment's seed
    assert [call["timestep"] for call in spy.calls] == timesteps
    torch.testing.assert_close(spy.calls[0]["latents"], latents, rtol=0, atol=1e-5)


def test_freeinit_off_for_frames_held_by_repaint_is_said_once(animatediff, caplog):
    video = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with caplog.at_level("WARNING", logger="kinema.pipelines.generation"):
        result = run(animatediff, video=video, extend_frames=5, overlap_frames=2, segment_frames=4, steps=2,
                     free_init=FreeInitSettings(iterations=2))
    assert result.report["segments"] == 3
    assert [record.message for record in caplog.records].count(
        "FreeInit is off: sampling starts from given frames (video-to-video, or the held frames of a model without "
        "inpaint channels), not from noise") == 1


def test_inp_extend_conditions_each_segment_on_the_last_frames(easyanimate, monkeypatch):
    video = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    keeps = []
    original = easyanimate.inpaint_conditioning

    def record(frames, keep, clip_image):
        keeps.append((frames.clone(), keep.clone()))
        return original(frames, keep, clip_image)

    monkeypatch.setattr(easyanimate, "inpaint_conditioning", record)
    result = run(easyanimate, video=video, extend_frames=8, overlap_frames=4, segment_frames=8, steps=2)
    assert result.frames.shape == (1, 16, 3, SIZE, SIZE)
    torch.testing.assert_close(result.frames[0, :4], video[:4], rtol=0, atol=0)
    assert len(keeps) == 2
    frames, keep = keeps[0]
    assert keep.tolist() == [True] * 4 + [False] * 4
    torch.testing.assert_close(frames[0, :4], video[4:])  # the first segment's kept frames are the input's last 4


@pytest.mark.timeout(120)  # without the refusal the segment loop makes no progress: it hung rather than failed
def test_inp_text_to_video_past_the_window_continues(easyanimate, monkeypatch):
    monkeypatch.setattr(type(easyanimate), "max_frames", property(lambda self: 8))
    result = run(easyanimate, frames=16, steps=2)
    assert result.frames.shape == (1, 16, 3, SIZE, SIZE)
    assert result.report["segments"] == 3  # 8 frames, then 4 new frames per segment after 4 overlapping
    # A request may leave segment_frames to the model's window, so only generate can refuse an overlap that fills it.
    with pytest.raises(KinemaError, match=r"overlap_frames \(8: .*\) must be below the segment length \(8 frames\)"):
        run(easyanimate, frames=16, steps=2, overlap_frames=8)


# ------------------------------------------------------------------------------------------ context windows


def test_context_windows_bound_what_the_model_sees(animatediff, monkeypatch):
    spy = spy_on(animatediff, monkeypatch)
    context = ContextSettings(length=4, overlap=2, schedule="static")
    result = run(animatediff, frames=10, steps=2, context=context)
    assert result.frames.shape == (1, 10, 3, SIZE, SIZE)
    assert {call["shape"][2] for call in spy.calls} == {4}
    assert result.report["windows"] == 4  # 0-3, 2-5, 4-7, 6-9


def test_one_window_over_every_frame_is_plain_sampling(animatediff):
    plain = run(animatediff, frames=6, steps=2)
    windowed = run(animatediff, frames=6, steps=2, context=ContextSettings(length=6, overlap=2))
    torch.testing.assert_close(windowed.frames, plain.frames, rtol=0, atol=1e-6)


def test_what_guidance_1_turns_off_is_said_to_do_nothing(animatediff, caplog):
    with caplog.at_level("WARNING", logger="kinema.pipelines.generation"):
        off = run(animatediff, frames=4, steps=1, guidance=1.0, negative_prompt="blurry", guidance_rescale=0.7)
    assert "guidance 1 turns classifier-free guidance off, so the negative prompt and guidance_rescale change " \
           "nothing" in caplog.text
    # Independent of the warning: the video is the one without them.
    torch.testing.assert_close(off.frames, run(animatediff, frames=4, steps=1, guidance=1.0).frames, rtol=0, atol=0)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kinema.pipelines.generation"):
        run(animatediff, frames=4, steps=1, guidance=3.0, negative_prompt="blurry")
    assert "turns classifier-free guidance off" not in caplog.text


def test_context_options_on_a_video_of_one_window_are_said_to_do_nothing(animatediff, caplog):
    for options in ({"closed_loop": True}, {"freenoise": True}, {"fuse": "pyramid"}):
        caplog.clear()
        with caplog.at_level("WARNING", logger="kinema.pipelines.generation"):
            run(animatediff, frames=4, steps=1, context=ContextSettings(length=4, overlap=2, **options))
        assert "the context windows change nothing: these 4 frames fit in one window of 4, sampled as one clip" in \
               caplog.text, options
    caplog.clear()
    with caplog.at_level("WARNING", logger="kinema.pipelines.generation"):
        run(animatediff, frames=6, steps=1, context=ContextSettings(length=4, overlap=2, closed_loop=True))
    assert "change nothing" not in caplog.text


def test_context_windows_on_the_dit_slice_inpaint_latents(easyanimate, monkeypatch):
    spy = spy_on(easyanimate, monkeypatch)
    context = ContextSettings(length=16, overlap=8, schedule="static")
    run(easyanimate, frames=24, steps=2, context=context)
    assert {call["shape"][2] for call in spy.calls} == {4}  # 16 pixel frames = 4 latent frames
    assert {call["inpaint_latents"].shape[2] for call in spy.calls} == {4}


# ------------------------------------------------------------------------------------------ prompt travel


def test_prompt_travel_gives_each_frame_its_interpolated_text(animatediff, monkeypatch):
    spy = spy_on(animatediff, monkeypatch)
    schedule = {"0": "a cat runs", "4": "a dog sleeps"}
    run(animatediff, prompt=schedule, frames=6, steps=1)
    seen = spy.calls[0]["encoder_hidden_states"]  # (2B, F, L, D): unconditional rows first
    assert seen.shape[:2] == (2, 6)
    parsed = parse_prompt_schedule(schedule, 6)
    keyframes = animatediff.encode_text(parsed.prompts())["encoder_hidden_states"]
    torch.testing.assert_close(seen[1], interpolate_states(keyframes, parsed, 6))
    negative = animatediff.encode_text(["blurry"])["encoder_hidden_states"]
    torch.testing.assert_close(seen[0], negative.expand(6, -1, -1))


def test_a_continuation_gives_each_segment_its_frames_of_the_whole_videos_schedule(animatediff, monkeypatch):
    # 6 given frames extended to 12 in segments of 4 overlapping by 2 (frames 4-7, 6-9, 8-11): the schedule, held
    # and looped, runs over all 12 frames, as it would for a video made in one go.
    schedule = {"0": "a cat runs", "9": "a dog sleeps"}
    blend = {"prompt_hold": 0.3, "prompt_loop": True, "interpolation": "slerp"}
    spy = spy_on(animatediff, monkeypatch)
    run(animatediff, prompt=schedule, video=torch.rand(6, 3, SIZE, SIZE), extend_frames=6, overlap_frames=2,
        segment_frames=4, steps=4, **blend)
    parsed = parse_prompt_schedule(schedule, 12, "slerp", 0.3, True)
    whole = interpolate_states(animatediff.encode_text(parsed.prompts())["encoder_hidden_states"], parsed, 12)
    found = []
    for call in spy.calls:
        text = call["encoder_hidden_states"][1]
        starts = [start for start in (4, 6, 8) if torch.allclose(text, whole[start:start + 4], atol=1e-6)]
        assert len(starts) == 1, "a segment's text is no window of the whole video's schedule"
        if not found or found[-1] != starts[0]:
            found.append(starts[0])
    assert found == [4, 6, 8]


def test_inp_text_to_video_past_the_window_follows_a_schedule_past_it(easyanimate, monkeypatch):
    monkeypatch.setattr(type(easyanimate), "max_frames", property(lambda self: 8))
    spy = spy_on(easyanimate, monkeypatch)
    result = run(easyanimate, frames=16, steps=1, prompt={"0": "a cat runs", "12": "a dog sleeps"})
    assert result.frames.shape == (1, 16, 3, SIZE, SIZE) and result.report["segments"] == 3
    parsed = parse_prompt_schedule({"0": "a cat runs", "12": "a dog sleeps"}, 16)
    keyframes = easyanimate.encode_text(parsed.prompts())[easyanimate.text_key]
    whole = interpolate_states(keyframes, parsed, 16)
    # Each segment of 8 frames (0-7, 4-11, 8-15) is 2 latent frames of 4 frames each, each taking the mean text of
    # its frames (they took frames 0 and 7, the ends); the DiT cross-attends to their mean, the segment's mean (it
    # took the second's, leaning to the later prompt).
    for call, start in zip(spy.calls, (0, 4, 8), strict=True):
        expected = whole[start:start + 8].mean(dim=0)
        torch.testing.assert_close(call[easyanimate.text_key][-1], expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ FreeInit, dtype


def test_free_init_runs_the_sampler_once_per_iteration(animatediff, monkeypatch):
    spy = spy_on(animatediff, monkeypatch)
    plain = run(animatediff, steps=2)
    calls = len(spy.calls)
    freed = run(animatediff, steps=2, free_init=FreeInitSettings(iterations=2))
    assert len(spy.calls) - calls == 2 * calls
    assert (freed.frames - plain.frames).abs().max() > 1e-4


def test_motion_effect_zero_is_the_model_without_its_motion_modules(animatediff):
    # The reference: the same model with each motion module's output projection zeroed, so it adds nothing.
    still = run(animatediff, steps=2, motion_effect=0.0)
    assert still.settings[0]["motion_effect"] == 0.0
    without = copy.deepcopy(animatediff)
    for _, module in without.model.motion_modules():
        torch.nn.init.zeros_(module.temporal_transformer.proj_out.weight)
        torch.nn.init.zeros_(module.temporal_transformer.proj_out.bias)
    assert torch.equal(still.frames, run(without, steps=2).frames)
    scaled = run(animatediff, steps=2, motion_scale=1.5)
    assert (scaled.frames - run(animatediff, steps=2).frames).abs().max() > 1e-4


def test_freeu_equals_diffusers_enable_freeu_on_the_same_unet(animatediff):
    settings = FreeUSettings(b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    freed = run(animatediff, steps=2, freeu=settings)
    assert freed.settings[0]["freeu"] == {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}
    # The reference: diffusers' own FreeU, set on the blocks of the 2D UNet that kinema's video UNet runs.
    reference = copy.deepcopy(animatediff)
    reference.model.unet.enable_freeu(**vars(settings))
    expected = run(reference, steps=2).frames
    assert (freed.frames - expected).abs().max().item() <= 1e-4
    assert (freed.frames - run(animatediff, steps=2).frames).abs().max().item() > 1e-3


def test_freeu_with_a_diffusion_transformer_is_one_line_before_sampling(easyanimate, monkeypatch):
    spy = spy_on(easyanimate, monkeypatch)
    with pytest.raises(KinemaError, match=r"^FreeU rebalances a UNet's backbone and skip features, and .* is a "
                                          r"diffusion transformer.*drop freeu \(--freeu\)"):
        run(easyanimate, freeu=FreeUSettings())
    assert not spy.calls


def test_sampling_to_nan_names_the_likely_causes_before_any_decode(animatediff, monkeypatch):
    decoded = []
    monkeypatch.setattr(animatediff, "decode", lambda latents: decoded.append(latents))
    # A model that overflows (as a motion effect of 1e30 once made it: now past the largest taken, 100).
    monkeypatch.setattr(animatediff.model, "forward", Spy(lambda sample, *args, **kwargs: sample * float("inf")),
                        raising=False)
    with pytest.raises(KinemaError, match=r"^sampling produced NaN or infinity, so nothing was decoded or saved; look "
                                          r"at the motion scale 1 or effect 100 .*; damaged or mis-converted"):
        run(animatediff, steps=2, motion_effect=100)
    assert not decoded


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_timestep_spacing_places_the_steps_as_diffusers_does(animatediff, monkeypatch, scheduler):
    import diffusers

    spy = spy_on(animatediff, monkeypatch)
    result = run(animatediff, steps=4, guidance=1.0, scheduler=scheduler, timestep_spacing="trailing")
    assert result.settings[0]["timestep_spacing"] == "trailing"
    # The reference: diffusers' scheduler with AnimateDiff-Lightning's settings (linear betas, trailing).
    reference = getattr(diffusers, SCHEDULERS[scheduler][0])(
        beta_schedule="linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    reference.set_timesteps(4)
    assert [call["timestep"] for call in spy.calls] == [float(t) for t in reference.timesteps]
    assert spy.calls[0]["timestep"] == 999  # trailing starts at the last training step


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_runs_image_to_video_on_the_dit_with_its_image_tokens_on_the_later_half(easyanimate,
                                                                                              monkeypatch, scheduler):
    """V3 gives the CLIP image tokens to the later half of the steps, counted over the scheduler's timesteps: PNDM
    runs one more than asked, and the count by `steps` alone stopped it at its last step (found by a hostile
    trial: kinema-tiny with --scheduler pndm failed at every step count)."""
    spy = spy_on(easyanimate, monkeypatch)
    run(easyanimate, frames=8, steps=4, image=torch.rand(3, SIZE, SIZE), scheduler=scheduler)
    with_image = [call.get("clip_image_embeds") is not None for call in spy.calls]
    assert with_image == sorted(with_image) and any(with_image) and not all(with_image), with_image


def test_bfloat16_runs_and_is_reported(tmp_path_factory):
    parts = tiny_sd_parts(seed=2)
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    family = AnimateDiffFamily(VideoUNet.from_unet2d(parts["unet"]).eval(), parts["vae"], parts["text_encoder"],
                               load_tokenizer(folder))
    result = run(family, dtype="bfloat16", steps=2)
    assert result.report["dtype"] == result.report["vae_dtype"] == "bfloat16"
    assert torch.isfinite(result.frames).all()


def test_a_float16_vae_that_overflowed_is_reported_as_float32(tmp_path_factory):
    parts = tiny_sd_parts(seed=2)
    with torch.no_grad():  # activations past float16's range, as an SD VAE's outgrow it at large sizes
        parts["vae"].decoder.conv_in.weight.mul_(1e5)
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    family = AnimateDiffFamily(VideoUNet.from_unet2d(parts["unet"]).eval(), parts["vae"], parts["text_encoder"],
                               load_tokenizer(folder))
    result = run(family, dtype="float16", steps=1)
    assert (result.report["dtype"], result.report["vae_dtype"]) == ("float16", "float32")
    assert torch.isfinite(result.frames).all()


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("family", "kwargs", "words"), [
    ("easyanimate", dict(frames=20), "16 or 24"),
    ("animatediff", dict(image=torch.rand(3, 16, 16)), "--resize"),
    # Tensors that are not [0, 1] pixels: once run, washed out, darkened or NaN after the whole sampling.
    ("animatediff", dict(image=torch.rand(3, SIZE, SIZE) * 255), r"the start image holds values from .* to .*; give "
                                                                 r"values in \[0, 1\] \(divide by 255\)"),
    ("animatediff", dict(image=(torch.rand(3, SIZE, SIZE) * 255).to(torch.uint8)), "is a uint8 tensor; give floats"),
    ("animatediff", dict(image=torch.rand(3, SIZE, SIZE) * 2 - 1), r"\(x \+ 1\) / 2 takes \[-1, 1\] there"),
    ("animatediff", dict(image=torch.full((3, SIZE, SIZE), float("nan"))), "the start image holds NaN or infinity"),
    ("animatediff", dict(image=torch.rand(3, SIZE, SIZE) * 1.2 - 0.1), r"give values in \[0, 1\] \(clamp them\)"),
    ("easyanimate", dict(video=torch.zeros(0, 3, SIZE, SIZE), strength=0.5, frames=None), "0 is not"),
    ("animatediff", dict(video=torch.rand(4, 3, SIZE, SIZE) * 255, strength=0.5, frames=None),
     "the input video holds values from"),
    ("animatediff", dict(video=torch.rand(4, 3, SIZE, SIZE), strength=0.5, frames=None,
                         mask=numpy.ones((SIZE, SIZE), numpy.float32)), "the mask must be a path, a PIL image, or an "
                                                                   r"\(H, W\) or \(F, H, W\) tensor .*; got ndarray"),
    ("animatediff", dict(prompt={"0": "a cat", "9": "a dog"}), "9"),
    ("animatediff", dict(prompt={"3": "a cat", "1": "a dog"}), "order"),
    ("animatediff", dict(frames=30, context=ContextSettings(length=32, overlap=4)), "32"),
    # The window named in the request's pixel frames (V3 packs 4 into a latent frame), with a fix that works.
    ("easyanimate", dict(frames=8, context=ContextSettings(length=1024, overlap=4)),
     r"^context length 1024 exceeds the \d+ frames .* denoises at once; use a context length of at most \d+$"),
    # Past its rounding to whole latent frames (4 a latent), still said in the frames given.
    ("easyanimate", dict(frames=16, context=ContextSettings(length=6, overlap=4)),
     r"windows count whole latent frames of 4 frames, so a context length of 6 and an overlap of 4 would be windows "
     r"of 4 frames overlapping by 4; use a context length and overlap that are multiples of 4, the overlap below"),
    # Counts once rounded down without a word: 12 frames overlapping by 3 ran as overlapping by 0.
    ("easyanimate", dict(frames=32, context=ContextSettings(length=12, overlap=3)),
     r"a context length of 12 and an overlap of 3 would be windows of 12 frames overlapping by 0"),
    ("animatediff", dict(frames=16, context=ContextSettings(length=8, overlap=8)),
     r"^the context overlap 8 \(--context-overlap, context.overlap\) must be below the context length 8"),
    ("animatediff", dict(scheduler="heun"), "ddim, euler"),
    ("animatediff", dict(height=31), "multiples of"),
    ("animatediff", dict(frames=40), None),
], indirect=["family"])
def test_bad_input_fails_before_denoising(family, kwargs, words, monkeypatch):
    spy = spy_on(family, monkeypatch)
    if words is None:  # 40 frames on a 24-frame model: context windows come in by themselves
        result = run(family, steps=1, **kwargs)
        assert result.frames.shape[1] == 40
        return
    with pytest.raises(KinemaError, match=words):
        run(family, **kwargs)
    assert spy.calls == []


@pytest.mark.parametrize("family", ["animatediff", "easyanimate"], indirect=True)
def test_frames_that_cannot_fit_in_memory_are_refused_before_denoising(family, monkeypatch):
    """The finished frames (B, F, 3, H, W) float32 are checked against the free memory first: with 1 MiB free, two
    8-frame videos at 32x32 (0.19 MiB) pass; an extension to 3000 frames (35 MiB) fails, naming the fix."""
    monkeypatch.setattr("kinema.memory.available_memory", lambda device="cpu": 2**20)
    spy = spy_on(family, monkeypatch)
    video = torch.rand(8, 3, SIZE, SIZE)
    refusal = (r"^3000 frames at 32x32 need 35 MiB of memory for the finished frames alone, and 1 MiB is "
               r"free; ask for fewer frames \(generate --frames, extend --frames / --to\), a smaller size or fewer "
               r"seeds$")
    with pytest.raises(KinemaError, match=refusal):
        run(family, video=video, extend_frames=2992)
    with pytest.raises(KinemaError, match=r"^2 videos of 1400 frames at 32x32 need 33 MiB"):
        run(family, frames=1400, seeds=[1, 2])
    assert spy.calls == []
    assert run(family, frames=8, seeds=[1, 2], steps=1).frames.shape == (2, 8, 3, SIZE, SIZE)


@pytest.mark.parametrize("family", ["animatediff", "easyanimate"], indirect=True)
def test_a_decode_that_cannot_fit_in_memory_is_refused_before_denoising_and_tiles_fit(family, monkeypatch):
    """The VAE's full-size layers for the frames one call decodes are estimated (VideoFamily.decode_bytes) and
    checked against the free memory before sampling: a 100000x64 video once ran its sampling and was then killed by
    the out-of-memory killer in the decoder. Tiles shrink what one call holds."""
    from kinema.models.slice_vae_tiling import Tiling
    from kinema.pipelines.generation import set_vae_options

    big, tile = 256, 64
    if isinstance(family, EasyAnimateFamily):
        monkeypatch.setattr(family.vae, "config_tiling", Tiling(tile))
    else:
        monkeypatch.setattr(family.vae, "tile_sample_min_size", tile)
    whole = family.decode_bytes(1, 8, big, big)
    set_vae_options(family, vae_tiling=True, decode_chunk=None)
    tiled = family.decode_bytes(1, 8, big, big)
    set_vae_options(family, vae_tiling=False, decode_chunk=None)
    assert tiled < whole / 3  # the layers at a tile's share of the frame, 1/16 (the decoded video held alike)
    monkeypatch.setattr(generation_module, "available_memory", lambda device="cpu": whole - 1)
    spy = spy_on(family, monkeypatch)
    with pytest.raises(KinemaError, match=rf"^decoding 8 frames at {big}x{big} needs about .* of memory at once on "
                                          r"cpu \(the VAE's full-size layers\), and .* is free; decode in tiles "
                                          r"\(--vae-tiling, vae_tiling\)"):
        run(family, frames=8, height=big, width=big)
    assert spy.calls == []
    set_vae_options(family, vae_tiling=True, decode_chunk=None)  # what a request with vae_tiling sets
    generation_module._check_decode_fits(family, 1, 8, big, big)  # fits in tiles
    set_vae_options(family, vae_tiling=False, decode_chunk=None)
    # Latents alone (to decode elsewhere) decode nothing here: no room for a decode asked.
    monkeypatch.setattr(generation_module, "available_memory", lambda device="cpu": 1)
    assert run(family, frames=8, steps=1, output="latent").latents is not None


def test_saved_latents_are_refused_by_a_vae_that_did_not_make_them(animatediff, easyanimate):
    """decode_saved with the settings saved beside the latents: the family that made them decodes them as generate
    did; the other family, or a VAE that would decode them to another size, is refused before decoding."""
    from kinema.pipelines.generation import decode_saved

    saved = {}
    made = generate(easyanimate, request(frames=8, steps=2), progress=False,
                    on_latents=lambda latents, settings: saved.update(latents=latents, settings=settings))
    latents, settings = saved["latents"], saved["settings"]
    torch.testing.assert_close(decode_saved(easyanimate, latents, settings), made.frames)
    with pytest.raises(KinemaError, match=r"made by .* of the easyanimate family, and .* is of the animatediff "
                                          r"family: its VAE reads other latents; decode them with --model "):
        decode_saved(animatediff, latents, settings)
    smaller = [{**settings[0], "height": SIZE // 2, "width": SIZE // 2}]
    with pytest.raises(KinemaError, match=f"saved for {SIZE // 2}x{SIZE // 2} videos, but .* would decode them to "
                                          f"{SIZE}x{SIZE}: it is not the VAE that made them"):
        decode_saved(easyanimate, latents, smaller)
    # Latent frames cut or padded after saving, the settings still saying 8 frames: 1 latent decodes to 1 frame, 3
    # (not whole slices of 2) to none.
    for changed, makes in ((latents[:, :, :1], "1 frames"), (torch.cat([latents, latents[:, :, :1]], 2), "no video")):
        with pytest.raises(KinemaError, match=rf"^these latents hold {changed.shape[2]} latent frames, which .* "
                                              rf"decodes to {makes}, but their settings say 8 frames: the file was"):
            decode_saved(easyanimate, changed, settings)
    without = [{k: v for k, v in settings[0].items() if k not in ("family", "height", "width", "frames")}]
    torch.testing.assert_close(decode_saved(easyanimate, latents, without), made.frames)  # older files pass


def test_image_to_video_needs_an_inpaint_model_on_the_dit(easyanimate, monkeypatch):
    t2v = EasyAnimateFamily(tiny_video_dit(caption_channels=48), easyanimate.vae, easyanimate.text_encoder,
                            easyanimate.tokenizer)
    spy = spy_on(t2v, monkeypatch)
    with pytest.raises(KinemaError, match="inpaint"):
        run(t2v, image=torch.rand(3, SIZE, SIZE), frames=8)
    assert spy.calls == []


@pytest.mark.parametrize(("options", "starts_at"), [({"steps": 1}, 1), ({"steps": 2}, 501), ({"steps": 3}, 667),
                                                    ({"steps": 4}, None), ({"steps": 25}, None),
                                                    ({"steps": 1, "timestep_spacing": "trailing"}, None),
                                                    ({"steps": 1, "scheduler": "euler"}, 0),
                                                    ({"steps": 1, "scheduler": "dpmpp_2m"}, None)])
def test_a_sampler_starting_far_below_pure_noise_is_warned_of(animatediff, caplog, options, starts_at):
    """DDIM's default leading spacing runs 1 step at timestep 1 (the video stays noise, std 0.99) and 2 from 501,
    without a word."""
    with caplog.at_level("WARNING", logger="kinema.pipelines.generation"):
        run(animatediff, **{"scheduler": "ddim", **options})
    said = [record.getMessage() for record in caplog.records if "far below the pure noise" in record.getMessage()]
    if starts_at is None:
        assert said == []
    else:
        assert len(said) == 1 and f"starts at timestep {starts_at} of 1000" in said[0]
        assert "--timestep-spacing trailing" in said[0]


def test_notebook_inputs_numpy_values_and_a_bfloat16_family_are_recorded_as_what_ran(animatediff):
    """Found by a hostile notebook user: numpy booleans passed the check but made the settings unsaveable, numpy
    numbers were refused by some fields, a repeated seed made the same video twice and then refused to save, the
    settings of a family loaded in bfloat16 said dtype None (a float32 remake differed by 0.18), and output='latent'
    of a continuation gave PIL images."""
    import json

    import numpy as np

    result = run(animatediff, resize=np.bool_(False), clip_skip=np.int64(1), guidance_rescale=np.float32(0.5),
                 steps=1, timestep_spacing="trailing")
    json.dumps(result.settings)
    assert result.settings[0]["resize"] is False and result.settings[0]["guidance_rescale"] == 0.5
    assert result.settings[0]["dtype"] is None  # a float32 family
    with pytest.raises(KinemaError, match="seed 1 is given more than once, which would make the same video twice"):
        run(animatediff, seeds=[1, 2, 1])
    with pytest.raises(KinemaError, match="output='latent' cannot be given"):
        run(animatediff, output="latent", video=torch.rand(4, 3, SIZE, SIZE), extend_frames=4, overlap_frames=2,
            segment_frames=4)
    half = copy.deepcopy(animatediff)
    half.model.to(torch.bfloat16)
    saved = []
    made = generate(half, request(steps=1, timestep_spacing="trailing"), progress=False,
                    on_latents=lambda latents, settings: saved.append((latents, settings)))
    assert made.settings[0]["dtype"] == "bfloat16"
    # Latents of a float32 family (dtype None) are another run's for it.
    latents, settings = saved[0]
    with pytest.raises(KinemaError, match="their settings differ in dtype"):
        generate(half, request(steps=1, timestep_spacing="trailing"), progress=False,
                 resume=(latents, [{**entry, "dtype": None} for entry in settings]))
    resumed = generate(half, request(steps=1, timestep_spacing="trailing"), progress=False, resume=saved[0])
    assert torch.equal(resumed.frames, made.frames)
