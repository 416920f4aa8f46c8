"""AnimateDiff through the front door (`kinema.describe` / `load` / `convert`: kinema.loaders' functions): every layout
of motion modules and motion LoRAs, compared with what was written (the published layout from animatediff_fixtures,
diffusers' own converter and MotionAdapter) or with the library functions, never only with the front door's own
earlier output; and a torch checkpoint is unpickled once however many steps look at it."""

import copy
import json

import pytest
import torch
from animatediff_fixtures import (
    TINY_CHANNELS,
    module_prefixes,
    original_motion_state_dict,
    published_motion_lora,
    tiny_unet,
    video_inputs,
)
from diffusers import MotionAdapter
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from safetensors.torch import save_file

import kinema
from kinema.loaders import checkpoint_io
from kinema.loaders.animatediff import convert_motion_lora, load_motion_lora, load_motion_module
from kinema.models.video_unet import VideoUNet

PE = ".pos_encoder.pe"
# (frame-encoding length, mid block, resnet norm) that each version's file and preset give
VERSION_SETTINGS = {"v1": (24, False, "across_frames"), "v2": (32, True, "per_frame"), "v3": (32, False, "per_frame")}
# The same kinema code on bit-identical weights; a few float32 ulps of room for MKL's alignment-dependent summation.
SAME_CODE_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def unet2d():
    return tiny_unet()


def without_pe(state_dict):
    return {k: v for k, v in state_dict.items() if not k.endswith(PE)}


def assert_same_tensors(got, expected):
    assert set(got) == set(expected)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())


def save(state_dict, path, metadata=None):
    """Write tensors as the file's suffix says, without kinema's writer."""
    if path.suffix == ".ckpt":
        torch.save(state_dict, path)
    else:
        save_file(state_dict, path, metadata=metadata)
    return path


def assert_animates(video, unet2d, expected_motion):
    """`video` is a VideoUNet on `unet2d`'s exact weights whose motion weights are `expected_motion`."""
    assert isinstance(video, VideoUNet)
    assert_same_tensors(video.motion_state_dict(), expected_motion)
    loaded = video.unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in unet2d.state_dict().items())


# ---------------------------------------------------------------- motion modules


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("version", list(VERSION_SETTINGS))
def test_load_opens_published_motion_modules(tmp_path, unet2d, version, suffix):
    written = original_motion_state_dict(version, seed=3)
    video = kinema.load(save(written, tmp_path / f"mm_{version}{suffix}"), unet=unet2d)
    assert_animates(video, unet2d, without_pe(written))
    max_frames, mid_block, resnet_norm = VERSION_SETTINGS[version]
    assert (video.max_frames, video.config.motion_mid_block, video.config.resnet_norm_mode) == (
        max_frames, mid_block, resnet_norm)


def diffusers_adapter_folder(folder, original, safe_serialization=True):
    """A MotionAdapter folder written by diffusers itself, holding `original`'s weights as diffusers' own converter
    names them (independent of kinema's key maps) and the frame tables a MotionAdapter computes; its weights are a
    torch pickle (`.bin`) when `safe_serialization` is False."""
    adapter = MotionAdapter(block_out_channels=TINY_CHANNELS, motion_max_seq_length=32, use_motion_mid_block=True)
    tables = {k: v for k, v in adapter.state_dict().items() if k.endswith(".pos_embed.pe")}
    adapter.load_state_dict({**convert_animatediff_checkpoint_to_diffusers(original), **tables}, strict=True)
    adapter.save_pretrained(folder, safe_serialization=safe_serialization)
    return folder


def test_load_opens_a_diffusers_motion_adapter_folder(tmp_path, unet2d):
    original = original_motion_state_dict("v2", seed=4)
    video = kinema.load(diffusers_adapter_folder(tmp_path / "adapter", original), unet=unet2d)
    assert_animates(video, unet2d, without_pe(original))
    # diffusers' semantics: motion norm across frames, resnets per frame; an override changes that
    assert (video.config.motion_module["norm_mode"], video.config.resnet_norm_mode) == ("across_frames", "per_frame")
    per_frame = kinema.load(tmp_path / "adapter", unet=unet2d, norm_mode="per_frame")
    assert per_frame.config.motion_module["norm_mode"] == "per_frame"
    # dtype, which load's docstring offers every kind, was an unknown motion-module setting
    halved = kinema.load(tmp_path / "adapter", unet=unet2d, dtype="bfloat16")
    assert {p.dtype for p in halved.parameters()} == {torch.bfloat16}
    assert all(torch.equal(mine.float(), theirs.to(torch.bfloat16).float()) for mine, theirs in zip(
        halved.state_dict().values(), video.state_dict().values(), strict=True))
    assert {p.dtype for p in (*unet2d.parameters(), *video.parameters())} == {torch.float32}  # copies, not cast


def test_load_opens_a_kinema_file_written_before_settings_were_keyword_arguments(tmp_path, unet2d):
    # The metadata as kinema wrote it before: `motion_settings` holds the flat fields of the old MotionSettings.
    old_settings = {"max_frames": 32, "mid_block": True, "transformer_blocks": 1, "num_attention_heads": 8,
                    "norm_num_groups": 32, "norm_mode": "across_frames", "resnet_norm_mode": "per_frame"}
    weights = without_pe(original_motion_state_dict("v2", seed=5))
    path = save(weights, tmp_path / "mm_kinema.safetensors", {"kinema_layout": "motion-module", "version": "v2",
                                                              "motion_settings": json.dumps(old_settings)})
    assert kinema.describe(path)["format"] == "kinema"
    video = kinema.load(path, unet=unet2d)
    assert_animates(video, unet2d, weights)
    assert video.config.motion_module["norm_mode"] == "across_frames"  # from the metadata, not v2's per_frame


def test_a_saved_module_keeps_its_settings_in_the_old_metadata_form(tmp_path, unet2d):
    from kinema.loaders.animatediff import save_motion_module

    video = load_motion_module(save(original_motion_state_dict("v1"), tmp_path / "v1.ckpt"), unet2d,
                               norm_mode="across_frames", max_frames=20)
    out = save_motion_module(video, tmp_path / "k.safetensors")
    stored = json.loads(checkpoint_io.read_checkpoint(out).metadata["motion_settings"])
    assert stored == {"max_frames": 20, "mid_block": False, "transformer_blocks": 1, "num_attention_heads": 8,
                      "norm_num_groups": 32, "norm_mode": "across_frames", "resnet_norm_mode": "across_frames"}
    assert kinema.load(out, unet=unet2d).config == video.config


@pytest.mark.parametrize("to", ["original", "diffusers", "kinema"])
def test_describe_and_convert_round_trip_through_the_registry(tmp_path, unet2d, to):
    written = original_motion_state_dict("v1", seed=6)
    source = save(written, tmp_path / "mm_v1.ckpt")
    assert (kinema.describe(source)["kind"], kinema.describe(source)["version"]) == ("motion_module", "v1")
    target = tmp_path / {"original": "out.ckpt", "diffusers": "out", "kinema": "out.safetensors"}[to]
    out, _ = kinema.convert(source, target, to)
    report = kinema.describe(out)
    expected_format = {"original": "animatediff-original", "diffusers": "animatediff-diffusers", "kinema": "kinema"}
    assert (report["kind"], report["format"], report["version"]) == ("motion_module", expected_format[to], "v1")
    assert_animates(kinema.load(out, unet=unet2d, norm_mode="per_frame"), unet2d, without_pe(written))
    if to == "original":  # the published layout again, frame tables included
        assert_same_tensors(checkpoint_io.read_state_dict(out), written)


# ---------------------------------------------------------------- motion LoRAs


@pytest.fixture(scope="module")
def v2_video(unet2d, tmp_path_factory):
    path = save(original_motion_state_dict("v2", seed=7), tmp_path_factory.mktemp("mm") / "v2.safetensors")
    return load_motion_module(path, unet2d)


def tiny_lora():
    return published_motion_lora({prefix: c for prefix, c in module_prefixes(TINY_CHANNELS, True)}, rank=4, seed=8)


@pytest.mark.parametrize("layout,suffix", [("original", ".ckpt"), ("original", ".safetensors"),
                                           ("diffusers", ".safetensors"), ("diffusers_peft", ".safetensors"),
                                           ("kinema", ".safetensors")])
def test_load_applies_motion_loras_in_every_layout(tmp_path, v2_video, layout, suffix):
    published = tiny_lora()
    path = save(convert_motion_lora(published, layout), tmp_path / f"lora_{layout}{suffix}")
    assert kinema.describe(path)["format"] == layout
    x, t, text = video_inputs(frames=3)
    with torch.no_grad():
        before = v2_video(x, t, text)
        through_front_door = kinema.load(path, video_unet=copy.deepcopy(v2_video))
        reference = copy.deepcopy(v2_video)
        load_motion_lora(reference, published, "reference")
        got, expected = through_front_door(x, t, text), reference(x, t, text)
    assert (got - before).abs().max().item() > 1e-3  # the LoRA reaches the output
    torch.testing.assert_close(got, expected, **SAME_CODE_TOLERANCE)


def test_convert_motion_lora_round_trips_through_the_registry(tmp_path):
    published = tiny_lora()
    source = save(published, tmp_path / "lora.ckpt")
    for layout in ("diffusers", "diffusers_peft", "kinema", "original"):
        out, _ = kinema.convert(source, tmp_path / f"{layout}.safetensors", layout)
        assert kinema.describe(out)["format"] == layout
        source = out
    assert_same_tensors(checkpoint_io.read_state_dict(source), published)


def test_motion_lora_alpha_is_said_as_it_loads_and_a_bad_one_is_refused(tmp_path):
    from kinema.errors import KinemaError

    peft, _ = kinema.convert(save(tiny_lora(), tmp_path / "lora.ckpt"), tmp_path / "peft.safetensors",
                             "diffusers_peft")
    tensors = checkpoint_io.read_state_dict(peft)
    downs = sorted(k for k in tensors if k.endswith("lora_A.weight"))
    rank = tensors[downs[0]].shape[0]
    with_alpha = {**tensors, **{k.replace("lora_A.weight", "alpha"): torch.tensor(2.0) for k in downs}}
    save_file(with_alpha, tmp_path / "alpha.safetensors")
    # The original layout has no alpha: alpha / r goes into up, and convert says so.
    out, notes = kinema.convert(tmp_path / "alpha.safetensors", tmp_path / "original.safetensors", "original")
    assert notes == [f"the original layout has no place for alpha, so alpha / rank ({2 / rank:g}) is multiplied into "
                     "each up matrix: the same LoRA, but not the same tensors, and a conversion back has no alpha"]
    from kinema.loaders.animatediff.motion_lora_keys import parse_motion_lora

    given, written = (parse_motion_lora(checkpoint_io.read_state_dict(path)).layers for path in (peft, out))
    assert given.keys() == written.keys()
    assert all(torch.equal(written[slot].up, given[slot].up * (2 / rank)) and written[slot].alpha is None
               for slot in given)
    # inspect reports the alpha each layer loads with: from the metadata, or none for some layers.
    save_file(tensors, tmp_path / "meta.safetensors", metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 2}'})
    assert kinema.describe(tmp_path / "meta.safetensors")["alpha"] == 2.0
    half = {**tensors, **{k.replace("lora_A.weight", "alpha"): torch.tensor(2.0) for k in downs[::2]}}
    save_file(half, tmp_path / "half.safetensors")
    assert kinema.describe(tmp_path / "half.safetensors")["alpha"] == [2.0, None]
    # A NaN alpha is refused by inspect and convert, where convert wrote 88 up matrices of NaN.
    save_file({**with_alpha, downs[0].replace("lora_A.weight", "alpha"): torch.tensor(float("nan"))},
              tmp_path / "nan.safetensors")
    for call in (lambda: kinema.describe(tmp_path / "nan.safetensors"),
                 lambda: kinema.convert(tmp_path / "nan.safetensors", tmp_path / "nan_out.safetensors", "original")):
        with pytest.raises(KinemaError, match=r"nan.safetensors: the motion LoRA holds NaN or infinite values"):
            call()
    assert not (tmp_path / "nan_out.safetensors").exists()


# ---------------------------------------------------------------- one read per file


@pytest.fixture
def unpickles(monkeypatch):
    """How many times torch.load runs (checkpoint_io reads every torch checkpoint through it)."""
    calls = []
    real_load = torch.load

    def counting_load(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return calls


@pytest.mark.parametrize("layout", ["ckpt file", "bin MotionAdapter folder"])
def test_the_front_door_unpickles_a_motion_module_once(tmp_path, unet2d, unpickles, layout):
    if layout == "ckpt file":
        source = save(original_motion_state_dict("v3"), tmp_path / "v3.ckpt")
    else:
        source = diffusers_adapter_folder(tmp_path / "adapter", original_motion_state_dict("v2"),
                                          safe_serialization=False)
        assert [f.name for f in source.glob("*.bin")] == ["diffusion_pytorch_model.bin"]
    assert unpickles == []
    kinema.load(source, unet=unet2d)
    assert len(unpickles) == 1
    kinema.convert(source, tmp_path / "out.safetensors", "kinema")
    assert len(unpickles) == 2


def test_the_front_door_unpickles_a_motion_lora_once(tmp_path, v2_video, unpickles):
    source = save(tiny_lora(), tmp_path / "lora.ckpt")
    kinema.load(source, video_unet=copy.deepcopy(v2_video))
    assert len(unpickles) == 1
    kinema.convert(source, tmp_path / "out.safetensors", "kinema")
    assert len(unpickles) == 2


def test_the_front_door_reads_a_safetensors_motion_module_once(tmp_path, unet2d, monkeypatch):
    reads = []
    real_read = checkpoint_io._read_safetensors

    def counting_read(path):
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(checkpoint_io, "_read_safetensors", counting_read)
    source = save(original_motion_state_dict("v3"), tmp_path / "v3.safetensors")
    kinema.load(source, unet=unet2d)
    assert reads == [source]  # describe read the header only; the load read the data
