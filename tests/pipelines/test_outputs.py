"""The files of a generation (kinema.pipelines.outputs): one video per seed with its settings beside it, checked
against the output policy before anything is written, and latents that come back exactly."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kinema.data.probe import read_embedded_settings, read_sidecar
from kinema.data.video_io import read_video
from kinema.errors import KinemaError
from kinema.pipelines.outputs import (
    VIDEO_SUFFIXES,
    latents_path,
    load_latents,
    save_latents,
    video_paths,
    write_result,
)

FRAMES, SIZE = 4, 32


@dataclass
class Result:
    """What write_result reads of a GenerationResult."""

    frames: object
    settings: list
    report: dict = field(default_factory=dict)


def smooth_frames(videos: int) -> torch.Tensor:
    """(B, F, 3, H, W) in [0, 1]: gradients that move per frame and differ per video (lossy codecs keep them well)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    frames = torch.empty(videos, FRAMES, 3, SIZE, SIZE)
    for b in range(videos):
        for f in range(FRAMES):
            shift = 0.1 * f + 0.3 * b
            frames[b, f] = torch.stack([0.5 + 0.4 * torch.sin(3 * x + shift), y, (x + y) / 2 * (1 - 0.2 * b)])
    return frames


def result_for(seeds, frames=None):
    frames = smooth_frames(len(seeds)) if frames is None else frames
    settings = [{"prompt": "a fox", "seed": seed, "steps": 3, "model": "tiny"} for seed in seeds]
    return Result(frames, settings, {"mode": "text-to-video", "dtype": "float32", "seconds": 1.5,
                                     "peak_memory_bytes": 1024, "frames": FRAMES, "family": "animatediff"})


def as_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> uint8 (F, H, W, 3), rounding to nearest: what a lossless writer must store."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_video_paths_for_one_and_three_seeds(tmp_path):
    out = tmp_path / "clips" / "fox.mp4"
    assert video_paths(out, [7]) == [out]
    assert video_paths(out, [1, 20, 3]) == [tmp_path / "clips" / name
                                            for name in ("fox-seed1.mp4", "fox-seed20.mp4", "fox-seed3.mp4")]
    folder = tmp_path / "frames"
    assert video_paths(folder, [5]) == [folder]
    assert video_paths(folder, [0, 1, 2]) == [tmp_path / f"frames-seed{s}" for s in range(3)]
    with pytest.raises(KinemaError, match="seed 4 is given more than once"):
        video_paths(out, [4, 2, 4])


def test_the_suffixes_checked_early_are_the_ones_video_io_writes():
    from kinema.data import video_io

    assert set(VIDEO_SUFFIXES) == set(video_io._WRITERS)  # outputs repeats them to stay free of torch


def test_latents_path_is_beside_the_output(tmp_path):
    assert latents_path(tmp_path / "fox.mp4") == tmp_path / "fox.mp4.latents.safetensors"
    assert latents_path(tmp_path / "frames") == tmp_path / "frames.latents.safetensors"


@pytest.mark.parametrize(("suffix", "min_psnr"), [(".mp4", 30.0), (".gif", 25.0)])
def test_writes_one_video_per_seed_with_its_settings(tmp_path, suffix, min_psnr):
    result = result_for([11, 12])
    paths = write_result(result, tmp_path / f"fox{suffix}", fps=6)
    assert paths == [tmp_path / f"fox-seed11{suffix}", tmp_path / f"fox-seed12{suffix}"]
    for index, path in enumerate(paths):
        side = read_sidecar(path)
        assert {k: side[k] for k in ("prompt", "seed", "steps", "model")} == result.settings[index]
        assert side["report"] == result.report and side["fps"] == 6
        assert read_embedded_settings(path)["seed"] == 11 + index
        read = ((read_video(path).frames + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
        expected = as_uint8(result.frames[index]).astype(np.float64)
        psnr = 10 * np.log10(255**2 / max(((read - expected) ** 2).mean(), 1e-10))
        assert psnr > min_psnr, f"{path.name}: {psnr:.1f} dB"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in paths] + [p.name + ".json" for p in paths])


def test_png_frames_folder_holds_the_exact_frames(tmp_path):
    result = result_for([3])
    [path] = write_result(result, tmp_path / "frames", fps=8)
    assert path == tmp_path / "frames"
    files = sorted(path.glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(FRAMES)]
    stored = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.testing.assert_array_equal(stored, as_uint8(result.frames[0]))
    assert read_sidecar(path)["seed"] == 3


def test_numpy_output_is_written_as_is(tmp_path):
    frames = [as_uint8(video) for video in smooth_frames(1)]
    [path] = write_result(Result(frames, [{"seed": 0}]), tmp_path / "frames", fps=8)
    stored = np.stack([np.asarray(Image.open(f)) for f in sorted(path.glob("*.png"))])
    np.testing.assert_array_equal(stored, frames[0])


def test_refuses_a_users_file_before_writing_anything(tmp_path):
    theirs = tmp_path / "fox-seed2.mp4"
    theirs.write_bytes(b"my holiday video")
    for overwrite in (False, True):
        with pytest.raises(KinemaError, match="kinema did not write it"):
            write_result(result_for([1, 2, 3]), tmp_path / "fox.mp4", fps=8, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["fox-seed2.mp4"]  # seed 1 came first and was not written
    assert theirs.read_bytes() == b"my holiday video"


def test_overwrite_replaces_only_earlier_kinema_videos(tmp_path):
    out = tmp_path / "fox.gif"
    write_result(result_for([1]), out, fps=8)
    with pytest.raises(KinemaError, match="pass --overwrite"):
        write_result(result_for([1]), out, fps=8)
    write_result(result_for([9]), out, fps=8, overwrite=True)
    assert read_sidecar(out)["seed"] == 9


def test_a_png_file_for_several_frames_and_latent_only_results_are_refused(tmp_path):
    with pytest.raises(KinemaError, match="a .png file holds one frame, not 4"):
        write_result(result_for([1]), tmp_path / "fox.png", fps=8)
    with pytest.raises(KinemaError, match="output='latent'"):
        write_result(Result(None, [{"seed": 1}]), tmp_path / "fox.mp4", fps=8)
    with pytest.raises(KinemaError, match="unsupported extension '.avi'"):
        write_result(result_for([1]), tmp_path / "fox.avi", fps=8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_latents_round_trip_exactly(tmp_path, dtype):
    latents = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    settings = [{"prompt": {"0": "a cat", "8": "a dog"}, "seed": 4, "guidance": 7.5},
                {"prompt": "ünïcode", "seed": 5, "guidance": 7.5}]
    path = save_latents(latents, settings, tmp_path / "run.mp4.latents.safetensors")
    loaded, loaded_settings = load_latents(path)
    assert loaded.dtype == dtype and torch.equal(loaded, latents)
    assert loaded_settings == settings


def test_latents_follow_the_output_policy(tmp_path):
    path = tmp_path / "run.latents.safetensors"
    latents = torch.zeros(1, 4, 2, 2, 2)
    save_latents(latents, [{"seed": 0}], path)
    with pytest.raises(KinemaError, match="pass --overwrite"):
        save_latents(latents + 1, [{"seed": 0}], path)
    save_latents(latents + 1, [{"seed": 1}], path, overwrite=True)
    assert torch.equal(load_latents(path)[0], latents + 1)
    with pytest.raises(KinemaError, match="got 1 latent video.s. but 2 settings"):
        save_latents(latents, [{"seed": 0}, {"seed": 1}], tmp_path / "two.safetensors")
    with pytest.raises(KinemaError, match="latents are saved as .safetensors"):
        save_latents(latents, [{"seed": 0}], tmp_path / "run.pt")


def test_load_latents_refuses_files_kinema_did_not_save_as_latents(tmp_path):
    theirs = tmp_path / "weights.safetensors"
    save_file({"latents": torch.zeros(1, 4, 2, 2, 2)}, str(theirs), metadata={"kinema_settings": "[{}]"})
    with pytest.raises(KinemaError) as refused:
        load_latents(theirs)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{theirs} is a safetensors file but not latents kinema saved")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(KinemaError, match="is not kinema latents: it is a text file"):
        load_latents(text)
    with pytest.raises(KinemaError, match="no such latents file"):
        load_latents(tmp_path / "missing.safetensors")


def test_damaged_latents_settings_are_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"latents": torch.zeros(2, 4, 2, 2, 2)}, str(path),
              metadata={"kinema_output": "latents", "kinema_settings": json.dumps([{"seed": 0}])})
    with pytest.raises(KinemaError, match="contents are damaged"):
        load_latents(path)
    assert Path(path).exists()
    # No videos at all: damaged, not "no seeds given" (which names a flag decode does not have).
    save_file({"latents": torch.zeros(0, 4, 2, 2, 2)}, str(path),
              metadata={"kinema_output": "latents", "kinema_settings": "[]"})
    with pytest.raises(KinemaError, match="contents are damaged"):
        load_latents(path)
    # NaN, digest-less (older) or with a digest matching: refused before a decode blames the model.
    for value in (float("nan"), float("inf")):
        save_file({"latents": torch.full((1, 4, 2, 2, 2), value)}, str(path),
                  metadata={"kinema_output": "latents", "kinema_settings": json.dumps([{"seed": 0}])})
        with pytest.raises(KinemaError, match="its latents hold NaN or infinity, which kinema never saves"):
            load_latents(path)


def test_a_flipped_bit_in_saved_latents_or_their_settings_is_refused(tmp_path):
    latents = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    path = save_latents(latents, [{"seed": 4, "prompt": "a cat"}], tmp_path / "run.latents.safetensors")
    whole = path.read_bytes()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    tensor_flip = bytearray(whole)
    tensor_flip[-5] ^= 0x01  # one mantissa bit of the last value
    settings_flip = whole.replace(b'\\"seed\\": 4', b'\\"seed\\": 5')
    assert settings_flip != whole
    for name, data in (("tensor.safetensors", bytes(tensor_flip)), ("settings.safetensors", settings_flip)):
        (damaged / name).write_bytes(data)
        with pytest.raises(KinemaError, match=r"is damaged: its latents or settings no longer match the digest"):
            load_latents(damaged / name)
    # Latents saved before the digest hold none, and still load.
    save_file({"latents": latents}, str(tmp_path / "older.safetensors"),
              metadata={"kinema_output": "latents", "kinema_settings": json.dumps([{"seed": 4}])})
    assert torch.equal(load_latents(tmp_path / "older.safetensors")[0], latents)


def test_settings_saved_before_a_setting_existed_differ_only_from_a_value_other_than_its_default():
    from kinema.pipelines.outputs import differing_settings

    saved = [{"seed": 1, "prompt": "a cat"}]  # written before prompt_hold, prompt_loop and clip_skip existed
    ours = [{"seed": 1, "prompt": "a cat", "prompt_hold": 0.0, "prompt_loop": False, "clip_skip": 1}]
    assert differing_settings(ours, saved) == []
    assert differing_settings([{**ours[0], "prompt_hold": 0.5, "clip_skip": 2}], saved) == ["clip_skip", "prompt_hold"]
    assert differing_settings(ours, [{**saved[0], "clip_skip": 2}]) == ["clip_skip"]  # saved, and not ours


def test_settings_leave_out_the_fields_of_inputs_a_request_lacks_and_still_match_latents_saved_with_them():
    from kinema.pipelines.outputs import differing_settings
    from kinema.pipelines.request import BLEND_SETTINGS, CONTROL_SETTINGS, GenerationRequest

    text = GenerationRequest(prompt="a cat").settings()
    assert not {"strength", "mask_blur", *CONTROL_SETTINGS, *BLEND_SETTINGS} & set(text)
    remake = GenerationRequest(prompt={0: "a cat", 8: "a dog"}, video="in.mp4", strength=0.8, mask="m.png",
                               mask_blur=2.0, control_video="c.mp4", control_end=0.5).settings()
    assert (remake["strength"], remake["mask_blur"], remake["control_end"], remake["interpolation"]) == \
        (0.8, 2.0, 0.5, "linear")
    assert "strength" not in GenerationRequest(prompt="a cat", video="in.mp4", extend_frames=8).settings()
    # Latents saved when every setting was recorded: the unused ones at their defaults match, others do not.
    saved = {**text, "strength": 0.6, "mask_blur": 0.0, "guess_mode": False, "prompt_hold": 0.0, "seed": 0}
    assert differing_settings([{**text, "seed": 0}], [saved]) == []
    assert differing_settings([{**text, "seed": 0}], [{**saved, "strength": 0.9}]) == ["strength"]
