"""`kinema inspect` checks every tensor name and shape of what it recognises; `kinema convert` refuses broken input.

Each kind and layout starts from a small file or folder with the exact published key names: AnimateDiff motion
modules from the reference table in animatediff_fixtures.py and diffusers' own MotionAdapter, motion LoRAs from the
four published key templates written out below, and EasyAnimate V3 transformer and Slice VAE folders written by
EasyAnimate's own V3 code (tests/fixtures/easyanimate_v3). Each is then broken in one way (one tensor of the wrong
shape, one key missing, one unexpected key); the expected shapes in the messages come from those published layouts,
not from kinema.
"""

import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import MotionAdapter
from loaders.animatediff.animatediff_fixtures import (
    MODULE_TENSORS,
    PE_SUFFIXES,
    TINY_CHANNELS,
    TINY_SDXL_CHANNELS,
    module_params,
    module_prefixes,
    original_motion_state_dict,
)
from safetensors.torch import load_file, save_file

from kinema.cli import main
from kinema.errors import KinemaError
from kinema.loaders.animatediff.motion_lora_keys import convert_motion_lora
from kinema.loaders.animatediff.motion_module import convert_motion_module, detect_motion_module
from kinema.loaders.easyanimate.transformer import convert_easyanimate_transformer, load_video_dit
from kinema.loaders.source import describe

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "easyanimate_v3"
Mutation = Callable[[dict[str, torch.Tensor]], None]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, path: Path, target: Path, to: str, *fragments: str) -> None:
    """describe, `kinema inspect` and `kinema convert path target --to to` all refuse `path` with one line holding
    every fragment, and convert writes nothing (no target, no temporary beside it)."""
    with pytest.raises(KinemaError) as err:
        describe(path)
    message = str(err.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message
    code, out, err_text = run(capsys, "inspect", str(path))
    assert (code, out, err_text.count("\n")) == (1, "", 1) and fragments[0] in err_text, err_text
    code, _, err_text = run(capsys, "convert", str(path), str(target), "--to", to)
    assert code == 1 and err_text.count("\n") == 1 and fragments[0] in err_text, err_text
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]


def inspect_ok(capsys, path: Path) -> dict:
    code, out, err = run(capsys, "inspect", str(path), "--json")
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------- AnimateDiff motion modules

TO_V = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_v.weight"
DIFFUSERS_TO_V = "down_blocks.1.motion_modules.0.transformer_blocks.0.attn2.to_v.weight"


def motion_mutations(key: str) -> dict[str, tuple[Mutation, str]]:
    """The three breakages of the 64-wide `key` (a (C, C) projection without bias) and what the message names."""
    bias = key.removesuffix(".weight") + ".bias"
    return {
        "wrong shape": (lambda s: s.__setitem__(key, torch.zeros(64, 63)),
                        f"1 mismatched (e.g. {key}: file (64, 63) vs model (64, 64))"),
        "missing": (lambda s: s.pop(key), f"1 missing (e.g. {key})"),
        "unexpected": (lambda s: s.__setitem__(bias, torch.zeros(64)), f"1 unexpected (e.g. {bias})"),
    }


KINEMA_SETTINGS = {"max_frames": 32, "mid_block": True, "transformer_blocks": 1, "num_attention_heads": 8,
                   "norm_num_groups": 32, "norm_mode": "per_frame", "resnet_norm_mode": "per_frame"}


def write_motion_module(tmp_path: Path, layout: str, mutate: Mutation = lambda s: None) -> Path:
    """A tiny v2 motion module in `layout`, passed through `mutate` before it is written."""
    if layout == "diffusers":
        folder = tmp_path / "adapter"
        MotionAdapter(block_out_channels=TINY_CHANNELS, motion_max_seq_length=32).save_pretrained(folder)
        weights = folder / "diffusion_pytorch_model.safetensors"
        state = load_file(weights)
        mutate(state)
        save_file(state, weights)
        return folder
    state = original_motion_state_dict("v2")
    if layout == "kinema":  # the original names without the `pe` tables, settings in the metadata
        state = {k: v for k, v in state.items() if not k.endswith(".pe")}
        mutate(state)
        path = tmp_path / "mm_v2_kinema.safetensors"
        save_file(state, path, metadata={"kinema_layout": "motion-module", "version": "v2",
                                         "motion_settings": json.dumps(KINEMA_SETTINGS)})
        return path
    mutate(state)
    path = tmp_path / ("mm_sd_v15_v2.ckpt" if layout == "original-ckpt" else "mm_sd_v15_v2.safetensors")
    if path.suffix == ".ckpt":
        torch.save(state, path)
    else:
        save_file(state, path)
    return path


MOTION_LAYOUTS = {"original-safetensors": ("animatediff-original", TO_V, "kinema"),
                  "original-ckpt": ("animatediff-original", TO_V, "kinema"),
                  "kinema": ("kinema", TO_V, "original"),
                  "diffusers": ("animatediff-diffusers", DIFFUSERS_TO_V, "kinema")}


@pytest.mark.parametrize("layout", list(MOTION_LAYOUTS))
@pytest.mark.parametrize("case", list(motion_mutations(TO_V)))
def test_broken_motion_modules_are_refused(tmp_path, capsys, layout, case):
    fmt, key, to = MOTION_LAYOUTS[layout]
    mutate, names = motion_mutations(key)[case]
    path = write_motion_module(tmp_path, layout, mutate)
    target = tmp_path / ("out.safetensors" if to == "kinema" else "out.ckpt")
    assert_refused(capsys, path, target, to, names, f"detected AnimateDiff v2 ({fmt})",
                   "widths (32, 64, 64, 64) with 2 down / 3 up modules each and a mid-block module", "Likely cause")
    with pytest.raises(KinemaError, match=re.escape(names)):  # the converter checks too, for library callers
        convert_motion_module(path, target, to)
    assert not target.exists()


@pytest.mark.parametrize("layout", list(MOTION_LAYOUTS))
def test_whole_motion_modules_inspect(tmp_path, capsys, layout):
    report = inspect_ok(capsys, write_motion_module(tmp_path, layout))
    assert (report["format"], report["version"], report["parameters"]) == (
        MOTION_LAYOUTS[layout][0], "v2", sum(module_params(c) for _, c in module_prefixes(TINY_CHANNELS, True)))


@pytest.mark.parametrize("version,channels", [("v1", TINY_CHANNELS), ("v3", TINY_CHANNELS),
                                              ("animatelcm", TINY_CHANNELS), ("sdxl-beta", TINY_SDXL_CHANNELS)])
def test_every_version_is_checked(version, channels):
    state = original_motion_state_dict(version, channels)
    detect_motion_module(state)  # whole: passes
    key = "up_blocks.0.motion_modules.2.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight"
    width = channels[-1]
    state[key] = torch.zeros(8 * width, width + 1)
    with pytest.raises(KinemaError, match=rf"detected AnimateDiff {version} \(animatediff-original\).*1 mismatched "
                                          rf"\(e.g. {key}: file \({8 * width}, {width + 1}\) vs model "
                                          rf"\({8 * width}, {width}\)\)"):
        detect_motion_module(state)


def test_one_damaged_norm_does_not_change_the_width_checked_against():
    state = original_motion_state_dict("v3")
    norm = "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight"  # the first tensor of level 0
    state[norm] = torch.ones(48)
    with pytest.raises(KinemaError, match=rf"widths \(32, 64, 64, 64\).*: 1 mismatched \(e.g. {norm}: file \(48,\) "
                                          r"vs model \(32,\)\)\. Likely"):
        detect_motion_module(state)
    del state[norm]
    with pytest.raises(KinemaError, match=rf"widths \(32, 64, 64, 64\).*: 1 missing \(e.g. {norm}\)\. Likely"):
        detect_motion_module(state)


def full_size_meta_v2() -> dict[str, torch.Tensor]:
    """An SD1.5 v2 motion module as meta tensors (shapes only), from the published layout table."""
    state = {}
    for prefix, c in module_prefixes((320, 640, 1280, 1280), mid_block=True):
        for suffix, shape in MODULE_TENSORS.items():
            state[f"{prefix}.temporal_transformer.{suffix}"] = torch.empty(shape(c), device="meta")
        for suffix in PE_SUFFIXES:
            state[f"{prefix}.temporal_transformer.{suffix}"] = torch.empty(1, 32, c, device="meta")
    return state


def test_a_full_size_v2_check_builds_nothing_real():
    state = full_size_meta_v2()
    start = time.perf_counter()
    info = detect_motion_module(state)
    seconds = time.perf_counter() - start
    print(f"full-size v2 names-and-shapes check: {seconds * 1000:.0f} ms")
    assert (info.version, info.num_params, info.num_keys) == ("v2", 453_209_280, 588)
    assert seconds < 5  # a real build of 453M parameters takes far longer and 1.8 GB
    state["mid_block.motion_modules.0.temporal_transformer.proj_in.weight"] = torch.empty(1280, 640, device="meta")
    with pytest.raises(KinemaError, match=r"proj_in.weight: file \(1280, 640\) vs model \(1280, 1280\)"):
        detect_motion_module(state)


def test_a_config_that_is_not_an_object_is_one_line(tmp_path, capsys):
    folder = write_motion_module(tmp_path, "diffusers")
    (folder / "config.json").write_text("[1, 2]")
    code, _, err = run(capsys, "inspect", str(folder))
    assert code == 1 and err.count("\n") == 1 and "config.json (a model config) holds an array, not an object" in err
    (folder / "config.json").write_text('{"_class_name": "MotionAdapter",\n "block_out_channels": [32, }')
    code, _, err = run(capsys, "inspect", str(folder))
    assert code == 1 and err.count("\n") == 1 and "is not valid JSON at line 2 column" in err


# ---------------------------------------------------------------- motion LoRAs

# The published key templates (motion_lora_keys.py documents where each comes from), written out independently.
LORA_TEMPLATES = {
    "original": "{mm}.temporal_transformer.transformer_blocks.0.attention_blocks.{a}.processor.{p}_lora.{part}.weight",
    "diffusers": "unet.{mm}.transformer_blocks.0.attn{a1}.processor.{p}_lora.{part}.weight",
    "diffusers_peft": "unet.{mm}.transformer_blocks.0.attn{a1}.{peft}.{ab}.weight",
    "kinema": "{mm}.temporal_transformer.transformer_blocks.0.attention_blocks.{a}.{peft}.{ab}.weight",
}
LORA_MODULES = {"down_blocks.0.motion_modules.0": 32, "mid_block.motion_modules.0": 64}
RANK = 4


def lora_key(layout: str, mm: str, attention: int, projection: str, part: str) -> str:
    return LORA_TEMPLATES[layout].format(mm=mm, a=attention, a1=attention + 1, p=projection, part=part,
                                         peft="to_out.0" if projection == "to_out" else projection,
                                         ab={"down": "lora_A", "up": "lora_B"}[part])


def motion_lora(layout: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {lora_key(layout, mm, a, p, part): torch.randn(shape, generator=gen)
            for mm, c in LORA_MODULES.items() for a in (0, 1) for p in ("to_q", "to_k", "to_v", "to_out")
            for part, shape in (("down", (RANK, c)), ("up", (c, RANK)))}


def lora_mutations(layout: str) -> dict[str, tuple[Mutation, tuple[str, ...]]]:
    down = lora_key(layout, "down_blocks.0.motion_modules.0", 0, "to_k", "down")
    up = lora_key(layout, "down_blocks.0.motion_modules.0", 0, "to_k", "up")
    stray = down.removesuffix(".weight") + ".bias"
    return {
        "wrong width": (lambda s: s.__setitem__(down, torch.zeros(RANK, 48)),
                        (f"1 mismatched (e.g. {down}: file (4, 48) vs model (4, 32))",
                         "down_blocks.0: 32", "reshaped or replaced")),
        "wrong rank": (lambda s: s.__setitem__(up, torch.zeros(32, RANK + 1)),
                       (f"1 mismatched (e.g. {up}: file (32, 5) vs model (32, 4))", "one rank r per pair")),
        "missing": (lambda s: s.pop(up), (f"1 missing (e.g. {up})", f"{down} has no up matrix")),
        "unexpected": (lambda s: s.__setitem__(stray, torch.zeros(RANK)),
                       (f"keys are not '{layout}' motion-LoRA keys: {stray}",)),
    }


@pytest.mark.parametrize("layout", list(LORA_TEMPLATES))
@pytest.mark.parametrize("case", list(lora_mutations("original")))
def test_broken_motion_loras_are_refused(tmp_path, capsys, layout, case):
    state = motion_lora(layout)
    mutate, fragments = lora_mutations(layout)[case]
    mutate(state)
    path = tmp_path / "zoom_lora.safetensors"
    save_file(state, path)
    assert_refused(capsys, path, tmp_path / "out.safetensors", "original" if layout == "kinema" else "kinema",
                   *fragments, *([f"motion LoRA ({layout} layout)"] if case != "unexpected" else []))
    with pytest.raises(KinemaError, match=re.escape(fragments[0])):  # the converter checks too, for library callers
        convert_motion_lora(state, "kinema")


@pytest.mark.parametrize("layout", list(LORA_TEMPLATES))
def test_whole_motion_loras_inspect(tmp_path, capsys, layout):
    path = tmp_path / "zoom_lora.safetensors"
    save_file(motion_lora(layout), path)
    report = inspect_ok(capsys, path)
    assert (report["format"], report["rank"], report["channels"], report["layers"]) == (layout, RANK, [32, 64], 16)


def test_a_lora_pair_must_be_as_wide_as_its_module():
    # Square in itself (down (4, 64), up (64, 4)) but aimed at a 32-wide module: the other pairs there give C = 32.
    state = motion_lora("original")
    down = lora_key("original", "down_blocks.0.motion_modules.0", 1, "to_v", "down")
    up = lora_key("original", "down_blocks.0.motion_modules.0", 1, "to_v", "up")
    state[down], state[up] = torch.zeros(RANK, 64), torch.zeros(64, RANK)
    with pytest.raises(KinemaError, match=r"2 mismatched .*file \(4, 64\) vs model \(4, 32\).*file \(64, 4\) vs "
                                          r"model \(32, 4\)"):
        convert_motion_lora(state, "kinema")
    # The mid block is as wide as the first up block (the deepest level): a 32-wide pair there is refused.
    down = lora_key("original", "up_blocks.0.motion_modules.2", 0, "to_q", "down")
    up = lora_key("original", "up_blocks.0.motion_modules.2", 0, "to_q", "up")
    state = {**motion_lora("original"), down: torch.zeros(RANK, 32), up: torch.zeros(32, RANK)}
    with pytest.raises(KinemaError, match=rf"2 mismatched \(e.g. {down}: file \(4, 32\) vs model \(4, 64\)"
                                          r".*up_blocks.0 and mid_block: 64"):
        convert_motion_lora(state, "kinema")


# ---------------------------------------------------------------- EasyAnimate V3 transformer and Slice VAE


def copy_fixture(tmp_path: Path, part: str, mutate: Mutation) -> Path:
    folder = tmp_path / part
    shutil.copytree(FIXTURES / part, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    mutate(state)
    save_file(state, weights)
    return folder


def kinema_transformer(tmp_path: Path, mutate: Mutation) -> Path:
    folder = tmp_path / "kinema_transformer"
    load_video_dit(FIXTURES / "transformer").save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    mutate(state)
    save_file(state, weights)
    return folder


TRANSFORMER_MUTATIONS = {
    "wrong shape": (lambda s: s.__setitem__("proj_out.weight", torch.zeros(16, 32, dtype=s["proj_out.weight"].dtype)),
                    "1 mismatched (e.g. proj_out.weight: file (16, 32) vs model (32, 32))"),
    "missing": (lambda s: s.pop("transformer_blocks.2.attn2.to_k.weight"),
                "1 missing (e.g. transformer_blocks.2.attn2.to_k.weight)"),
    "unexpected": (lambda s: s.__setitem__("transformer_blocks.0.norm3.weight", torch.ones(32)),
                   "1 unexpected (e.g. transformer_blocks.0.norm3.weight)"),
}


@pytest.mark.parametrize("layout", ["original", "kinema"])
@pytest.mark.parametrize("case", list(TRANSFORMER_MUTATIONS))
def test_broken_easyanimate_transformers_are_refused(tmp_path, capsys, layout, case):
    mutate, names = TRANSFORMER_MUTATIONS[case]
    folder = copy_fixture(tmp_path, "transformer", mutate) if layout == "original" else kinema_transformer(
        tmp_path, mutate)
    to = "kinema" if layout == "original" else "original"
    assert_refused(capsys, folder, tmp_path / "out", to, names,
                   f"transformer weights in {folder} does not match the video DiT its config describes")
    with pytest.raises(KinemaError, match=re.escape(names)):  # the converter checks too, for library callers
        convert_easyanimate_transformer(folder, tmp_path / "out", to)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["original", "kinema"])
def test_whole_easyanimate_transformers_inspect(tmp_path, capsys, layout):
    folder = FIXTURES / "transformer" if layout == "original" else kinema_transformer(tmp_path, lambda s: None)
    report = inspect_ok(capsys, folder)
    assert (report["kind"], report["layout"], report["blocks"], report["width"]) == (
        "easyanimate_transformer", layout, 28, 32)
    assert "not_checked" not in report


def test_a_transformer_file_without_config_says_it_was_not_checked(tmp_path, capsys):
    lone = tmp_path / "v3_transformer.safetensors"
    shutil.copy(FIXTURES / "transformer" / "diffusion_pytorch_model.safetensors", lone)
    assert "no config.json beside the file" in inspect_ok(capsys, lone)["not_checked"]


VAE_MUTATIONS = {
    "wrong shape": (lambda s: s.__setitem__("decoder.conv_out.bias", torch.zeros(4, dtype=torch.float16)),
                    "1 mismatched (e.g. decoder.conv_out.bias: file (4,) vs model (3,))"),
    "missing": (lambda s: s.pop("encoder.conv_in.weight"), "1 missing (e.g. encoder.conv_in.weight)"),
    "unexpected": (lambda s: s.__setitem__("decoder.conv_norm_out.running_mean", torch.zeros(8)),
                   "1 unexpected (e.g. decoder.conv_norm_out.running_mean)"),
}


@pytest.mark.parametrize("case", list(VAE_MUTATIONS))
def test_broken_slice_vaes_are_refused(tmp_path, capsys, case):
    mutate, names = VAE_MUTATIONS[case]
    folder = copy_fixture(tmp_path, "vae", mutate)
    assert_refused(capsys, folder, tmp_path / "out", "kinema", names, f"{folder} does not match the Slice VAE",
                   "Likely cause")


def test_a_whole_slice_vae_inspects(capsys):
    report = inspect_ok(capsys, FIXTURES / "vae")
    assert (report["kind"], report["keys"], report["latent_channels"]) == ("slice_vae", 244, 4)


# ---------------------------------------------------------------- failing fast


def test_inspect_imports_no_model_code_before_it_finds_the_path(tmp_path):
    script = ("import sys\nfrom kinema.loaders.source import describe\nfrom kinema.errors import KinemaError\n"
              f"try:\n    describe({str(tmp_path / 'missing.ckpt')!r})\nexcept KinemaError as err:\n    print(err)\n"
              "print(sorted(m for m in ('diffusers', 'transformers', 'peft', 'kinema.models.video_unet') "
              "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == [f"no such file or folder: {tmp_path / 'missing.ckpt'}", "[]"], result.stderr


def test_weights_cast_to_integers_or_float8_are_refused(tmp_path):
    # An int8 copy of a motion module or LoRA once loaded silently as a model of garbage.
    from safetensors.torch import save_file
    from tiny_sd import kohya_lora, published_motion_lora
    from tiny_sd import module_prefixes as prefixes

    import kinema
    from kinema.loaders.stable_diffusion import load_spatial_lora

    def as_int8(tensors):
        return {name: tensor.to(torch.int8) for name, tensor in tensors.items()}

    save_file(as_int8(original_motion_state_dict("v2", (32, 64))), tmp_path / "mm.safetensors")
    save_file(as_int8(published_motion_lora(dict(prefixes((32, 64), True)), rank=4, seed=0)), tmp_path / "ml.ckpt")
    for name, kind in (("mm.safetensors", "motion module"), ("ml.ckpt", "motion lora")):
        with pytest.raises(KinemaError, match=f"{name} \\(a {kind}\\) holds int8 tensors .*kinema reads float16"):
            kinema.describe(tmp_path / name)
    with pytest.raises(KinemaError, match="the image LoRA holds int8 tensors"):
        load_spatial_lora(None, as_int8(kohya_lora(seed=0, rank=4, alpha=2.0)))
    save_file({k: v.half() for k, v in original_motion_state_dict("v2", (32, 64)).items()}, tmp_path / "half.ckpt")
    assert kinema.describe(tmp_path / "half.ckpt")["kind"] == "motion_module"  # float16 stays welcome
    # float8 is floating point, but torch computes nothing in it: it failed with a library error at loading.
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in original_motion_state_dict("v2", (32, 64)).items()},
              tmp_path / "fp8.safetensors")
    with pytest.raises(KinemaError, match=r"fp8.safetensors \(a motion module\) holds float8_e4m3fn tensors"):
        kinema.describe(tmp_path / "fp8.safetensors")


def test_weights_holding_nan_or_infinity_are_refused_before_any_sampling(tmp_path, sd_model):
    # A NaN-valued LoRA once loaded, sampled every step and stopped only at the NaN check after sampling.
    from safetensors.torch import save_file
    from tiny_sd import kohya_lora, published_motion_lora
    from tiny_sd import module_prefixes as prefixes

    import kinema
    from kinema.loaders.stable_diffusion import load_spatial_lora
    from kinema.pipelines.load import load_family

    def spoiled(tensors, value):
        name = sorted(tensors)[1]
        return {k: v.clone().index_fill_(0, torch.tensor([0]), value) if k == name else v for k, v in tensors.items()}

    save_file(spoiled(original_motion_state_dict("v2", (32, 64)), math.nan), tmp_path / "mm.safetensors")
    motion_lora = spoiled(published_motion_lora(dict(prefixes((32, 64), False)), rank=4, seed=0), math.inf)
    save_file(motion_lora, tmp_path / "ml.safetensors")
    torch.save(motion_lora, tmp_path / "ml.ckpt")
    # describe reads a torch pickle whole (a safetensors file only as far as its header): it checks the values too.
    with pytest.raises(KinemaError, match=r"ml.ckpt \(a motion lora\) holds NaN or infinite values \([0-9]+ in "
                                          r".*\); the file is damaged"):
        kinema.describe(tmp_path / "ml.ckpt")
    # What `kinema generate --motion-module ... --lora ...` loads, before any sampling.
    with pytest.raises(KinemaError, match=r"mm.safetensors: the motion module holds NaN or infinite values"):
        load_family(sd_model["path"], motion_module=tmp_path / "mm.safetensors")
    with pytest.raises(KinemaError, match=r"the motion LoRA holds NaN or infinite values"):
        load_family(sd_model["path"], motion_module=sd_model["motion_module"], loras=[(tmp_path / "ml.safetensors", 1)])
    with pytest.raises(KinemaError, match="the image LoRA holds NaN or infinite values"):
        load_spatial_lora(None, spoiled(kohya_lora(seed=0, rank=4, alpha=2.0), -math.inf))


@pytest.mark.parametrize(("setting", "value", "words"), [
    ("num_attention_heads", 0, "num_attention_heads is 0, which must be a positive whole number"),
    ("num_attention_heads", -8, "num_attention_heads is -8"),
    ("num_attention_heads", 7, "num_attention_heads 7 does not divide the module's width 32"),
    ("max_frames", "32", "max_frames is '32'"),
    ("max_frames", 0, "max_frames is 0"),
    ("norm_mode", "banana", "norm_mode is 'banana'; it is one of per_frame, across_frames"),
])
def test_impossible_stored_settings_are_refused_by_inspect(tmp_path, setting, value, words):
    # They once passed inspect and crashed the load with ZeroDivisionError, TypeError or RuntimeError.
    import kinema

    path = write_motion_module(tmp_path, "kinema")
    state = load_file(path)
    save_file(state, path, metadata={"kinema_layout": "motion-module", "version": "v2",
                                     "motion_settings": json.dumps({**KINEMA_SETTINGS, setting: value})})
    with pytest.raises(KinemaError, match=f"the file's motion_settings metadata: {re.escape(words)}"):
        kinema.describe(path)
    adapter = tmp_path / "adapter"
    MotionAdapter(block_out_channels=TINY_CHANNELS, motion_max_seq_length=32).save_pretrained(adapter)
    config = json.loads((adapter / "config.json").read_text())
    (adapter / "config.json").write_text(json.dumps({**config, "motion_num_attention_heads": 0}))
    with pytest.raises(KinemaError, match="its config.json: num_attention_heads is 0"):
        kinema.describe(adapter)
