"""`kinema inspect` and `kinema convert` through `kinema.cli.main`: reports, conversions and one-line errors."""

import json

import pytest
import torch
from diffusers import MotionAdapter
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from loaders.animatediff.animatediff_fixtures import TINY_CHANNELS, original_motion_state_dict, tiny_unet

from kinema.cli import main
from kinema.loaders.checkpoint_io import read_state_dict, write_state_dict


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_tensors(got, expected):
    """Same names, and each tensor bit-exact with the same dtype (convert only renames, so it owns every bit)."""
    assert set(got) == set(expected)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())


def inspect_json(capsys, path, *options):
    code, out, err = run(capsys, "inspect", str(path), "--json", *options)
    assert code == 0, err
    return json.loads(out)


def test_inspect_a_v2_file(tmp_path, capsys):
    path = tmp_path / "mm_v2.safetensors"
    write_state_dict(original_motion_state_dict("v2"), path)
    assert inspect_json(capsys, path) == {
        "path": str(path), "kind": "motion_module", "format": "animatediff-original", "version": "v2",
        "keys": 588, "parameters": 1_579_296, "max_frames": 32, "max_frames_source": "file", "dtype": "float32",
        "mid_block": True, "channels": list(TINY_CHANNELS), "num_attention_heads": 8, "norm_num_groups": 32,
        "norm_mode": "per_frame", "resnet_norm_mode": "per_frame",
        "settings_source": "the v2 preset (the file records only weights and frame tables; a model folder's "
                           "kinema.json \"motion\" entry may set others)", "dropped": {}}
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0 and "            version: v2\n" in out and "         parameters: 1579296\n" in out


def test_inspect_takes_a_bundled_models_name_and_names_its_motion_module(capsys):
    # `kinema inspect kinema-tiny-ad` was refused (no such file); the folder's report now says which settings its
    # original-layout motion module loads with, which the file alone cannot (inspect of it shows the v3/sdxl preset).
    report = inspect_json(capsys, "kinema-tiny-ad")
    assert report["kind"] == "stable_diffusion" and report["motion_module"].startswith(
        "motion_module.safetensors with kinema.json's \"motion\" settings {'max_frames': 32, ")
    assert "'num_attention_heads': 4" in report["motion_module"]
    assert inspect_json(capsys, "kinema-tiny")["kind"] == "easyanimate_transformer"


def test_inspect_v3_ckpt_reports_the_dropped_config(tmp_path, capsys):
    torch.save({**original_motion_state_dict("v3", dtype=torch.float16), "animatediff_config": {"L": 16}},
               tmp_path / "v3.ckpt")
    report = inspect_json(capsys, tmp_path / "v3.ckpt")
    assert (report["version"], report["keys"], report["max_frames"], report["dtype"]) == ("v3", 560, 32, "float16")
    assert report["dropped"] == {"animatediff_config": "dict with 1 entries (0 tensors)"}


def test_inspect_a_diffusers_folder(tmp_path, capsys):
    MotionAdapter(block_out_channels=TINY_CHANNELS, motion_max_seq_length=32).save_pretrained(tmp_path / "adapter")
    report = inspect_json(capsys, tmp_path / "adapter")
    assert (report["format"], report["version"], report["keys"], report["norm_mode"]) == (
        "animatediff-diffusers", "v2", 21 * 27, "across_frames")


def test_inspect_a_motion_lora(tmp_path, capsys):
    prefix = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor"
    write_state_dict({f"{prefix}.to_q_lora.down.weight": torch.zeros(4, 32),
                      f"{prefix}.to_q_lora.up.weight": torch.zeros(32, 4)}, tmp_path / "zoom.safetensors")
    report = inspect_json(capsys, tmp_path / "zoom.safetensors")
    assert (report["kind"], report["rank"], report["parameters"]) == ("motion_lora", 4, 256)


def test_inspect_unknown_and_broken_files(tmp_path, capsys):
    write_state_dict(tiny_unet().state_dict(), tmp_path / "unet.safetensors")
    code, _, err = run(capsys, "inspect", str(tmp_path / "unet.safetensors"))
    assert code == 1 and err.count("\n") == 1
    assert "not a format kinema knows: looked for AnimateDiff motion module" in err
    assert "motion LoRA; EasyAnimate V3" in err and "it looks like an image UNet" in err

    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run(capsys, "inspect", str(tmp_path / "notes.txt"))
    assert code == 1 and "weights files kinema reads end in .safetensors, .ckpt" in err
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing.ckpt"))
    assert code == 2 and "no such file or folder" in err

    v1 = original_motion_state_dict("v1")
    key = next(k for k in v1 if k.endswith("pos_encoder.pe"))
    write_state_dict({**v1, key: torch.zeros(1, 32, 32)}, tmp_path / "mixed.safetensors")
    code, _, err = run(capsys, "inspect", str(tmp_path / "mixed.safetensors"))
    assert code == 1 and "mixed.safetensors: frame-encoding lengths disagree" in err

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"x": Payload()}, tmp_path / "evil.ckpt")
    code, _, err = run(capsys, "inspect", str(tmp_path / "evil.ckpt"))
    assert code == 1 and "refused to run code from the pickle" in err and not (tmp_path / "pwned").exists()


def test_convert_original_to_diffusers_to_original_is_bit_exact(tmp_path, capsys):
    source = tmp_path / "mm_sd_v15_v2.ckpt"
    write_state_dict(original_motion_state_dict("v2", seed=7), source)
    code, out, _ = run(capsys, "convert", str(source), str(tmp_path / "adapter"), "--to", "diffusers")
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'adapter'} (diffusers layout)\nnote: ")
    adapter = MotionAdapter.from_pretrained(tmp_path / "adapter")
    written = read_state_dict(tmp_path / "adapter/diffusion_pytorch_model.safetensors")
    assert set(adapter.state_dict()) == set(written)
    # The diffusers side against diffusers' own converter (behind MotionAdapter.from_single_file), which never
    # writes the pe tables: a rename kinema made on the way out and undid on the way back would show here.
    assert_same_tensors({k: v for k, v in written.items() if not k.endswith(".pos_embed.pe")},
                        convert_animatediff_checkpoint_to_diffusers(read_state_dict(source)))
    for source_name, target, layout in [("adapter", "back.ckpt", "original"), ("back.ckpt", "k.safetensors", "kinema"),
                                        ("k.safetensors", "o.ckpt", "original")]:
        assert run(capsys, "convert", str(tmp_path / source_name), str(tmp_path / target), "--to", layout)[0] == 0
    expected = read_state_dict(source)
    for name in ("back.ckpt", "o.ckpt"):
        assert_same_tensors(read_state_dict(tmp_path / name), expected)
    assert inspect_json(capsys, tmp_path / "k.safetensors")["format"] == "kinema"
    # kinema's layout is the original names without the frame tables.
    assert_same_tensors(read_state_dict(tmp_path / "k.safetensors"),
                        {k: v for k, v in expected.items() if not k.endswith(".pos_encoder.pe")})


def test_convert_a_motion_lora_through_every_layout_is_bit_exact(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    source = {}
    for mm, width in [("down_blocks.0.motion_modules.0", 32), ("mid_block.motion_modules.0", 64)]:
        for attn in (0, 1):
            prefix = f"{mm}.temporal_transformer.transformer_blocks.0.attention_blocks.{attn}.processor"
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                source[f"{prefix}.{proj}_lora.down.weight"] = torch.randn(4, width, generator=gen)
                source[f"{prefix}.{proj}_lora.up.weight"] = torch.randn(width, 4, generator=gen)
    write_state_dict(source, tmp_path / "zoom.ckpt")
    steps = [("zoom.ckpt", "d.safetensors", "diffusers"), ("d.safetensors", "p.safetensors", "diffusers_peft"),
             ("p.safetensors", "k.safetensors", "kinema"), ("k.safetensors", "back.ckpt", "original")]
    for name, target, layout in steps:
        code, out, err = run(capsys, "convert", str(tmp_path / name), str(tmp_path / target), "--to", layout)
        assert code == 0, err
        assert inspect_json(capsys, tmp_path / target)["format"] == layout
    peft_keys = read_state_dict(tmp_path / "p.safetensors")
    assert "unet.mid_block.motion_modules.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in peft_keys
    assert_same_tensors(read_state_dict(tmp_path / "back.ckpt"), source)
    # Each layout on the way against diffusers' own renaming of the source, so a rename made on the way out and
    # undone on the way back cannot hide: its motion-module converter (+ "unet.") as diffusers' LoRA script writes,
    # and its legacy -> peft renaming for the peft layouts (diffusers' paths, and kinema's = the original paths).
    diffusers_layout = {f"unet.{k}": v for k, v in convert_animatediff_checkpoint_to_diffusers(source).items()}
    assert_same_tensors(read_state_dict(tmp_path / "d.safetensors"), diffusers_layout)
    assert_same_tensors(peft_keys, convert_unet_state_dict_to_peft(diffusers_layout))
    assert_same_tensors(read_state_dict(tmp_path / "k.safetensors"), convert_unet_state_dict_to_peft(source))


def test_convert_refuses_a_layout_the_kind_lacks(tmp_path, capsys):
    write_state_dict(original_motion_state_dict("v3"), tmp_path / "mm.safetensors")
    code, _, err = run(capsys, "convert", str(tmp_path / "mm.safetensors"), str(tmp_path / "o.safetensors"),
                       "--to", "diffusers_peft")
    assert code == 1 and "an AnimateDiff motion module converts to ['original', 'diffusers', 'kinema']" in err
    code, _, err = run(capsys, "convert", str(tmp_path / "mm.safetensors"), str(tmp_path / "mm.safetensors"),
                       "--to", "original")
    assert code == 2 and "is the input" in err


def test_a_target_of_the_wrong_form_is_refused_before_the_weights_are_read(tmp_path, capsys, monkeypatch):
    from kinema.loaders.formats import format_of

    write_state_dict(original_motion_state_dict("v3"), tmp_path / "mm.safetensors")
    described = type(format_of("motion_module")).function  # describe runs; convert, which reads the weights, not

    def no_convert(self, role):
        return pytest.fail("convert ran") if role == "convert" else described(self, role)

    monkeypatch.setattr(type(format_of("motion_module")), "function", no_convert)
    module = "an AnimateDiff motion module"
    for target, layout, words in (("o.txt", "kinema", f"the kinema layout of {module} is a .safetensors file"),
                                  ("o.ckpt", "kinema", f"the kinema layout of {module} is a .safetensors file"),
                                  ("o.txt", "original", f"the original layout of {module} is a .safetensors or "),
                                  ("adapter.x", "diffusers", f"the diffusers layout of {module} is a folder; "
                                                             "give a folder path without an extension"),
                                  ("o.safetensors/", "kinema", f"the kinema layout of {module} is one .safetensors "
                                                               "file, but")):
        code, _, err = run(capsys, "convert", str(tmp_path / "mm.safetensors"), f"{tmp_path}/{target}", "--to",
                           layout)  # a trailing slash kept, as the shell gives it
        assert code == 1 and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mm.safetensors"]


def test_convert_errors_and_help(tmp_path, capsys):
    code, _, err = run(capsys, "convert", str(tmp_path / "none.ckpt"), str(tmp_path / "o.ckpt"), "--to", "original")
    assert code == 2 and "no such file" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "a", "b", "--to", "comfy"])
    assert exit_info.value.code == 2
    for command in ("inspect", "convert"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and f"example:\n  kinema {command} " in capsys.readouterr().out


def test_inspect_names_a_git_lfs_pointer(tmp_path, capsys):
    pointer = tmp_path / "mm_sd_v15_v2.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1817888431\n")
    code, _, err = run(capsys, "inspect", str(pointer))
    assert code == 1 and "is a Git LFS pointer" in err and err.count("\n") == 1


def test_convert_offers_every_layout_of_the_format_registry(capsys):
    from kinema.loaders.formats import CONVERT_LAYOUTS, FORMATS

    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "{" + ",".join(CONVERT_LAYOUTS) + "}" in capsys.readouterr().out
    assert set(CONVERT_LAYOUTS) == {layout for entry in FORMATS for layout in entry.layouts}


def test_inspect_checks_a_controlnet_or_motion_module_against_the_models_unet(tmp_path, capsys):
    from loaders.test_controlnet import original_layout, tiny_controlnet
    from safetensors.torch import save_file
    from tiny_sd import tiny_sd_parts, write_sd_folder

    parts = tiny_sd_parts(seed=1)
    model = write_sd_folder(tmp_path / "tiny-sd", {name: parts[name] for name in ("unet", "vae", "text_encoder")})
    # The published files' hint encoder (a single file's is not read from its tensors), on the tiny UNet.
    save_file(original_layout(tiny_controlnet(parts["unet"], hint=(16, 32, 96, 256))),
              tmp_path / "control_tiny.safetensors")
    # A single file has no config: alone it is read as SD1.5's ControlNet, which this one is not.
    code, _, err = run(capsys, "inspect", str(tmp_path / "control_tiny.safetensors"))
    assert code == 1 and "control_tiny.safetensors" in err, err
    report = inspect_json(capsys, tmp_path / "control_tiny.safetensors", "--model", str(model))
    assert (report["kind"], report["checked_against"]) == ("controlnet", str(model))
    write_state_dict(original_motion_state_dict("v2"), tmp_path / "mm_v2.safetensors")  # made for other widths
    code, _, err = run(capsys, "inspect", str(tmp_path / "mm_v2.safetensors"), "--model", str(model))
    assert code == 1 and f"is made for a UNet of widths {TINY_CHANNELS}" in err
    code, _, err = run(capsys, "inspect", str(tmp_path / "mm_v2.safetensors"), "--model", str(tmp_path))
    assert code == 2 and "is not a Stable Diffusion diffusers folder (no unet/config.json)" in err


def test_inspect_says_what_model_does_not_check(tmp_path, capsys):
    from tiny_sd import module_prefixes, published_motion_lora, tiny_sd_parts, write_sd_folder

    parts = tiny_sd_parts(seed=1)
    model = write_sd_folder(tmp_path / "tiny-sd", {name: parts[name] for name in ("unet", "vae", "text_encoder")})
    lora = tmp_path / "ml.safetensors"
    write_state_dict(published_motion_lora(dict(module_prefixes((32, 64, 64), True)), rank=4, seed=0), lora)
    code, out, err = run(capsys, "inspect", str(lora), "--model", str(model))
    assert code == 0 and "checked_against" not in out
    assert f"{lora} is a motion lora, not checked against {model}" in err
