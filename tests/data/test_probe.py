"""frame_count reads a container's count without decoding; the reference is decoding every frame (read_video)."""

import json

import numpy as np
import pytest

from kinema.data.probe import frame_count
from kinema.data.video_io import read_video, write_video
from kinema.errors import KinemaError


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "clip.gif", "clip.webp", "frames"])
def test_frame_count_equals_the_decoded_frames(tmp_path, name):
    pixels = np.random.default_rng(1).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    write_video(pixels, tmp_path / name)
    assert frame_count(tmp_path / name) == len(read_video(tmp_path / name).frames) == 7


def test_a_folder_of_webp_frames_counts_as_the_reader_reads_it(tmp_path):
    # The reader takes .webp frames in a folder; the count once took only PNG and JPEG, so such a folder was refused.
    from PIL import Image

    (tmp_path / "frames").mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8), (index * 80, 0, 0)).save(tmp_path / "frames" / f"{index:05d}.webp")
    assert frame_count(tmp_path / "frames") == len(read_video(tmp_path / "frames").frames) == 3


def test_what_is_not_a_video_is_one_line(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "empty").mkdir()
    for path, words in ((tmp_path / "broken.mp4", "corrupt, truncated or not a video"),
                        (tmp_path / "empty", "without PNG, JPEG or WebP frames"),
                        (tmp_path / "missing.mp4", "does not exist")):
        with pytest.raises(KinemaError, match=words) as caught:
            frame_count(path, "input video")
        assert "\n" not in str(caught.value) and str(caught.value).startswith(f"the input video {path}")
    # An extend job reads the settings stored in the video first: it said "cannot read ...: [Errno 1094995529]".
    from kinema.pipelines.jobs import job_from_mapping

    with pytest.raises(KinemaError, match=rf"the video {tmp_path / 'broken.mp4'} is corrupt, truncated or not a video "
                                          r"kinema can read \(InvalidDataError.*give an MP4"):
        job_from_mapping({"video": str(tmp_path / "broken.mp4"), "extend_frames": 8})


def test_a_videos_frame_rate_is_the_one_kinema_stored_else_its_containers():
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from PIL import Image

    from kinema.data.probe import video_fps

    frames = np.zeros((4, 16, 16, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(4)[:, None, None] * 60  # distinct frames: GIF merges equal ones
    with TemporaryDirectory() as folder:
        root = Path(folder)
        import av

        with av.open(str(root / "fast.mp4"), "w") as container:  # another tool's video: the container's own rate
            stream = container.add_stream("libx264", rate=24)
            stream.width = stream.height = 16
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        assert video_fps(root / "fast.mp4") == 24
        write_video(frames, root / "slow.webm", fps=12)  # kinema's stored fps
        assert video_fps(root / "slow.webm") == 12
        # Re-encoded at another rate with the old settings kept (ffmpeg copies metadata): the container wins.
        (root / "slow.webm.json").write_text(json.dumps({"fps": 8}))
        assert video_fps(root / "slow.webm") == 12
        # A frames folder moved without its sidecar: every PNG holds kinema's settings.
        write_video(frames, root / "made", fps=24)
        (root / "made.json").unlink()
        (root / "made").rename(root / "moved")
        assert video_fps(root / "moved") == 24
        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(root / "anim.gif", save_all=True, append_images=images[1:], duration=50)
        assert video_fps(root / "anim.gif") == 20  # 50 ms a frame
        images[0].save(root / "still.png")
        (root / "frames").mkdir()
        images[0].save(root / "frames" / "0.png")
        (root / "text.mp4").write_text("not a video")
        for path in ("still.png", "frames", "text.mp4", "missing.mp4"):  # no rate: the caller's default
            assert video_fps(root / path) is None


@pytest.mark.parametrize("name", ["mask.mp4", "mask.webm", "mask.gif", "mask.webp", "mask"])
def test_a_blank_mask_is_told_before_loading_as_generate_reads_it(tmp_path, name):
    import torch

    from kinema.data.probe import is_blank_mask, rgb_frames
    from kinema.pipelines.generation import _mask_tensor
    from kinema.pipelines.request import MASK_MARKS_NOTHING

    def generate_finds_it_blank(path):
        try:
            _mask_tensor(str(path), 6, 32, 32, False)
        except KinemaError as err:
            assert str(err) == MASK_MARKS_NOTHING
            return True
        return False

    # Dark grey, pure green (luma 150 but channel mean 85: kept), and a white block in the last frame only.
    for case, (value, marked_last) in enumerate([((-0.1, -0.1, -0.1), False), ((-1, 1, -1), False),
                                                 ((-1, -1, -1), True)]):
        frames = torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1).expand(6, 3, 32, 32).clone()
        if marked_last:
            frames[-1, :, 8:24, 8:24] = 1
        path = tmp_path / str(case) / name
        write_video(frames, path)
        decoded = np.stack(list(rgb_frames(path)))
        np.testing.assert_array_equal(decoded, read_video(path).frames.add(1).mul(127.5).round().byte().permute(
            0, 2, 3, 1).numpy())  # the frames generate() reads
        assert is_blank_mask(path) is generate_finds_it_blank(path) is (not marked_last), (name, case)


def test_a_sidecar_left_from_another_video_is_not_taken_for_this_ones(tmp_path, caplog):
    import logging

    from kinema.data.probe import stored_settings

    made = {"prompt": "a red fox", "frames": 4, "width": 16, "height": 16}
    write_video(np.zeros((4, 16, 16, 3), np.uint8), tmp_path / "fox.mp4", settings=made)
    assert stored_settings(tmp_path / "fox.mp4")["prompt"] == "a red fox"
    # The video replaced by another of 6 frames, its old sidecar left beside it: the file's own settings are read.
    write_video(np.zeros((6, 16, 16, 3), np.uint8), tmp_path / "new.mp4", settings={**made, "prompt": "a cat",
                                                                                     "frames": 6})
    (tmp_path / "new.mp4").replace(tmp_path / "fox.mp4")
    with caplog.at_level(logging.WARNING, logger="kinema.data.probe"):
        assert stored_settings(tmp_path / "fox.mp4")["prompt"] == "a cat"
    assert f"the settings beside {tmp_path / 'fox.mp4'} describe another video (4 frames at 16x16; it has 6 at " \
           "16x16), left from a file since replaced: they are not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kinema.data.probe"):  # read again (its fps, its prompt): said once
        assert stored_settings(tmp_path / "fox.mp4")["prompt"] == "a cat"
    assert not caplog.records
    # A WebP of equal frames holds them as one: kinema's own sidecar is still the video's.
    write_video(np.zeros((8, 16, 16, 3), np.uint8), tmp_path / "still.webp", settings={**made, "frames": 8})
    with caplog.at_level(logging.WARNING, logger="kinema.data.probe"):
        assert stored_settings(tmp_path / "still.webp")["prompt"] == "a red fox"
    assert not caplog.records
    # Settings without the counts (written by hand, or by other tools) are taken as they are.
    (tmp_path / "fox.mp4.json").write_text(json.dumps({"prompt": "a dog"}))
    assert stored_settings(tmp_path / "fox.mp4")["prompt"] == "a dog"
