"""ControlNet: diffusers folders and original-layout single files load strictly into diffusers' ControlNetModel, and
sampling a VideoUNet under one equals diffusers' AnimateDiffControlNetPipeline on the same weights and control
frames; bad files are one line."""

import pytest
import torch
from diffusers import AnimateDiffControlNetPipeline, ControlNetModel, MotionAdapter
from loaders.test_stable_diffusion import ldm_unet_key, write_tokenizer
from PIL import Image
from safetensors.torch import save_file
from sampling.test_parity import FRAMES, GUIDANCE, STEPS, embeddings, tiny_pipeline_parts
from tiny_models import perturb
from tiny_sd import tiny_sd_parts

import kinema
from kinema.errors import KinemaError
from kinema.loaders.animatediff.keys import diffusers_to_original_key
from kinema.loaders.controlnet import check_controlnet_scale, controlnet_config, describe_controlnet, read_controlnet
from kinema.loaders.source import Source
from kinema.models.controlnet import VideoControlNet
from kinema.models.video_unet import VideoUNet
from kinema.sampling.denoisers import UNetDenoiser
from kinema.sampling.loop import initial_noise, sample
from kinema.sampling.schedulers import make_scheduler

# The tiny VAE halves the frame size, so the control-image embedding downsamples once (SD1.5's: three times).
TINY_HINT = (16, 32)


def tiny_controlnet(unet2d, seed=5, hint=TINY_HINT) -> ControlNetModel:
    """A ControlNet for the tiny UNet, its zero-initialised output convolutions perturbed so they act."""
    torch.manual_seed(seed)
    return perturb(ControlNetModel.from_unet(unet2d, conditioning_embedding_out_channels=hint), seed, 0.05).eval()


def motion_adapter() -> MotionAdapter:
    return perturb(MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                                 motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False),
                   seed=3, scale=0.1)


def generation_parts(tokenizer_folder) -> dict:
    """What diffusers' AnimateDiff pipelines and kinema's AnimateDiffFamily take, tiny: `tiny_sd_parts` (seed 1), the
    tiny tokenizer written to `tokenizer_folder` and `motion_adapter()`."""
    from kinema.loaders.stable_diffusion import load_tokenizer

    write_tokenizer(tokenizer_folder)
    tokenizer = load_tokenizer(tokenizer_folder)
    tokenizer.model_max_length = 77  # SD1.5's; the tiny vocabulary's folder says none, which diffusers cannot pad to
    return {**tiny_sd_parts(seed=1), "tokenizer": tokenizer, "adapter": motion_adapter()}


def control_frames(frames=FRAMES, size=32) -> torch.Tensor:
    """`(F, 3, H, W)` in [0, 1]: a bright square moving right on a dark ground, like an edge or pose map."""
    # Whole 255ths, so that the PIL images diffusers' pipelines take hold exactly these values.
    video = torch.full((frames, 3, size, size), 26 / 255)
    for f in range(frames):
        video[f, :, 8:20, 4 + 3 * f:16 + 3 * f] = 230 / 255
    return video


def as_pil(frame: torch.Tensor) -> Image.Image:
    return Image.fromarray((frame.permute(1, 2, 0) * 255).round().byte().numpy())


def original_layout(controlnet: ControlNetModel, prefix="control_model.") -> dict[str, torch.Tensor]:
    """The ControlNet under lllyasviel's original names (ControlNet-v1-1's .pth layout)."""
    config = controlnet.config
    state = {}
    for key, value in controlnet.state_dict().items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key.removeprefix("controlnet_cond_embedding.")
            layer, _, tail = rest.rpartition(".")
            index = {"conv_in": 0, "conv_out": 2 * len(config.conditioning_embedding_out_channels) * 2 - 2}.get(layer)
            if index is None:  # blocks.i -> input_hint_block.2(i+1)
                index = 2 * (int(layer.split(".")[1]) + 1)
            name = f"input_hint_block.{index}.{tail}"
        elif key.startswith("controlnet_down_blocks."):
            i, tail = key.removeprefix("controlnet_down_blocks.").split(".", 1)
            name = f"zero_convs.{i}.0.{tail}"
        elif key.startswith("controlnet_mid_block."):
            name = f"middle_block_out.0.{key.removeprefix('controlnet_mid_block.')}"
        else:
            name = ldm_unet_key(key, config.layers_per_block, set())
        state[prefix + name] = value.clone()
    return state


@pytest.fixture(scope="module")
def controlnet(unet2d):
    return tiny_controlnet(unet2d)


@pytest.fixture(scope="module")
def controlnet_folder(controlnet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn") / "control_v11p_tiny"
    controlnet.save_pretrained(folder)
    return folder


def video_unet_like(pipe, unet2d) -> VideoUNet:
    video = VideoUNet.from_unet2d(unet2d, motion_module={"type": "temporal", "norm_mode": "across_frames",
                                                         "max_frames": 32})
    video.load_motion_state_dict({diffusers_to_original_key(k): v for k, v in pipe.unet.state_dict().items()
                                  if ".motion_modules." in k and not k.endswith("pos_embed.pe")})
    return video.eval()


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_sampling_under_a_controlnet_equals_diffusers(unet2d, controlnet, controlnet_folder, tmp_path, scale):
    pipe = AnimateDiffControlNetPipeline(**tiny_pipeline_parts(tmp_path / "tokenizer"), unet=unet2d,
                                         motion_adapter=motion_adapter(), controlnet=controlnet,
                                         scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    video = video_unet_like(pipe, unet2d)
    loaded = VideoControlNet(read_controlnet(controlnet_folder, dict(unet2d.config)), scale=scale)
    frames = control_frames()
    # One video: diffusers' pipeline repeats the control frames for a batch of prompts only when given one frame.
    noise = initial_noise((1, 4, FRAMES, 16, 16), seeds=[11])
    cond, uncond = (states[:1] for states in embeddings())
    control = frames.permute(1, 0, 2, 3)[None]  # (B, 3, F, H, W)
    with torch.no_grad():
        expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond,
                        conditioning_frames=[as_pil(f) for f in frames], controlnet_conditioning_scale=scale,
                        latents=noise.clone(), num_frames=FRAMES, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, height=32, width=32, output_type="latent", return_dict=False)[0]
        ours = sample(UNetDenoiser(video, loaded), make_scheduler("ddim"), noise,
                      {"encoder_hidden_states": cond, "control_frames": control},
                      {"encoder_hidden_states": uncond, "control_frames": control}, STEPS, GUIDANCE, progress=False)
        uncontrolled = sample(UNetDenoiser(video), make_scheduler("ddim"), noise, {"encoder_hidden_states": cond},
                              {"encoder_hidden_states": uncond}, STEPS, GUIDANCE, progress=False)
    difference = (ours - expected).abs().max().item()
    print(f"ControlNet at scale {scale}: max abs difference {difference:.3g}")
    assert difference <= 1e-3
    # The control counts: without it the latents end far from diffusers' controlled ones.
    assert (uncontrolled - expected).abs().max().item() > 1e-2


# ---------------------------------------------------------------- files people have

SD15_HINT = (16, 32, 96, 256)  # what a single file's ControlNet gets: diffusers' from_unet default, SD1.5's


@pytest.fixture(scope="module")
def file_controlnet(unet2d):
    """A ControlNet with the control embedding a published single file has."""
    return tiny_controlnet(unet2d, seed=6, hint=SD15_HINT)


def assert_same_weights(loaded, reference):
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_an_original_layout_file_loads_to_the_same_weights(unet2d, file_controlnet, tmp_path, prefix):
    path = tmp_path / "control_v11p_sd15_tiny.safetensors"
    save_file(original_layout(file_controlnet, prefix), path)
    assert_same_weights(read_controlnet(path, dict(unet2d.config)), file_controlnet)
    report = Source(path, {"unet_config": dict(unet2d.config)})
    described = describe_controlnet(report)
    assert described["kind"] == "controlnet" and described["format"] == "original"
    assert described["conditioning_channels"] == 3 and described["block_out_channels"] == [32, 64]


def test_a_pickled_original_file_is_read_without_unpickling_code(unet2d, file_controlnet, tmp_path):
    path = tmp_path / "control_v11p_sd15_tiny.pth"
    torch.save({"state_dict": original_layout(file_controlnet)}, path)
    assert_same_weights(read_controlnet(path, dict(unet2d.config)), file_controlnet)


def test_a_diffusers_named_single_file_and_a_folder_load(unet2d, file_controlnet, controlnet, controlnet_folder,
                                                         tmp_path):
    path = tmp_path / "controlnet.safetensors"
    save_file({k: v.contiguous() for k, v in file_controlnet.state_dict().items()}, path)
    assert_same_weights(read_controlnet(path, dict(unet2d.config)), file_controlnet)
    assert_same_weights(read_controlnet(controlnet_folder), controlnet)
    described = kinema.describe(controlnet_folder)
    assert (described["kind"], described["format"]) == ("controlnet", "diffusers-folder")


def test_the_shipped_sd15_config_makes_the_published_controlnet():
    config = controlnet_config()
    # lllyasviel/sd-controlnet-canny's config.json, the published SD1.5 ControlNet's.
    assert tuple(config["block_out_channels"]) == (320, 640, 1280, 1280)
    assert (config["cross_attention_dim"], config["conditioning_channels"], config["layers_per_block"]) == (768, 3, 2)
    assert tuple(config["conditioning_embedding_out_channels"]) == SD15_HINT
    with torch.device("meta"):
        count = sum(p.numel() for p in ControlNetModel.from_config(config).parameters())
    # The published float32 files (lllyasviel's control_v11p_sd15_*.pth, sd-controlnet-* folders) are 1.45 GB.
    assert 1.44e9 < 4 * count < 1.46e9


def test_a_single_file_is_described_against_sd15_by_default(file_controlnet, tmp_path):
    path = tmp_path / "control_tiny.safetensors"
    save_file(original_layout(file_controlnet), path)
    with pytest.raises(KinemaError, match=r"control_tiny.safetensors: its weights do not fit the ControlNet: .* "
                                          r"Is it an SD1.5 ControlNet"):
        kinema.describe(path)


# ---------------------------------------------------------------- bad files


def test_an_incomplete_file_is_one_line(unet2d, file_controlnet, tmp_path):
    state = original_layout(file_controlnet)
    del state["control_model.zero_convs.3.0.weight"]
    path = tmp_path / "cut.safetensors"
    save_file(state, path)
    with pytest.raises(KinemaError, match=r"^.*cut.safetensors: the file lacks 1 ControlNet tensors \(e.g. "
                                          r"controlnet_down_blocks.3.weight\)"):
        read_controlnet(path, dict(unet2d.config))


def test_weights_holding_nan_are_refused(unet2d, file_controlnet, tmp_path):
    state = original_layout(file_controlnet)
    state["control_model.zero_convs.0.0.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, path)
    with pytest.raises(KinemaError, match=r"nan.safetensors: .*NaN"):
        read_controlnet(path, dict(unet2d.config))


def test_a_controlnet_for_another_unet_is_named_before_loading(controlnet_folder, unet2d):
    from kinema.loaders.controlnet import check_fits_unet

    with pytest.raises(KinemaError, match=r"the ControlNet's block_out_channels is \[32, 64\] and the base UNet's "
                                          r"\[320, 640, 1280, 1280\], so its residuals do not fit"):
        check_fits_unet(ControlNetModel.load_config(controlnet_folder), controlnet_config())
    # SDXL's ControlNets add time and text embeddings: at equal widths, every other setting would pass.
    own = dict(ControlNetModel.load_config(controlnet_folder))
    with pytest.raises(KinemaError, match=r"the ControlNet's addition_embed_type is text_time and the base UNet's "
                                          r"None"):
        check_fits_unet({**own, "addition_embed_type": "text_time"}, dict(unet2d.config))
    check_fits_unet(own, dict(unet2d.config))
    source = Source(controlnet_folder, {"unet_config": {**controlnet_config(), "block_out_channels": [64, 64]}})
    with pytest.raises(KinemaError, match=r"control_v11p_tiny: the ControlNet's block_out_channels"):
        describe_controlnet(source)


def test_a_sparsectrl_file_is_left_to_the_sparsectrl_reader(tmp_path):
    path = tmp_path / "v3_sd15_sparsectrl_rgb.safetensors"
    save_file({"controlnet_cond_embedding.weight": torch.zeros(320, 4, 3, 3),
               "controlnet_down_blocks.0.weight": torch.zeros(320, 320, 1, 1),
               "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": torch.ones(320)}, path)
    assert describe_controlnet(Source(path)) is None
    with pytest.raises(KinemaError, match=r"its weights do not fit SparseCtrl: .*Is it AnimateDiff v3's SparseCtrl"):
        kinema.describe(path)


@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf"), True, "1"])
def test_a_bad_scale_is_one_line(scale):
    with pytest.raises(KinemaError, match=r"^the ControlNet scale must be at least 0 and finite"):
        check_controlnet_scale(scale)


def test_loading_needs_the_video_unet(controlnet_folder):
    with pytest.raises(KinemaError, match=r"is a ControlNet, which steers an AnimateDiff model frame by frame: pass "
                                          r"video_unet="):
        kinema.load(controlnet_folder)


def test_kinema_load_gives_a_controlnet_for_the_video_unet(unet2d, controlnet, controlnet_folder):
    video = VideoUNet.from_unet2d(unet2d).eval()
    loaded = kinema.load(controlnet_folder, video_unet=video, scale=0.5)
    assert isinstance(loaded, VideoControlNet) and loaded.scale == 0.5 and loaded.path == str(controlnet_folder)
    assert_same_weights(loaded.controlnet, controlnet)


# ---------------------------------------------------------------- the residuals, and step caching


def test_step_caching_adds_the_residuals_where_the_plain_forward_does(unet2d, controlnet):
    video = VideoUNet.from_unet2d(unet2d).eval()
    net = VideoControlNet(controlnet, scale=0.8)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 16, 16, generator=gen)
    text = torch.randn(2, 7, 32, generator=gen)
    control = torch.rand(2, 3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        residuals = net(latents, 500, VideoUNet.text_per_frame(text, 2, 3), control)
        plain = video(latents, 500, text, **residuals)
        full, deep = video.forward_deep_cached(latents, 500, text, depth=1, **residuals)
        shallow, _ = video.forward_deep_cached(latents, 500, text, depth=1, deep_features=deep, **residuals)
        uncontrolled = video(latents, 500, text)
    assert (full - plain).abs().max().item() <= 1e-5
    assert (shallow - plain).abs().max().item() <= 1e-5  # the same step's deep features: the same output
    assert (plain - uncontrolled).abs().max().item() > 1e-3


def test_frame_weights_scale_each_frames_residuals_as_diffusers_controlnet_at_that_scale(unet2d, controlnet):
    """Keyframes and their neighbours: each frame's residuals are diffusers' ControlNetModel's on that frame alone at
    conditioning_scale scale * weight; a frame of weight 0 gets none, and the ControlNet does not run on it."""
    net = VideoControlNet(controlnet, scale=0.8)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 4, 16, 16, generator=gen)
    text = VideoUNet.text_per_frame(torch.randn(2, 7, 32, generator=gen), 2, 4)
    control = torch.rand(2, 3, 4, 32, 32, generator=gen)
    weights = torch.tensor([[1.0, 0.5, 0.0, 0.25], [0.0, 0.0, 1.0, 0.0]])
    seen = []
    hook = controlnet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            out = net(latents, torch.tensor([500, 300]), text, control, weights[:, None, :, None, None])
    finally:
        hook.remove()
    assert seen == [4]  # the four steered frames of eight
    for clip, frame in ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 2)):
        row = clip * 4 + frame
        with torch.no_grad():
            down, mid = controlnet(latents[clip, :, frame][None], torch.tensor([[500, 300][clip]]),
                                   encoder_hidden_states=text[row][None], controlnet_cond=control[clip, :, frame][None],
                                   conditioning_scale=0.8 * weights[clip, frame].item(), return_dict=False)
        for ours, theirs in zip((*out["down_block_additional_residuals"], out["mid_block_additional_residual"]),
                                (*down, mid), strict=True):
            assert (ours[row] - theirs[0]).abs().max().item() <= 1e-5
        if weights[clip, frame] == 0:
            assert all(r[row].abs().max().item() == 0 for r in out["down_block_additional_residuals"])
    with torch.no_grad():
        assert net(latents, 500, text, control, torch.zeros(2, 1, 4, 1, 1)) == {}
    with pytest.raises(KinemaError, match=r"frame weights are \(B, 1, F, 1, 1\) = \(2, 1, 4, 1, 1\)"):
        net(latents, 500, text, control, torch.ones(2, 1, 4))


def test_control_images_that_do_not_fit_are_one_line(unet2d, controlnet):
    net = VideoControlNet(controlnet)
    with pytest.raises(KinemaError, match=r"control images \(1, 3, 2, 32, 32\) do not fit latents \(1, 4, 3, 16, 16\)"):
        net(torch.zeros(1, 4, 3, 16, 16), 1, torch.zeros(3, 7, 32), torch.zeros(1, 3, 2, 32, 32))
    with pytest.raises(KinemaError, match=r"no ControlNet is loaded to read them"):
        UNetDenoiser(VideoUNet.from_unet2d(unet2d))(torch.zeros(1, 4, 2, 16, 16), 1, {
            "encoder_hidden_states": torch.zeros(1, 7, 32), "control_frames": torch.zeros(1, 3, 2, 32, 32)})


def test_a_folder_with_only_fp16_weights_or_a_pickle_loads(unet2d, controlnet, controlnet_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file

    weights = load_file(controlnet_folder / "diffusion_pytorch_model.safetensors")
    for name in ("fp16", "bin"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(controlnet_folder / "config.json", folder / "config.json")
        if name == "fp16":  # lllyasviel's folders also hold diffusion_pytorch_model.fp16.safetensors
            save_file({k: v.half() for k, v in weights.items()}, folder / "diffusion_pytorch_model.fp16.safetensors")
        else:
            torch.save(weights, folder / "diffusion_pytorch_model.bin")
    assert_same_weights(read_controlnet(tmp_path / "bin"), controlnet)
    halved = read_controlnet(tmp_path / "fp16")
    assert next(halved.parameters()).dtype == torch.float32  # read in float32 unless asked
    assert all(torch.equal(v, controlnet.state_dict()[k].half().float()) for k, v in halved.state_dict().items())
    assert kinema.describe(tmp_path / "fp16")["dtype"] == "float16"
