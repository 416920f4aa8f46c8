import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from kinema import __version__
from kinema.data import video_io
from kinema.data.probe import read_embedded_settings, read_sidecar, sidecar_path
from kinema.data.video_io import generation_settings, read_video, to_uint8_frames, write_video
from kinema.errors import KinemaError


def smooth_clip(frames: int = 12, height: int = 48, width: int = 64) -> torch.Tensor:
    """A moving colour wave, (F, 3, H, W) in [-1, 1]: smooth, like real footage rather than noise."""
    ys = torch.linspace(-1, 1, height).view(height, 1)
    xs = torch.linspace(-1, 1, width).view(1, width)
    out = []
    for i in range(frames):
        r = 0.6 * torch.sin(2.0 * xs + 0.4 * i) * torch.cos(1.5 * ys)
        g = 0.5 * torch.cos(1.3 * ys + 0.3 * i) + 0 * xs
        b = 0.4 * torch.sin(1.1 * (xs + ys) - 0.2 * i)
        out.append(torch.stack([c.expand(height, width) for c in (r, g, b)]))
    return torch.stack(out)


def index_clip(frames: int = 12, size: int = 32) -> torch.Tensor:
    """Frame i is flat grey at brightness -0.9 + 1.8 i / (F - 1), so its index can be read back from the pixels."""
    levels = torch.linspace(-0.9, 0.9, frames)
    return levels.view(frames, 1, 1, 1).expand(frames, 3, size, size).clone()


def frame_indices(clip: torch.Tensor, frames: int = 12) -> list[int]:
    return [round((f.mean().item() + 0.9) / 1.8 * (frames - 1)) for f in clip]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(4 / ((a - b) ** 2).mean())).item()  # peak-to-peak of [-1, 1] is 2


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(("name", "min_psnr"), [("clip.mp4", 35.0), ("clip.webm", 35.0), ("clip.webp", 35.0),
                                                ("clip.gif", 30.0)])
def test_round_trip_quality(tmp_path, name, min_psnr):
    frames = smooth_clip()
    clip = read_video(write_video(frames, tmp_path / name, fps=8))
    assert clip.frames.shape == frames.shape
    assert clip.frames.dtype == torch.float32
    assert psnr(clip.frames, frames) >= min_psnr
    assert frame_indices(read_video(write_video(index_clip(), tmp_path / f"i{name}")).frames) == list(range(12))


def test_png_folder_and_single_png_are_exact_to_half_a_level(tmp_path):
    frames = smooth_clip()
    folder = read_video(write_video(frames, tmp_path / "frames", fps=12))
    assert sorted(p.name for p in (tmp_path / "frames").iterdir())[:2] == ["00000.png", "00001.png"]
    assert (folder.frames - frames).abs().max().item() <= 1 / 255 + 1e-6
    assert folder.fps == 12  # a folder has no frame rate of its own: it comes from the sidecar
    still = read_video(write_video(frames[:1], tmp_path / "still.png"))
    assert still.frames.shape == (1, 3, 48, 64)
    assert (still.frames - frames[:1]).abs().max().item() <= 1 / 255 + 1e-6


def test_uint8_numpy_and_grey_inputs(tmp_path):
    frames = smooth_clip(frames=3)
    as_numpy = to_uint8_frames(frames)
    assert as_numpy.dtype == np.uint8 and as_numpy.shape == (3, 48, 64, 3)
    a = read_video(write_video(frames, tmp_path / "a")).frames
    b = read_video(write_video(as_numpy, tmp_path / "b")).frames
    assert torch.equal(a, b)
    grey = read_video(write_video(frames[:, :1], tmp_path / "grey")).frames
    assert torch.equal(grey[:, 0], grey[:, 2]) and torch.equal(grey[:, 0], a[:, 0])


@pytest.mark.parametrize(("name", "fps", "expected"), [("c.mp4", 24, 24.0), ("c.webm", 12.5, 12.5),
                                                       ("c.webp", 24, 24.0), ("c.gif", 8, 8.0)])
def test_fps_round_trip(tmp_path, name, fps, expected):
    # GIF stores frame times in 10 ms steps (125 ms, 8 fps, as 120 ms) and WebP in whole ms (24 fps as 42 ms): a
    # clip kinema wrote reads back at the fps stored with it.
    assert read_video(write_video(index_clip(frames=4), tmp_path / name, fps=fps)).fps == pytest.approx(expected)


@pytest.mark.parametrize("name", ["c.mp4", "c.gif", "c.webp", "frames"])
def test_start_stride_max_frames_pick_the_right_frames(tmp_path, name):
    path = write_video(index_clip(), tmp_path / name)
    assert frame_indices(read_video(path, start=2, stride=3).frames) == [2, 5, 8, 11]
    assert frame_indices(read_video(path, start=2, stride=3, max_frames=2).frames) == [2, 5]
    assert frame_indices(read_video(path, max_frames=1).frames) == [0]
    assert frame_indices(read_video(path, start=11).frames) == [11]
    with pytest.raises(KinemaError, match="start 12 is past the end .* 12 frames"):
        read_video(path, start=12)
    with pytest.raises(KinemaError, match="stride >= 1"):
        read_video(path, stride=0)


@pytest.mark.parametrize("name", ["c.gif", "c.webp"])
def test_runs_of_identical_frames_come_back_as_many_frames(tmp_path, name):
    from kinema.data.probe import frame_count, rgb_frames, video_fps

    # PIL's GIF writer and libwebp store a run of equal frames as one frame shown longer: still stretches of a clip.
    levels = [0, 0, 0, 5, 5, 7, 7, 7, 7, 11, 11, 11]
    clip = index_clip()[levels]
    path = write_video(clip, tmp_path / name, fps=8)
    with Image.open(path) as image:
        assert image.n_frames == 4  # the format really merged them
    read = read_video(path)
    assert frame_indices(read.frames) == levels and read.fps == 8
    assert frame_indices(read_video(path, start=1, stride=4).frames) == [0, 7, 11]
    assert frame_count(path) == 12 and video_fps(path) == 8
    assert len(list(rgb_frames(path))) == 12
    # Long still runs at a frame time of no whole ms (24 fps: 41.7 ms written as 42, and a GIF's run cut to 10 ms).
    long = [0] + [5] * 150 + [11] * 70
    path24 = write_video(index_clip()[long], tmp_path / f"long{path.suffix}", fps=24)
    assert frame_indices(read_video(path24).frames) == long and read_video(path24).fps == 24 == video_fps(path24)
    # An animation kinema did not write has no frame count of its own to restore: one frame per stored frame.
    frames = [Image.fromarray(frame) for frame in list(rgb_frames(path))[::3]]
    frames[0].save(tmp_path / f"theirs{path.suffix}", save_all=True, append_images=frames[1:],
                   duration=[125, 500, 125, 125])
    assert read_video(tmp_path / f"theirs{path.suffix}").frames.shape[0] == 4


# ---------------------------------------------------------------- settings


def test_the_same_frames_make_the_same_mp4_in_every_process(tmp_path):
    # x264's macroblock-tree lookahead gave 64x64 frames another encoding in each process (up to 13/255 apart once
    # decoded), so one seed did not give one video; it is off. Fresh processes, side by side, as runs are.
    import subprocess
    import sys

    np.save(tmp_path / "frames.npy", to_uint8_frames(smooth_clip(16, 64, 64)))
    script = ("import sys, numpy as np; from pathlib import Path; from kinema.data.video_io import write_video\n"
              "folder = Path(sys.argv[1]); frames = np.load(folder / 'frames.npy')\n"
              "for i in range(4):\n    write_video(frames, folder / f'{sys.argv[2]}-{i}.mp4')\n")
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(run)]) for run in range(3)]
    assert [run.wait(timeout=120) for run in runs] == [0, 0, 0]
    decoded = {read_video(path).frames.numpy().tobytes() for path in tmp_path.glob("*.mp4")}
    assert len(list(tmp_path.glob("*.mp4"))) == 12 and len(decoded) == 1


def test_mp4_settings_in_sidecar_and_container_comment(tmp_path):
    settings = generation_settings("a red ball", negative_prompt="blurry", seed=7, model="tiny", steps=4,
                                   scheduler="ddim", guidance=7.5, width=64, height=48, frames=12, fps=8,
                                   lora_scale=0.8)
    path = write_video(smooth_clip(), tmp_path / "clip.mp4", settings=settings)
    assert sidecar_path(path) == tmp_path / "clip.mp4.json"
    side = json.loads((tmp_path / "clip.mp4.json").read_text())
    assert side["kinema"] == __version__
    assert (side["prompt"], side["negative_prompt"], side["seed"], side["steps"]) == ("a red ball", "blurry", 7, 4)
    assert (side["scheduler"], side["guidance"], side["lora_scale"]) == ("ddim", 7.5, 0.8)
    with av.open(str(path)) as container:
        assert json.loads(container.metadata["comment"]) == side
    assert read_embedded_settings(path) == side == read_sidecar(path)


@pytest.mark.parametrize("name", ["c.webm", "c.gif", "c.png"])
def test_settings_embedded_in_other_formats(tmp_path, name):
    frames = smooth_clip(frames=1 if name.endswith(".png") else 3)
    path = write_video(frames, tmp_path / name, settings=generation_settings("cat", seed=3))
    embedded = read_embedded_settings(path)
    assert embedded == read_sidecar(path)
    assert (embedded["prompt"], embedded["seed"], embedded["width"], embedded["height"]) == ("cat", 3, 64, 48)


def test_sidecar_always_written_and_filled_from_the_frames(tmp_path):
    write_video(smooth_clip(frames=5), tmp_path / "frames", fps=6)
    side = read_sidecar(tmp_path / "frames")
    assert (tmp_path / "frames.json").is_file()
    assert side == {"kinema": __version__, "width": 64, "height": 48, "frames": 5, "fps": 6}
    with Image.open(tmp_path / "frames" / "00004.png") as image:
        assert json.loads(image.info[video_io.SETTINGS_KEY]) == side


def test_settings_must_be_json(tmp_path):
    with pytest.raises(KinemaError, match="'weights'.*JSON"):
        generation_settings("x", weights=torch.zeros(2))


# ---------------------------------------------------------------- atomic writes


def _fail_after(count, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > count:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    return wrapper


def test_failed_mp4_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", _fail_after(3, av.VideoFrame.from_ndarray))
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(smooth_clip(), tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_video(index_clip(frames=4), tmp_path / "clip.mp4", settings=generation_settings("old"))
    before = path.read_bytes()
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", _fail_after(2, av.VideoFrame.from_ndarray))
    with pytest.raises(RuntimeError):
        write_video(smooth_clip(), path, settings=generation_settings("new"), overwrite=True)
    assert path.read_bytes() == before
    assert read_sidecar(path)["prompt"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip.mp4.json"]


def test_failed_folder_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", _fail_after(3, Image.Image.save))
    with pytest.raises(RuntimeError):
        write_video(smooth_clip(), tmp_path / "frames")
    assert list(tmp_path.iterdir()) == []


def test_rewriting_a_frame_folder_replaces_it(tmp_path):
    write_video(index_clip(frames=6), tmp_path / "frames")
    with pytest.raises(KinemaError, match="already exists.*--overwrite"):
        write_video(index_clip(frames=3), tmp_path / "frames")
    write_video(index_clip(frames=3), tmp_path / "frames", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["00000.png", "00001.png", "00002.png",
                                                                        "kinema-output.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "frames.json"]


# ---------------------------------------------------------------- bad input


def test_corrupt_and_truncated_videos_name_the_file(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(KinemaError, match=r"cannot read .*x\.mp4.*corrupt"):
        read_video(bad)
    good = write_video(smooth_clip(), tmp_path / "good.mp4").read_bytes()
    (tmp_path / "half.mp4").write_bytes(good[: len(good) // 2])
    with pytest.raises(KinemaError, match=r"half\.mp4"):
        read_video(tmp_path / "half.mp4")
    (tmp_path / "y.gif").write_bytes(b"GIF89a" + b"\x00" * 10)
    with pytest.raises(KinemaError, match=r"y\.gif"):
        read_video(tmp_path / "y.gif")


def test_unsupported_extensions_list_the_supported_ones(tmp_path):
    with pytest.raises(KinemaError, match=r"'\.avi'; supported: \.mp4, \.webm, \.gif, \.webp, \.png"):
        write_video(smooth_clip(frames=2), tmp_path / "c.avi")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(KinemaError, match=r"'\.txt'; supported: \.mp4, .*\.gif"):
        read_video(tmp_path / "notes.txt")
    with pytest.raises(KinemaError, match="no such file"):
        read_video(tmp_path / "missing.mp4")


@pytest.mark.parametrize(("frames", "message"), [
    (torch.zeros(0, 3, 8, 8), "zero frames"),
    (torch.zeros(3, 8, 8), r"\(F, C, H, W\), got a tensor of shape \(3, 8, 8\)"),
    (torch.zeros(2, 4, 8, 8), "C = 4"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), "float frames"),
    (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    ([[0.0]], "torch tensor"),
])
def test_bad_frames(tmp_path, frames, message):
    with pytest.raises(KinemaError, match=message):
        write_video(frames, tmp_path / "c.mp4")
    assert list(tmp_path.iterdir()) == []


def test_file_where_folder_is_needed_and_back(tmp_path):
    (tmp_path / "frames").write_text("a file")
    with pytest.raises(KinemaError, match="frames is a file; give a folder path"):
        write_video(smooth_clip(frames=2), tmp_path / "frames")
    (tmp_path / "clip.mp4").mkdir()
    with pytest.raises(KinemaError, match="is a folder"):
        write_video(smooth_clip(frames=2), tmp_path / "clip.mp4")
    with pytest.raises(KinemaError, match="frames is a file, not a folder"):
        write_video(smooth_clip(frames=2), tmp_path / "frames" / "c.mp4")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(KinemaError, match="kinema did not write it"):
        write_video(smooth_clip(frames=2), tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_other_write_errors(tmp_path):
    with pytest.raises(KinemaError, match="even width and height, got 63x48"):
        write_video(smooth_clip(frames=2, width=63), tmp_path / "c.mp4")
    with pytest.raises(KinemaError, match="holds one frame, got 2"):
        write_video(smooth_clip(frames=2), tmp_path / "c.png")
    with pytest.raises(KinemaError, match="fps must be from 0.01 to 1000 frames per second, got 0"):
        write_video(smooth_clip(frames=2), tmp_path / "c.gif", fps=0)
    # A rate the container cannot keep (PyAV overflows its 32-bit time base past 2**31 - 1).
    with pytest.raises(KinemaError, match=r"^fps must be from 0.01 to 1000 frames per second, got 1e\+20$"):
        write_video(smooth_clip(frames=2), tmp_path / "c.mp4", fps=1e20)
    assert list(tmp_path.iterdir()) == []


def test_frames_named_without_padding_are_read_in_frame_order(tmp_path):
    """ffmpeg's `%d.png` names: 2.png comes before 10.png (as numbers), not after it (as text); the count, the
    first frame's size and the dataset's reader agree."""
    from kinema.data.dataset import probe
    from kinema.data.probe import folder_frames, frame_count, video_size

    folder = tmp_path / "frames"
    folder.mkdir()
    for index in (1, 2, 10, 11):
        Image.new("RGB", (8, 6), (index * 20, 0, 0)).save(folder / f"frame{index}.png")
    (folder / "notes.txt").write_text("not a frame")
    assert [p.name for p in folder_frames(folder)] == ["frame1.png", "frame2.png", "frame10.png", "frame11.png"]
    video = read_video(folder)
    reds = ((video.frames[:, 0, 0, 0] + 1) / 2 * 255).round().tolist()
    assert reds == [20, 40, 200, 220]
    assert (frame_count(folder), video_size(folder), probe(folder)) == (4, (6, 8), (6, 8, 4))


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_in_a_frame_folder_is_not_a_frame(tmp_path):
    # Opening it (to hash the inputs, or read its size) waited for a writer forever.
    import os

    from kinema.data.probe import folder_frames, frame_count

    write_video(index_clip(3, 16), tmp_path / "frames")
    os.mkfifo(tmp_path / "frames" / "00009.png")
    assert [p.name for p in folder_frames(tmp_path / "frames")] == ["00000.png", "00001.png", "00002.png"]
    assert frame_count(tmp_path / "frames") == 3 and read_video(tmp_path / "frames").frames.shape[0] == 3


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    # Depth maps are saved as 16-bit grayscale PNGs; PIL's convert("RGB") clips every value past 255 to white.
    from kinema.data.probe import rgb_frames
    from kinema.pipelines.generation import _read_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    (tmp_path / "frames").mkdir()
    Image.fromarray(ramp).save(tmp_path / "frames" / "0000.png")
    expected = torch.from_numpy((ramp / 257).round() / 255).float()  # 65535 -> 255
    for read in (_read_image(tmp_path / "depth.png", "the control image"),
                 (read_video(tmp_path / "depth.png").frames[0] + 1) / 2,
                 (read_video(tmp_path / "frames").frames[0] + 1) / 2,
                 torch.from_numpy(next(rgb_frames(tmp_path / "depth.png"))).permute(2, 0, 1).float() / 255):
        assert read.shape == (3, 64, 64)
        torch.testing.assert_close(read[1], expected, atol=1e-6, rtol=0)  # rounded, as 65535 / 257 is exact


def test_a_phone_photo_stored_sideways_is_read_and_sized_upright(tmp_path):
    # Its EXIF orientation 6 turns it a quarter turn as browsers (and gradio) show it; kinema read the stored pixels,
    # so the size check refused the size the user saw and the video was made sideways.
    from PIL import ImageOps

    from kinema.data.probe import oriented_size, video_size
    from kinema.pipelines.generation import _read_image
    from kinema.pipelines.jobs import check_image_file

    stored = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # 64 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "frames").mkdir()
    for path in (tmp_path / "photo.png", tmp_path / "frames" / "0000.png"):
        Image.fromarray(stored).save(path, exif=exif)
    with Image.open(tmp_path / "photo.png") as image:
        upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))  # PIL's own turn: the reference
        assert oriented_size(image) == (48, 64)
    assert upright.shape == (64, 48, 3)
    expected = torch.from_numpy(upright).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(_read_image(tmp_path / "photo.png", "the start image"), expected, rtol=0, atol=0)
    torch.testing.assert_close((read_video(tmp_path / "frames").frames[0] + 1) / 2, expected, rtol=0, atol=1e-6)
    assert check_image_file(str(tmp_path / "photo.png"), "start image") == (48, 64)
    assert video_size(tmp_path / "frames") == (64, 48)  # (height, width)


def test_exif_edge_cases_a_broken_block_a_pil_image_handed_in_and_the_dataset_and_folder_sizes(tmp_path):
    from PIL import ImageOps

    from kinema.data.dataset import probe
    from kinema.data.probe import video_size
    from kinema.pipelines.generation import _path_frames, _read_image
    from kinema.pipelines.jobs import check_image_file

    stored = np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    # A broken EXIF block, which PIL decodes past: read as stored, not refused or a SyntaxError.
    Image.fromarray(stored).save(tmp_path / "bad.png", exif=b"Exif\0\0XX*\0\x08\0\0\0")
    assert check_image_file(str(tmp_path / "bad.png"), "mask") == (40, 20)
    assert video_size(tmp_path / "bad.png") == (20, 40)
    assert _read_image(tmp_path / "bad.png", "the mask").shape == (3, 20, 40)
    # A PIL image handed in is taken as it is (PIL's rotate keeps the tag): not turned a second time.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    with Image.open(tmp_path / "phone.png") as opened:
        turned = ImageOps.exif_transpose(opened).convert("RGB")
        turned.info["exif"] = opened.info.get("exif")
    assert _read_image(turned, "the start image").shape == (3, 40, 20)
    # The training dataset sizes and buckets a photo as it reads it; a folder of photos turned differently is one
    # size as shown, so resize fits each.
    assert probe(tmp_path / "phone.png")[:2] == (40, 20)
    (tmp_path / "mixed").mkdir()
    Image.fromarray(stored).save(tmp_path / "mixed" / "0001.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "mixed" / "0002.png")
    assert _path_frames(tmp_path / "mixed", 32, 32, True, "the input video").shape == (2, 3, 32, 32)
