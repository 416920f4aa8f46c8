"""`kinema generate` without --model: the bundled default (kinema-tiny, here a tiny stand-in found through
KINEMA_BUNDLED_DIR), its kinema.json defaults for the options left unset, an unknown name listing the available
models, and a prompt outside the synthetic world still making a video with one warning."""

import json

import numpy as np
import pytest
from loaders.test_text_encoder import write_named_v3_folder, write_tiny_bert

from kinema.bundled import DEFAULT_MODEL
from kinema.cli import build_parser, main
from kinema.data.video_io import read_video
from kinema.pipelines.request import GenerationRequest

TINY_DEFAULTS = {"height": 32, "width": 32, "frames": 8, "steps": 2, "guidance": 3.0, "scheduler": "euler"}
WARNING = "kinema: warning: the bundled models only know coloured shapes"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """A bundled-models folder whose kinema-tiny is a tiny V3-family model reading a tiny BERT (its kinema.json
    entry points at the folder), with defaults and the synthetic world."""
    root = tmp_path_factory.mktemp("bundled")
    bert = write_tiny_bert(root / "bert")
    write_named_v3_folder(root / DEFAULT_MODEL, {"path": str(bert), "max_length": 8}, world="synth",
                          defaults=TINY_DEFAULTS)
    return root


@pytest.fixture(autouse=True)
def bundled_dir(bundled, monkeypatch):
    monkeypatch.setenv("KINEMA_BUNDLED_DIR", str(bundled))
    return bundled


def checked(argv):
    args = build_parser().parse_args(argv)
    args.check(args)
    return args


def test_no_model_means_kinema_tiny_and_its_defaults_fill_what_is_unset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = checked(["generate", "a red circle moving right"])
    assert args.model == "kinema-tiny"
    assert args.request == GenerationRequest(prompt="a red circle moving right", seeds=[0], **TINY_DEFAULTS,
                                             overlap_frames=4)
    args = checked(["generate", "a red circle", "--frames", "16", "--steps", "5", "--height", "64",
                    "--scheduler", "ddim"])
    assert args.request == GenerationRequest(prompt="a red circle", seeds=[0], overlap_frames=4, **{
        **TINY_DEFAULTS, "frames": 16, "steps": 5, "height": 64, "scheduler": "ddim"})
    from kinema.data.video_io import write_video

    write_video(np.zeros((8, 48, 80, 3), np.uint8), tmp_path / "walk.mp4")
    args = checked(["v2v", "walk.mp4", "a blue square", "--strength", "0.5"])  # the size stays the input's
    assert (args.request.steps, args.request.guidance, args.request.scheduler) == (2, 3.0, "euler")
    assert (args.request.height, args.request.width) == (48, 80)  # read from the video's header, before any load


def test_a_prompt_of_bytes_that_are_not_utf8_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kinema.pipelines.load.load_family", lambda *a, **k: pytest.fail("loaded"))
    # What Python makes of the bytes b"a \xed\xa0\x80 cat" in argv (surrogateescape): text no tokenizer takes.
    argv_text = b"a \xed\xa0\x80 cat".decode("utf-8", "surrogateescape")
    for argv in (["generate", argv_text], ["generate", "a cat", "--negative", argv_text]):
        assert main([*argv, "-o", str(tmp_path / "x.mp4")]) == 2
        assert "holds a lone surrogate (a \\ud800-\\udfff escape in JSON, or bytes that are not UTF-8 on a " \
               "command line)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_context_windows_of_part_latent_frames_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    # The default context length (16) with --context-overlap 3 alone: refused as the job parser refuses it.
    monkeypatch.setattr("kinema.pipelines.load.load_family", lambda *a, **k: pytest.fail("loaded"))
    assert main(["generate", "a red circle", "--frames", "16", "--context-overlap", "3", "-o",
                 str(tmp_path / "x.mp4")]) == 2
    assert "windows count whole latent frames of 4 frames, so a context length of 16 and an overlap of 3" in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_help_says_what_the_default_model_is(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: kinema-tiny, bundled with kinema" in text
    assert "Without --model: the bundled kinema-tiny" in text and "kinema.json defaults" in text


def test_an_unknown_model_name_lists_the_available_ones(capsys):
    assert main(["generate", "a red circle", "--model", "kinema-huge"]) == 2
    assert capsys.readouterr().err == (
        "kinema generate: error: no such model file or folder: kinema-huge; a model is an existing path or a bundled "
        "model's name (available: kinema-tiny)\n")


def test_a_prompt_outside_the_world_still_makes_a_video_and_warns_once(tmp_path, capsys):
    out = tmp_path / "cat.mp4"
    assert main(["generate", "a cat chasing a dog", "--seed", "0", "1", "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err.count(WARNING) == 0  # --quiet shows errors only
    assert main(["generate", "a cat chasing a dog", "--seed", "0", "1", "-o", str(out), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert err.count(WARNING) == 1 and "'a cat chasing a dog'" in err
    for seed in (0, 1):
        video = tmp_path / f"cat-seed{seed}.mp4"
        assert read_video(video).frames.shape == (8, 3, 32, 32)
        settings = json.loads(video.with_name(video.name + ".json").read_text())
        assert settings["model"] == "kinema-tiny" and settings["steps"] == 2
    assert main(["generate", "a red circle moving right", "-o", str(tmp_path / "red.mp4")]) == 0
    assert WARNING not in capsys.readouterr().err
    # A negative prompt is what the video avoids, not what it asks for.
    assert main(["generate", "a red circle moving right", "--negative", "a cat chasing a dog", "-o",
                 str(tmp_path / "red.mp4"), "--overwrite"]) == 0
    assert WARNING not in capsys.readouterr().err


def test_the_end_of_a_prompt_past_what_the_text_encoder_reads_is_named(tmp_path, capsys):
    from kinema.bundled import bundled_model_path

    # The bundled text encoder reads its kinema.json max_length of tokens, [CLS] and [SEP] among them.
    config = json.loads((bundled_model_path("kinema-tiny") / "kinema.json").read_text())
    length = config["text_encoder"]["max_length"]
    prompt = "a red circle moving right" + " and" * (length - 7) + " a blue square"
    assert main(["generate", prompt, "-o", str(tmp_path / "long.mp4")]) == 0
    err = capsys.readouterr().err
    assert "the text encoder reads the start of each prompt only, so the end of 'a red circle moving right and " in err
    assert "is cut off and changes nothing: 'a blue square'; shorten the prompt, or spread it over a prompt " \
           "schedule" in err
    assert main(["generate", prompt.removesuffix(" a blue square"), "-o", str(tmp_path / "fits.mp4")]) == 0
    assert "cut off" not in capsys.readouterr().err


def test_library_bars_stay_off_where_kinemas_own_are_off(bundled, tmp_path):
    """transformers draws a "Loading weights" bar whatever stderr is; a kinema command whose stderr is not a terminal
    (here a pipe, in a fresh interpreter so nothing imported transformers before) shows none, as its own bars."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "KINEMA_BUNDLED_DIR": str(bundled)}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    from pathlib import Path

    run = [str(Path(sys.executable).parent / "kinema"), "generate", "a red circle moving right", "-o",
           str(tmp_path / "a.mp4")]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {tmp_path / 'a.mp4'}: 8 frames in ")
    assert done.stderr == ""



def test_v2v_refuses_what_kinema_tiny_cannot_remake_before_it_loads(tmp_path, capsys, monkeypatch):
    # These once failed inside generate(), after the model had loaded (or, for .png, after sampling).
    from kinema.data.video_io import write_video
    from kinema.pipelines import load as load_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(load_module, "load_family", lambda *a, **k: pytest.fail("the model loaded"))
    write_video(np.zeros((10, 64, 64, 3), np.uint8), tmp_path / "ten.mp4")
    write_video(np.full((8, 60, 60, 3), 255, np.uint8), tmp_path / "sixty.mp4")
    write_video(np.zeros((8, 64, 64, 3), np.uint8), tmp_path / "eight.mp4")
    write_video(np.full((8, 64, 64, 3), 255, np.uint8), tmp_path / "mask.mp4")
    from PIL import Image

    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    (tmp_path / "notes.png").write_text("not an image")
    for argv, message in (
            (["ten.mp4"], "the input video has 10 frames, and EasyAnimate V3 remakes 1 or a multiple of 8: trim it "
                          "to 8 frames"),
            (["sixty.mp4"], "the input video is 60x60, and the model makes sizes in multiples of 16 (the VAE's 8x "
                            "downscale times the transformer's 2x2 patches): add --width 48 --height 48 --resize"),
            (["sixty.mp4", "--width", "60", "--height", "64", "--resize"], "got 60x64: use 48x64"),
            (["eight.mp4", "--steps", "1", "-o", "still.png"], "still.png: a .png file holds one frame, not 8"),
            (["eight.mp4", "--mask", "gone.png"], "no such mask: gone.png"),
            (["eight.mp4", "--mask", "ten.mp4"], "the mask has 10 frames and the input video 8: give one mask image "
                                                 "for every frame, or a mask video of 8 frames"),
            (["eight.mp4", "--mask", "sixty.mp4"], "the mask is 60x60 but the video is 64x64; pass --resize to resize "
                                                  "it, or give a mask of 64x64"),
            (["eight.mp4", "--mask", "black.png"], "the mask marks no pixel to remake"),
            (["eight.mp4", "--mask", "notes.png"], "the mask notes.png is not a PNG, JPEG, WebP or GIF image kinema "
                                                   "can read (damaged, or another format under that name)"),
            (["eight.mp4", "--mask", "mask.mp4", "-o", "mask.mp4"], "the output mask.mp4 is the input mask.mp4"),
            (["eight.mp4", "--mask-blur", "4"], "mask_blur (--mask-blur) feathers the edge of a video-to-video mask: "
                                                "give the mask (--mask) too"),
            (["eight.mp4", "--mask", "mask.mp4", "--mask-blur", "-1"], "mask_blur is the radius in pixels")):
        assert main(["v2v", *argv[:1], "a blue square", "--strength", "0.5", *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == ["eight.mp4", "mask.mp4", "sixty.mp4",
                                                                                "ten.mp4"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("still*"))


def test_a_videos_settings_are_a_job_that_remakes_it_from_anywhere(tmp_path, monkeypatch, capsys):
    """OUT.json names its inputs by absolute path, and `kinema batch` takes it as a job (its record-only keys,
    kinema's version, the family and the report, dropped): run from another folder, it makes the same frames."""
    from kinema.data.video_io import write_video

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write_video(np.zeros((8, 32, 32, 3), np.uint8), work / "walk.mp4", fps=12)
    assert main(["v2v", "walk.mp4", "a red circle moving right", "--strength", "0.7", "--seed", "4", "-o",
                 "remade.mp4"]) == 0
    settings = json.loads((work / "remade.mp4.json").read_text())
    assert settings["video"] == str(work / "walk.mp4") and settings["fps"] == 12
    assert {"kinema", "family", "report"} <= set(settings)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "again.jsonl").write_text(json.dumps(settings) + "\n")
    assert main(["batch", "again.jsonl", "--out", "batch"]) == 0
    [made] = list((elsewhere / "batch").rglob("*.mp4"))
    np.testing.assert_array_equal(read_video(made).frames.numpy(), read_video(work / "remade.mp4").frames.numpy())
    # The report holds each input's SHA-256: a replay after the input changed says it makes another video.
    import hashlib

    assert settings["report"]["inputs"] == {str(work / "walk.mp4"): hashlib.sha256(
        (work / "walk.mp4").read_bytes()).hexdigest()}
    write_video(np.full((8, 32, 32, 3), 90, np.uint8), work / "walk.mp4", fps=12, overwrite=True)
    capsys.readouterr()
    assert main(["batch", "again.jsonl", "--out", "batch2"]) == 0
    assert f"{work / 'walk.mp4'} has changed since the video these settings come from was made" in \
        capsys.readouterr().err
