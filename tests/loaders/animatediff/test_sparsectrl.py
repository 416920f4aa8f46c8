"""SparseCtrl: AnimateDiff v3's keyframe encoders (RGB and scribble) load from files with the published names (and
from diffusers folders) into diffusers' SparseControlNetModel, and generate() with keyframes equals diffusers'
AnimateDiffSparseControlNetPipeline on the same weights; bad keyframe placements are one line."""

import logging
import re

import pytest
import torch
from diffusers import AnimateDiffSparseControlNetPipeline, SparseControlNetModel
from loaders.test_controlnet import as_pil, control_frames, generation_parts, video_unet_like
from safetensors.torch import save_file

import kinema
from kinema.errors import KinemaError
from kinema.loaders.animatediff.sparsectrl import describe_sparsectrl, read_sparsectrl, sparsectrl_config
from kinema.loaders.source import Source
from kinema.models.controlnet import VideoSparseControlNet
from kinema.models.video_unet import VideoUNet
from kinema.pipelines.animatediff import AnimateDiffFamily
from kinema.pipelines.generation import generate
from kinema.pipelines.request import GenerationRequest, control_places
from kinema.sampling.loop import initial_noise
from kinema.sampling.schedulers import make_scheduler

FRAMES, SIZE, STEPS = 4, 32, 4


def tiny_sparsectrl(unet2d, variant: str, hint=(16, 32), seed=9) -> SparseControlNetModel:
    config = sparsectrl_config(dict(unet2d.config), variant, 4 if variant == "rgb" else 3)
    torch.manual_seed(seed)
    embedding = {} if variant == "rgb" else {"conditioning_embedding_out_channels": hint}
    model = SparseControlNetModel(**config, **embedding)
    tables = {k for k in model.state_dict() if k.endswith("pos_embed.pe")}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised output convolutions would make every test pass
        for name, param in model.named_parameters():
            if name not in tables:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


def original_layout(model: SparseControlNetModel) -> dict[str, torch.Tensor]:
    """The network under AnimateDiff's names (v3_sd15_sparsectrl_*.ckpt): diffusers' motion names turned back."""
    state = {}
    for key, value in model.state_dict().items():
        if ".motion_modules." in key:
            key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
            key = key.replace(".pos_embed.pe", ".attention_blocks.0.pos_encoder.pe")
            key = key.replace(".attn1.", ".attention_blocks.0.").replace(".norm1.", ".norms.0.")
            key = key.replace(".norm3.", ".ff_norm.")
        state[key] = value.clone()
    return state


def assert_same_weights(loaded, reference):
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("variant", ["rgb", "scribble"])
def test_a_published_layout_file_loads_to_the_same_weights(unet2d, tmp_path, variant):
    model = tiny_sparsectrl(unet2d, variant, hint=(16, 32, 96, 256))  # what a file gets: SD1.5's embedding
    state = original_layout(model)
    assert "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q" \
           ".weight" in state
    ckpt = tmp_path / f"v3_sd15_sparsectrl_{variant}.ckpt"
    torch.save({"controlnet": {**state, "animatediff_config": {"use_simplified_condition_embedding": True}}}, ckpt)
    loaded = read_sparsectrl(ckpt, dict(unet2d.config))
    assert_same_weights(loaded, model)
    report = describe_sparsectrl(Source(ckpt, {"unet_config": dict(unet2d.config)}))
    assert (report["kind"], report["format"], report["variant"]) == ("sparsectrl", "original", variant)
    assert report["conditioning_channels"] == (4 if variant == "rgb" else 3)
    safetensors = tmp_path / "sparsectrl.safetensors"
    save_file({k: v for k, v in state.items() if not k.endswith("pos_encoder.pe")}, safetensors)
    assert_same_weights(read_sparsectrl(safetensors, dict(unet2d.config)), model)


def test_a_diffusers_folder_loads_and_the_front_door_names_it(unet2d, tmp_path, caplog):
    model = tiny_sparsectrl(unet2d, "scribble")
    model.save_pretrained(tmp_path / "sparsectrl-scribble")
    assert_same_weights(read_sparsectrl(tmp_path / "sparsectrl-scribble"), model)
    report = kinema.describe(tmp_path / "sparsectrl-scribble")
    assert (report["kind"], report["variant"]) == ("sparsectrl", "scribble")
    video = VideoUNet.from_unet2d(unet2d).eval()
    with caplog.at_level(logging.WARNING):
        loaded = kinema.load(tmp_path / "sparsectrl-scribble", video_unet=video, scale=0.5)
    assert not caplog.records  # nor diffusers' notice on casting
    assert isinstance(loaded, VideoSparseControlNet) and not loaded.latent_condition and loaded.scale == 0.5


def test_a_sparsectrl_file_given_as_motion_module_is_named(unet2d, tmp_path):
    path = tmp_path / "v3_sd15_sparsectrl_rgb.safetensors"
    save_file(original_layout(tiny_sparsectrl(unet2d, "rgb")), path)
    from kinema.loaders.animatediff import load_motion_module

    with pytest.raises(KinemaError, match=r"this is AnimateDiff v3's SparseCtrl .*not a motion module: load it as a "
                                          r"ControlNet \(--controlnet"):
        load_motion_module(path, unet2d)


def test_an_altered_frame_table_is_refused(unet2d, tmp_path):
    state = original_layout(tiny_sparsectrl(unet2d, "rgb"))
    key = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
    state[key] = state[key] * 1.5
    path = tmp_path / "learned.safetensors"
    save_file(state, path)
    with pytest.raises(KinemaError, match=r"learned.safetensors: down_blocks.1.*pos_encoder.pe is not the sinusoidal "
                                          r"frame table"):
        read_sparsectrl(path, dict(unet2d.config))


def test_a_file_missing_tensors_is_one_line(unet2d, tmp_path):
    state = original_layout(tiny_sparsectrl(unet2d, "rgb"))
    del state["controlnet_mid_block.weight"]
    path = tmp_path / "cut.safetensors"
    save_file(state, path)
    with pytest.raises(KinemaError, match=r"cut.safetensors: its weights do not fit SparseCtrl: 1 missing \(e.g. "
                                          r"controlnet_mid_block.weight\).*Is it AnimateDiff v3's SparseCtrl"):
        read_sparsectrl(path, dict(unet2d.config))


# ---------------------------------------------------------------- sampling, against diffusers


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return generation_parts(tmp_path_factory.mktemp("tokenizer"))


def sparsectrl_pipe(parts, network, monkeypatch) -> AnimateDiffSparseControlNetPipeline:
    """diffusers' SparseCtrl pipeline on the parts, taking the VAE posterior's mean for RGB keyframes as kinema does
    (diffusers draws a sample, from the global generator), so a run repeats."""
    import diffusers.pipelines.animatediff.pipeline_animatediff_sparsectrl as reference

    monkeypatch.setattr(reference, "retrieve_latents", lambda output, generator=None: output.latent_dist.mode())
    pipe = AnimateDiffSparseControlNetPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                               tokenizer=parts["tokenizer"], unet=parts["unet"],
                                               motion_adapter=parts["adapter"], controlnet=network,
                                               scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kinema_family(parts, pipe, sparse) -> AnimateDiffFamily:
    return AnimateDiffFamily(video_unet_like(pipe, parts["unet"]), parts["vae"], parts["text_encoder"],
                             parts["tokenizer"], controlnet=sparse)


@pytest.mark.parametrize("variant, indices", [("rgb", [0, 3]), ("scribble", [0, -1]), ("rgb", None)])
def test_generate_with_keyframes_equals_diffusers_sparsectrl_pipeline(parts, monkeypatch, variant, indices):
    network = tiny_sparsectrl(parts["unet"], variant)
    pipe = sparsectrl_pipe(parts, network, monkeypatch)
    family = kinema_family(parts, pipe, VideoSparseControlNet(network, scale=0.9, path="sparsectrl"))
    keyframes = control_frames()[[0, 3]] if indices is not None else control_frames()[:1]
    request = GenerationRequest(prompt="the cat", negative_prompt="th", frames=FRAMES, height=SIZE, width=SIZE,
                                steps=STEPS, guidance=7.5, seeds=[5], scheduler="ddim", control_video=keyframes,
                                control_indices=indices)
    ours = generate(family, request, progress=False, output="latent")
    noise = initial_noise((1, 4, FRAMES, SIZE // 2, SIZE // 2), seeds=[5])
    with torch.no_grad():
        expected = pipe(prompt="the cat", negative_prompt="th", conditioning_frames=[as_pil(f) for f in keyframes],
                        controlnet_frame_indices=indices if indices is not None else [0],
                        controlnet_conditioning_scale=0.9, latents=noise.clone(), num_frames=FRAMES,
                        num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="latent",
                        return_dict=False)[0]
    difference = (ours.latents - expected).abs().max().item()
    print(f"SparseCtrl {variant} at {indices}: max abs difference {difference:.3g}, latents' mean abs "
          f"{expected.abs().mean():.3g}")
    assert difference <= 1e-3
    unsteered = kinema_family(parts, pipe, None)
    plain = generate(unsteered, GenerationRequest(**{**vars(request), "control_video": None,
                                                     "control_indices": None}), progress=False, output="latent")
    assert (plain.latents - expected).abs().max().item() > 1e-2
    assert ours.settings[0]["control_indices"] == indices


def test_guess_mode_without_guidance_equals_diffusers_sparsectrl_pipeline(parts, monkeypatch):
    network = tiny_sparsectrl(parts["unet"], "rgb")
    pipe = sparsectrl_pipe(parts, network, monkeypatch)
    family = kinema_family(parts, pipe, VideoSparseControlNet(network, scale=0.9, path="sparsectrl"))
    keyframes = control_frames()[[0, 3]]
    fields = dict(prompt="the cat", frames=FRAMES, height=SIZE, width=SIZE, steps=STEPS, guidance=1.0, seeds=[5],
                  scheduler="ddim", control_video=keyframes, control_indices=[0, 3])
    ours = generate(family, GenerationRequest(**fields, guess_mode=True), progress=False, output="latent")
    noise = initial_noise((1, 4, FRAMES, SIZE // 2, SIZE // 2), seeds=[5])
    with torch.no_grad():
        expected = pipe(prompt="the cat", conditioning_frames=[as_pil(f) for f in keyframes],
                        controlnet_frame_indices=[0, 3], controlnet_conditioning_scale=0.9, guess_mode=True,
                        latents=noise.clone(), num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=1.0,
                        height=SIZE, width=SIZE, output_type="latent", return_dict=False)[0]
    difference = (ours.latents - expected).abs().max().item()
    print(f"SparseCtrl guess mode: max abs difference {difference:.3g}")
    assert difference <= 1e-3
    plain = generate(family, GenerationRequest(**fields), progress=False, output="latent")
    assert (plain.latents - expected).abs().max().item() > 1e-2


def test_keyframe_placement_is_checked():
    assert control_places(2, 16, [0, -1]) == [0, 15]
    assert control_places(16, 16) == list(range(16))
    with pytest.raises(KinemaError, match=r"control_indices name 1 frames for 2 control images"):
        control_places(2, 16, [0])
    with pytest.raises(KinemaError, match=r"control_indices must be whole numbers from -16 to 15 .*got \[0, 16\]"):
        control_places(2, 16, [0, 16])
    with pytest.raises(KinemaError, match=r"control_indices \[0, -16\] name a frame twice"):
        control_places(2, 16, [0, -16])
    with pytest.raises(KinemaError, match=r"the control video has 3 frames and the video 16"):
        control_places(3, 16)


def test_a_falloff_for_sparsectrl_is_one_line_before_sampling(parts, monkeypatch):
    network = VideoSparseControlNet(tiny_sparsectrl(parts["unet"], "rgb"))
    family = AnimateDiffFamily(VideoUNet.from_unet2d(parts["unet"]).eval(), parts["vae"], parts["text_encoder"],
                               parts["tokenizer"], controlnet=network)
    monkeypatch.setattr(family.model, "forward", lambda *a, **k: pytest.fail("sampling ran"))
    request = GenerationRequest(prompt="x", frames=FRAMES, height=SIZE, width=SIZE, steps=2,
                                control_video=control_frames()[:2], control_indices=[0, 3], control_falloff=[0.5])
    with pytest.raises(KinemaError, match=r"^control_falloff spreads an ordinary ControlNet's keyframes; SparseCtrl"):
        generate(family, request, progress=False)


def test_a_falloff_with_sparsectrl_files_is_one_line_before_any_weights_load(unet2d, tmp_path, monkeypatch):
    """The published .ckpt (its names read by disassembling the pickle), a .safetensors and a diffusers folder are
    each named as SparseCtrl; an ordinary ControlNet, or no falloff, passes."""
    from loaders.test_controlnet import tiny_controlnet

    import kinema.loaders.checkpoint_io as checkpoint_io
    from kinema.pipelines.jobs import check_sparsectrl_falloff

    model = tiny_sparsectrl(unet2d, "rgb")
    state = original_layout(model)
    torch.save({"controlnet": state}, tmp_path / "v3_sd15_sparsectrl_rgb.ckpt")
    save_file(state, tmp_path / "sparsectrl.safetensors")
    model.save_pretrained(tmp_path / "folder")
    tiny_controlnet(unet2d).save_pretrained(tmp_path / "pose")
    monkeypatch.setattr(checkpoint_io, "read_checkpoint", lambda *a: pytest.fail("weights were read"))
    for path in ("v3_sd15_sparsectrl_rgb.ckpt", "sparsectrl.safetensors", "folder"):
        with pytest.raises(KinemaError, match=r"^control_falloff spreads an ordinary ControlNet's keyframes; "
                                              r"SparseCtrl's own motion modules"):
            check_sparsectrl_falloff([tmp_path / "pose", tmp_path / path], [0.5])
        check_sparsectrl_falloff([tmp_path / path], None)
    check_sparsectrl_falloff([tmp_path / "pose"], [0.5])


@pytest.mark.parametrize("variant, channels, size", [("rgb", 4, 1.85), ("scribble", 3, 1.86)])
def test_the_sd15_config_makes_the_published_networks(variant, channels, size):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = SparseControlNetModel.from_config(sparsectrl_config(None, variant, channels))
    stored = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    # AnimateDiff's README gives v3_sd15_sparsectrl_rgb.ckpt as 1.85 GB and _scribble.ckpt as 1.86 (float32, GiB).
    assert round(4 * stored / 2**30, 2) == size
