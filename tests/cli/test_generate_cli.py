"""`kinema generate`, `v2v`, `extend` and `decode`: arguments become the GenerationRequest the library takes, bad usage
exits 2 with one line before torch is imported, and on tiny SD weights `generate` writes what the library makes
while `decode` of the saved latents gives the same frames again."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kinema
from kinema.cli import build_parser, main
from kinema.cli.generate import (
    CONTEXT_SCHEDULES,
    FUSE_METHODS,
    default_output,
    parse_lora,
    read_prompt,
)
from kinema.errors import KinemaError
from kinema.fileio import slug
from kinema.pipelines.request import ContextSettings, FreeInitSettings, FreeUSettings, GenerationRequest

COMMANDS = ("generate", "v2v", "extend", "decode")


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(("text", "expected"), [
    ("zoom.safetensors", ("zoom.safetensors", 1.0)),
    ("zoom.safetensors:0.8", ("zoom.safetensors", 0.8)),
    ("loras/zoom.safetensors:-1.5", ("loras/zoom.safetensors", -1.5)),
    ("C:\\loras\\zoom.safetensors", ("C:\\loras\\zoom.safetensors", 1.0)),
    ("C:\\loras\\zoom.safetensors:.5", ("C:\\loras\\zoom.safetensors", 0.5)),
    ("models/a:b/zoom.ckpt", ("models/a:b/zoom.ckpt", 1.0)),
    ("models/a:b/zoom.ckpt:2", ("models/a:b/zoom.ckpt", 2.0)),
    ("zoom.safetensors:", ("zoom.safetensors:", 1.0)),  # nothing after the colon: part of the (missing) path
])
def test_lora_weight_is_split_off_the_last_colon_only_when_it_is_a_number(text, expected):
    assert parse_lora(text) == expected


@pytest.mark.parametrize("text", [":0.5", "zoom.safetensors:nan", "zoom.safetensors:inf"])
def test_lora_without_a_path_or_with_a_non_finite_weight_is_refused(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_lora(text)


def test_prompt_is_text_json_text_or_a_json_file(tmp_path):
    assert read_prompt("a cat on a mat") == "a cat on a mat"
    assert read_prompt(' {"0": "a cat", "8": "a dog"}') == {"0": "a cat", "8": "a dog"}
    schedule = {"head_prompt": "masterpiece", "prompt_map": {"0": "spring", "12": "winter"}}
    (tmp_path / "travel.json").write_text(json.dumps(schedule))
    assert read_prompt(str(tmp_path / "travel.json")) == schedule
    (tmp_path / "plain.JSON").write_text('"a plain prompt"')
    assert read_prompt(str(tmp_path / "plain.JSON")) == "a plain prompt"
    (tmp_path / "list.json").write_text('["a", "b"]')
    with pytest.raises(KinemaError, match="holds list, not a prompt schedule"):
        read_prompt(str(tmp_path / "list.json"))
    with pytest.raises(KinemaError, match="no such prompt file: .*nope.json"):
        read_prompt(str(tmp_path / "nope.json"))
    with pytest.raises(KinemaError, match="given twice"):
        read_prompt('{"0": "a", "0": "b"}')


def test_default_names():
    assert slug("A red fox, running through SNOW!") == "a-red-fox-running-through-snow"
    assert slug("猫") == "video"
    assert len(slug("word " * 40)) <= 48 and not slug("word " * 40).endswith("-")
    assert default_output("fox", [3]) == Path("out/fox-seed3.mp4")
    assert default_output("fox", [3, 4]) == Path("out/fox.mp4")  # each video then gets -seed3 / -seed4


def test_context_choices_are_the_samplers_own():
    from kinema.sampling.context import FUSE_METHODS as fuse_methods
    from kinema.sampling.context import SCHEDULES

    assert CONTEXT_SCHEDULES == SCHEDULES and FUSE_METHODS == fuse_methods


@pytest.fixture
def model_files(tmp_path):
    (tmp_path / "sd").mkdir()
    from safetensors.torch import save_file

    for name in ("mm.safetensors", "zoom.safetensors", "style.safetensors"):  # weights as their first bytes tell
        save_file({"x": torch.zeros(1)}, str(tmp_path / name))
    for name in ("start.png", "end.png"):  # read before any model loads: real images
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    return tmp_path


def checked(argv):
    args = build_parser().parse_args(argv)
    args.check(args)
    return args


def test_options_become_the_request(model_files):
    root = model_files
    args = checked([
        "generate", '{"0": "a cat", "8": "a dog"}', "--model", str(root / "sd"), "--motion-module",
        str(root / "mm.safetensors"), "--lora", f"{root / 'zoom.safetensors'}:0.6", "--lora",
        str(root / "style.safetensors"), "--frames", "24", "--height", "256", "--width", "384", "--steps", "9",
        "--guidance", "5", "--seed", "3", "1", "--scheduler", "euler_a", "--negative", "blurry", "--image",
        str(root / "start.png"), "--end-image", str(root / "end.png"), "--resize", "--dtype", "bfloat16",
        "--context-length", "12", "--context-overlap", "2", "--closed-loop", "--fuse", "pyramid", "--free-init", "2",
        "--interpolation", "slerp", "--vae-tiling", "--decode-chunk", "4", "--attention-chunk", "64", "--offload",
        "--fps", "12", "--freeu", "1.2,1.4,0.9,0.2", "-o", str(root / "runs" / "travel.webm"),
    ])
    assert args.request == GenerationRequest(
        prompt={"0": "a cat", "8": "a dog"}, negative_prompt="blurry", frames=24, height=256, width=384, steps=9,
        guidance=5.0, scheduler="euler_a", seeds=[3, 1], image=str(root / "start.png"),
        end_image=str(root / "end.png"), resize=True,
        context=ContextSettings(length=12, overlap=2, closed_loop=True, fuse="pyramid"), interpolation="slerp",
        free_init=FreeInitSettings(iterations=2), dtype="bfloat16", vae_tiling=True, decode_chunk=4,
        attention_chunk=64, offload=True, fps=12.0, overlap_frames=4, freeu=FreeUSettings(1.2, 1.4, 0.9, 0.2))
    assert args.lora == [(str(root / "zoom.safetensors"), 0.6), (str(root / "style.safetensors"), 1.0)]
    assert args.output == root / "runs" / "travel.webm"


def write_walk(folder: Path) -> None:
    """walk.mp4: 8 frames at 96x64, an input video as v2v and extend read it before any model loads."""
    from kinema.data.video_io import write_video

    write_video(np.zeros((8, 64, 96, 3), np.uint8), folder / "walk.mp4")


def test_defaults_and_the_other_commands_requests(model_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ["--model", "sd", "--motion-module", "mm.safetensors"]
    args = checked(["generate", "A fox!", *model])
    # The library's defaults otherwise (16 frames at 512x512).
    assert args.request == GenerationRequest(prompt="A fox!", seeds=[0]).with_defaults()
    assert (args.request.height, args.request.frames, args.request.steps) == (512, 16, 25)
    assert args.request.context is None and args.output == Path("out/a-fox-seed0.mp4")
    write_walk(tmp_path)  # the size of an input video is its own, read from its header
    args = checked(["v2v", "walk.mp4", "a robot", "--strength", "0.4", "--seed", "5", "6", *model])
    assert args.request == GenerationRequest(prompt="a robot", video="walk.mp4", strength=0.4, height=64, width=96,
                                             seeds=[5, 6]).with_defaults()
    assert args.output == Path("out/walk-v2v.mp4")
    args = checked(["extend", "walk.mp4", "--frames", "20", "--overlap", "3", "--segment-frames", "8", "--prompt",
                    "", *model])
    assert args.request == GenerationRequest(prompt="", video="walk.mp4", extend_frames=20, overlap_frames=3,
                                             segment_frames=8, height=64, width=96, seeds=[0]).with_defaults()
    assert args.output == Path("out/walk-extended-seed0.mp4")
    # A video with no prompt of kinema's is not continued without one, unless asked.
    with pytest.raises(KinemaError, match=r"^walk.mp4 holds no prompt kinema can read .*; pass --prompt TEXT, or "
                                          r"--prompt '' to continue it without one$"):
        checked(["extend", "walk.mp4", "--frames", "20", *model])
    # The frames kept or remade play at the input's own rate, unless --fps says otherwise.
    from kinema.data.video_io import write_video

    write_video(np.zeros((8, 64, 96, 3), np.uint8), tmp_path / "fast.mp4", fps=24)
    assert checked(["v2v", "fast.mp4", "a robot", "--strength", "0.4", *model]).request.fps == 24
    assert checked(["extend", "fast.mp4", "--frames", "8", "--prompt", "a cat", *model]).request.fps == 24
    assert checked(["v2v", "fast.mp4", "a robot", "--strength", "0.4", "--fps", "12", *model]).request.fps == 12


def test_extend_checks_its_schedules_over_the_whole_video_before_loading(model_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_walk(tmp_path)  # 8 frames, extended by 20: the schedules run over 28
    model = ["--model", "sd", "--motion-module", "mm.safetensors"]
    with pytest.raises(KinemaError, match=r"^the prompt schedule runs over the whole video's 28 frames: prompt "
                                          r"schedule key '30' is out of range: keyframes go from 0 to 27 for 28 "
                                          r"frames; make at least 31 frames, or move the keyframe$"):
        checked(["extend", "walk.mp4", "--frames", "20", "--prompt", '{"0": "a cat", "30": "a dog"}', *model])
    # Given no prompt, the video's own, blended as it was unless the options say otherwise.
    stored = {"prompt": {"0": "a cat", "20": "a dog"}, "prompt_hold": 0.5, "prompt_loop": True,
              "interpolation": "slerp"}
    (tmp_path / "walk.mp4.json").write_text(json.dumps(stored))
    request = checked(["extend", "walk.mp4", "--frames", "20", *model]).request
    assert (request.prompt, request.prompt_hold, request.prompt_loop, request.interpolation) == (
        stored["prompt"], 0.5, True, "slerp")
    assert checked(["extend", "walk.mp4", "--frames", "20", "--prompt-hold", "0.2", *model]).request.prompt_hold == 0.2
    with pytest.raises(KinemaError, match=r"^the prompt stored with walk.mp4 runs over the whole video's 16 frames: "
                                          r"prompt schedule key '20' is out of range"):
        checked(["extend", "walk.mp4", "--frames", "8", *model])


def test_the_continuation_overlap_is_the_models_default_unless_given(model_files, tmp_path, monkeypatch):
    """kinema.json "defaults" may name overlap_frames: `kinema extend` without --overlap, and `kinema generate`
    past the model's window, take it; --overlap wins; a model without it takes the library's 4. The bundled
    kinema-tiny-ad names 8, kinema-tiny nothing."""
    monkeypatch.chdir(tmp_path)
    write_walk(tmp_path)
    (tmp_path / "walk.mp4.json").write_text(json.dumps({"prompt": "a walk"}))  # continued with its own prompt
    (tmp_path / "sd" / "kinema.json").write_text(json.dumps({"defaults": {"overlap_frames": 6}}))
    model = ["--model", "sd", "--motion-module", "mm.safetensors"]
    assert checked(["extend", "walk.mp4", "--frames", "20", *model]).request.overlap_frames == 6
    assert checked(["extend", "walk.mp4", "--frames", "20", "--overlap", "3", *model]).request.overlap_frames == 3
    assert checked(["generate", "a fox", "--frames", "40", *model]).request.overlap_frames == 6
    too_long = r"overlap_frames \({}: .*\) must be below the segment length \({} frames\).*--overlap.*--segment-frames"
    with pytest.raises(KinemaError, match=too_long.format(4, 4)):
        checked(["extend", "walk.mp4", "--frames", "20", "--overlap", "4", "--segment-frames", "4", *model])
    (tmp_path / "sd" / "kinema.json").write_text(json.dumps({"defaults": {"overlap_frames": 0}}))
    with pytest.raises(KinemaError, match="default overlap_frames must be a positive whole number, got 0"):
        checked(["extend", "walk.mp4", "--frames", "20", *model])
    assert checked(["extend", "walk.mp4", "--frames", "20", "--model", "kinema-tiny-ad"]).request.overlap_frames == 8
    with pytest.raises(KinemaError, match=too_long.format(8, 8)):
        checked(["extend", "walk.mp4", "--frames", "20", "--model", "kinema-tiny-ad", "--segment-frames", "8"])
    assert checked(["extend", "walk.mp4", "--frames", "20", "--model", "kinema-tiny"]).request.overlap_frames == 4


def test_print_schedule_needs_no_model(capsys):
    assert main(["generate", '{"2": "a cat", "6": "a dog"}', "--frames", "8", "--print-schedule"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        'frames 0-2: "a cat"', 'frame 3: 0.75 "a cat" -> 0.25 "a dog"', 'frame 4: 0.50 "a cat" -> 0.50 "a dog"',
        'frame 5: 0.25 "a cat" -> 0.75 "a dog"', 'frames 6-7: "a dog"']
    assert main(["generate", '{"0": "a", "123456789012345678": "b"}', "--frames", "16", "--print-schedule"]) == 2
    assert "key '123456789012345678' is out of range: keyframes go from 0 to 15 for 16 frames" in \
        capsys.readouterr().err  # against the frames asked for, not a placeholder length
    assert main(["generate", '{"0": "a", "900000000": "b"}', "--frames", "1000000000", "--print-schedule"]) == 2
    assert "--frames 1000000000 is past the 100000 it prints; give fewer frames" in capsys.readouterr().err
    images = ["--ip-image", '{"0": "cat.png", "4": "dog.png"}', "--prompt-hold", "0.5"]  # blended as the prompts
    assert main(["generate", '{"0": "a cat", "4": "a dog"}', "--frames", "6", "--print-schedule", *images]) == 0
    assert capsys.readouterr().out.splitlines() == [
        'frames 0-2: "a cat"', 'frame 3: 0.50 "a cat" -> 0.50 "a dog"', 'frames 4-5: "a dog"', "image prompt:",
        'frames 0-2: "cat.png"', 'frame 3: 0.50 "cat.png" -> 0.50 "dog.png"', 'frames 4-5: "dog.png"']
    assert main(["generate", "a cat", "--frames", "4", "--print-schedule", "--ip-image", '{"0": "a.png", "4": '
                 '"b.png"}']) == 2
    assert "the image prompt has a keyframe at frame 4, which the video's 4 frames do not reach; make more frames " \
           "(--frames), or move the keyframe" in capsys.readouterr().err


# ---------------------------------------------------------------- usage errors, in a fresh interpreter

DRIVER = """
import contextlib, io, json, sys
from kinema.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    results.append([code, out.getvalue(), err.getvalue()])
# PyAV is not among them: an input video is counted and sized in the check (importing av takes about 50 ms).
heavy = [m for m in ("torch", "numpy", "diffusers", "safetensors") if m in sys.modules]
print(json.dumps({"results": results, "heavy": heavy}))
"""


def run_fresh(argvs, cwd):
    """Run each argv through `main` in one fresh interpreter: (code, stdout, stderr) each, and the heavy modules
    imported by the end (modules other tests imported cannot hide one there)."""
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    return report["results"], report["heavy"]


def test_usage_errors_exit_2_with_one_line_before_torch_is_imported(model_files, tmp_path):
    (tmp_path / "theirs.mp4").write_bytes(b"my video")
    (tmp_path / "new.mp4.latents.safetensors").write_bytes(b"my file")
    from kinema.data.video_io import write_video

    write_video(np.zeros((8, 32, 32, 3), np.uint8), tmp_path / "clip.mp4",  # an input: counted and sized first
                settings={"prompt": "a clip"})
    write_video(np.zeros((8, 36, 44, 3), np.uint8), tmp_path / "odd.mp4")
    (tmp_path / "notes.safetensors").write_text("my notes\n")
    (tmp_path / "held.mp4.json").mkdir()
    (tmp_path / "frames").mkdir()
    from PIL import Image
    from safetensors.torch import save_file

    Image.new("RGB", (100, 84)).save(tmp_path / "odd.png")

    save_file({"latents": torch.zeros(1, 4, 2, 2, 2)}, str(tmp_path / "weights.safetensors"))
    save_file({"image_proj.proj.weight": torch.zeros(4, 4)}, str(tmp_path / "ip.safetensors"))
    # PIA motion modules, told from the header and the config alone: the tensors are never read.
    save_file({"conv_in.weight": torch.zeros(1, 9, 1, 1), "conv_in.bias": torch.zeros(1),
               "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(1)},
              str(tmp_path / "pia.safetensors"))
    (tmp_path / "pia-adapter").mkdir()
    (tmp_path / "pia-adapter" / "config.json").write_text('{"_class_name": "MotionAdapter", "conv_in_channels": 9}')
    model = ["--model", "sd", "--motion-module", "mm.safetensors"]
    cases = [  # (argv, the line printed: ours in full after "kinema COMMAND: error: ", argparse's at the end)
        (["generate", "a cat", "--model", "nowhere"], "no such model file or folder: nowhere"),
        (["generate", "a cat", "--model", "sd", "--motion-module", "mm.ckpt"], "no such motion module: mm.ckpt"),
        (["generate", "a cat", *model, "--lora", "pan.safetensors:0.5"], "no such LoRA file: pan.safetensors"),
        (["generate", "a cat", *model, "--vae", "vae.pt"], "no such VAE: vae.pt"),
        (["generate", "a cat", "--vae", "weights.safetensors"],
         f"{BUNDLED_TINY} is an EasyAnimate model, whose Slice VAE encodes time as well as space: another VAE (vae, "
         "--vae) is for AnimateDiff (SD1.5) models, which use an image VAE; drop it"),
        (["generate", "a cat", *model, "--guidance", "0.5"], "guidance must be a finite number from 1 to 100 (1 "
                                                             "turns classifier-free guidance off; 5 to 9 are usual), "
                                                             "got 0.5"),
        (["generate", "a cat", *model, "--guidance", "1e308"], "guidance must be a finite number from 1 to 100"),
        (["generate", "a cat", *model, "--motion-scale", "1e300"], "motion scale must be a finite number above 0, at "
                                                                   "most 100 (1: as trained), got 1e+300"),
        (["generate", "a cat", *model, "--end-image", "end.png"], "--end-image needs --image (the first frame) too"),
        (["generate", "a cat", *model, "--ip-image", "clip.mp4"], "--ip-adapter and --ip-image come together (the "
                                                                  "adapter conditions on the image prompt): give "
                                                                  "both, or neither"),
        (["generate", "a cat", *model, "--ip-adapter", "ip.safetensors", "--ip-image", "clip.mp4"],
         "the IP-Adapter needs its CLIP image encoder, and image_encoder is no transformers model folder"),
        (["generate", "a cat", *model, "--control-video", "clip.mp4"], "--controlnet and --control-video come "
                                                                       "together (the ControlNet steers by the "
                                                                       "control images): give one --control-video "
                                                                       "per --controlnet"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--controlnet", "weights.safetensors",
          "--control-video", "clip.mp4"], "--controlnet and --control-video come together (the ControlNet steers by "
                                          "the control images): give one --control-video per --controlnet"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--control-video", "gone.mp4"],
         "no such control video: gone.mp4"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--control-video", "clip.mp4"],
         "the control video clip.mp4 has 8 frames and the video 16: give one control image per frame (or one for "
         "all), or make 8 frames (--frames 8)"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--control-video", "clip.mp4",
          "--frames", "8", "--height", "64", "--width", "64"], "the control video is 32x32 but the video is 64x64; "
                                                               "pass --resize to resize it"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--control-video", "clip.mp4",
          "--frames", "8", "--height", "32", "--width", "32", "--control-start", "1"],
         "the ControlNet steers from control_start to control_end, shares of the steps with 0 <= start < end <= 1; "
         "got 1.0 to 1.0"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--control-video", "clip.mp4",
          "--control-indices", "0,-1"], "control_indices name 2 frames for 8 control images; give one index per "
                                        "image"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--control-video", "clip.mp4",
          "--frames", "4", "--control-indices", "0,1,2,3,4,5,6,9"], "control_indices must be whole numbers from "
                                                                    "-4 to 3"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--control-video", "clip.mp4",
          "--frames", "8", "--control-loop"],
         "control_loop wraps the control_falloff around the video's ends: give control_falloff (--control-falloff)"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--control-video", "clip.mp4",
          "--frames", "8", "--control-falloff", "0.5"],
         "control_falloff spreads keyframes to the frames beside them: give control_indices (--control-indices)"),
        (["extend", "clip.mp4", "--frames", "8", *model, "--controlnet", "weights.safetensors", "--control-video",
          "clip.mp4"], "a ControlNet steers the frames of one clip, and extend makes new segments past the control "
                       "video's end"),
        (["generate", "a cat", *model, "--image", "gone.png"], "no such image: gone.png"),
        (["generate", "a cat", *model, "--image", "clip.mp4"], "the image clip.mp4 is not an image"),
        (["generate", "a cat", *model, "--image", "."], "the image . is a folder; give an image file (PNG, JPEG, "
                                                        "WebP or GIF)"),
        (["generate", "a cat", *model, "--image", "start.png", "--height", "64", "--width", "64"],
         "the start image is 8x8 but the video is 64x64; pass --resize to resize it, or set --width 8 --height 8"),
        (["generate", "a cat", "--image", "start.png"], "the start image is 8x8 but the video is 64x64"),  # kinema.json
        (["generate", "a cat", *model, "--image", "start.png"], "the start image is 8x8 but the video is 512x512"),
        (["generate", "a cat", *model, "--image", "start.png", "--end-image", "clip.mp4"], "the end image clip.mp4 is "
                                                                                           "not an image"),
        (["generate", "a cat", "--frames", "12"], "EasyAnimate V3 makes 1 or a multiple of 8 frames; 12 is not: use "
                                                  "8 or 16"),
        (["generate", "a cat", "--height", "50"], "width and height must be positive multiples of 8 (the VAE's 4x "
                                                  "downscale times the transformer's 2x2 patches); got 64x50: use "
                                                  "64x48"),
        (["generate", "a cat", "--model", "kinema-tiny-ad", "--width", "60"], "width and height must be positive "
         "multiples of 8 (the VAE's downscale); got 60x64: use 56x64"),
        # A fix offered is a size the model makes.
        (["generate", "a cat", "--image", "odd.png"], "the start image is 100x84 but the video is 64x64; pass --resize "
                                                      "to resize it, or give a start image of 64x64"),
        (["generate", "a cat", "--image", "odd.png", "--end-image", "odd.png", "--frames", "1", "--resize"],
         "an end image is the last frame and the start image the first, so a video of both needs at least 2 frames"),
        (["v2v", "odd.mp4", "a cat", "--strength", "0.5"], "the input video is 44x36, and the model makes sizes in "
         "multiples of 8 (the VAE's 4x downscale times the transformer's 2x2 patches): add --width 40 --height 32 "
         "--resize to resize it to the nearest size below"),
        (["extend", "clip.mp4", "--frames", "8", "--width", "64"], "the input video is 32x32 but --width/--height ask "
         "for 64x32; add --resize to resize it to that size, or drop --width and --height"),
        (["generate", "a cat", *model, "--seed", "3", "1", "3"], "seed 3 is given more than once, which would make "
                                                                 "the same video twice; give each seed once"),
        (["generate", "a cat", *model, "-o", "theirs.mp4", "--overwrite"], "theirs.mp4 already exists and kinema "
         "did not write it; kinema never replaces what it did not write: choose a new file"),
        (["generate", "a cat", *model, "-o", "new.mp4"], "new.mp4.latents.safetensors already exists and kinema did "
         "not write it; kinema never replaces what it did not write: choose a new file"),
        (["generate", '{"0": "a cat",', *model], "the prompt schedule is not valid JSON"),
        (["generate", '{"0": "a", "20": "b"}', *model], "prompt schedule key '20' is out of range: keyframes go "
                                                         "from 0 to 15 for 16 frames"),
        (["generate", "a cat", *model, "-o", "fox.avi"], "cannot write fox.avi: unsupported extension '.avi'"),
        (["generate", "a cat", "-o", "out/.MP4"], ".MP4 is an extension with no name, which would be a hidden folder "
                                                  "of frames; give a name such as out.MP4"),
        (["generate", "a cat", "--frames", "32", "--context-schedule", "static", "--context-stride", "2"],
         "the context stride 2 (--context-stride, context.stride) spaces the windows of the uniform schedule only; "
         "drop it with the 'static' schedule"),
        (["generate", "a cat", "--free-init", "11"], "FreeInit (--free-init, free_init.iterations) runs from 1 "
                                                     "(plain sampling) to 10 iterations"),
        (["generate", "a cat", "--control-end", "0.5"], "control_start and control_end (--control-start, "
                                                        "--control-end) time a ControlNet's steering over the steps"),
        (["generate", "a cat", "--model", "kinema-tiny-ad", "--lora", "notes.safetensors"],
         "the LoRA file notes.safetensors is a text file, not weights; check the path"),
        (["generate", "a cat", "--model", "kinema-tiny-ad", "--lora", "notes.safetensors:strong"],
         "'strong' after notes.safetensors: is not a number; give the LoRA file as PATH or PATH:WEIGHT with a number "
         "(e.g. :0.8)"),
        (["generate", "a cat", "--model", "kinema-tiny-ad", "--motion-module", "notes.safetensors"],
         "the motion module notes.safetensors is a text file, not weights"),
        (["generate", "a cat", *model, "-o", "fox.png"], "fox.png: a .png file holds one frame, not 16"),
        (["v2v", "clip.mp4", "a robot", "--strength", "1.5", *model], "strength must be in (0, 1] (the share of the "
                                                                       "input noised away), got 1.5"),
        (["v2v", "clip.mp4", "a robot", "--strength", "0.5", *model, "-o", "clip.mp4", "--overwrite"],
         "the output clip.mp4 is the input clip.mp4; write the result somewhere else"),
        (["extend", "gone.mp4", "--frames", "8", *model], "no such video: gone.mp4"),
        (["generate", "a cat", "--model", "sd", "--motion-module", "pia.safetensors"],
         "the motion module pia.safetensors is a PIA image animator: it animates one start image (image, --image), "
         "with no end image, and makes nothing else (text-to-video); load another motion module for that"),
        (["extend", "clip.mp4", "--frames", "8", "--model", "sd", "--motion-module", "pia-adapter"],
         "the motion module pia-adapter is a PIA image animator: it animates one start image (image, --image), with "
         "no end image, and makes nothing else (extend); load another motion module for that"),
        (["generate", "a cat", *model, "--controlnet", "weights.safetensors", "--control-video", "clip.mp4",
          "--frames", "8", "--height", "32", "--width", "32", "--control-preprocess", "sobel"],
         "unknown control preprocessor 'sobel'; known: canny, invert, tile_resample, blur, none (canny:LOW:HIGH for "
         "other thresholds, tile_resample:RATE, blur:SIGMA)"),
        (["generate", "a cat", "--model", "sd", "--motion-module", "weights.safetensors", "--pia-motion", "1"],
         "pia_motion (--pia-motion) is a PIA motion preset, and the motion module weights.safetensors is not a PIA "
         "image animator; load a PIA motion module, or drop it"),
        (["decode", "weights.safetensors", *model], "weights.safetensors is a safetensors file but not latents kinema "
         "saved (no 'latents' mark in its metadata); give the .latents.safetensors file that `kinema generate` saved "
         "beside its video"),
        (["decode", "clip.mp4", *model], "clip.mp4 is not kinema latents"),
        (["decode", "frames", *model], "frames is a folder; give the .latents.safetensors file that `kinema "
                                       "generate` saved beside its video"),
        (["generate", "a cat", *model, "-o", "held.mp4"], "held.mp4.json is a folder, where kinema writes the video "
                                                          "settings beside the output; move the folder or give the "
                                                          "output another name"),
    ]
    argparse_cases = [
        (["generate", "a cat", *model, "--steps", "0"], "argument --steps: must be a positive whole number, got 0"),
        (["generate", "a cat", *model, "--seed", str(2**64)], "argument --seed: must be from 0 to 2**64 - 1, got "
                                                              f"{2**64}"),
        (["generate", "a cat", *model, "--fps", "1e20"], "argument --fps: must be from 0.01 to 1000 frames per "
                                                         "second, got 1e+20"),
        (["generate", "a cat", *model, "--scheduler", "magic"], "argument --scheduler: invalid choice: 'magic'"),
        (["generate", "a cat", *model, "--lora", "x:inf"], "argument --lora: the LoRA weight must be a finite number"),
        (["generate", "a cat", *model, "--lora", "x:1e9"], "argument --lora: the LoRA weight must be a number from "
                                                           "-100 to 100 (1: as trained, 0: off, negative: its "
                                                           "opposite), got 1000000000.0 in 'x:1e9'"),
        (["v2v", "clip.mp4", "a robot", *model], "the following arguments are required: --strength"),
        (["generate", "a cat", *model, "--ip-adapter", "ip.safetensors:-1"], "argument --ip-adapter: the IP-Adapter "
                                                                             "scale must be at least 0"),
        (["generate", "a cat", *model, "--controlnet", "cn:nan"], "argument --controlnet: the ControlNet scale "
                                                                  "must be a finite number, got nan"),
        (["generate", "a cat", *model, "--control-indices", "0,x"], "argument --control-indices: expected whole "
                                                                    "numbers (e.g. 0,15 or 0,-1) separated by commas"),
        (["generate", "a cat", *model, "--control-falloff", "0.5,x"], "argument --control-falloff: expected "
                                                                      "weights from 0 to 1 (e.g. 0.5,0.4,0.3) "
                                                                      "separated by commas"),
        (["generate", "a cat", *model, "--ip-image", '{"0": "a.png", "x": "b.png"}'],
         "argument --ip-image: ip_image keyframe 'x' is not a frame number"),
        (["generate", '{"0": "a cat", "8": "a dog"}', *model, "--prompt-hold", "2"], "prompt_hold is the share of "
                                                                                      "each gap between keyframes"),
        (["generate", "a cat", "--clip-skip", "2"], "is an EasyAnimate model, whose text encoder is not CLIP: "
                                                   "clip_skip (--clip-skip) is for AnimateDiff models; drop it"),
        (["generate", "a cat", *model, "--clip-skip", "0"], "argument --clip-skip:"),
        (["generate", "a cat", *model, "--ip-image", '{"0": '], "argument --ip-image: the image prompt schedule is "
                                                               "not valid JSON"),
        (["generate", "a cat", *model, "--ip-image", '{"1": "a.png", "1": "b.png"}'],
         "argument --ip-image: image prompt schedule key '1' is given twice"),
        (["generate", "a cat", *model, "--ip-image", '{"³": "a.png"}'], "argument --ip-image: ip_image keyframe '³' "
                                                                       "is not a frame number"),
        (["generate", "a cat", *model, "--ip-image", '{"0": 3}'], "argument --ip-image: an image prompt schedule "
                                                                 "maps frame numbers to image paths"),
        (["generate", "a cat", *model, "--controlnet", "cn:-2"], "argument --controlnet: the ControlNet scale "
                                                                 "must be at least 0 and finite"),
        (["generate", "a cat", *model, "--freeu", "1.5,1.6"], "argument --freeu: expected on, or four numbers "
                                                              "B1,B2,S1,S2 (e.g. 1.5,1.6,0.9,0.2), got '1.5,1.6'"),
        (["generate", "a cat", *model, "--freeu", "1,1,nan,1"], "argument --freeu: FreeU factor s1 must be a finite "
                                                                "number above 0, got nan"),
        (["generate", "a cat", "--freeu", "on"], "kinema-tiny is a diffusion transformer, which has no skip "
                                                 "features to rebalance; drop freeu (--freeu)"),
        (["extend", "clip.mp4", *model], "one of the arguments --frames --to is required"),
        (["extend", "clip.mp4", "--frames", "8", "--to", "32", *model], "argument --to: not allowed with argument "
                                                                          "--frames"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    results, heavy = run_fresh([argv for argv, _ in cases + argparse_cases], tmp_path)
    for (argv, message), (code, out, err) in zip(cases, results, strict=False):
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith(f"kinema {argv[0]}: error: {message}"), (argv, err)
        assert out == ""
    for (argv, message), (code, _, err) in zip(argparse_cases, results[len(cases):], strict=True):
        assert code == 2 and message in err.splitlines()[-1], (argv, err)
    assert heavy == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_help_has_an_example_and_imports_no_torch(tmp_path):
    results, heavy = run_fresh([[command, "--help"] for command in COMMANDS] + [["--help"]], tmp_path)
    for command, (code, out, _) in zip(COMMANDS, results, strict=False):
        assert code == 0
        assert f"usage: kinema {command}" in out
        assert f"example:\n  kinema {command} " in out
    assert all(f" {command} " in results[-1][1] for command in COMMANDS)
    assert heavy == []


# ---------------------------------------------------------------- end to end on tiny SD weights

BUNDLED_TINY = Path(kinema.__file__).parent / "bundled" / "kinema-tiny"
LUMA = np.array([0.299, 0.587, 0.114])  # BT.601 weights
SMALL = ["--frames", "4", "--height", "32", "--width", "32", "--steps", "2", "--guidance", "3"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_sd import tiny_sd_parts, write_motion_module, write_sd_folder

    root = tmp_path_factory.mktemp("models")
    folder = write_sd_folder(root / "tiny-sd", tiny_sd_parts())
    module = write_motion_module(root / "mm_v2.safetensors", "v2", seed=5)
    return ["--model", str(folder), "--motion-module", str(module)]


@pytest.fixture(scope="module")
def family(tiny_sd):
    """The library's side of the comparisons: the same files through load_family."""
    from kinema.pipelines.load import load_family

    return load_family(tiny_sd[1], motion_module=tiny_sd[3])


def test_another_vae_decodes_the_video_and_is_recorded(tiny_sd, tmp_path, capsys, monkeypatch):
    from diffusers import AutoencoderKL
    from loaders.test_stable_diffusion import TINY_VAE
    from safetensors.torch import save_file
    from tiny_models import perturb
    from tiny_sd import ldm_vae_state

    from kinema.data.probe import read_sidecar
    from kinema.pipelines.outputs import load_latents

    torch.manual_seed(8)
    other = perturb(AutoencoderKL(**TINY_VAE), 31).eval()
    save_file(ldm_vae_state(other, training=True), tmp_path / "vae-ft-mse.safetensors")
    vae = ["--vae", str(tmp_path / "vae-ft-mse.safetensors")]
    assert main(["generate", "a red fox", "--seed", "4", *SMALL, *tiny_sd, *vae, "-o", str(tmp_path / "fox.mp4"),
                 "--quiet"]) == 0
    assert read_sidecar(tmp_path / "fox.mp4")["vae"] == vae[1]
    latents, _ = load_latents(tmp_path / "fox.mp4.latents.safetensors")
    assert main(["decode", str(tmp_path / "fox.mp4.latents.safetensors"), *tiny_sd, *vae, "-o",
                 str(tmp_path / "frames")]) == 0
    capsys.readouterr()
    with torch.no_grad():  # the independent side: diffusers' VAE of the same weights on the saved latents
        images = other.decode(latents[0].transpose(0, 1) / other.config.scaling_factor).sample
    expected = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(png_frames(tmp_path / "frames").astype(int) - expected).max() <= 1
    assert read_sidecar(tmp_path / "frames")["vae"] == vae[1]
    # Decoded without it: said, and the videos record the VAE that decoded them (the model's own: no "vae").
    assert main(["decode", str(tmp_path / "fox.mp4.latents.safetensors"), *tiny_sd, "-o",
                 str(tmp_path / "own")]) == 0
    assert f"these latents were made with {vae[1]} VAE and are decoded with the model's own: pass --vae {vae[1]} " \
           "for the frames that run made" in capsys.readouterr().err
    assert "vae" not in read_sidecar(tmp_path / "own")
    # Extending it re-encodes its last frames: without its VAE, said before anything runs.
    import kinema.cli.generate as generate_cli

    ran = []
    monkeypatch.setattr(generate_cli, "_generate_and_write", lambda args, request, latents: ran.append(request))
    assert main(["extend", str(tmp_path / "fox.mp4"), "--frames", "4", *tiny_sd, "-o", str(tmp_path / "on.mp4")]) == 0
    assert f"{tmp_path / 'fox.mp4'} was made with the VAE {vae[1]} and is continued with the model's own: pass --vae " \
           f"{vae[1]} to continue it alike" in capsys.readouterr().err
    assert ran and ran[0].prompt == "a red fox"  # its prompt, as before
    assert main(["extend", str(tmp_path / "fox.mp4"), "--frames", "4", *tiny_sd, *vae, "-o",
                 str(tmp_path / "on2.mp4")]) == 0
    assert "was made with the VAE" not in capsys.readouterr().err


def png_frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("*.png"))])


def test_generate_writes_the_librarys_frames_and_decode_gives_them_again(tiny_sd, family, tmp_path, capsys,
                                                                          monkeypatch):
    from kinema.data.probe import read_sidecar
    from kinema.data.video_io import read_video
    from kinema.pipelines.generation import generate
    from kinema.pipelines.outputs import load_latents

    argv = ["generate", "a red fox", "--negative", "blurry", "--seed", "4", "7", *SMALL, *tiny_sd, "-o",
            str(tmp_path / "fox.mp4"), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[0].startswith(f"wrote {tmp_path / 'fox-seed4.mp4'}: 4 frames in ")
    assert re.search(r", float32, peak memory \d+(\.\d\d GiB| MiB)$", printed[0]), printed[0]
    assert printed[2] == f"saved latents to {tmp_path / 'fox.mp4.latents.safetensors'} (`kinema decode` decodes " \
                         "them again)"

    # The independent side: the library on the request written out by hand.
    expected = generate(family, GenerationRequest(prompt="a red fox", negative_prompt="blurry", frames=4, height=32,
                                                  width=32, steps=2, guidance=3.0, seeds=[4, 7]), progress=False)
    latents, stored = load_latents(tmp_path / "fox.mp4.latents.safetensors")
    assert torch.equal(latents, expected.latents)
    assert [entry["seed"] for entry in stored] == [4, 7]
    as_bytes = [(video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for video in expected.frames]
    for index, seed in enumerate((4, 7)):
        settings = read_sidecar(tmp_path / f"fox-seed{seed}.mp4")
        assert (settings["prompt"], settings["negative_prompt"], settings["seed"]) == ("a red fox", "blurry", seed)
        assert settings["report"]["mode"] == "text-to-video"
        decoded = ((read_video(tmp_path / f"fox-seed{seed}.mp4").frames + 1) * 127.5).permute(0, 2, 3, 1).numpy()
        # Luma only: yuv420 keeps one colour sample per 2x2 pixels, and random tiny weights make pixel noise.
        error = (((decoded - as_bytes[index]) @ LUMA) ** 2).mean()
        assert 10 * np.log10(255**2 / max(error, 1e-10)) > 30

    # Decoding the saved latents into PNG frames (lossless) gives exactly the frames generate made.
    decode = ["decode", str(tmp_path / "fox.mp4.latents.safetensors"), *tiny_sd, "-o", str(tmp_path / "again")]
    assert main(decode) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'again-seed4'}: 4 frames in ")
    for index, seed in enumerate((4, 7)):
        np.testing.assert_array_equal(png_frames(tmp_path / f"again-seed{seed}"), as_bytes[index])
        settings = read_sidecar(tmp_path / f"again-seed{seed}")
        assert settings["seed"] == seed and settings["prompt"] == "a red fox"
        assert settings["report"]["mode"] == "decode"

    # Writing to the same outputs again is refused until --overwrite, which replaces kinema's own files; the settings
    # say how this decode ran (they said the latents' run's tiling and chunk), the report where the latents are.
    assert main(decode) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["decode", "fox.mp4.latents.safetensors", *decode[2:], "--overwrite", "--decode-chunk", "3"]) == 0
    settings = read_sidecar(tmp_path / "again-seed4")
    assert (settings["decode_chunk"], settings["report"]["decode_chunk"]) == (3, 3)
    assert settings["report"]["latents"] == str(tmp_path / "fox.mp4.latents.safetensors")

    # Without --model, the model the latents name decodes them (it once fell back to the bundled default, and
    # refused these as another family's); with another model, a warning, and the report names the decoder.
    assert main([*decode[:2], "-o", str(tmp_path / "stored")]) == 0
    np.testing.assert_array_equal(png_frames(tmp_path / "stored-seed4"), as_bytes[0])
    assert read_sidecar(tmp_path / "stored-seed4")["report"]["decoder"]["model"] == tiny_sd[1]
    import shutil

    other = shutil.copytree(tiny_sd[1], tmp_path / "other-sd")
    capsys.readouterr()
    assert main([*decode[:2], "--model", str(other), "--motion-module", tiny_sd[3], "-o", str(tmp_path / "by")]) == 0
    assert f"these latents were made by {tiny_sd[1]} and are decoded by {other}: pass --model {tiny_sd[1]} (or no " \
           "--model)" in capsys.readouterr().err
    assert read_sidecar(tmp_path / "by-seed4")["report"]["decoder"]["model"] == str(other)
    assert read_sidecar(tmp_path / "by-seed4")["model"] == tiny_sd[1]  # the settings stay the making run's

    # decode's VAE options reach the VAE (they were once accepted and dropped), the fps it writes at is the one its
    # settings record, and a .png output (one frame) is refused before anything decodes.
    import kinema.pipelines.animatediff as animatediff

    chunks = []

    def spy(vae, latents, decode_chunk=16):
        chunks.append(decode_chunk)
        return decode_latents(vae, latents, decode_chunk)

    decode_latents = animatediff.decode_latents
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(animatediff, "decode_latents", spy)
        tiled = [*decode[:-1], str(tmp_path / "tiled.gif"), "--decode-chunk", "3", "--vae-tiling", "--fps", "5"]
        assert main(tiled) == 0 and chunks == [3]
        assert read_sidecar(tmp_path / "tiled-seed4.gif")["fps"] == 5.0
        assert main([*decode[:-1], str(tmp_path / "one.png")]) == 2 and chunks == [3]
    assert "a .png file holds one frame, not 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # decode samples nothing: no speed, LoRA or offload options
        main([*decode, "--speed", "fast"])


def test_a_run_stopped_while_writing_its_videos_resumes_from_its_saved_latents(tiny_sd, tmp_path, capsys,
                                                                                 monkeypatch):
    import shutil

    from kinema.data.probe import read_sidecar
    from kinema.models.video_unet import VideoUNet

    argv = ["generate", "a red fox", "--seed", "4", "7", *SMALL, *tiny_sd, "-o", str(tmp_path / "fox"), "--quiet"]
    assert main(argv) == 0  # frames folders: lossless, so the frames compare exactly
    made = png_frames(tmp_path / "fox-seed7")
    # As a run killed after the first video: the second video and its settings never written.
    shutil.rmtree(tmp_path / "fox-seed7")
    (tmp_path / "fox-seed7.json").unlink()
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(VideoUNet, "forward", lambda *a, **k: pytest.fail("sampled again"))
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert f"resuming: {tmp_path / 'fox.latents.safetensors'} holds the final latents" in captured.err
        np.testing.assert_array_equal(png_frames(tmp_path / "fox-seed7"), made)
        assert read_sidecar(tmp_path / "fox-seed7")["report"]["resumed"] is True
        # A finished run is not resumed: its outputs are refused as before.
        assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
        # Another run's latents are never taken for this one's, and nothing of it is replaced.
        shutil.rmtree(tmp_path / "fox-seed7")
        assert main([argv[0], "a blue fox", *argv[2:]]) == 2  # told from the latents' header, before any load
        assert "the saved latents are another run's: their settings differ in prompt; pass --overwrite" in \
            capsys.readouterr().err
        assert not (tmp_path / "fox-seed7").exists()
        assert main([*argv, "--seed", "4"]) == 2 and "their settings differ in seed" in capsys.readouterr().err
        # Settings the command line gives are compared before any load, and nothing says "resuming" first.
        for extra, differ in ((["--scheduler", "euler"], "scheduler"), (["--fps", "24"], "fps"),
                              (["--guidance-rescale", "0.5"], "guidance_rescale"),
                              (["--model", "kinema-tiny-ad"], "model"), (["--frames", "8"], "frames"),
                              (["--width", "40"], "width"), (["--dtype", "bfloat16"], "dtype")):
            assert main([*argv, *extra]) == 2, extra
            err = capsys.readouterr().err
            assert f"their settings differ in {differ}" in err and "resuming" not in err, err
        assert not (tmp_path / "fox-seed7").exists()
        # How the latents are decoded may change: the usual retry of a run that ran out of memory decoding.
        assert main([*argv, "--vae-tiling", "--decode-chunk", "2"]) == 0
        assert "resuming:" in capsys.readouterr().err
        np.testing.assert_array_equal(png_frames(tmp_path / "fox-seed7"), made)
        assert read_sidecar(tmp_path / "fox-seed7")["vae_tiling"] is True
        shutil.rmtree(tmp_path / "fox-seed7")
        (tmp_path / "fox-seed7.json").unlink()
        # Latents with a flipped bit are refused by their digest, where they would decode into wrong frames.
        saved = tmp_path / "fox.latents.safetensors"
        whole = bytearray(saved.read_bytes())
        whole[-3] ^= 0x10
        saved.write_bytes(bytes(whole))
        with monkeypatch.context() as before_loading:
            before_loading.setattr("kinema.pipelines.load.load_family", lambda *a, **k: pytest.fail("loaded"))
            assert main(argv) == 1
        assert "its latents or settings no longer match the digest saved with them (a disk or copy fault); generate " \
               "it again, or copy it again from where it was made (or pass --overwrite to sample anew and replace " \
               "it)" in capsys.readouterr().err
        # Latents kinema saved whose header is damaged are refused as nothing to resume from.
        saved.write_bytes(bytes(whole).replace(b'"[{', b'"[[', 1))  # the settings text, no longer JSON
        assert main(argv) == 2
        assert "marked as kinema latents but its contents are damaged (expected one (B, C, F', h, w) tensor and B " \
               "settings); generate it again (pass --overwrite to replace it)" in capsys.readouterr().err
        assert not (tmp_path / "fox-seed7").exists()


def test_an_overwrite_stopped_while_writing_leaves_its_latents_without_the_old_videos_and_resumes(
        tiny_sd, tmp_path, capsys, monkeypatch):
    from kinema.data import video_io
    from kinema.data.probe import read_sidecar

    common = ["--seed", "4", "7", *SMALL, *tiny_sd, "--quiet"]
    assert main(["generate", "a red fox", *common, "-o", str(tmp_path / "fox")]) == 0
    (tmp_path / "fox-seed4-notes.txt").write_text("mine")
    blue = ["generate", "a blue fox", *common, "-o", str(tmp_path / "fox")]
    with monkeypatch.context() as patch:  # as a Ctrl-C while the new run writes its first video
        patch.setattr(video_io, "write_video", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main([*blue, "--overwrite"]) == 130
    # Again with --overwrite would sample anew: the way on is the command without it.
    assert "the same command without --overwrite writes its videos without sampling again" in capsys.readouterr().err
    # The red run's videos are gone, not left beside latents of the blue one; a file of the user's is not.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fox-seed4-notes.txt", "fox.latents.safetensors"]
    capsys.readouterr()
    assert main(blue) == 0  # the same command without --overwrite finishes it
    assert "resuming:" in capsys.readouterr().err
    assert read_sidecar(tmp_path / "fox-seed7")["prompt"] == "a blue fox"
    assert main([*blue[:-1], str(tmp_path / "straight")]) == 0
    for seed in (4, 7):
        np.testing.assert_array_equal(png_frames(tmp_path / f"fox-seed{seed}"),
                                      png_frames(tmp_path / f"straight-seed{seed}"))


def test_a_stopped_v2v_does_not_resume_once_its_input_video_changed(tiny_sd, family, tmp_path, capsys, monkeypatch):
    from kinema.data import video_io
    from kinema.data.video_io import write_video
    from kinema.pipelines.generation import NotThisRun, generate
    from kinema.pipelines.outputs import load_latents

    def clip(seed):
        return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    write_video(clip(0), tmp_path / "walk")
    argv = ["v2v", str(tmp_path / "walk"), "a robot", "--strength", "0.5", "--steps", "2", "--seed", "2", *tiny_sd,
            "--quiet", "-o", str(tmp_path / "robot")]
    with monkeypatch.context() as patch:  # as a Ctrl-C while the run writes its video, after its latents
        patch.setattr(video_io, "write_video", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(argv) == 130
    assert "the same command again writes its videos without sampling again" in capsys.readouterr().err
    # The input is replaced by other frames of the same size and length: its settings alone cannot tell.
    write_video(clip(1), tmp_path / "walk", overwrite=True)
    with monkeypatch.context() as before_loading:
        before_loading.setattr("kinema.pipelines.load.load_family", lambda *a, **k: pytest.fail("loaded"))
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the saved latents were made from another {tmp_path / 'walk'}: the file changed since they were saved; " \
           "pass --overwrite" in err and "resuming" not in err, err
    assert not (tmp_path / "robot").exists()
    # generate() itself refuses them too (the Python API resumes without the command line's check).
    latents, settings = load_latents(tmp_path / "robot.latents.safetensors")
    request = GenerationRequest(prompt="a robot", video=str(tmp_path / "walk"), strength=0.5, steps=2, seeds=[2])
    with pytest.raises(NotThisRun, match="made from another"):
        generate(family, request, progress=False, resume=(latents, settings))
    # With --overwrite the run samples anew from the new input.
    assert main([*argv, "--overwrite"]) == 0 and (tmp_path / "robot").is_dir()


def test_v2v_and_extend_take_the_input_size_and_its_stored_prompt(tiny_sd, family, tmp_path, capsys):
    from kinema.data.probe import read_sidecar
    from kinema.data.video_io import read_video, write_video
    from kinema.pipelines.generation import generate

    clip = torch.rand(4, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    write_video(clip * 2 - 1, tmp_path / "walk", settings={"prompt": "a walking fox"})
    as_input = read_video(tmp_path / "walk").frames.add(1).div(2)  # what the pipeline reads back from the PNGs
    common = ["--steps", "2", "--guidance", "3", "--seed", "2", *tiny_sd, "--quiet"]
    assert main(["v2v", str(tmp_path / "walk"), "a robot", "--strength", "0.5", *common,
                 "-o", str(tmp_path / "robot")]) == 0
    expected = generate(family, GenerationRequest(prompt="a robot", video=as_input, strength=0.5, height=24,
                                                  width=40, steps=2, guidance=3.0, seeds=[2]), progress=False)
    as_bytes = (expected.frames[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(png_frames(tmp_path / "robot"), as_bytes)
    assert (tmp_path / "robot.latents.safetensors").is_file()
    # --mask: video inpainting, the mask image's white half remade, as generate() remakes it.
    from PIL import Image

    mask = torch.zeros(24, 40)
    mask[:, 20:] = 1
    Image.fromarray((mask * 255).byte().numpy()).save(tmp_path / "mask.png")
    assert main(["v2v", str(tmp_path / "walk"), "a robot", "--strength", "1", "--mask", str(tmp_path / "mask.png"),
                 "--mask-blur", "1.5", *common, "-o", str(tmp_path / "masked")]) == 0
    expected = generate(family, GenerationRequest(prompt="a robot", video=as_input, strength=1.0, mask=mask,
                                                  mask_blur=1.5, height=24, width=40, steps=2, guidance=3.0,
                                                  seeds=[2]), progress=False)
    as_bytes = (expected.frames[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(png_frames(tmp_path / "masked"), as_bytes)
    assert read_sidecar(tmp_path / "masked")["mask"] == str(tmp_path / "mask.png")
    assert read_sidecar(tmp_path / "masked")["mask_blur"] == 1.5

    capsys.readouterr()
    assert main(["extend", str(tmp_path / "walk"), "--frames", "3", "--overlap", "2", "--segment-frames", "4",
                 *common, "-o", str(tmp_path / "longer.gif")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'longer.gif'}: 7 frames in ")
    settings = read_sidecar(tmp_path / "longer.gif")
    assert settings["prompt"] == "a walking fox" and settings["extend_frames"] == 3
    assert settings["segment_frames"] == 4 and settings["report"]["segments"] == 2
    assert read_video(tmp_path / "longer.gif").frames.shape == (7, 3, 24, 40)
    assert not (tmp_path / "longer.gif.latents.safetensors").exists()

    # --to TOTAL counts the input's own 4 frames: --to 7 is --frames 3, frame for frame (PNG folders: lossless).
    for name, length in (("to-seven", ["--to", "7"]), ("three-more", ["--frames", "3"])):
        assert main(["extend", str(tmp_path / "walk"), *length, "--overlap", "2", "--segment-frames", "4", *common,
                     "-o", str(tmp_path / name)]) == 0
    assert read_sidecar(tmp_path / "to-seven")["extend_frames"] == 3
    np.testing.assert_array_equal(png_frames(tmp_path / "to-seven"), png_frames(tmp_path / "three-more"))
    capsys.readouterr()
    assert main(["extend", str(tmp_path / "walk"), "--to", "4", *common, "-o", str(tmp_path / "same")]) == 2
    assert capsys.readouterr().err.endswith("already has 4 frames, so --to 4 appends nothing; give --to more than 4, "
                                            "or --frames N to append N frames\n")
    assert not (tmp_path / "same").exists()
    # Counting the frames of a file no decoder can read is one line, also when --height / --width skip reading it.
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    assert main(["extend", str(tmp_path / "broken.mp4"), "--to", "8", "--height", "24", "--width", "40", *common,
                 "-o", str(tmp_path / "never.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the video {tmp_path / 'broken.mp4'} is corrupt, truncated or not a " \
        "video kinema can read (InvalidDataError" in err


def test_extend_continues_with_the_model_and_negative_prompt_the_video_was_made_with(tiny_sd, tmp_path, capsys):
    import shutil

    from kinema.data.probe import read_sidecar

    made = tmp_path / "fox"
    assert main(["generate", "a red fox", "--negative", "blurry", *SMALL, *tiny_sd, "--quiet", "-o", str(made)]) == 0
    extend = ["extend", str(made), "--frames", "2", "--overlap", "2", "--segment-frames", "4", "--steps", "1"]
    # No --model: the one the video names (it once fell back to the bundled default, of another family).
    assert main([*extend, "-o", str(tmp_path / "longer")]) == 0
    settings = read_sidecar(tmp_path / "longer")
    assert (settings["model"], settings["motion_module"]) == (tiny_sd[1], tiny_sd[3])
    assert (settings["prompt"], settings["negative_prompt"]) == ("a red fox", "blurry")
    assert "continued by" not in capsys.readouterr().err
    # Given ones win, and another model is said.
    other = shutil.copytree(tiny_sd[1], tmp_path / "other-sd")
    assert main([*extend, "--model", str(other), "--motion-module", tiny_sd[3], "--negative", "dark", "-o",
                 str(tmp_path / "other")]) == 0
    assert f"{made} was made by {tiny_sd[1]} and is continued by {other}: pass --model {tiny_sd[1]} (or no --model) " \
           "to continue it alike" in capsys.readouterr().err
    assert read_sidecar(tmp_path / "other")["negative_prompt"] == "dark"


def test_extend_refuses_a_video_shorter_than_the_overlap_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from kinema.data.video_io import write_video
    from kinema.pipelines import load as load_module

    write_video(torch.zeros(1, 3, 64, 64), tmp_path / "one.mp4")
    monkeypatch.setattr(load_module, "load_family", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["extend", str(tmp_path / "one.mp4"), "--frames", "8", "--prompt", "a cat", "-o",
                 str(tmp_path / "longer.mp4")]) == 2
    assert capsys.readouterr().err == (
        "kinema extend: error: the video to extend has 1 frame, fewer than the 4 each new segment is conditioned on "
        "(overlap_frames, --overlap); give an overlap of at most 1, or a longer video\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mp4", "one.mp4.json"]


def test_the_model_loads_on_the_device_and_with_offload_waits_in_cpu_memory(monkeypatch):
    import kinema.devices
    import kinema.pipelines.load
    from kinema.cli.generate import _load
    from kinema.pipelines.family import VideoFamily

    loaded = []

    def load_family(model, **options):
        loaded.append(options["device"])
        return VideoFamily()

    monkeypatch.setattr(kinema.pipelines.load, "load_family", load_family)
    monkeypatch.setattr(kinema.devices, "resolve_device", lambda name: torch.device("cuda", 1))
    assert _load(checked(["generate", "a cat", "--device", "cuda:1"])).offload_device is None
    family = _load(checked(["generate", "a cat", "--device", "cuda:1", "--offload"]))
    assert loaded == [torch.device("cuda", 1), "cpu"] and family.offload_device == torch.device("cuda", 1)
    with pytest.raises(KinemaError, match=r"^--quantize int8 runs on the CPU only .* and --device is cuda:1: drop "
                                          r"--quantize, or give --device cpu$"):
        _load(checked(["generate", "a cat", "--device", "cuda:1", "--quantize", "int8"]))
    monkeypatch.setattr(kinema.devices, "resolve_device", lambda name: torch.device("cpu"))
    assert _load(checked(["generate", "a cat", "--offload"])).offload_device is None  # nowhere to offload to
    assert loaded[-1] == torch.device("cpu")


@pytest.mark.parametrize("command", [["generate", "a cat"], ["eval"], ["batch", "jobs.jsonl", "--out", "b"], ["ui"],
                                     ["serve"], ["decode", "x.latents.safetensors"]])
def test_every_command_that_runs_models_takes_a_device_and_checks_its_name(command, capsys):
    assert build_parser().parse_args([*command, "--device", "cuda:1"]).device == "cuda:1"
    assert build_parser().parse_args(command).device == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--device", "gpu"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(f"error: argument --device: unknown device 'gpu': use auto, cpu, "
                                                  f"cuda, cuda:N or mps (see kinema {command[0]} --help)\n")


def test_a_device_this_machine_lacks_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import kinema.pipelines.load

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.setattr(kinema.pipelines.load, "load_family", lambda *a, **k: pytest.fail("loaded"))
    for speed in ([], ["--speed", "fast"]):  # --speed asks the device what it runs fast, and still fails alike
        assert main(["generate", "a cat", "--device", "cuda", *speed, "-o", str(tmp_path / "cat.mp4")]) == 1
        printed = capsys.readouterr()
        assert printed.err.strip() == ("kinema generate: error: device cuda: this torch is built for the CPU only; use "
                                       "--device cpu (or auto)") and printed.out == ""
    assert not list(tmp_path.iterdir())


def test_refusals_that_the_options_and_headers_decide_come_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Found by a hostile trial: each of these was refused only after the model had loaded, or in argparse's or
    Python's words."""
    from kinema.pipelines import load as load_module

    made = tmp_path / "ad.mp4"
    assert main(["generate", "a red circle moving right", "--model", "kinema-tiny-ad", "--steps", "1", "--frames",
                 "8", "-o", str(made)]) == 0
    (tmp_path / "dir.json").mkdir()
    capsys.readouterr()
    monkeypatch.setattr(load_module, "load_family", lambda *a, **k: pytest.fail("the model loaded"))
    for argv, message in (
            (["decode", f"{made}.latents.safetensors", "--model", "kinema-tiny", "-o", str(tmp_path / "x.mp4")],
             "these latents were made by kinema-tiny-ad of the animatediff family, and kinema-tiny is of the "
             "easyanimate family: its VAE reads other latents; decode them with --model kinema-tiny-ad"),
            (["extend", str(made), "--model", "kinema-tiny", "--frames", "8", "--overlap", "16", "-o",
              str(tmp_path / "e.mp4")],
             "overlap_frames (16: the request's, else the model's kinema.json default) must be below the segment "
             "length (16 frames)"),
            (["generate", "a cat", "-o", ""], "argument -o/--output: is empty; give a file name"),
            (["generate", "a cat", "--fps", "60", "-o", str(tmp_path / "fast.gif")],
             "so it plays at most 50 fps, not 60; write .mp4, .webm or .webp, or lower --fps"),
            (["generate", str(tmp_path / "dir.json")], f"the prompt file {tmp_path / 'dir.json'} is a folder"),
            # Finished frames past the free memory (refused after a load, exit 1, in 12 s).
            (["generate", "a cat", "--width", "100000", "--height", "100000", "-o", str(tmp_path / "big.mp4")],
             "16 frames at 100000x100000 need 1788.14 GiB of memory for the finished frames alone"),
            (["v2v", str(made), "a cat", "--strength", "0.5", "--width", "100000", "--height", "100000", "--resize",
              "-o", str(tmp_path / "big.mp4")], "8 frames at 100000x100000 need 894.07 GiB of memory"),
            (["extend", str(made), "--frames", "10000000", "-o", str(tmp_path / "long.mp4")],
             "10000008 frames at 64x64 need 457.76 GiB of memory for the finished frames alone")):
        try:
            code = main(argv)
        except SystemExit as usage:  # argparse's own refusals exit
            code = usage.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_another_kind_of_file_as_ip_adapter_is_left_to_the_load_that_names_it(tmp_path):
    # Blamed for a missing image_encoder/ beside it before: the load says what the file is instead.
    from safetensors.torch import save_file

    from kinema.cli.generate import _may_be_ip_adapter

    save_file({"image_proj.proj.weight": torch.zeros(4, 4)}, str(tmp_path / "ip.safetensors"))
    save_file({"down_blocks.0.motion_modules.0.proj_in.weight": torch.zeros(4, 4)}, str(tmp_path / "mm.safetensors"))
    (tmp_path / "ip.bin").write_bytes(b"PK")  # a pickle: told once read
    assert [_may_be_ip_adapter(str(tmp_path / name)) for name in ("ip.safetensors", "mm.safetensors", "ip.bin")] == [
        True, False, True]
    assert not _may_be_ip_adapter(str(tmp_path))  # a ControlNet folder, say


def test_a_folder_ending_in_a_separator_or_dot_gets_the_default_name_inside(tmp_path, monkeypatch, capsys):
    # pathlib drops a trailing "/" and names "." nothing: `-o clips/` made a frames folder "clips", `-o .` wrote
    # frames into the current folder and its settings into the parent.
    from kinema.cli.args import output_in, output_path

    (tmp_path / "clips").mkdir()
    monkeypatch.chdir(tmp_path / "clips")
    here, up = str(tmp_path / "clips") + os.sep, str(tmp_path) + os.sep
    assert [output_path(text) for text in (".", "./", "..", "sub/.", "sub/", "out.mp4", "frames")] == [
        here, here, up, here + "sub" + os.sep, here + "sub" + os.sep, "out.mp4", "frames"]
    default = Path("out/a-cat-seed0.mp4")
    assert [output_in(given, default) for given in (None, "sub/", "x.webm", "frames")] == [
        default, Path("sub/a-cat-seed0.mp4"), Path("x.webm"), Path("frames")]
    argv = ["generate", "a red circle", "--model", "kinema-tiny-ad", "--steps", "1", "--frames", "8"]
    assert main([*argv, "-o", "."]) == 0
    assert main([*argv, "--seed", "3", "4", "-o", "sub/"]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "clips", "clips/a-red-circle-seed0.mp4", "clips/a-red-circle-seed0.mp4.json",
        "clips/a-red-circle-seed0.mp4.latents.safetensors", "clips/sub", "clips/sub/a-red-circle-seed3.mp4",
        "clips/sub/a-red-circle-seed3.mp4.json", "clips/sub/a-red-circle-seed4.mp4",
        "clips/sub/a-red-circle-seed4.mp4.json", "clips/sub/a-red-circle.mp4.latents.safetensors"]
    assert main([*argv, "-o", "frames"]) == 0  # no slash: a folder of frames, as ever
    for inside in ("frames/", "frames/x.mp4", "frames/sub/"):  # a video there would make kinema's frames the user's
        assert main([*argv, "-o", inside]) == 2
        assert f"is inside {tmp_path / 'clips' / 'frames'}, an earlier kinema video whose files kinema lists" in \
            capsys.readouterr().err
