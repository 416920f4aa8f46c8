"""kinema.pipelines.jobs: a job from plain data (checked, with the model's defaults and drawn seeds), one-line
refusals before any model loads, and run_job's folder on the bundled kinema-tiny, compared with generate() called
directly on a separately loaded model."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kinema.bundled import bundled_model_path, model_defaults
from kinema.data.probe import read_sidecar
from kinema.data.video_io import read_video, write_video
from kinema.errors import KinemaError
from kinema.fileio import output_kind
from kinema.pipelines.jobs import (
    JOB_KEYS,
    MAX_SEED,
    Cancelled,
    FamilyCache,
    check_image_bytes,
    check_model_request,
    check_video_bytes,
    job_from_mapping,
    model_shape,
    model_window,
    run_job,
)
from kinema.pipelines.request import ContextSettings, FreeInitSettings, FreeUSettings, GenerationRequest

SMALL = {"frames": 8, "steps": 2}


@pytest.fixture(scope="module")
def cache() -> FamilyCache:
    return FamilyCache()


def png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unset_fields_take_the_model_defaults_and_settings_read_back_into_the_same_job():
    defaults = model_defaults(bundled_model_path("kinema-tiny"))
    job = job_from_mapping({"prompt": "a red circle moving right", "seed": -1, "frames": 8})
    assert job.model == "kinema-tiny" and job.loras == [] and job.motion_module is None
    assert (job.request.height, job.request.width, job.request.steps) == (defaults["height"], defaults["width"],
                                                                         defaults["steps"])
    assert (job.request.guidance, job.request.scheduler, job.request.frames) == (defaults["guidance"],
                                                                                defaults["scheduler"], 8)
    [seed] = job.request.seeds
    assert 0 <= seed < 2**32  # drawn here, and recorded
    settings = json.loads(json.dumps(job.settings()))
    assert settings["seeds"] == [seed] and settings["model"] == "kinema-tiny"
    assert job_from_mapping(settings) == job
    context = job_from_mapping({"prompt": "a cat", "context": {"length": 8, "closed_loop": True}, "seed": [3, 4]})
    assert context.request.context == ContextSettings(length=8, closed_loop=True)
    assert list(context.request.seeds) == [3, 4]
    assert job_from_mapping(context.settings()) == context


def test_equal_settings_share_a_model_key_and_dtype_or_loras_make_another(tmp_path):
    from tiny_sd import tiny_sd_parts, write_kohya_lora

    lora = tmp_path / "style.safetensors"
    write_kohya_lora(lora)
    vae = tmp_path / "vae"
    tiny_sd_parts()["vae"].save_pretrained(vae)  # an AutoencoderKL folder
    a = job_from_mapping({"prompt": "a cat", "seed": 1})
    assert a.model_key() == job_from_mapping({"prompt": "a dog", "steps": 3}).model_key()
    assert a.model_key() != job_from_mapping({"prompt": "a cat", "dtype": "bfloat16"}).model_key()
    sd = {"prompt": "a cat", "model": "kinema-tiny-ad"}  # LoRAs are for SD models (kinema-tiny's family refuses them)
    with_lora = job_from_mapping({**sd, "loras": [{"path": "style.safetensors", "weight": 0.5}]}, base=tmp_path)
    assert with_lora.loras == [(str(lora), 0.5)]
    assert with_lora.model_key() != job_from_mapping(sd).model_key()
    assert job_from_mapping({**sd, "loras": [[str(lora), 0.5]]}).loras == with_lora.loras
    with pytest.raises(KinemaError, match="is an EasyAnimate model: --lora is for AnimateDiff"):
        job_from_mapping({"prompt": "a cat", "loras": [[str(lora), 0.5]]})  # kinema-tiny, refused before it loads
    with_vae = job_from_mapping({**sd, "vae": "vae"}, base=tmp_path)
    assert with_vae.vae == str(vae) and with_vae.model_key() != job_from_mapping(sd).model_key()
    assert job_from_mapping(with_vae.settings()).model_key() == with_vae.model_key()
    with pytest.raises(KinemaError, match="is an EasyAnimate model, whose Slice VAE encodes time as well"):
        job_from_mapping({"prompt": "a cat", "vae": str(vae)})


def test_a_model_file_of_the_wrong_kind_is_refused_when_the_job_is_accepted(tmp_path, no_model_loads):
    """Read from headers, not at run time: a job the API accepts is one that can run."""
    from tiny_sd import write_kohya_lora, write_motion_module

    write_kohya_lora(tmp_path / "style.safetensors")
    write_motion_module(tmp_path / "mm.safetensors")
    (tmp_path / "notes.txt").write_text("my notes")
    sd = {"prompt": "a cat", "model": "kinema-tiny-ad"}
    assert job_from_mapping({**sd, "motion_module": "mm.safetensors", "loras": [["style.safetensors", 0.5]]},
                            base=tmp_path).loras == [(str(tmp_path / "style.safetensors"), 0.5)]
    for fields, message in (
            ({"vae": "style.safetensors"}, r"^job: vae \S+style.safetensors is not an SD1.x VAE \(it is: image "
                                           r"LoRA for SD1.5 .*\); give an SD1.x VAE file or AutoencoderKL folder"),
            ({"loras": [["mm.safetensors", 1]]}, r"^job: LoRA \S+mm.safetensors is not a LoRA \(it is: AnimateDiff "
                                                 r"motion module"),
            ({"motion_module": "style.safetensors"}, r"^job: motion_module \S+style.safetensors is not an AnimateDiff "
                                                     r"motion module"),
            ({"controlnet": "mm.safetensors", "control_video": "notes.txt"}, r"^job: controlnet \S+mm.safetensors "
                                                                              r"is not a ControlNet"),
            ({"ip_adapter": {"path": "notes.txt", "scale": 0.5}, "ip_image": "notes.txt"},
             r"^job: ip_adapter \S+notes.txt is a text file, not weights")):
        with pytest.raises(KinemaError, match=message):
            job_from_mapping({**sd, **fields}, base=tmp_path)


def test_relative_paths_resolve_against_base_then_the_models_folder(tmp_path):
    models, configs = tmp_path / "models", tmp_path / "configs"
    models.mkdir(), configs.mkdir()
    torch.save({}, models / "mm.ckpt")  # a torch pickle: its kind shows only to the load, so it passes here
    (configs / "start.png").write_bytes(png_bytes())
    job = job_from_mapping({"prompt": "a cat", "model": "kinema-tiny-ad", "motion_module": "mm.ckpt",
                            "image": "start.png"}, base=configs, models_dir=models)
    assert job.motion_module == str(models / "mm.ckpt") and job.request.image == str(configs / "start.png")
    assert job.request.mode == "image-to-video"


@pytest.mark.parametrize(("data", "message"), [
    ({"promt": "a cat"}, "job: unknown key 'promt'; did you mean 'prompt'?"),
    ({"prompt": "a cat", "context": {"lenght": 8}}, "job: context: unknown key 'lenght'; did you mean 'length'?"),
    ({"prompt": "a cat", "loras": [{"path": "x", "wieght": 1}]}, "unknown key 'wieght'; did you mean 'weight'?"),
    # Falsy values that are no list were taken as no LoRA at all.
    ({"prompt": "a cat", "loras": 0}, "job: loras must be a list of [path, weight] pairs"),
    ({"prompt": "a cat", "loras": ""}, "job: loras must be a list of [path, weight] pairs"),
    ({"prompt": "a cat", "loras": {}}, "job: loras must be a list of [path, weight] pairs"),
    ({"prompt": "a cat", "loras": [{"path": "x", "weight": -1e9}]}, "job: LoRA weight must be a number from -100 to "
                                                                    "100 (1: as trained, 0: off, negative: its "
                                                                    "opposite), got -1000000000.0"),
    ({"prompt": "a cat", "steps": "ten"}, "job: steps must be a whole number, got str 'ten'"),
    ({"prompt": "a cat", "frames": 8.0}, "job: frames must be a whole number, got float 8.0; send 8"),
    ({"prompt": None}, "job: prompt must be text, got null"),
    ({"prompt": "a cat", "context": {"fuse": "pyramidal"}}, "job: unknown context.fuse 'pyramidal'; choose one of"),
    ({"prompt": "a cat", "context": {"length": 8, "overlap": 8}},
     "the context overlap 8 (--context-overlap, context.overlap) must be below the context length 8"),
    ({"prompt": "a cat", "free_init": {"spatial_stop": 2.0}}, "job: free_init.spatial_stop must be in (0, 1]"),
    ({"prompt": "a cat", "guidance": True}, "job: guidance must be a finite number, got bool True"),
    ({"prompt": "a cat", "scheduler": "eulr"}, "job: unknown scheduler 'eulr'; choose one of"),
    ({"prompt": "a cat", "timestep_spacing": "trail"}, "job: unknown timestep_spacing 'trail'; choose one of"),
    ({"prompt": "a cat", "motion_effect": -1}, "job: motion effect must be a finite number from 0 to 100"),
    ({"prompt": "a cat", "motion_scale": "big"}, "job: motion_scale must be a finite number, got str 'big'"),
    ({"prompt": "a cat", "guidance_rescale": "0.7"}, "job: guidance_rescale must be a finite number, got str '0.7'"),
    ({"prompt": "a cat", "guidance_rescale": 2}, "job: guidance_rescale must be a number from 0 to 1"),
    ({"prompt": "a cat", "freeu": "on"}, "job: freeu must be true (Stable Diffusion 1.5's factors), false, or an"),
    ({"prompt": "a cat", "freeu": {"b3": 1}}, "job: freeu: unknown key 'b3'; known keys: b1, b2, s1, s2"),
    ({"prompt": "a cat", "freeu": {"s2": 0}}, "job: FreeU factor s2 must be a finite number above 0, got 0.0"),
    ({"prompt": "a cat", "freeu": {"s2": "x"}}, "job: freeu.s2 must be a finite number, got str 'x'"),
    ({"prompt": "a cat", "seed": 2**64}, f"job: seed {2**64} is out of range; seeds go from 0 to 2**64 - 1"),
    ({"prompt": "a cat", "seed": [1, 1]}, "seed 1 is given more than once, which would make the same video twice"),
    ({"prompt": "a cat", "seed": 1, "seeds": [2]}, "give seed or seeds, not both"),
    ({"prompt": "a cat", "guidance": 0.5}, "job: guidance must be a finite number from 1 to 100"),
    ({"prompt": " "}, "job: no prompt"),
    ({"prompt": {"0": "a cat", "20": "a dog"}, "frames": 8}, "job: prompt schedule key '20' is out of range"),
    ({"prompt": "a cat", "model": "kinema-huge"}, "job: no such model file or folder: kinema-huge; a model is"),
    ({"prompt": "a cat", "motion_module": "missing.ckpt"}, "job: no such motion module: missing.ckpt"),
    ({"prompt": "a cat", "loras": [["missing.safetensors", 1.0]]}, "job: no such LoRA file: missing.safetensors"),
    ({"prompt": "a cat", "image": "missing.png"}, "job: no such image: missing.png"),
    ({"prompt": "a cat", "overlap_frames": 8, "segment_frames": 8},
     "overlap_frames (8: the request's, else the model's kinema.json default) must be below the segment length (8 "),
    ({"prompt": "a cat", "model": "kinema-tiny-ad", "segment_frames": 8},  # the model's overlap is 8, read unloaded
     "overlap_frames (8: the request's, else the model's kinema.json default) must be below the segment length (8 "),
    ({"prompt": "a cat", "mode": "extend"}, "mode is 'extend' but the inputs make a text-to-video job"),
    ({"prompt": "a cat", "frames": 12}, "job: EasyAnimate V3 makes 1 or a multiple of 8 frames; 12 is not: use 8 or "
                                         "16"),  # the bundled kinema-tiny's vae/config.json, read unloaded
    ({"prompt": "a cat", "fps": 5000}, "job: fps must be from 0.01 to 1000 frames per second, got 5000"),
    ({"prompt": "a cat", "model": "kinema-tiny-ad", "clip_skip": 2},  # read from its encoder's config, unloaded
     "kinema-tiny-ad's is BertModel: drop clip_skip (--clip-skip)"),
    ([1, 2], "job: a job is an object of settings"),
])
def test_bad_input_is_one_line_naming_the_problem(tmp_path, data, message):
    with pytest.raises(KinemaError) as caught:
        job_from_mapping(data, base=tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("guidance", float("nan"), "guidance must be a finite number from 1 to 100"),
    ("guidance", float("inf"), "guidance must be a finite number from 1 to 100"),
    ("fps", float("inf"), "fps must be from 0.01 to 1000"),
    ("fps", float("nan"), "fps must be from 0.01 to 1000"),
    ("steps", float("inf"), "steps must be a whole number, got float inf"),
    ("steps", 501, r"steps must be at most 500 \(some schedulers fail past it"),
    # Switches, text and settings objects' fields are checked by their declared kinds too: "no" is true in Python.
    ("compile", "no", "^compile must be True or False, got str 'no'$"),
    ("resize", 1, "^resize must be True or False, got int 1$"),
    ("negative_prompt", 3, "^negative_prompt must be text, got int 3$"),
    ("seeds", iter([1]), "^seeds must be a list of whole numbers"),  # this check would use it up
    ("context", ContextSettings(length="8"), "^context.length must be a whole number, got str '8'$"),
    ("context", ContextSettings(overlap=4.5), "^context.overlap must be a whole number, got float 4.5$"),
    ("context", ContextSettings(closed_loop="no"), "^context.closed_loop must be True or False"),
    ("free_init", FreeInitSettings(method=2), "^free_init.method must be text, got int 2$"),
])
def test_the_python_api_refuses_nan_infinity_and_values_of_another_kind(field, value, message):
    """GenerationRequest is also built directly (the Python API), where no job parser has checked the numbers."""
    request = GenerationRequest(prompt="a cat", **{field: value})
    with pytest.raises(KinemaError, match=message):
        request.check()


def test_lcm_takes_at_most_its_original_steps():
    GenerationRequest(prompt="a cat", scheduler="lcm", steps=50).check()
    with pytest.raises(KinemaError, match=r"the lcm scheduler takes at most 50 steps .*, got 51"):
        GenerationRequest(prompt="a cat", scheduler="lcm", steps=51).check()


def test_every_request_field_is_a_job_key():
    from dataclasses import fields

    assert {f.name for f in fields(GenerationRequest)} < set(JOB_KEYS)


def test_the_named_setting_choices_are_the_sampling_modules():
    from kinema.pipelines.jobs import SETTING_CHOICES
    from kinema.sampling.context import FUSE_METHODS, SCHEDULES
    from kinema.sampling.freeinit import FREE_INIT_METHODS

    assert SETTING_CHOICES == {"schedule": SCHEDULES, "fuse": FUSE_METHODS, "method": FREE_INIT_METHODS}


def test_the_largest_seed_is_torchs_largest():
    torch.Generator().manual_seed(MAX_SEED)
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(MAX_SEED + 1)
    assert list(job_from_mapping({"prompt": "a cat", "seed": MAX_SEED}).request.seeds) == [MAX_SEED]


def png_with_garbage_pixels() -> bytes:
    """A 16x16 PNG whose pixel data (IDAT) is garbage with a correct checksum: its chunks verify, its pixels do not
    decode."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"\x78\x9c" + bytes(range(200))) + \
        chunk(b"IEND", b"")


def test_an_image_that_is_not_an_image_or_too_big_is_refused(tmp_path):
    check_image_bytes(png_bytes(), max_bytes=10_000)
    with pytest.raises(KinemaError, match=r"^the start image is \d+ bytes, over the limit of 100 bytes"):
        check_image_bytes(png_bytes(), max_bytes=100, what="start image")
    with pytest.raises(KinemaError, match="^the image is not an image; give a PNG, JPEG, WebP or GIF file$"):
        check_image_bytes(b"hello, I am text", max_bytes=10_000)
    with pytest.raises(KinemaError, match="the image is not an image"):
        check_image_bytes(png_bytes()[:60], max_bytes=10_000)  # a truncated PNG
    with pytest.raises(KinemaError, match="the image is not an image"):
        check_image_bytes(png_with_garbage_pixels(), max_bytes=10_000)
    for kind in ("BMP", "TIFF"):  # images, of formats kinema does not read: named
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=kind)
        with pytest.raises(KinemaError, match=f"^the image is a {kind} image, which kinema does not read; save it as "
                                              "a PNG, JPEG, WebP or GIF file$"):
            check_image_bytes(buffer.getvalue(), max_bytes=10_000)
    (tmp_path / "cat.png").write_text("not a picture")
    with pytest.raises(KinemaError, match=r"^job: the image .*cat.png is not an image"):
        job_from_mapping({"prompt": "a cat", "image": "cat.png"}, base=tmp_path)


@pytest.mark.parametrize("form", ["EPS", "BMP", "TIFF"])
def test_only_the_documented_image_formats_are_opened(tmp_path, monkeypatch, form):
    """An EPS file is rendered by Ghostscript when PIL opens it: a fake `gs` on PATH shows it never runs, for an
    upload, an image path or a video path (the reader of stills and animations)."""
    import io
    import os
    import stat

    from kinema.data.video_io import read_video

    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    data = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data, format=form)
    # Named from their first bytes, not by letting PIL's other plugins open them.
    with pytest.raises(KinemaError, match=f"^the image is a {form} image, which kinema does not read; save it as a "
                                          "PNG, JPEG, WebP or GIF file$"):
        check_image_bytes(data.getvalue(), max_bytes=10**6)
    (tmp_path / "disguised.png").write_bytes(data.getvalue())
    with pytest.raises(KinemaError, match=rf"^job: the image .*disguised.png is a {form} image, which kinema does "
                                          "not read"):
        job_from_mapping({"prompt": "a cat", "image": "disguised.png"}, base=tmp_path)
    with pytest.raises(KinemaError, match=r"disguised.png"):
        read_video(tmp_path / "disguised.png")
    # As a video (a mask, a control video) too: PyAV opens BMP and TIFF, which no reader of kinema's takes.
    with pytest.raises(KinemaError, match=r"^the video (is a still image of a kind kinema does not read|is corrupt)"):
        check_video_bytes(data.getvalue(), max_bytes=10**6)
    (tmp_path / f"mask.{form.lower()}").write_bytes(data.getvalue())
    from kinema.data.video_io import write_video

    write_video(np.zeros((8, 64, 64, 3), np.uint8), tmp_path / "clip.mp4")
    with pytest.raises(KinemaError, match=rf"cannot read the mask \S+mask.{form.lower()}: unsupported extension"):
        job_from_mapping({"prompt": "a cat", "video": "clip.mp4", "mask": f"mask.{form.lower()}"}, base=tmp_path)
    # PyAV names BMP and TIFF by their content, and takes EPS for the PNG its name says (its image2 demuxer).
    said = ("is not a PNG, JPEG, WebP or GIF image kinema can read" if form == "EPS"
            else "is a still image of a kind kinema does not read")
    with pytest.raises(KinemaError, match=rf"disguised.png {said}"):
        job_from_mapping({"prompt": "a cat", "video": "disguised.png"}, base=tmp_path)
    assert not marker.exists()


def test_run_job_writes_the_videos_and_settings_that_generate_makes(tmp_path, cache, encoded_frames):
    from kinema.pipelines.generation import generate
    from kinema.pipelines.load import load_family
    from kinema.pipelines.outputs import write_result

    job = job_from_mapping({"prompt": "a blue square moving left", "seed": [5, 7], **SMALL})
    paths = run_job(job, tmp_path / "job", cache=cache)
    assert paths == [tmp_path / "job" / "video-seed5.mp4", tmp_path / "job" / "video-seed7.mp4"]
    assert output_kind(tmp_path / "job") == "job"
    assert json.loads((tmp_path / "job" / "job.json").read_text()) == job.settings()
    assert json.loads((tmp_path / "job" / "report.json").read_text())["frames"] == 8
    # The reference: generate() on its own load of the model, written by write_result as `kinema generate` does.
    reference = generate(load_family("kinema-tiny"), job.request, progress=False)
    expected = write_result(reference, tmp_path / "reference.mp4", fps=job.request.fps)
    for path, other, seed in zip(paths, expected, (5, 7), strict=True):
        [made], [expected_frames] = encoded_frames[path.name], encoded_frames[other.name]
        assert np.array_equal(made, expected_frames)
        decoded = [read_video(video).frames.numpy().astype(int) for video in (path, other)]
        assert np.abs(decoded[0] - decoded[1]).max() <= 1
        assert read_sidecar(path)["seed"] == seed and read_sidecar(path)["prompt"] == "a blue square moving left"
    assert cache.loads == 1
    run_job(job_from_mapping({"prompt": "a red circle", "seed": 1, **SMALL}), tmp_path / "again", cache=cache)
    assert cache.loads == 1  # the same model key: no second load


def test_an_existing_folder_is_refused_before_loading_and_a_cancelled_job_leaves_nothing(tmp_path, cache):
    job = job_from_mapping({"prompt": "a red circle", **SMALL})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    fresh = FamilyCache()
    with pytest.raises(KinemaError, match="already exists and kinema did not write it"):
        run_job(job, tmp_path / "mine", cache=fresh)
    assert fresh.loads == 0

    def stop(step, timestep, latents):
        raise Cancelled

    with pytest.raises(Cancelled):
        run_job(job, tmp_path / "cancelled", cache=cache, callback=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_the_cache_keeps_at_most_max_models(monkeypatch):
    import kinema.pipelines.load as load

    monkeypatch.setattr(load, "load_family", lambda model, **options: object())
    cache = FamilyCache(max_models=1)
    cat, small = job_from_mapping({"prompt": "a cat"}), job_from_mapping({"prompt": "a cat", "dtype": "bfloat16"})
    first = cache.get(cat)
    assert cache.get(cat) is first and cache.loads == 1
    cache.get(small)
    assert cache.get(cat) is not first and cache.loads == 3


def test_a_model_let_go_while_a_job_still_runs_on_it_is_taken_back_not_loaded_twice(monkeypatch):
    """Past max_models the cache let go of a model a running job still held, and the next job for it loaded a second
    copy: three models resident for a limit of two."""
    import gc

    import kinema.pipelines.load as load

    class Family:
        pass

    monkeypatch.setattr(load, "load_family", lambda model, **options: Family())
    cache = FamilyCache(max_models=2)
    a, b, c = (job_from_mapping({"prompt": "a cat", **extra}) for extra in ({}, {"dtype": "bfloat16"},
                                                                            {"dtype": "float16"}))
    running = cache.get(a)  # a job still runs on it
    cache.get(b)
    cache.get(c)  # a is let go of
    assert cache.get(a) is running and cache.loads == 3
    del running
    cache.get(b)  # b and c were let go of with no job on them: freed, loaded again
    cache.get(c)  # a let go of again, and no job holds it now: freed too, so it loads again
    gc.collect()
    cache.get(a)
    assert cache.loads == 6


def test_the_video_size_of_a_video_job_is_the_inputs(tmp_path):
    from kinema.data.video_io import write_video

    write_video(np.zeros((8, 40, 48, 3), np.uint8), tmp_path / "clip.mp4", fps=8)
    job = job_from_mapping({"prompt": "a cat", "video": "clip.mp4", "strength": 0.5}, base=Path(tmp_path))
    assert (job.request.height, job.request.width, job.request.mode) == (40, 48, "video-to-video")
    assert job.request.frames == 8 and job_from_mapping(job.settings()).request == job.request  # as made
    with pytest.raises(KinemaError, match=r"^job: frames is 16 but video-to-video remakes the input video's 8 "):
        job_from_mapping({"prompt": "a cat", "video": "clip.mp4", "strength": 0.5, "frames": 16}, base=tmp_path)
    with pytest.raises(KinemaError, match=r'^job: the input video is 48x40 but the job makes 64x64 videos; set '
                                          r'"resize": true'):
        job_from_mapping({"prompt": "a cat", "video": "clip.mp4", "height": 64, "width": 64}, base=tmp_path)
    resized = job_from_mapping({"prompt": "a cat", "video": "clip.mp4", "height": 64, "width": 64, "resize": True},
                               base=tmp_path)
    assert (resized.request.height, resized.request.width) == (64, 64)


def test_freeu_jobs_and_their_settings_round_trip(no_model_loads):
    job = job_from_mapping({"prompt": "a cat", "model": "kinema-tiny-ad", "freeu": True})
    assert job.request.freeu == FreeUSettings() and job.settings()["freeu"] == {"b1": 1.5, "b2": 1.6, "s1": 0.9,
                                                                                  "s2": 0.2}
    own = job_from_mapping({"prompt": "a cat", "model": "kinema-tiny-ad", "freeu": {"b1": 1.2, "s2": 0.5}})
    assert own.request.freeu == FreeUSettings(b1=1.2, s2=0.5)
    assert job_from_mapping(own.settings()).request == own.request
    assert job_from_mapping({"prompt": "a cat", "model": "kinema-tiny-ad", "freeu": False}).request.freeu is None
    # kinema-tiny is a diffusion transformer: refused from its configs, before any weights load.
    with pytest.raises(KinemaError, match=r"^job: FreeU rebalances a UNet's .*/kinema-tiny is a diffusion"):
        job_from_mapping({"prompt": "a cat", "freeu": True})


def test_a_video_job_its_model_cannot_make_is_refused_before_loading(tmp_path, no_model_loads):
    """The input's frames, counted from its container: kinema-tiny remakes 1 or a multiple of 8, and a
    continuation holds the video's last frames (4 by default)."""
    from kinema.data.video_io import write_video

    frames = np.stack([np.full((64, 64, 3), 80 * i, np.uint8) for i in range(3)])  # GIF merges equal frames
    write_video(frames, tmp_path / "three.gif", fps=8)
    with pytest.raises(KinemaError, match=r"^job: the input video has 3 frames, and EasyAnimate V3 remakes 1 or"):
        job_from_mapping({"prompt": "a cat", "video": "three.gif", "strength": 0.5}, base=tmp_path)
    with pytest.raises(KinemaError, match=r"^job: the video to extend has 3 frames, fewer than the 4 each new "):
        job_from_mapping({"prompt": "a cat", "video": "three.gif", "extend_frames": 8}, base=tmp_path)
    extend = {"prompt": "a cat", "video": "three.gif", "extend_frames": 8, "overlap_frames": 2}
    job = job_from_mapping(extend, base=tmp_path)
    assert job.request.mode == "extend" and job.request.frames == 11 and job.settings()["frames"] == 11
    assert job_from_mapping({**extend, "frames": 11}, base=tmp_path).request.frames == 11  # as its video records it
    with pytest.raises(KinemaError, match=r"^job: frames is 16 but extending the input video's 3 frames by "
                                          r"extend_frames 8 makes 11; drop frames \(extend_frames says how many"):
        job_from_mapping({**extend, "frames": 16}, base=tmp_path)


def test_a_mask_job_is_checked_against_its_input_video_before_loading(tmp_path, no_model_loads):
    from kinema.data.video_io import write_video

    write_video(np.zeros((8, 64, 64, 3), np.uint8), tmp_path / "clip.mp4", fps=8)
    write_video(np.full((5, 64, 64, 3), 255, np.uint8), tmp_path / "five.mp4", fps=8)
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    Image.new("RGBA", (64, 64), (0, 0, 0, 255)).save(tmp_path / "black.png")
    video = {"prompt": "a cat", "video": "clip.mp4", "strength": 1.0}
    job = job_from_mapping({**video, "mask": "mask.png", "mask_blur": 3}, base=tmp_path)
    assert job.request.mask == str(tmp_path / "mask.png") and job.settings()["mask"] == str(tmp_path / "mask.png")
    assert job.settings()["mask_blur"] == 3
    assert job_from_mapping(job.settings()).request == job.request  # read back from a video's settings
    for mask, message in (("five.mp4", r"^job: the mask has 5 frames and the input video 8: give one mask image"),
                          ("small.png", r'^job: the mask is 32x32 but the job makes 64x64 videos; set "resize"'),
                          ("gone.png", r"^job: no such mask: gone.png"),
                          ("black.png", r"^job: the mask marks no pixel to remake: .*transparency is not read")):
        with pytest.raises(KinemaError, match=message):
            job_from_mapping({**video, "mask": mask}, base=tmp_path)
    with pytest.raises(KinemaError, match=r"^job: a mask \(--mask\) marks the pixels of an input video to remake"):
        job_from_mapping({"prompt": "a cat", "mask": "mask.png"}, base=tmp_path)
    for blur, message in (("4", r"^job: mask_blur must be a finite number, got str '4'"),
                          (-2, r"^job: mask_blur is the radius"),
                          (99, r"^job: mask_blur is the radius in pixels .* to 64; got 99")):
        with pytest.raises(KinemaError, match=message):
            job_from_mapping({**video, "mask": "mask.png", "mask_blur": blur}, base=tmp_path)
    with pytest.raises(KinemaError, match=r"^job: mask_blur \(--mask-blur\) feathers .*: give the mask"):
        job_from_mapping({**video, "mask_blur": 2}, base=tmp_path)


# ---------------------------------------------------------------- hardening: paths, models, image sizes


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (1-bit grey) and holds no pixels: PIL reads the size from its header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.fixture()
def no_model_loads(monkeypatch):
    import kinema.pipelines.load as load

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded while a job was being checked")

    monkeypatch.setattr(load, "load_family", refuse)


def test_a_decompression_bomb_is_too_large_in_one_line(tmp_path):
    from PIL import Image

    # Over twice PIL's limit PIL raises; between once and twice it only warns: both are refused the same way.
    for width, height in ((20_000, 20_000), (10_000, 10_000)):
        assert Image.MAX_IMAGE_PIXELS < width * height
        with pytest.raises(KinemaError) as caught:
            check_image_bytes(png_header(width, height), max_bytes=10_000, what="start image")
        assert str(caught.value) == (f"the start image is too large: {width * height} pixels, over the limit of "
                                     f"{Image.MAX_IMAGE_PIXELS} pixels (PIL's guard against decompression bombs); "
                                     "give a smaller image")
    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 20_000))
    with pytest.raises(KinemaError, match=r"^job: the image \S+bomb.png is too large: 400000000 pixels, over the "):
        job_from_mapping({"prompt": "a cat", "image": "bomb.png"}, base=tmp_path)


@pytest.mark.parametrize(("key", "what"), [("image", "image"), ("end_image", "end image")])
def test_an_image_of_another_size_needs_resize_before_any_model_loads(tmp_path, no_model_loads, key, what):
    Image.new("RGB", (48, 32), (200, 30, 30)).save(tmp_path / "start.png")
    extra = {"image": "start.png"} if key == "end_image" else {}
    if extra:
        Image.new("RGB", (64, 64)).save(tmp_path / "fits.png")
        extra = {"image": "fits.png"}
    with pytest.raises(KinemaError) as caught:
        job_from_mapping({"prompt": "a cat", **extra, key: "start.png"}, base=tmp_path)  # kinema-tiny: 64x64
    assert str(caught.value) == (f'job: the {what} is 48x32 but the job makes 64x64 videos; set "resize": true to '
                                 'resize it, or "width": 48, "height": 32')
    # (with an end image, the 64x64 start image rules out making the video the end image's size)
    for fits in ({"resize": True}, *([] if extra else [{"width": 48, "height": 32}])):
        job = job_from_mapping({"prompt": "a cat", **extra, key: "start.png", **fits}, base=tmp_path)
        assert getattr(job.request, key) == str(tmp_path / "start.png")


@pytest.mark.parametrize(("model", "message"), [
    ("m" * 300, "job: model is too long for a path (300 characters: mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm …); give "
                "an existing path or a shorter name"),
    ("kinema\0tiny", "job: model holds a NUL character, which no path can; give a path without it"),
    ("notes.txt", "job: model {base}/notes.txt is a text file, not weights; check the path; a weights file is "
                  "binary (.safetensors, .ckpt, .pt, .pth, .bin)"),
])
def test_a_model_that_cannot_be_a_path_or_a_model_file_is_one_line_without_torch(tmp_path, model, message):
    import subprocess
    import sys

    (tmp_path / "notes.txt").write_text("my notes\n")
    code = ("import json, sys; from kinema.pipelines.jobs import job_from_mapping\n"
            "try:\n    job_from_mapping({'prompt': 'a cat', 'model': sys.argv[1]}, base=sys.argv[2])\n"
            "except Exception as err:\n    print(json.dumps([type(err).__name__, str(err), 'torch' in sys.modules]))")
    if "\0" in model:  # a command line cannot carry NUL: this one is checked here
        with pytest.raises(KinemaError) as caught:
            job_from_mapping({"prompt": "a cat", "model": model}, base=tmp_path)
        assert str(caught.value) == message
        return
    done = subprocess.run([sys.executable, "-c", code, model, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert json.loads(done.stdout.splitlines()[-1]) == ["KinemaError", message.format(base=tmp_path), False]


def test_a_path_that_is_no_generation_model_is_refused_before_loading(tmp_path, sd_model, no_model_loads):
    from kinema.loaders.formats import FORMATS

    tiny = bundled_model_path("kinema-tiny")
    (tmp_path / "empty").mkdir()
    looked = "; ".join(entry.label for entry in FORMATS)
    words = ("give an EasyAnimate V3 folder, a Stable Diffusion 1.5 folder or single file, or a bundled model's name "
             "(kinema.bundled)")
    for model, message in (
            ("/////", f"job: model /: not a format kinema knows: looked for {looked}; {words}"),
            ("empty", f"job: model {tmp_path / 'empty'} is an empty folder, not weights or a model folder; {words}"),
            (str(sd_model["motion_module"]), f"job: model {sd_model['motion_module']} is not a model to generate "
                                             "with (it is: AnimateDiff motion module (file or diffusers MotionAdapter "
                                             f"folder)); {words}"),
            (str(tiny / "transformer"), f"job: model {tiny / 'transformer'} is an EasyAnimate transformer alone; "
                                        "generation needs the whole V3 folder (transformer/, vae/ and a text encoder)"),
    ):
        with pytest.raises(KinemaError) as caught:
            job_from_mapping({"prompt": "a cat", "model": model}, base=tmp_path)
        assert str(caught.value) == message
    # Model folders of both families pass (an SD model's motion module is the load's to check).
    assert job_from_mapping({"prompt": "a cat", "model": str(tiny)}).model == str(tiny)
    sd = job_from_mapping({"prompt": "a cat", "model": str(sd_model["path"]), "height": 64, "width": 64,
                           "frames": 8, "steps": 2, "guidance": 7.5})
    assert sd.model == str(sd_model["path"])


@pytest.mark.parametrize("model", ["kinema-tiny", "kinema-tiny-ad", "v3_model", "sd_model"])
def test_the_shape_read_before_loading_is_the_loaded_familys(model, request):
    """`model_shape` reads the configs alone; the loaded family checks its own modules. Sizes and frame counts one
    refuses, the other refuses in the same words, and what one accepts the other accepts."""
    from kinema.pipelines.load import load_family

    if model in ("v3_model", "sd_model"):
        fixture = request.getfixturevalue(model)
        folder = fixture["path"] if model == "sd_model" else fixture
        family = load_family(folder, **({"motion_module": fixture["motion_module"]} if model == "sd_model" else {}))
    else:
        folder, family = bundled_model_path(model), load_family(model)
    shape = model_shape(folder)
    assert shape is not None
    factor = shape.size_multiple
    for height, width in ((factor, 2 * factor), (factor + 8, factor), (factor // 2, factor), (factor, factor * 3 + 4)):
        loaded, read = [], []
        for check, into in ((family.check_size, loaded),
                            (lambda h, w: check_model_request(folder, height=h, width=w), read)):
            try:
                check(height, width)
                into.append(None)
            except KinemaError as err:
                into.append(str(err))
        assert read == loaded, (height, width)
    assert (shape.frames_per_slice is None) == (model in ("kinema-tiny-ad", "sd_model"))
    for frames in (1, 2, 7, 8, 12, 16, 24):
        loaded, read = [], []
        try:
            family.latent_frames(frames)
            loaded.append(None)
        except KinemaError as err:
            loaded.append(str(err))
        try:
            check_model_request(folder, frames=frames)
            read.append(None)
        except KinemaError as err:
            read.append(str(err))
        assert read == loaded, frames
    # The window: the most frames one pass denoises, which context windows and continuation segments must fit.
    module = fixture["motion_module"] if model == "sd_model" else None
    assert model_window(folder, module) == (family.max_frames, Path(module or folder).name)
    name = Path(module or folder).name
    for length in (family.max_frames, family.max_frames + 1):
        refusal = (f"context length {length} exceeds the {family.max_frames} frames {name} denoises at once; use a "
                   f"context length of at most {family.max_frames}")
        with contextlib.nullcontext() if length == family.max_frames else pytest.raises(KinemaError, match=refusal):
            check_model_request(folder, motion_module=module, context=ContextSettings(length=length))
        refusal = f"segments of {length} frames exceed the {family.max_frames} frames {name} denoises at once"
        with contextlib.nullcontext() if length == family.max_frames else pytest.raises(KinemaError, match=refusal):
            check_model_request(folder, motion_module=module, segment_frames=length)


def test_context_and_segments_past_the_window_are_refused_when_the_job_is_accepted(tmp_path, no_model_loads):
    from kinema.data.video_io import write_video

    write_video(np.zeros((16, 64, 64, 3), np.uint8), tmp_path / "clip.mp4", fps=8)
    for job, message in (
            ({"frames": 32, "context": {"length": 24}}, "context length 24 exceeds the 16 frames kinema-tiny denoises"),
            ({"model": "kinema-tiny-ad", "frames": 48, "context": {"length": 40}},
             "context length 40 exceeds the 32 frames kinema-tiny-ad denoises at once"),
            ({"video": "clip.mp4", "extend_frames": 16, "segment_frames": 24},
             "segments of 24 frames exceed the 16 frames kinema-tiny denoises at once; use segment_frames")):
        with pytest.raises(KinemaError, match=rf"^job: {message}"):
            job_from_mapping({"prompt": "a red circle", **job}, base=tmp_path)
    job_from_mapping({"prompt": "a red circle", "frames": 32, "context": {"length": 16}}, base=tmp_path)
    # A motion module whose frame tables only a load would read (a torch pickle) is left to the load.
    torch.save({}, tmp_path / "mm.ckpt")
    assert model_window(bundled_model_path("kinema-tiny-ad"), tmp_path / "mm.ckpt") is None
    # A folder's own motion module counts where load_family takes it: in a kinema folder (one with kinema.json).
    import shutil

    folder = tmp_path / "sd"
    folder.mkdir()
    shutil.copy(bundled_model_path("kinema-tiny-ad") / "motion_module.safetensors", folder)
    assert model_window(folder) is None
    (folder / "kinema.json").write_text(json.dumps({"name": "mine"}))
    assert model_window(folder) == (32, "sd")


def test_an_extend_job_without_a_model_continues_with_the_videos_own(tmp_path):
    # As `kinema extend` does: a video kinema-tiny-ad made is continued by it, not by the default kinema-tiny.
    from kinema.data.video_io import write_video

    frames = np.zeros((8, 64, 64, 3), np.uint8)
    from kinema.bundled import bundled_model_path

    module = str(bundled_model_path("kinema-tiny-ad") / "motion_module.safetensors")  # as a CLI run records it
    write_video(frames, tmp_path / "ad.mp4", settings={"prompt": "a red circle moving right", "negative_prompt": "dark",
                                                        "model": "kinema-tiny-ad", "motion_module": module})
    job = job_from_mapping({"video": "ad.mp4", "extend_frames": 8}, base=tmp_path)
    assert (job.model, job.request.negative_prompt) == ("kinema-tiny-ad", "dark")
    # As the job naming the model records it: no motion module path of the installed package.
    assert job.settings() == job_from_mapping({"video": "ad.mp4", "extend_frames": 8, "model": "kinema-tiny-ad"},
                                              base=tmp_path).settings()
    assert job_from_mapping({"video": "ad.mp4", "extend_frames": 8, "model": "kinema-tiny"}, base=tmp_path).model == \
        "kinema-tiny"
    # A model that is not here any more: the default, as without settings.
    write_video(frames, tmp_path / "gone.mp4", settings={"prompt": "x", "model": str(tmp_path / "gone-model")})
    assert job_from_mapping({"video": "gone.mp4", "extend_frames": 8}, base=tmp_path).model == "kinema-tiny"


def test_an_extend_job_without_a_prompt_continues_the_videos_own(tmp_path):
    # As `kinema extend` does; the web app's Extend tab ran such jobs with an empty prompt.
    from kinema.data.video_io import write_video

    frames = np.zeros((8, 64, 64, 3), np.uint8)
    write_video(frames, tmp_path / "made.mp4", settings={"prompt": "a red circle moving right"})
    (tmp_path / "made.mp4.json").unlink()  # an upload keeps only what is inside the file
    write_video(frames, tmp_path / "theirs.mp4")
    for video, prompt in (("made.mp4", "a red circle moving right"), ("theirs.mp4", "")):
        job = job_from_mapping({"video": video, "extend_frames": 8}, base=tmp_path)
        assert job.request.prompt == prompt
    given = job_from_mapping({"video": "made.mp4", "extend_frames": 8, "prompt": "a blue square"}, base=tmp_path)
    assert given.request.prompt == "a blue square"
    # A schedule, its own or given, runs over the whole video (8 + 8 frames): checked before any model loads.
    write_video(frames, tmp_path / "travel.mp4", settings={"prompt": {"0": "a cat", "12": "a dog"}, "prompt_hold": 0.5})
    inherited = job_from_mapping({"video": "travel.mp4", "extend_frames": 8}, base=tmp_path).request
    assert (inherited.prompt, inherited.prompt_hold) == ({"0": "a cat", "12": "a dog"}, 0.5)
    with pytest.raises(KinemaError, match=r"key '12' is out of range: keyframes go from 0 to 11 for 12 frames"):
        job_from_mapping({"video": "travel.mp4", "extend_frames": 4}, base=tmp_path)


@pytest.mark.parametrize(("fields", "message"), [
    ({"seeds": 1}, "seeds must be a list of whole numbers (one video per seed), got int 1"),
    ({"guidance": "6"}, "guidance must be a number, got str '6'"),
    ({"steps": True}, "steps must be a whole number, got bool True"),
    ({"frames": [8]}, "frames must be a whole number, got list [8]"),
    ({"steps": 2.0}, "steps must be a whole number, got float 2.0"),
    ({"free_init": 3}, "free_init must be FreeInitSettings(...) or None, got int 3"),
    ({"context": {"length": 16}}, "context must be ContextSettings(...) or None, got dict"),
])
def test_the_python_api_gets_one_line_for_a_value_of_the_wrong_type(fields, message):
    # They once failed in Python's words (TypeError: 'int' object is not iterable) deep in the checks.
    with pytest.raises(KinemaError) as refused:
        GenerationRequest(prompt="a red circle", **fields).check()
    assert str(refused.value).startswith(message)


def test_numpy_numbers_are_taken_and_recorded_as_python_numbers():
    from dataclasses import replace

    request = GenerationRequest(prompt="a red circle", frames=np.int64(8), guidance=np.float32(5.5),
                                seeds=np.array([1, 2]))
    request.check()
    # Within lists too (control_indices come with a control video, not read here).
    settings = replace(request, control_video="clip.mp4", control_indices=[np.int64(0)]).settings()
    assert (settings["frames"], settings["guidance"], settings["seeds"]) == (8, 5.5, [1, 2])
    assert json.loads(json.dumps(settings))["control_indices"] == [0]  # JSON writes Python numbers only


def test_a_job_whose_finished_frames_cannot_fit_in_memory_is_refused_when_read(tmp_path, monkeypatch):
    """Checked with the line, before any model loads (a batch's later jobs would have run first), in the job's own
    keys: with 1 MiB free, 2 videos of 64 frames at 64x64 (6 MiB) fail; an extension counts the whole video."""
    monkeypatch.setattr("kinema.memory.available_memory", lambda device="cpu": 2**20)
    with pytest.raises(KinemaError, match=r'^job: 2 videos of 64 frames at 64x64 need 6 MiB of memory for the finished '
                                          r'frames alone, and 1 MiB is free; ask for fewer "frames" \(or '
                                          r'"extend_frames"\), a smaller "width" and "height", or fewer "seeds"$'):
        job_from_mapping({"prompt": "a cat", "frames": 64, "seed": [1, 2]})
    assert job_from_mapping({"prompt": "a cat", "frames": 8}).request.frames == 8  # 0.4 MiB
    clip = tmp_path / "clip.mp4"
    write_video(np.zeros((8, 64, 64, 3), np.uint8), clip)
    with pytest.raises(KinemaError, match=r"^job: 72 frames at 64x64 need"):
        job_from_mapping({"video": str(clip), "extend_frames": 64, "prompt": "a cat"})


def test_a_missing_relative_input_names_where_it_was_looked_for_and_a_home_path_expands(tmp_path, monkeypatch):
    with pytest.raises(KinemaError, match=rf"^job: no such image: gone.png \(looked in {tmp_path}\)$"):
        job_from_mapping({"prompt": "a cat", "image": "gone.png"}, base=tmp_path)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "start.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    job = job_from_mapping({"prompt": "a cat", "image": "~/start.png"}, base=tmp_path / "elsewhere")
    assert job.request.image == str(tmp_path / "start.png")


def test_a_continued_video_keeps_its_loras_and_says_what_it_loses(tmp_path, caplog):
    # `kinema extend` and extend jobs without a model take the one that made the video; its LoRAs were dropped
    # without a word, and so were its IP-Adapter and ControlNet.
    import logging

    from kinema.pipelines.jobs import stored_model_parts, warn_continued_without

    for name in ("sd", "mm.safetensors", "style.safetensors"):
        (tmp_path / name).touch()
    style = {"path": str(tmp_path / "style.safetensors"), "weight": 0.7}
    recorded = {"model": str(tmp_path / "sd"), "motion_module": str(tmp_path / "mm.safetensors"), "loras": [style],
                "ip_adapter": {"path": str(tmp_path / "ip.bin"), "scale": 1.0}}
    # Decoding latents needs the VAE alone: no LoRA.
    assert stored_model_parts(recorded) == {"model": str(tmp_path / "sd"),
                                            "motion_module": str(tmp_path / "mm.safetensors")}
    parts = stored_model_parts(recorded, continued=True)
    assert parts["loras"] == [style]
    # A bundled model's own folder supplies its motion module, not its LoRAs: those are kept too.
    assert stored_model_parts({**recorded, "model": "kinema-tiny-ad"}, continued=True) == {
        "model": "kinema-tiny-ad", "loras": [style]}
    options = {"loras": "loras", "ip_adapter": "ip_adapter and ip_image"}
    with caplog.at_level(logging.WARNING):
        warn_continued_without(recorded, parts, [], options)
        warn_continued_without(recorded, parts, ["ip_adapter"], options)  # given again: nothing said
    assert [r.getMessage() for r in caplog.records] == [
        "the video was made with an IP-Adapter's image prompt, and is continued without it; give the IP-Adapter and "
        "its image again (ip_adapter and ip_image) to keep it"]
    (tmp_path / "style.safetensors").unlink()
    caplog.clear()
    gone = stored_model_parts(recorded, continued=True)
    assert "loras" not in gone
    with caplog.at_level(logging.WARNING):
        warn_continued_without({**recorded, "ip_adapter": None}, gone, [], options)
        warn_continued_without({**recorded, "ip_adapter": None}, gone, ["loras"], options)
    assert [r.getMessage() for r in caplog.records] == [
        f"the video was made with LoRAs that are no longer all here ({style['path']}), so it is continued without "
        "them; give them again (loras) to keep its style"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # settings of another shape, and a model that is gone: nothing to say
        warn_continued_without({**recorded, "loras": 3, "ip_adapter": None}, gone, [], options)
        warn_continued_without({**recorded, "ip_adapter": None}, {}, [], options)
    assert not caplog.records


def test_numpy_numbers_and_bools_are_what_they_stand_for():
    # Values computed with numpy reach the Python API as numpy scalars: under numpy 2 a bool's type is named "bool".
    from kinema.pipelines.request import check_lora_weight

    GenerationRequest(prompt="a cat", resize=np.True_, compile=np.False_, guidance=np.float32(6.5),
                      context=ContextSettings(length=np.int64(16), closed_loop=np.True_)).check()
    assert (check_lora_weight(np.float32(0.5)), check_lora_weight(np.int64(-2))) == (0.5, -2.0)
    with pytest.raises(KinemaError, match="the LoRA weight must be a number from -100 to 100"):
        check_lora_weight(np.float64("nan"))


def test_an_animated_image_says_its_first_frame_is_used(tmp_path, caplog):
    # An animated GIF given as a start image was taken as its first frame without a word.
    from PIL import Image

    from kinema.pipelines.jobs import check_image_file

    frames = [Image.new("RGB", (16, 12), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "still.gif")
    # A phone's JPEG with a second picture inside (MPO), which PIL counts as 2 frames: no animation.
    frames[0].save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=frames[1:2])
    with caplog.at_level("WARNING", logger="kinema.pipelines.jobs"):
        assert check_image_file(tmp_path / "still.gif", "start image") == (16, 12)
        assert check_image_file(tmp_path / "phone.jpg", "start image") == (16, 12)
        assert not caplog.records
        assert check_image_file(tmp_path / "anim.gif", "start image") == (16, 12)
    assert [record.getMessage() for record in caplog.records] == [
        f"the start image {tmp_path / 'anim.gif'} is an animated image of 3 frames; its first frame is used"]
