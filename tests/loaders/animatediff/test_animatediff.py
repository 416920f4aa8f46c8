"""AnimateDiff motion-module loader: detection, settings, strict loading, layouts, round trips, bad input."""

import json

import pytest
import torch
from animatediff_fixtures import (
    SD15_CHANNELS,
    TINY_CHANNELS,
    TINY_SDXL_CHANNELS,
    module_params,
    module_prefixes,
    original_motion_state_dict,
    tiny_unet,
    video_inputs,
)
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

from kinema.cli import main
from kinema.errors import KinemaError
from kinema.loaders.animatediff import (
    convert_motion_module,
    detect_motion_module,
    load_motion_module,
    motion_settings,
    read_motion_module,
    save_motion_module,
)
from kinema.loaders.checkpoint_io import read_checkpoint, read_state_dict, write_state_dict
from kinema.models.video_unet import AcrossFramesGroupNorm

PE = ".pos_encoder.pe"


@pytest.fixture(scope="module")
def unet2d():
    return tiny_unet()


def write(tmp_path, version, name=None, channels=TINY_CHANNELS, **kwargs):
    path = tmp_path / (name or f"{version}.safetensors")
    write_state_dict(original_motion_state_dict(version, channels, **kwargs), path)
    return path


def without_pe(state_dict):
    return {k: v for k, v in state_dict.items() if not k.endswith(PE)}


def assert_equal_dicts(got, expected):
    assert set(got) == set(expected)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())


def diffusers_own_layout(original):
    """The diffusers-layout weights diffusers itself derives from an original motion-module file (the converter
    behind `MotionAdapter.from_single_file`): independent of kinema's key maps, it drops the `pe` tables."""
    return convert_animatediff_checkpoint_to_diffusers(original)


# A VideoUNet loaded from a file and one loaded another way run the same kinema code on bit-identical weights (checked
# separately, exactly); the outputs get a few float32 ulps of room (|output| <= 1.3 here), because MKL's CPU GEMM may
# pick its summation order by the alignment of the weights' memory. Measured difference: 0.
SAME_CODE_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- detection


# version: (channels, keys, parameters, PE length, PE source, mid block, resnet norm, motion norm)
EXPECTED = {
    # 20 modules x 28 keys; params = 2*(f(32)+3 f(64)) down + 3*(3 f(64)+f(32)) up, f(C) = 22C^2 + 21C
    "v1": (TINY_CHANNELS, 560, 1_487_840, 24, "file", False, "across_frames", "per_frame"),
    "v2": (TINY_CHANNELS, 588, 1_579_296, 32, "file", True, "per_frame", "per_frame"),
    "v3": (TINY_CHANNELS, 560, 1_487_840, 32, "file", False, "per_frame", "per_frame"),
    "animatelcm": (TINY_CHANNELS, 21 * 26, 1_579_296, 64, "assumed", True, "per_frame", "per_frame"),
    "sdxl-beta": (TINY_SDXL_CHANNELS, 15 * 28, 1_030_560, 32, "file", False, "per_frame", "across_frames"),
}


@pytest.mark.parametrize("version", list(EXPECTED))
def test_detects_published_layouts(version):
    channels, keys, params, pe, source, mid, resnet_norm, norm = EXPECTED[version]
    state_dict = original_motion_state_dict(version, channels)
    assert params == sum(module_params(c) for _, c in module_prefixes(channels, mid))
    info = detect_motion_module(state_dict)
    assert (info.format, info.version, info.channels, info.num_keys, info.num_params) == (
        "animatediff-original", version, channels, keys, params)
    assert (info.max_frames, info.max_frames_source, info.mid_block) == (pe, source, mid)
    assert (info.resnet_norm_mode, info.norm_mode, info.dtype) == (resnet_norm, norm, "float32")
    assert (info.num_attention_heads, info.norm_num_groups, info.modules_per_level) == (8, 32, (2, 3))


def test_detects_a_diffusers_motion_adapter_folder(tmp_path):
    adapter = MotionAdapter(block_out_channels=TINY_CHANNELS, motion_num_attention_heads=4, motion_max_seq_length=24,
                            use_motion_mid_block=False)
    adapter.save_pretrained(tmp_path / "adapter")
    motion = read_motion_module(tmp_path / "adapter")
    info = motion.info
    assert (info.format, info.version, info.max_frames, info.mid_block) == ("animatediff-diffusers", "v1", 24, False)
    # diffusers semantics whatever the version: motion norm across frames, resnets per frame
    assert (info.norm_mode, info.resnet_norm_mode, info.num_attention_heads) == ("across_frames", "per_frame", 4)
    assert info.num_keys == 20 * 27 and info.num_params == 1_487_840
    original = {k: v for k, v in original_motion_state_dict("v1").items() if not k.endswith(PE)}
    assert set(motion.state_dict) == set(original)


def test_settings_follow_the_version_and_yield_to_overrides():
    info = detect_motion_module(original_motion_state_dict("v1"))
    video_unet_kwargs = motion_settings(info)  # VideoUNet's keyword arguments, the one form settings take
    assert video_unet_kwargs == {
        "motion_module": {"type": "temporal", "max_frames": 24, "num_transformer_blocks": 1,
                          "num_attention_heads": 8, "norm_num_groups": 32, "norm_mode": "per_frame"},
        "motion_mid_block": False, "resnet_norm_mode": "across_frames"}
    changed = motion_settings(info, norm_mode="across_frames", resnet_norm_mode="per_frame", max_frames=48)
    spec = changed["motion_module"]
    assert (spec["norm_mode"], changed["resnet_norm_mode"], spec["max_frames"]) == ("across_frames", "per_frame", 48)
    with pytest.raises(KinemaError, match=r"unknown motion-module setting\(s\) \['mid_block'\]; you can set"):
        motion_settings(info, mid_block=True)


def test_fp16_files_keep_their_dtype(tmp_path):
    path = write(tmp_path, "v2", dtype=torch.float16)
    motion = read_motion_module(path)
    assert motion.info.dtype == "float16" and motion.info.max_frames == 32
    out = save_motion_module(load_motion_module(path, tiny_unet().half()), tmp_path / "o.safetensors", "original")
    assert_equal_dicts(read_state_dict(out), read_state_dict(path))


# ---------------------------------------------------------------- loading


def test_v1_loads_strictly_with_its_settings(tmp_path, unet2d):
    path = write(tmp_path, "v1")
    video = load_motion_module(path, unet2d)
    assert video.max_frames == 24 and video.config.resnet_norm_mode == "across_frames"
    assert sum(isinstance(m, AcrossFramesGroupNorm) for m in video.modules()) == 2 * 22 + 1  # resnets + norm_out
    assert_equal_dicts(video.motion_state_dict(), without_pe(read_state_dict(path)))
    base = video.unet.state_dict()
    assert all(torch.equal(base[k], v) for k, v in unet2d.state_dict().items())
    x, t, text = video_inputs(frames=25)
    with pytest.raises(KinemaError, match="25 frames exceed .* 24; .*use context windows"):
        video(x, t, text)


def test_loading_replaces_the_motion_modules_of_a_video_unet(tmp_path, unet2d):
    v1 = load_motion_module(write(tmp_path, "v1"), unet2d)
    v2 = load_motion_module(write(tmp_path, "v2", seed=4), v1)
    assert v2.max_frames == 32 and v2.config.motion_mid_block and v2.config.resnet_norm_mode == "per_frame"
    assert not any(isinstance(m, AcrossFramesGroupNorm) for m in v2.modules())
    base = v2.unet.state_dict()
    assert all(torch.equal(base[k], v) for k, v in unet2d.state_dict().items())
    assert_equal_dicts(v2.motion_state_dict(), without_pe(original_motion_state_dict("v2", seed=4)))


def note_settings(notes):
    """The `name='value'` settings a conversion note tells the user to load with."""
    import re

    return {name: value for note in notes for name, value in re.findall(r"(\w+)='(\w+)'", note)}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_loading_as_the_conversion_note_says_keeps_the_behaviour(tmp_path, unet2d, version):
    # v1 -> diffusers once named only norm_mode, leaving v1's resnet norms across frames out (0.31 apart), and
    # diffusers -> original said nothing (0.049 apart).
    path = write(tmp_path, version, seed=3)
    x, t, text = video_inputs(frames=3)
    with torch.no_grad():
        expected = load_motion_module(path, unet2d)(x, t, text)
        _, notes = convert_motion_module(path, tmp_path / "adapter", "diffusers")
        said = note_settings(notes)
        assert said == ({"norm_mode": "per_frame", "resnet_norm_mode": "across_frames"} if version == "v1" else
                        {"norm_mode": "per_frame"})
        torch.testing.assert_close(load_motion_module(tmp_path / "adapter", unet2d, **said)(x, t, text), expected,
                                   **SAME_CODE_TOLERANCE)
        adapter_output = load_motion_module(tmp_path / "adapter", unet2d)(x, t, text)
        _, notes = convert_motion_module(tmp_path / "adapter", tmp_path / "back.safetensors", "original")
        back = load_motion_module(tmp_path / "back.safetensors", unet2d, **note_settings(notes))(x, t, text)
        torch.testing.assert_close(back, adapter_output, **SAME_CODE_TOLERANCE)
        assert (adapter_output - expected).abs().max() > 1e-3  # the norms matter here
        assert convert_motion_module(path, tmp_path / "k.safetensors", "kinema")[1] == []


def test_sdxl_beta_loads_on_a_three_level_unet(tmp_path):
    video = load_motion_module(write(tmp_path, "sdxl-beta", channels=TINY_SDXL_CHANNELS), tiny_unet(TINY_SDXL_CHANNELS))
    assert len(list(video.motion_modules())) == 15
    assert video.config.motion_module["norm_mode"] == "across_frames"


def test_original_and_diffusers_layouts_give_the_same_video_unet(tmp_path, unet2d):
    path = write(tmp_path, "v2", seed=2)
    convert_motion_module(path, tmp_path / "adapter", "diffusers")
    original = load_motion_module(path, unet2d)
    diffusers_layout = load_motion_module(tmp_path / "adapter", unet2d, norm_mode="per_frame")
    assert_equal_dicts(diffusers_layout.motion_state_dict(), original.motion_state_dict())
    x, t, text = video_inputs(frames=3)
    with torch.no_grad():
        from_original = original(x, t, text)
        from_diffusers = diffusers_layout(x, t, text)
        diffusers_norm = load_motion_module(tmp_path / "adapter", unet2d)(x, t, text)
    torch.testing.assert_close(from_diffusers, from_original, **SAME_CODE_TOLERANCE)
    # The motion modules are active: their norm setting alone moves the output well beyond float noise.
    assert (diffusers_norm - from_original).abs().max().item() > 1e-3


def test_diffusers_folder_matches_diffusers_unet_motion_model(tmp_path, unet2d):
    convert_motion_module(write(tmp_path, "v2", seed=3), tmp_path / "adapter", "diffusers")
    reference = UNetMotionModel.from_unet2d(unet2d, MotionAdapter.from_pretrained(tmp_path / "adapter")).eval()
    video = load_motion_module(tmp_path / "adapter", unet2d)
    x, t, text = video_inputs(frames=3)
    with torch.no_grad():
        expected = reference(x, t, text.repeat_interleave(3, dim=0)).sample
        # diffusers' own motion modules (other attention and reshaping code) vs kinema's, on the same weights: 4.6e-6
        # measured on outputs up to 1.2; 3e-5 leaves ~6x room while a wrong norm mode moves them by > 1e-3.
        torch.testing.assert_close(video(x, t, text), expected, rtol=3e-5, atol=3e-5)


# ---------------------------------------------------------------- saving and round trips


@pytest.mark.parametrize("version", ["v1", "v2", "animatelcm"])
def test_original_to_kinema_to_original_is_bit_exact(tmp_path, unet2d, version):
    path = write(tmp_path, version, name=f"{version}.ckpt")
    save_motion_module(load_motion_module(path, unet2d), tmp_path / "k.safetensors", version=version)
    meta = read_checkpoint(tmp_path / "k.safetensors").metadata
    assert meta["kinema_layout"] == "motion-module" and meta["version"] == version
    # kinema's side against the published layout written in animatediff_fixtures: its names without the pe tables.
    assert_equal_dicts(read_state_dict(tmp_path / "k.safetensors"), without_pe(read_state_dict(path)))

    again = load_motion_module(tmp_path / "k.safetensors", unet2d)  # settings from metadata, no guessing
    info = read_motion_module(tmp_path / "k.safetensors").info
    assert (info.format, info.version, info.max_frames_source) == ("kinema", version, "metadata")
    assert again.config == load_motion_module(path, unet2d).config
    out = save_motion_module(again, tmp_path / "o.ckpt", "original")
    expected = read_state_dict(path)
    if version == "animatelcm":  # the file stored no frame table; "original" writes the assumed length 64
        assert {k: v.shape[1] for k, v in read_state_dict(out).items() if k.endswith(PE)} == {
            f"{p}.temporal_transformer.transformer_blocks.0.attention_blocks.{a}.pos_encoder.pe": 64
            for p, _ in module_prefixes(TINY_CHANNELS, True) for a in (0, 1)}
        expected = {**expected, **{k: v for k, v in read_state_dict(out).items() if k.endswith(PE)}}
    assert_equal_dicts(read_state_dict(out), expected)


def test_original_to_diffusers_to_original_is_bit_exact_and_diffusers_loads_it(tmp_path):
    path = write(tmp_path, "v2", name="v2.ckpt", seed=5)
    _, notes = convert_motion_module(path, tmp_path / "adapter", "diffusers")
    assert "norm_mode='per_frame'" in notes[0]
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert (config["block_out_channels"], config["motion_max_seq_length"], config["use_motion_mid_block"]) == (
        list(TINY_CHANNELS), 32, True)
    written = read_state_dict(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors")
    adapter = MotionAdapter.from_pretrained(tmp_path / "adapter")
    assert_equal_dicts(adapter.state_dict(), written)  # every key diffusers expects, none extra, values exact
    assert len(written) == 21 * 27
    # The diffusers side against layouts kinema did not write, so a rename made on the way out and undone on the
    # way back (norm1 <-> norm2, say) cannot hide: diffusers' own converter gives every weight's name, and the
    # frame tables are the ones a MotionAdapter computes for this config.
    tables = {k: v for k, v in written.items() if k.endswith(".pos_embed.pe")}
    weights = {k: v for k, v in written.items() if k not in tables}
    assert_equal_dicts(weights, diffusers_own_layout(read_state_dict(path)))
    fresh = MotionAdapter.from_config(MotionAdapter.load_config(tmp_path / "adapter")).state_dict()
    assert len(tables) == 21 and all(torch.equal(v, fresh[k]) for k, v in tables.items())

    convert_motion_module(tmp_path / "adapter", tmp_path / "back.ckpt", "original")
    assert_equal_dicts(read_state_dict(tmp_path / "back.ckpt"), read_state_dict(path))


def test_v3_config_entry_is_dropped_and_reported(tmp_path):
    torch.save({**original_motion_state_dict("v3"), "animatediff_config": {"use_inflated_groupnorm": True}},
               tmp_path / "v3.ckpt")
    motion = read_motion_module(tmp_path / "v3.ckpt")
    assert motion.info.version == "v3" and motion.info.num_keys == 560
    assert motion.dropped == {"animatediff_config": "dict with 1 entries (0 tensors)"}


def test_save_layout_errors(tmp_path, unet2d):
    video = load_motion_module(write(tmp_path, "v3"), unet2d)
    with pytest.raises(KinemaError, match="kinema layout is a .safetensors file"):
        save_motion_module(video, tmp_path / "k.ckpt")
    with pytest.raises(KinemaError, match="diffusers layout is a folder"):
        save_motion_module(video, tmp_path / "k.safetensors", "diffusers")
    with pytest.raises(KinemaError, match="unknown layout 'comfy'"):
        save_motion_module(video, tmp_path / "k.safetensors", "comfy")


def test_temporal_cross_modules_load_save_and_run(tmp_path, unet2d):
    # The original code's Temporal_Cross blocks (no published file has them; kinema-tiny-ad's text-reading modules
    # do): detected from the shapes, loaded strictly, run with the prompt, and written back bit for bit.
    path = write(tmp_path, "v3", name="cross.ckpt", seed=4, text_width=32)
    info = read_motion_module(path).info
    assert (info.attention_kinds, info.cross_attention_dim) == (["temporal", "text", "temporal"], 32)
    video = load_motion_module(path, unet2d)
    assert all(module.takes_text for _, module in video.motion_modules())
    x, t, text = video_inputs()
    with torch.no_grad():
        out = video(x, t, text)
        # The middle attention reads the prompt: zero its output and the video changes.
        for _, module in video.motion_modules():
            module.temporal_transformer.transformer_blocks[0].attention_blocks[1].to_out[0].weight.zero_()
        assert (video(x, t, text) - out).abs().max().item() > 1e-3
    video = load_motion_module(path, unet2d)
    save_motion_module(video, tmp_path / "back.ckpt", "original")
    assert_equal_dicts(read_state_dict(tmp_path / "back.ckpt"), read_state_dict(path))
    save_motion_module(video, tmp_path / "k.safetensors")
    again = load_motion_module(tmp_path / "k.safetensors", unet2d)
    assert again.config == video.config
    torch.testing.assert_close(again(x, t, text), out, **SAME_CODE_TOLERANCE)
    with pytest.raises(KinemaError, match="MotionAdapter holds two temporal self-attentions"):
        save_motion_module(video, tmp_path / "adapter", "diffusers")
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------- bad input


def refusal(tmp_path, state_dict, unet, name="bad.safetensors"):
    write_state_dict(state_dict, tmp_path / name, overwrite=True)  # each call replaces the previous bad file
    with pytest.raises(KinemaError) as err:
        load_motion_module(tmp_path / name, unet)
    return str(err.value)


def test_files_of_other_kinds_are_named(tmp_path, unet2d):
    assert "not an AnimateDiff motion module: it looks like an image UNet" in refusal(tmp_path, unet2d.state_dict(),
                                                                                      unet2d)
    lora = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32)}
    assert "it looks like a LoRA" in refusal(tmp_path, lora, unet2d)
    motion_lora = {"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0"
                   ".processor.to_q_lora.down.weight": torch.zeros(4, 32)}
    assert "this is a motion LoRA" in refusal(tmp_path, motion_lora, unet2d)
    v3 = original_motion_state_dict("v3")
    message = refusal(tmp_path, {**v3, "controlnet_cond_embedding.weight": torch.zeros(4)}, unet2d)
    assert "this is AnimateDiff v3's SparseCtrl (a keyframe encoder with motion modules of its own), not a motion " \
           "module: load it as a ControlNet (--controlnet" in message
    assert "PIA motion adapter" in refusal(tmp_path, {**v3, "conv_in.weight": torch.zeros(32, 9, 3, 3)}, unet2d)
    hotshot = {"down_blocks.0.attentions.0.temporal_transformer.transformer_blocks.0.attn1.pos_encoder"
               ".positional_encoding": torch.zeros(1, 24, 32)}
    assert "HotShot-XL" in refusal(tmp_path, hotshot, unet2d)
    full = {**v3, "down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 3)}
    assert "besides motion modules the file holds 1 other tensor; it looks like an image UNet" in refusal(
        tmp_path, full, unet2d)
    # Every name behind DDP's `module.`: no motion module besides them (it said "besides motion modules").
    ddp = refusal(tmp_path, {f"module.{name}": tensor for name, tensor in v3.items()}, unet2d)
    assert "the file holds no motion module (no tensor is named like one); it looks like a model saved" in ddp
    assert "without that prefix" in ddp


def test_missing_and_mismatched_keys_name_keys_and_version(tmp_path, unet2d):
    v3 = original_motion_state_dict("v3")
    dropped = "up_blocks.1.motion_modules.2.temporal_transformer.proj_out.bias"
    message = refusal(tmp_path, {k: v for k, v in v3.items() if k != dropped}, unet2d)
    assert "detected AnimateDiff v3 (animatediff-original)" in message and f"1 missing (e.g. {dropped})" in message
    bad = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.2.weight"
    message = refusal(tmp_path, {**v3, bad: torch.zeros(64, 128)}, unet2d)
    assert "AnimateDiff v3" in message and f"1 mismatched (e.g. {bad}: file (64, 128) vs model (64, 256))" in message


def test_channel_mismatch_is_caught_before_loading(tmp_path, unet2d):
    message = refusal(tmp_path, original_motion_state_dict("sdxl-beta", TINY_SDXL_CHANNELS), unet2d)
    assert "AnimateDiff sdxl-beta" in message and "3-level UNet of widths (32, 64, 64)" in message
    assert "this UNet has widths (32, 64, 64, 64)" in message
    wide = original_motion_state_dict("v2", (64, 64, 64, 64))
    assert "widths (64, 64, 64, 64)" in refusal(tmp_path, wide, unet2d)


def test_frame_tables_are_checked(tmp_path, unet2d):
    v1 = original_motion_state_dict("v1")
    key = "up_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    assert "lengths disagree between modules: {24: 39, 32: 1}" in refusal(
        tmp_path, {**v1, key: torch.zeros(1, 32, 64)}, unet2d)
    learned = v1[key].clone()
    learned[0, 3, 5] += 0.01
    assert f"{key} is not the sinusoidal frame table (max difference 1.00e-02)" in refusal(
        tmp_path, {**v1, key: learned}, unet2d)
    assert "1 missing" in refusal(tmp_path, {k: v for k, v in v1.items() if k != key}, unet2d)


def test_pickle_payload_is_refused(tmp_path, unet2d):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({**original_motion_state_dict("v1"), "x": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(KinemaError, match="refused to run code from the pickle"):
        load_motion_module(tmp_path / "evil.ckpt", unet2d)
    assert not (tmp_path / "pwned").exists()


def test_bad_folders(tmp_path, unet2d):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KinemaError, match="folder without config.json"):
        load_motion_module(tmp_path / "empty", unet2d)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(KinemaError, match="holds a 'AutoencoderKL', not a diffusers MotionAdapter"):
        load_motion_module(tmp_path / "vae", unet2d)


# ---------------------------------------------------------------- full size


SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=SD15_CHANNELS, layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
@pytest.mark.parametrize("version,keys,params,pe", [
    ("v1", 560, 417_137_600, 24), ("v2", 588, 453_209_280, 32), ("v3", 560, 417_137_600, 32)])
def test_full_size_sd15_modules(tmp_path, capsys, version, keys, params, pe):
    # fp16 halves the memory and disk of this check; counts and layout do not depend on the dtype.
    state_dict = original_motion_state_dict(version, SD15_CHANNELS, dtype=torch.float16)
    path = tmp_path / f"{version}.ckpt"
    torch.save({**state_dict, **({"animatediff_config": {"motion_module_mid_block": False}}
                                 if version == "v3" else {})}, path)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["version"], report["keys"], report["parameters"], report["max_frames"]) == (
        version, keys, params, pe)
    assert (report["channels"], report["mid_block"]) == (list(SD15_CHANNELS), version == "v2")
    assert report["dropped"] == ({"animatediff_config": "dict with 1 entries (0 tensors)"} if version == "v3" else {})

    with torch.device("meta"):  # an SD1.5-sized UNet without allocating it: the load checks names and shapes
        unet = UNet2DConditionModel(**SD15_UNET)
    video = load_motion_module(path, unet)
    loaded = video.motion_state_dict()
    expected = without_pe(state_dict)
    assert set(loaded) == set(expected) and len(loaded) == keys - 2 * (keys // 28)
    assert all(loaded[k].shape == v.shape for k, v in expected.items())
