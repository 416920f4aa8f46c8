"""A ControlNet through generate(), load_family, jobs and the CLI: generate() equals diffusers'
AnimateDiffControlNetPipeline on the same parts, prompts and control frames (its control window too); context
windows hand each window its own control frames; missing or mismatched control inputs are one line before any
sampling."""

import logging
from dataclasses import replace

import pytest
import torch
from diffusers import AnimateDiffControlNetPipeline
from loaders.test_controlnet import (
    TINY_HINT,
    as_pil,
    control_frames,
    generation_parts,
    tiny_controlnet,
    video_unet_like,
)
from tiny_sd import write_motion_module, write_sd_folder

from kinema.errors import KinemaError
from kinema.models.controlnet import VideoControlNet, VideoMultiControlNet
from kinema.pipelines.animatediff import AnimateDiffFamily
from kinema.pipelines.generation import controlled, generate
from kinema.pipelines.jobs import job_from_mapping
from kinema.pipelines.load import load_family
from kinema.pipelines.request import ContextSettings, GenerationRequest
from kinema.sampling.loop import initial_noise
from kinema.sampling.schedulers import make_scheduler

FRAMES, SIZE, STEPS = 4, 32, 4


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    parts = generation_parts(tmp_path_factory.mktemp("tokenizer"))
    return {**parts, "controlnet": tiny_controlnet(parts["unet"], seed=8, hint=TINY_HINT)}


@pytest.fixture(scope="module")
def pipe(parts):
    pipe = AnimateDiffControlNetPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                         tokenizer=parts["tokenizer"], unet=parts["unet"],
                                         motion_adapter=parts["adapter"], controlnet=parts["controlnet"],
                                         scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family(parts, pipe, scale=1.0) -> AnimateDiffFamily:
    return AnimateDiffFamily(video_unet_like(pipe, parts["unet"]), parts["vae"], parts["text_encoder"],
                             parts["tokenizer"],
                             controlnet=VideoControlNet(parts["controlnet"], scale=scale, path="control_tiny"))


def control_seen(ours, monkeypatch) -> list:
    """The control images each ControlNet call gets, as the calls come."""
    seen = []
    forward = ours.controlnet.forward

    def spy(sample, timestep, text, control, mask=None, **options):
        seen.append(control.clone())
        return forward(sample, timestep, text, control, mask, **options)

    monkeypatch.setattr(ours.controlnet, "forward", spy)
    return seen


def request(**fields) -> GenerationRequest:
    options = dict(prompt="the cat", negative_prompt="th", frames=FRAMES, height=SIZE, width=SIZE, steps=STEPS,
                   guidance=7.5, seeds=[3], scheduler="ddim", control_video=control_frames())
    return GenerationRequest(**{**options, **fields})


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.25, 0.75)])
def test_generate_equals_diffusers_controlnet_pipeline(parts, pipe, window):
    ours = generate(family(parts, pipe, scale=0.8), request(control_start=window[0], control_end=window[1]),
                    progress=False, output="latent")
    noise = initial_noise((1, 4, FRAMES, SIZE // 2, SIZE // 2), seeds=[3])
    with torch.no_grad():
        expected = pipe(prompt="the cat", negative_prompt="th", conditioning_frames=[as_pil(f) for f in
                                                                                       control_frames()],
                        controlnet_conditioning_scale=0.8, control_guidance_start=window[0],
                        control_guidance_end=window[1], latents=noise.clone(), num_frames=FRAMES,
                        num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="latent",
                        return_dict=False)[0]
    difference = (ours.latents - expected).abs().max().item()
    print(f"control window {window}: max abs difference {difference:.3g}, latents' mean abs "
          f"{expected.abs().mean():.3g}")
    assert difference <= 1e-3
    assert ours.settings[0]["controlnet"] == {"path": "control_tiny", "scale": 0.8}
    assert (ours.settings[0]["control_start"], ours.settings[0]["control_end"]) == window
    assert ours.settings[0]["control_video"] == "<Tensor>"


def test_two_controlnets_steer_together_as_diffusers_multicontrolnet(parts, pipe):
    second = tiny_controlnet(parts["unet"], seed=11, hint=TINY_HINT)
    reference = AnimateDiffControlNetPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                              tokenizer=parts["tokenizer"], unet=parts["unet"],
                                              motion_adapter=parts["adapter"], controlnet=[parts["controlnet"], second],
                                              scheduler=make_scheduler("ddim"))
    reference.set_progress_bar_config(disable=True)
    ours = AnimateDiffFamily(video_unet_like(pipe, parts["unet"]), parts["vae"], parts["text_encoder"],
                             parts["tokenizer"], controlnet=VideoMultiControlNet([
                                 VideoControlNet(parts["controlnet"], 0.8, "pose"), VideoControlNet(second, 0.5,
                                                                                                    "depth")]))
    depth = control_frames().flip(-1)  # another control video: the square moving the other way
    result = generate(ours, request(control_video=[control_frames(), depth]), progress=False, output="latent")
    noise = initial_noise((1, 4, FRAMES, SIZE // 2, SIZE // 2), seeds=[3])
    with torch.no_grad():
        expected = reference(prompt="the cat", negative_prompt="th",
                             conditioning_frames=[[as_pil(f) for f in control_frames()], [as_pil(f) for f in depth]],
                             controlnet_conditioning_scale=[0.8, 0.5], latents=noise.clone(), num_frames=FRAMES,
                             num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                             output_type="latent", return_dict=False)[0]
    difference = (result.latents - expected).abs().max().item()
    print(f"two ControlNets: max abs difference {difference:.3g}")
    assert difference <= 1e-3
    one = generate(family(parts, pipe, scale=0.8), request(), progress=False, output="latent")
    assert (one.latents - expected).abs().max().item() > 1e-2  # the second one counts
    assert result.settings[0]["controlnet"] == [{"path": "pose", "scale": 0.8}, {"path": "depth", "scale": 0.5}]
    with pytest.raises(KinemaError, match=r"is loaded with 2 ControlNets, so control_video is a list of 2 control "
                                          r"videos or images"):
        generate(ours, request(), progress=False)


def test_the_control_window_follows_diffusers_rule():
    # diffusers' controlnet_keep: 1 - (i / n < start or (i + 1) / n > end)
    for start, end in ((0.0, 1.0), (0.25, 0.75), (0.1, 0.5), (0.5, 1.0)):
        for steps in (4, 7, 25):
            expected = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]
            assert [float(controlled(i, steps, start, end)) for i in range(steps)] == expected


def test_context_windows_hand_each_window_its_control_frames(parts, pipe, monkeypatch):
    ours = family(parts, pipe)
    seen = control_seen(ours, monkeypatch)
    frames = 8
    control = torch.rand(frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    generate(ours, request(frames=frames, steps=1, control_video=control,
                           context=ContextSettings(length=4, overlap=2, schedule="static")),
             progress=False, output="latent")
    whole = control.permute(1, 0, 2, 3)
    windows = [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]
    assert len(seen) == len(windows)
    for got, window in zip(seen, windows, strict=True):
        assert got.shape == (2, 3, 4, SIZE, SIZE)  # both halves of guidance
        assert torch.equal(got[0], whole[:, window]) and torch.equal(got[1], whole[:, window])


def guessed_reference(pipe, controlnet, scale, guidance, seed=3) -> torch.Tensor:
    """Guess mode under guidance as ControlNet's authors and diffusers' image pipeline run it, a plain DDIM loop over
    diffusers' networks: the ControlNet steers the conditional half alone, with guess mode's graded residuals, and
    the unconditional half gets zeros. (diffusers' AnimateDiff ControlNet pipelines leave the zeros out, so their
    guess mode fails under guidance.)"""
    cond, uncond = pipe.encode_prompt("the cat", torch.device("cpu"), 1, True, negative_prompt="th")
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(STEPS)
    latents = initial_noise((1, 4, FRAMES, SIZE // 2, SIZE // 2), seeds=[seed])
    for t in scheduler.timesteps:
        folded = latents.transpose(1, 2).reshape(FRAMES, 4, SIZE // 2, SIZE // 2)
        down, mid = controlnet(folded, t, encoder_hidden_states=cond.repeat_interleave(FRAMES, 0),
                               controlnet_cond=control_frames(), conditioning_scale=scale, guess_mode=True,
                               return_dict=False)
        eps = pipe.unet(torch.cat([latents, latents]), t,  # the text states per frame, as the pipelines give them
                        encoder_hidden_states=torch.cat([uncond, cond]).repeat_interleave(FRAMES, 0),
                        down_block_additional_residuals=[torch.cat([torch.zeros_like(d), d]) for d in down],
                        mid_block_additional_residual=torch.cat([torch.zeros_like(mid), mid])).sample
        eps_uncond, eps_cond = eps.chunk(2)
        latents = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latents).prev_sample
    return latents


def test_guess_mode_under_guidance_steers_the_prompted_half_alone(parts, pipe):
    with torch.no_grad():
        expected = guessed_reference(pipe, parts["controlnet"], 0.8, 7.5)
    ours = generate(family(parts, pipe, scale=0.8), request(guess_mode=True), progress=False, output="latent")
    difference = (ours.latents - expected).abs().max().item()
    print(f"guess mode, guidance 7.5: max abs difference {difference:.3g}, latents' mean abs "
          f"{expected.abs().mean():.3g}")
    assert difference <= 1e-3
    assert ours.settings[0]["guess_mode"] is True
    plain = generate(family(parts, pipe, scale=0.8), request(), progress=False, output="latent")
    assert (plain.latents - expected).abs().max().item() > 1e-2


def test_guess_mode_without_guidance_equals_diffusers_pipeline(parts, pipe):
    ours = generate(family(parts, pipe, scale=0.8), request(guess_mode=True, guidance=1.0), progress=False,
                    output="latent")
    noise = initial_noise((1, 4, FRAMES, SIZE // 2, SIZE // 2), seeds=[3])
    with torch.no_grad():
        expected = pipe(prompt="the cat", conditioning_frames=[as_pil(f) for f in control_frames()],
                        controlnet_conditioning_scale=0.8, guess_mode=True, latents=noise.clone(), num_frames=FRAMES,
                        num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE, output_type="latent",
                        return_dict=False)[0]
    difference = (ours.latents - expected).abs().max().item()
    print(f"guess mode, guidance 1: max abs difference {difference:.3g}")
    assert difference <= 1e-3
    plain = generate(family(parts, pipe, scale=0.8), request(guidance=1.0), progress=False, output="latent")
    assert (plain.latents - expected).abs().max().item() > 1e-2  # the graded scales count


def test_a_pooling_controlnet_turns_guess_mode_on_as_diffusers_does(parts, pipe):
    pooling = tiny_controlnet(parts["unet"], seed=8, hint=TINY_HINT)
    pooling.register_to_config(global_pool_conditions=True)  # as the shuffle ControlNet's config says
    ours = AnimateDiffFamily(video_unet_like(pipe, parts["unet"]), parts["vae"], parts["text_encoder"],
                             parts["tokenizer"], controlnet=VideoControlNet(pooling, scale=0.8, path="shuffle"))
    result = generate(ours, request(), progress=False, output="latent")
    with torch.no_grad():
        expected = guessed_reference(pipe, pooling, 0.8, 7.5)
    difference = (result.latents - expected).abs().max().item()
    print(f"pooling ControlNet: max abs difference {difference:.3g}")
    assert difference <= 1e-3
    assert result.settings[0]["guess_mode"] is True


def test_guess_mode_with_context_windows_steers_each_window_alone(parts, pipe, monkeypatch):
    ours = family(parts, pipe)
    seen = control_seen(ours, monkeypatch)
    whole = control_frames(frames=8)
    settings = ContextSettings(length=4, overlap=2)
    generate(ours, request(frames=8, steps=1, control_video=whole, context=settings, guess_mode=True),
             progress=False, output="latent")
    assert len(seen) == 3
    for got in seen:  # the conditional half alone, each window its frames
        assert got.shape == (1, 3, 4, SIZE, SIZE)


def test_canny_preprocessing_hands_the_controlnet_the_edges_of_the_control_video(parts, pipe, monkeypatch):
    import cv2
    import numpy as np

    ours = family(parts, pipe)
    seen = control_seen(ours, monkeypatch)
    video = control_frames()
    result = generate(ours, request(steps=1, control_video=video, control_preprocess="canny:50:150"),
                      progress=False, output="latent")
    pixels = (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    edges = torch.from_numpy(np.stack([cv2.Canny(np.ascontiguousarray(p), 50, 150) for p in pixels])) / 255
    assert edges.sum() > 0
    for got in seen:  # (2, 3, F, H, W): both halves of guidance, every channel the edges
        torch.testing.assert_close(got, edges[None, None].expand(2, 3, -1, -1, -1))
    assert result.settings[0]["control_preprocess"] == "canny:50:150"


def test_one_control_image_steers_every_frame(parts, pipe):
    ours = family(parts, pipe)
    image = control_frames()[1:2]
    one = generate(ours, request(steps=1, control_video=image), progress=False, output="latent")
    every = generate(ours, request(steps=1, control_video=image.expand(FRAMES, -1, -1, -1)), progress=False,
                     output="latent")
    assert torch.equal(one.latents, every.latents)


def test_control_weights_spread_keyframes_by_the_falloff_the_nearer_and_stronger_first():
    from kinema.pipelines.request import control_weights

    # Keyframes at 0 and 5 of 8 frames, falloff [0.5, 0.25]: each frame's (keyframe image, weight), by hand.
    assert control_weights([0, 5], 8, [0.5, 0.25]) == [
        (0, 1.0), (0, 0.5), (0, 0.25), (1, 0.25), (1, 0.5), (1, 1.0), (1, 0.5), (1, 0.25)]
    # Looping, frame 7 is one frame from keyframe 0 (0.5 beats keyframe 5's 0.25); frame 6 stays with 5.
    assert control_weights([0, 5], 8, [0.5, 0.25], loop=True)[6:] == [(1, 0.5), (0, 0.5)]
    assert control_weights([0, 4], 6, [0.5, 0.25])[2] == (0, 0.25)  # equally near and strong: the earlier
    assert control_weights([1], 4) == [(-1, 0.0), (0, 1.0), (-1, 0.0), (-1, 0.0)]  # keyframes only
    assert control_weights([0], 4, [0.0, 0.3]) == [(0, 1.0), (-1, 0.0), (0, 0.3), (-1, 0.0)]


def test_keyframes_at_every_frame_equal_the_control_video(parts, pipe):
    """The keyframe path (frames gathered, residuals weighted and placed back) at weight 1 everywhere equals the
    plain path, which equals diffusers' pipeline (above)."""
    ours = family(parts, pipe, scale=0.7)
    plain = generate(ours, request(steps=2), progress=False, output="latent")
    keyed = generate(ours, request(steps=2, control_indices=[3, 0, 1, 2], control_video=control_frames()[[3, 0, 1, 2]]),
                     progress=False, output="latent")
    assert (keyed.latents - plain.latents).abs().max().item() <= 1e-5


def test_keyframes_steer_their_frames_and_the_falloff_their_neighbours(parts, pipe, monkeypatch):
    ours = family(parts, pipe)
    seen, masks = [], []
    forward = ours.controlnet.forward

    def spy(sample, timestep, text, control, mask=None, **options):
        seen.append(control.clone())
        masks.append(mask.clone())
        return forward(sample, timestep, text, control, mask, **options)

    monkeypatch.setattr(ours.controlnet, "forward", spy)
    keyframes = control_frames()[[0, 3]]
    result = generate(ours, request(steps=1, control_video=keyframes, control_indices=[0, -1],
                                    control_falloff=[0.5]), progress=False, output="latent")
    assert masks[0].flatten().tolist() == [1.0, 0.5, 0.5, 1.0] * 2  # both sides of guidance
    assert torch.equal(seen[0][0].permute(1, 0, 2, 3), keyframes[[0, 0, 1, 1]])
    assert result.settings[0]["control_falloff"] == [0.5] and result.settings[0]["control_indices"] == [0, -1]
    alone = generate(ours, request(steps=1, control_video=keyframes, control_indices=[0, -1]), progress=False,
                     output="latent")
    assert masks[-1].flatten().tolist() == [1.0, 0.0, 0.0, 1.0] * 2
    assert (alone.latents - result.latents).abs().max().item() > 1e-4  # the neighbours' steering shows


@pytest.mark.parametrize("fields, message", [
    ({"control_video": None}, r"is loaded with a ControlNet \(control_tiny\), which steers every frame by a control "
                              r"image: give them \(control_video, --control-video\)"),
    ({"control_video": torch.rand(3, 3, SIZE, SIZE)}, r"^the control video has 3 frames and the video 4: give one "
                                                     r"control image per frame \(or one for all\)"),
    ({"control_video": torch.rand(4, 3, 16, 16)}, r"^the control video is 16x16 but the video is 32x32; pass "
                                                  r"--resize"),
    ({"control_start": 0.5, "control_end": 0.5}, r"^the ControlNet steers from control_start to control_end, shares "
                                                 r"of the steps with 0 <= start < end <= 1; got 0.5 to 0.5"),
    ({"video": torch.rand(4, 3, SIZE, SIZE), "extend_frames": 4}, r"^a ControlNet steers the frames of one clip, and "
                                                                  r"extend makes new segments"),
    ({"control_video": None, "control_preprocess": "canny"}, r"^control_preprocess \(--control-preprocess\) makes "
                                                             r"control images from a control video"),
    ({"control_preprocess": "sobel"}, r"^unknown control preprocessor 'sobel'"),
    ({"control_preprocess": ["canny", "none"]}, r"^2 control preprocessors for 1 ControlNet;"),
    ({"control_video": None, "guess_mode": True}, r"^guess_mode \(--guess-mode\) is a ControlNet's: give the control "
                                                  r"video"),
    ({"control_falloff": [0.5]}, r"^control_falloff spreads keyframes to the frames beside them: give control_indices"),
    ({"control_falloff": [1.5], "control_indices": [0, 1, 2, 3]}, r"^control_falloff is a list of 1 to 64 weights "
                                                                  r"from 0 to 1"),
    ({"control_loop": True}, r"^control_loop wraps the control_falloff around the video's ends: give "
                             r"control_falloff"),
    ({"control_indices": [0, 1, 2, 9]}, r"^control_indices must be whole numbers from -4 to 3"),
])
def test_bad_control_input_is_one_line_before_sampling(parts, pipe, monkeypatch, fields, message):
    ours = family(parts, pipe)
    monkeypatch.setattr(ours.model, "forward", lambda *a, **k: pytest.fail("sampling ran"))
    with pytest.raises(KinemaError, match=message):
        generate(ours, request(**fields), progress=False)


def test_control_images_without_a_controlnet_are_one_line(parts, pipe):
    plain = family(parts, pipe)
    plain.controlnet = None
    with pytest.raises(KinemaError, match=r"has no ControlNet loaded, so control images \(control_video, "
                                          r"--control-video\) have nothing to steer"):
        generate(plain, request(), progress=False)


# ---------------------------------------------------------------- load_family and jobs


@pytest.fixture(scope="module")
def files(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd = {name: parts[name] for name in ("unet", "vae", "text_encoder")}
    controlnet = root / "control_tiny"
    parts["controlnet"].save_pretrained(controlnet)
    control_video = root / "pose.gif"
    frames = [as_pil(f) for f in control_frames()]
    frames[0].save(control_video, save_all=True, append_images=frames[1:], duration=125, loop=0)
    return {"folder": write_sd_folder(root / "tiny-sd", sd),
            "motion_module": write_motion_module(root / "mm_v2.safetensors", "v2", seed=5),
            "controlnet": controlnet, "control_video": control_video, "root": root}


def test_load_family_loads_the_controlnet_for_the_model(files, parts, caplog):
    with caplog.at_level(logging.WARNING):
        loaded = load_family(files["folder"], motion_module=files["motion_module"],
                             controlnet=(files["controlnet"], 0.7), dtype="bfloat16")
    assert not [r.getMessage() for r in caplog.records if "float32" in r.getMessage()]  # no diffusers cast notice
    assert isinstance(loaded.controlnet, VideoControlNet) and loaded.controlnet.scale == 0.7
    assert next(loaded.controlnet.parameters()).dtype == torch.bfloat16
    reference = parts["controlnet"].state_dict()
    assert all(torch.equal(v, reference[k].to(torch.bfloat16)) for k, v in loaded.controlnet.controlnet.state_dict()
               .items())
    result = generate(loaded, request(control_video=files["control_video"], steps=1, dtype="float32"),
                      progress=False)
    assert result.frames.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert result.settings[0]["control_video"] == str(files["control_video"])


@pytest.mark.parametrize("given, message", [
    (lambda f: (f["motion_module"], 1.0), r"mm_v2.safetensors is not a ControlNet \(it is: AnimateDiff motion "
                                          r"module"),
    (lambda f: (f["root"] / "gone", 1.0), r"ControlNet .*gone does not exist"),
    (lambda f: (f["controlnet"], -1.0), r"the ControlNet scale must be at least 0"),
    (lambda f: f["controlnet"], r"controlnet is a \(path, scale\) pair"),
])
def test_bad_controlnet_files_are_one_line_before_weights_load(files, given, message, monkeypatch):
    from kinema.loaders import formats

    original = formats.Format.function

    def refuse(self, role):
        if role == "load":
            raise AssertionError(f"{self.kind} weights were loaded before the input was refused")
        return original(self, role)

    monkeypatch.setattr(formats.Format, "function", refuse)
    with pytest.raises(KinemaError, match=message):
        load_family(files["folder"], motion_module=files["motion_module"], controlnet=given(files))


def test_a_job_takes_a_controlnet_and_reads_its_settings_back(files):
    data = {"model": str(files["folder"]), "motion_module": str(files["motion_module"]), "prompt": "the cat",
            "controlnet": {"path": str(files["controlnet"]), "scale": 0.6},
            "control_video": str(files["control_video"]), "control_end": 0.8, "frames": FRAMES,
            "height": SIZE, "width": SIZE}
    job = job_from_mapping(data)
    assert job.controlnet == (str(files["controlnet"]), 0.6) and job.request.control_end == 0.8
    again = job_from_mapping(job.settings())
    assert again.controlnet == job.controlnet and again.model_key() == job.model_key()
    with pytest.raises(KinemaError, match=r"a ControlNet and its control images come together"):
        job_from_mapping({k: v for k, v in data.items() if k != "control_video"})
    with pytest.raises(KinemaError, match=r"the control video has 4 frames and the video 6: .* \"frames\": 4"):
        job_from_mapping({**data, "frames": 6})
    with pytest.raises(KinemaError, match=r"the control video is 32x32 but the job makes 64x64 videos; set "
                                          r"\"resize\": true"):
        job_from_mapping({**data, "height": 64, "width": 64})
    keyframes = job_from_mapping({**data, "control_indices": [0, -1, 1, 2]})
    assert keyframes.request.control_indices == [0, -1, 1, 2]
    assert job_from_mapping(keyframes.settings()).request.control_indices == [0, -1, 1, 2]
    with pytest.raises(KinemaError, match=r"control_indices name 2 frames for 4 control images"):
        job_from_mapping({**data, "control_indices": [0, 3]})
    with pytest.raises(KinemaError, match=r"control_indices must be a list of frame numbers"):
        job_from_mapping({**data, "control_indices": "0,3"})
    spread = job_from_mapping({**data, "control_video": [str(files["control_video"])], "control_indices": [0],
                               "control_falloff": [0.5, 0.25], "control_loop": True})
    assert (spread.request.control_falloff, spread.request.control_loop) == ([0.5, 0.25], True)
    again = job_from_mapping(spread.settings()).request
    assert (again.control_falloff, again.control_loop, again.control_indices) == ([0.5, 0.25], True, [0])
    with pytest.raises(KinemaError, match=r"control_falloff must be a finite number, got str '0.5'"):
        job_from_mapping({**spread.settings(), "control_falloff": ["0.5"]})
    with pytest.raises(KinemaError, match=r"control_falloff is a list of 1 to 64 weights from 0 to 1"):
        job_from_mapping({**spread.settings(), "control_falloff": 0.5})
    with pytest.raises(KinemaError, match=r"control_loop must be true or false, got 'yes'"):
        job_from_mapping({**spread.settings(), "control_loop": "yes"})
    with pytest.raises(KinemaError, match=r"controlnet: unknown key 'weight'; known keys: path, scale"):
        job_from_mapping({**data, "controlnet": {"path": str(files["controlnet"]), "weight": 1}})


def test_the_cli_runs_guess_mode_and_records_it(files, tmp_path):
    import json

    from kinema.cli import main

    out = tmp_path / "guessed.mp4"
    main(["generate", "", "--model", str(files["folder"]), "--motion-module", str(files["motion_module"]),
          "--controlnet", f"{files['controlnet']}:0.7", "--control-video", str(files["control_video"]),
          "--guess-mode", "--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE), "--steps", "1",
          "--guidance", "4", "-o", str(out), "--quiet"])
    settings = json.loads(out.with_name(out.name + ".json").read_text())
    assert (settings["guess_mode"], settings["controlnet"]["scale"], settings["prompt"]) == (True, 0.7, "")
    data = {"model": str(files["folder"]), "motion_module": str(files["motion_module"]), "prompt": "",
            "controlnet": str(files["controlnet"]), "control_video": str(files["control_video"]), "frames": FRAMES,
            "height": SIZE, "width": SIZE, "guess_mode": True}
    assert job_from_mapping(data).request.guess_mode is True
    with pytest.raises(KinemaError, match=r"guess_mode must be true or false"):
        job_from_mapping({**data, "guess_mode": "yes"})
    assert job_from_mapping({**data, "control_preprocess": "canny"}).request.control_preprocess == "canny"
    with pytest.raises(KinemaError, match=r"control_preprocess is a preprocessor name \(canny, canny:LOW:HIGH, "
                                          r"tile_resample:RATE, blur:SIGMA, invert, none\), or a list of them"):
        job_from_mapping({**data, "control_preprocess": 3})
    with pytest.raises(KinemaError, match=r"2 control preprocessors for 1 ControlNet;"):
        job_from_mapping({**data, "control_preprocess": ["canny", "invert"]})


def test_load_family_unpickles_a_pickled_controlnet_once(files, parts, tmp_path, monkeypatch):
    from loaders.test_controlnet import original_layout

    import kinema.loaders.source as source_module

    path = tmp_path / "control_v11p_sd15_tiny.pth"
    torch.save(original_layout(tiny_controlnet(parts["unet"], seed=12, hint=(16, 32, 96, 256))), path)
    reads = []
    read_checkpoint = source_module.read_checkpoint

    def counted(where):
        reads.append(where)
        return read_checkpoint(where)

    monkeypatch.setattr(source_module, "read_checkpoint", counted)
    loaded = load_family(files["folder"], motion_module=files["motion_module"], controlnet=(path, 1.0))
    assert isinstance(loaded.controlnet, VideoControlNet)
    assert [where for where in reads if where == path] == [path]  # describe's read serves the load too


def test_load_family_and_jobs_take_several_controlnets(files, parts, tmp_path):
    loaded = load_family(files["folder"], motion_module=files["motion_module"],
                         controlnet=[(files["controlnet"], 0.7), (files["controlnet"], 0.4)])
    assert isinstance(loaded.controlnet, VideoMultiControlNet) and loaded.controlnet.scale == [0.7, 0.4]
    result = generate(loaded, request(control_video=[files["control_video"], files["control_video"]], steps=1),
                      progress=False, output="latent")
    assert [entry["scale"] for entry in result.settings[0]["controlnet"]] == [0.7, 0.4]
    from loaders.animatediff.test_sparsectrl import tiny_sparsectrl

    tiny_sparsectrl(parts["unet"], "rgb").save_pretrained(tmp_path / "sparsectrl")
    with pytest.raises(KinemaError, match=r"sparsectrl is SparseCtrl, whose keyframes are its own: give it alone"):
        load_family(files["folder"], motion_module=files["motion_module"],
                    controlnet=[(files["controlnet"], 1.0), (tmp_path / "sparsectrl", 1.0)])

    data = {"model": str(files["folder"]), "motion_module": str(files["motion_module"]), "prompt": "the cat",
            "controlnet": [str(files["controlnet"]), {"path": str(files["controlnet"]), "scale": 0.5}],
            "control_video": [str(files["control_video"]), str(files["control_video"])], "frames": FRAMES,
            "height": SIZE, "width": SIZE}
    job = job_from_mapping(data)
    assert job.controlnet == [(str(files["controlnet"]), 1.0), (str(files["controlnet"]), 0.5)]
    again = job_from_mapping(job.settings())
    assert again.controlnet == job.controlnet and again.model_key() == job.model_key()
    with pytest.raises(KinemaError, match=r"2 ControlNets steer together, so control_video is a list of 2"):
        job_from_mapping({**data, "control_video": str(files["control_video"])})
    with pytest.raises(KinemaError, match=r"the control video 1 has 4 frames and the video 6"):
        job_from_mapping({**data, "frames": 6})
    with pytest.raises(KinemaError, match=r"controlnet lists the ControlNets that steer together, two or more"):
        job_from_mapping({**data, "controlnet": [str(files["controlnet"])]})



def test_several_controlnets_take_keyframe_images_from_a_job(files, parts, tmp_path):
    """Two copies of one ControlNet at scales 0.7 and 0.4 on the same keyframes steer as that ControlNet at 1.1
    (diffusers scales the residuals, which add up); each ControlNet's keyframe images are a list in the job."""
    images = []
    for frame in (0, 3):
        images.append(str(tmp_path / f"{frame:04d}.png"))
        as_pil(control_frames()[frame]).save(images[-1])
    data = {"model": str(files["folder"]), "motion_module": str(files["motion_module"]), "prompt": "the cat",
            "controlnet": [{"path": str(files["controlnet"]), "scale": 0.7},
                           {"path": str(files["controlnet"]), "scale": 0.4}],
            "control_video": [images, images], "control_indices": [0, -1], "control_falloff": [0.5],
            "frames": FRAMES, "height": SIZE, "width": SIZE, "steps": 2, "seed": 3}
    job = job_from_mapping(data)
    assert job.request.control_video == [images, images]
    assert job_from_mapping(job.settings()).request.control_video == [images, images]
    several = load_family(files["folder"], motion_module=files["motion_module"], controlnet=job.controlnet)
    one = load_family(files["folder"], motion_module=files["motion_module"], controlnet=(files["controlnet"], 1.1))
    together = generate(several, job.request, progress=False, output="latent")
    alone = generate(one, replace(job.request, control_video=images), progress=False, output="latent")
    assert (together.latents - alone.latents).abs().max().item() <= 1e-4
    with pytest.raises(KinemaError, match=r"control_indices name 2 frames for 1 control images"):
        job_from_mapping({**data, "control_video": [images, images[:1]]})
    with pytest.raises(KinemaError, match=r"control video 1 is an empty list"):
        job_from_mapping({**data, "control_video": [[], images]})
    with pytest.raises(KinemaError, match=r"control_video lists one ControlNet's images \(paths\); a list of lists is "
                                          r"for several ControlNets"):
        job_from_mapping({**data, "controlnet": str(files["controlnet"]), "control_video": [images]})


def test_an_easyanimate_model_refuses_a_controlnet_from_its_configs(files):
    from kinema.bundled import resolve_model
    from kinema.pipelines.jobs import check_model_request

    with pytest.raises(KinemaError, match=r"kinema-tiny is an EasyAnimate model: a ControlNet steers an SD1.5 UNet, "
                                          r"and EasyAnimate is a diffusion transformer"):
        check_model_request(resolve_model("kinema-tiny"), controlnet=(files["controlnet"], 1.0))


def test_a_list_of_images_is_a_control_video_and_normalising_grays_and_stretches_it(parts, pipe, monkeypatch,
                                                                                 tmp_path):
    ours = family(parts, pipe)
    paths = []
    for index, frame in enumerate(control_frames()):
        tinted = frame * torch.tensor([1.0, 0.5, 0.25]).view(3, 1, 1)  # a colour sketch on a dark ground
        as_pil(tinted).save(tmp_path / f"key{index}.png")
        paths.append(tmp_path / f"key{index}.png")
    seen = control_seen(ours, monkeypatch)
    result = generate(ours, request(steps=1, control_video=paths, normalize_control=True), progress=False,
                      output="latent")
    assert result.settings[0]["control_video"] == [str(path) for path in paths]
    control = seen[0][0]  # (3, F, H, W)
    assert torch.equal(control[0], control[1]) and torch.equal(control[0], control[2])  # gray
    for frame in range(FRAMES):
        assert control[:, frame].min().item() == 0 and control[:, frame].max().item() == 1  # stretched per image


def test_a_prompt_travel_controlnet_map_runs_end_to_end(files, tmp_path, monkeypatch):
    """A prompt-travel config with a controlnet_map on the tiny model: read, run, and its videos' settings say the
    keyframes and falloff it steered with; the config as run reproduces the job."""
    import json

    from kinema.pipelines.jobs import FamilyCache
    from kinema.pipelines.prompt_configs import read_config, run_config

    monkeypatch.chdir(tmp_path)
    poses = tmp_path / "data" / "cn" / "controlnet_openpose"
    poses.mkdir(parents=True)
    for frame in (0, 3):
        as_pil(control_frames(size=16)[frame]).save(poses / f"{frame:04d}.png")  # 16x16: resized to the video
    config = tmp_path / "travel.json"
    config.write_text(json.dumps({
        "name": "travel", "path": str(files["folder"]), "motion_module": str(files["motion_module"]), "seed": [3],
        "steps": 2, "prompt_map": {"0": "the cat"}, "n_prompt": [""], "L": FRAMES, "W": SIZE, "H": SIZE,
        "controlnet_map": {"input_image_dir": "cn", "is_loop": False, "controlnet_openpose": {
            "enable": True, "use_preprocessor": False, "guess_mode": False, "controlnet_conditioning_scale": 0.9,
            "control_guidance_start": 0.0, "control_guidance_end": 1.0, "control_scale_list": [0.5],
            "control_region_list": [], "path": str(files["controlnet"])}}}))
    read = read_config(config)
    [video] = run_config(read, tmp_path / "out", cache=FamilyCache(max_models=1))
    settings = json.loads((video.parent / "job.json").read_text())
    assert settings["controlnet"] == {"path": str(files["controlnet"]), "scale": 0.9}
    assert (settings["control_indices"], settings["control_falloff"], settings["control_loop"]) == ([0, 3], [0.5],
                                                                                                    False)
    again = read_config(tmp_path / "out" / "config.yaml")
    assert again.runs[0].job.settings() == read.runs[0].job.settings()
