"""PIA (Personalized Image Animator): its motion adapter, a MotionAdapter with a 9-channel conv_in, loads from the
published layouts (openmmlab/PIA-condition-adapter's diffusers folder; pia.ckpt's AnimateDiff names beside conv_in),
the UNet's conv_in widened as diffusers and ComfyUI-AnimateDiff widen it, and image-to-video equals diffusers'
PIAPipeline on the same weights, image and noise."""

import pytest
import torch
from diffusers import MotionAdapter
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.deprecated.pia.pipeline_pia import RANGE_list, prepare_mask_coef_by_statistics
from loaders.test_controlnet import as_pil, generation_parts
from safetensors.torch import save_file
from tiny_models import perturb
from tiny_sd import write_sd_folder

from kinema.errors import KinemaError
from kinema.loaders import describe
from kinema.loaders.animatediff import convert_motion_module, load_motion_module, save_motion_module
from kinema.loaders.animatediff.keys import diffusers_to_original_key
from kinema.pipelines.animatediff import PIA_MOTION_PRESETS, AnimateDiffFamily, pia_mask_values
from kinema.pipelines.generation import generate
from kinema.pipelines.request import GenerationRequest
from kinema.sampling.loop import initial_noise
from kinema.sampling.schedulers import make_scheduler

FRAMES, SIZE, STEPS = 4, 32, 4


def pia_adapter(seed=3) -> MotionAdapter:
    """openmmlab/PIA-condition-adapter's config at the tiny UNet's widths, every weight perturbed."""
    return perturb(MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                                 motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False,
                                 conv_in_channels=9), seed=seed, scale=0.1)


def original_layout(adapter: MotionAdapter) -> dict[str, torch.Tensor]:
    """pia.ckpt's layout: AnimateDiff's original motion names (their frame tables too) beside conv_in."""
    state = {}
    for key, value in adapter.state_dict().items():
        if key.endswith("pos_embed.pe"):  # one table per attention in the original layout
            for attention in (0, 1):
                name = diffusers_to_original_key(key.replace("pos_embed.pe", f"attn{attention + 1}.to_q.weight"))
                state[name.replace("to_q.weight", "pos_encoder.pe")] = value.clone()
        else:
            state[diffusers_to_original_key(key)] = value.clone()
    return state


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return {**generation_parts(tmp_path_factory.mktemp("tokenizer")), "adapter": pia_adapter()}


@pytest.fixture(scope="module")
def files(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("pia")
    parts["adapter"].save_pretrained(root / "PIA-condition-adapter")
    save_file(original_layout(parts["adapter"]), root / "pia.safetensors")
    return {"folder": root / "PIA-condition-adapter", "file": root / "pia.safetensors", "root": root}


def start_image() -> torch.Tensor:
    """`(3, H, W)` in whole 255ths (so the PIL image diffusers takes holds the same values): a square on a ramp."""
    image = torch.linspace(0, 1, SIZE).view(1, 1, SIZE).expand(3, SIZE, SIZE).clone()
    image[0, 8:20, 6:18] = 1.0
    return (image * 255).round() / 255


def test_the_mask_values_are_diffusers_presets():
    from kinema.pipelines.request import PIA_MOTION_NAMES

    assert [list(p) for p in PIA_MOTION_PRESETS] == RANGE_list
    assert len(PIA_MOTION_NAMES) == len(RANGE_list)  # one name per preset (the CLI's, the web app's choices)
    for preset in range(len(RANGE_list)):
        for frames in (1, 4, 16, 24):
            assert pia_mask_values(frames, preset) == prepare_mask_coef_by_statistics(frames, 0, preset)


def test_both_layouts_load_to_the_same_widened_unet(parts, files):
    unet2d, adapter = parts["unet"], parts["adapter"]
    from_folder = load_motion_module(files["folder"], unet2d)
    from_file = load_motion_module(files["file"], unet2d)
    conv = from_folder.unet.conv_in
    assert conv.in_channels == 9 and from_folder.unet.config.in_channels == 9
    # diffusers' UNetMotionModel.from_unet2d: the latents' channels keep the base model's weights and bias.
    expected = torch.cat([unet2d.conv_in.weight, adapter.conv_in.weight[:, 4:]], dim=1)
    assert torch.equal(conv.weight, expected) and torch.equal(conv.bias, unet2d.conv_in.bias)
    ours, other = from_folder.motion_state_dict(), from_file.motion_state_dict()
    assert ours.keys() == other.keys() and all(torch.equal(ours[k], other[k]) for k in ours)
    assert torch.equal(from_file.unet.conv_in.weight, expected)
    for path in (files["folder"], files["file"]):
        report = describe(path)
        assert report["kind"] == "motion_module" and "PIA: a 9-channel conv_in" in report["image_conditioning"]


def test_generate_from_an_image_equals_diffusers_pia_pipeline(parts, files, monkeypatch):
    from diffusers import PIAPipeline

    # diffusers draws a sample of the VAE posterior for the image; kinema takes its mean, so a run repeats. The
    # reference takes the mean here too.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipe = PIAPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                       unet=parts["unet"], motion_adapter=parts["adapter"], scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    family = AnimateDiffFamily(load_motion_module(files["folder"], parts["unet"]).eval(), parts["vae"],
                               parts["text_encoder"], parts["tokenizer"])
    assert family.animates_image and family.latent_channels == 4
    noise = initial_noise((1, 4, FRAMES, SIZE // 2, SIZE // 2), seeds=[5])
    for preset in (0, 2, 7):
        request = GenerationRequest(prompt="the cat", negative_prompt="th", frames=FRAMES, height=SIZE, width=SIZE,
                                    steps=STEPS, guidance=7.5, seeds=[5], scheduler="ddim", image=start_image(),
                                    pia_motion=preset)
        ours = generate(family, request, progress=False, output="latent")
        with torch.no_grad():
            expected = pipe(image=as_pil(start_image()), prompt="the cat", negative_prompt="th", motion_scale=preset,
                            latents=noise.clone(), num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=7.5,
                            height=SIZE, width=SIZE, output_type="latent", return_dict=False)[0]
        difference = (ours.latents - expected).abs().max().item()
        print(f"PIA motion {preset}: max abs difference {difference:.3g}, latents' mean abs "
              f"{expected.abs().mean():.3g}")
        assert difference <= 1e-3
        assert ours.settings[0]["pia_motion"] == preset
    other = generate(family, GenerationRequest(**{**vars(request), "image": start_image().flip(-1)}), progress=False,
                     output="latent")
    assert (other.latents - expected).abs().max().item() > 1e-2  # the image reaches the video


@pytest.mark.parametrize("fields, message", [
    ({"image": None}, r"is a PIA image animator: it animates one start image \(image, --image\), with no end image, "
                      r"and makes nothing else \(text-to-video\)"),
    ({"end_image": torch.rand(3, SIZE, SIZE)}, r"makes nothing else \(image-to-video with an end image\)"),
    ({"video": torch.rand(FRAMES, 3, SIZE, SIZE), "image": None}, r"makes nothing else \(video-to-video\)"),
    ({"pia_motion": 9}, r"pia_motion is one of PIA's motion presets 0 to 8, got 9"),
])
def test_what_pia_cannot_make_is_one_line_before_sampling(parts, files, monkeypatch, fields, message):
    family = AnimateDiffFamily(load_motion_module(files["folder"], parts["unet"]).eval(), parts["vae"],
                               parts["text_encoder"], parts["tokenizer"])
    monkeypatch.setattr(family.model, "forward", lambda *a, **k: pytest.fail("sampling ran"))
    request = dict(prompt="the cat", frames=FRAMES, height=SIZE, width=SIZE, steps=1, image=start_image())
    with pytest.raises(KinemaError, match=message):
        generate(family, GenerationRequest(**{**request, **fields}), progress=False)


def test_a_pia_preset_without_pia_is_refused(parts):
    from kinema.models.video_unet import VideoUNet

    plain = AnimateDiffFamily(VideoUNet.from_unet2d(parts["unet"]).eval(), parts["vae"], parts["text_encoder"],
                              parts["tokenizer"])
    with pytest.raises(KinemaError, match=r"pia_motion \(--pia-motion\) is a PIA motion preset, and .* is not a PIA "
                                          r"image animator"):
        generate(plain, GenerationRequest(prompt="a cat", frames=FRAMES, height=SIZE, width=SIZE, steps=1,
                                          pia_motion=1), progress=False)


def test_converting_or_saving_would_drop_conv_in_so_it_is_refused(parts, files, tmp_path):
    with pytest.raises(KinemaError, match=r"is a PIA image animator: its conv_in, which no motion-module layout "
                                          r"holds on its own, would be lost"):
        convert_motion_module(files["file"], tmp_path / "out.safetensors", "kinema")
    with pytest.raises(KinemaError, match=r"takes 9 input channels \(a PIA image animator's conv_in\)"):
        save_motion_module(load_motion_module(files["file"], parts["unet"]), tmp_path / "mm.safetensors")
    assert not list(tmp_path.iterdir())


def test_bad_pia_files_are_one_line(parts, files, tmp_path):
    state = original_layout(parts["adapter"])
    save_file({k: v for k, v in state.items() if k != "conv_in.bias"}, tmp_path / "no_bias.safetensors")
    with pytest.raises(KinemaError, match=r"no_bias.safetensors: a PIA motion adapter holds conv_in.weight "
                                          r"\(out, in, k, k\) and conv_in.bias"):
        load_motion_module(tmp_path / "no_bias.safetensors", parts["unet"])
    wide = {**state, "conv_in.weight": torch.zeros(64, 9, 3, 3), "conv_in.bias": torch.zeros(64)}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(KinemaError, match=r"PIA's conv_in \(64, 9, 3, 3\) does not widen this UNet's conv_in "
                                          r"\(32, 4, 3, 3\)"):
        load_motion_module(tmp_path / "wide.safetensors", parts["unet"])


def test_cli_animates_an_image_with_a_pia_module(parts, files, tmp_path):
    import json

    from kinema.cli import main

    sd = write_sd_folder(tmp_path / "tiny-sd", {name: parts[name] for name in ("unet", "vae", "text_encoder")})
    as_pil(start_image()).save(tmp_path / "start.png")
    out = tmp_path / "animated.mp4"
    main(["generate", "a cat", "--model", str(sd), "--motion-module", str(files["folder"]), "--image",
          str(tmp_path / "start.png"), "--pia-motion", "1", "--frames", str(FRAMES), "--height", str(SIZE),
          "--width", str(SIZE), "--steps", "1", "-o", str(out), "--quiet"])
    settings = json.loads(out.with_name(out.name + ".json").read_text())
    assert (settings["pia_motion"], settings["mode"]) == (1, "image-to-video")


def test_a_controlnet_steers_a_pia_model_from_the_latents(parts, files, tmp_path):
    from loaders.test_controlnet import TINY_HINT, control_frames, tiny_controlnet

    from kinema.pipelines.load import load_family

    sd = write_sd_folder(tmp_path / "tiny-sd", {name: parts[name] for name in ("unet", "vae", "text_encoder")})
    tiny_controlnet(parts["unet"], seed=8, hint=TINY_HINT).save_pretrained(tmp_path / "control")
    family = load_family(sd, motion_module=files["folder"], controlnet=(tmp_path / "control", 0.8))
    assert family.animates_image and family.controlnet.controlnet.config.in_channels == 4  # the latents alone
    result = generate(family, GenerationRequest(prompt="a cat", frames=FRAMES, height=SIZE, width=SIZE, steps=1,
                                                image=start_image(), control_video=control_frames()),
                      progress=False, output="latent")
    assert result.latents.shape == (1, 4, FRAMES, SIZE // 2, SIZE // 2)


def test_context_windows_hand_each_window_its_frames_mask_values(parts, files, monkeypatch):
    from kinema.pipelines.request import ContextSettings

    family = AnimateDiffFamily(load_motion_module(files["folder"], parts["unet"]).eval(), parts["vae"],
                               parts["text_encoder"], parts["tokenizer"])
    seen = []
    forward = family.model.forward

    def spy(sample, *args, **kwargs):
        seen.append(sample[:, 4, :, 0, 0].clone())  # the mask channel, per frame
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(family.model, "forward", spy)
    generate(family, GenerationRequest(prompt="a cat", frames=8, height=SIZE, width=SIZE, steps=1, guidance=1.0,
                                       image=start_image(), pia_motion=2,
                                       context=ContextSettings(length=4, overlap=2)), progress=False, output="latent")
    values = torch.tensor(pia_mask_values(8, 2))
    assert [got.shape for got in seen] == [(1, 4)] * 3
    for got, start in zip(seen, (0, 2, 4), strict=True):
        torch.testing.assert_close(got[0], values[start:start + 4])


def test_jobs_take_preset_0_and_refuse_what_pia_cannot_make_before_loading(files, tmp_path):
    from kinema.pipelines.jobs import job_from_mapping

    as_pil(start_image()).save(tmp_path / "start.png")
    data = {"model": "kinema-tiny-ad", "motion_module": str(files["folder"]), "prompt": "a cat",
            "image": str(tmp_path / "start.png"), "height": SIZE, "width": SIZE, "pia_motion": 0}
    assert job_from_mapping(data).request.pia_motion == 0  # the default preset, which jobs once refused
    with pytest.raises(KinemaError, match=r"pia_motion is one of PIA's motion presets 0 to 8, got 9"):
        job_from_mapping({**data, "pia_motion": 9})
    with pytest.raises(KinemaError, match=r"the motion module .*PIA-condition-adapter is a PIA image animator: .* "
                                          r"\(text-to-video\)"):
        job_from_mapping({k: v for k, v in data.items() if k != "image"})


def test_a_pickled_pia_ckpt_is_told_from_its_names_before_loading(parts, files, tmp_path):
    """pia.ckpt is a torch zip checkpoint: its tensor names are read from the pickle's opcodes, nothing unpickled."""
    from kinema.loaders.animatediff.pia import is_pia_file
    from kinema.pipelines.request import check_pia_module

    state = original_layout(parts["adapter"])
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "pia.ckpt")
    motion = {k: v for k, v in state.items() if not k.startswith("conv_in.")}
    torch.save(motion, tmp_path / "mm.ckpt")
    torch.save({"conv_in.weight": torch.zeros(1, 9, 1, 1)}, tmp_path / "unet_part.ckpt")  # no motion modules
    assert is_pia_file(tmp_path / "pia.ckpt") is True
    assert is_pia_file(tmp_path / "mm.ckpt") is False
    assert is_pia_file(tmp_path / "unet_part.ckpt") is False
    # Only tensors' names count, however nested and whatever the pickle protocol: not a string stored beside them.
    torch.save({"state_dict": motion, "note": "conv_in.weight", "bias": "conv_in.bias"}, tmp_path / "noted.ckpt")
    assert is_pia_file(tmp_path / "noted.ckpt") is False
    torch.save({"model": {"unet": state}}, tmp_path / "nested.ckpt", pickle_protocol=4)
    assert is_pia_file(tmp_path / "nested.ckpt") is True
    parameters = {name: torch.nn.Parameter(value) for name, value in state.items()}
    torch.save(parameters, tmp_path / "parameters.ckpt", pickle_protocol=5)
    assert is_pia_file(tmp_path / "parameters.ckpt") is True
    (tmp_path / "legacy.ckpt").write_bytes(b"\x80\x02" + b"\x00" * 16)  # a legacy pickle: told when it loads
    assert is_pia_file(tmp_path / "legacy.ckpt") is None
    with pytest.raises(KinemaError, match=r"pia.ckpt is a PIA image animator: .* \(text-to-video\)"):
        check_pia_module(tmp_path / "pia.ckpt", GenerationRequest(prompt="a cat", frames=FRAMES))
    check_pia_module(tmp_path / "mm.ckpt", GenerationRequest(prompt="a cat", frames=FRAMES))
