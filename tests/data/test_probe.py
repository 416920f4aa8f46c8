"""frame_count reads a container's count without decoding; the reference is decoding every frame (read_video)."""

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
