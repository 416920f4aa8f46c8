"""Control maps from ordinary frames: Canny edges equal OpenCV's Canny on the 8-bit frames (what ControlNet's
annotator and controlnet_aux's CannyDetector run), prompt travel's tile maps (its TileResamplePreProcessor's and
BlurPreProcessor's OpenCV calls, written out here), inverted images, and the names' checks."""

import cv2
import numpy as np
import pytest
import torch

from kinema.errors import KinemaError
from kinema.pipelines.control_maps import parse_preprocess, preprocess_control, preprocessors_for


def frames() -> torch.Tensor:
    """`(2, 3, 32, 32)` in whole 255ths: a bright square on a ramp, moving."""
    video = torch.linspace(0, 0.5, 32).view(1, 1, 1, 32).repeat(2, 3, 32, 1)
    video[0, :, 8:20, 4:16] = 1.0
    video[1, 0, 10:22, 9:21] = 0.9
    return (video * 255).round() / 255


@pytest.mark.parametrize("name, thresholds", [("canny", (100, 200)), ("canny:20:60", (20, 60))])
def test_canny_is_opencvs_canny_on_the_8_bit_frames(name, thresholds):
    made = preprocess_control(frames(), name)
    assert made.shape == (2, 3, 32, 32) and set(made.unique().tolist()) == {0.0, 1.0}
    for index, frame in enumerate(frames()):
        pixels = (frame * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        expected = cv2.Canny(np.ascontiguousarray(pixels), *thresholds) / 255
        for channel in range(3):
            np.testing.assert_array_equal(made[index, channel].numpy(), expected)
    assert made.sum() > 0


def eight_bit(frame: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray((frame * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("name, sigma", [("blur", 5.0), ("blur:1.5", 1.5)])
def test_blur_is_prompt_travels_gaussian_blur(name, sigma):
    made = preprocess_control(frames(), name)
    for index, frame in enumerate(frames()):
        expected = cv2.GaussianBlur(eight_bit(frame), (0, 0), sigma)  # BlurPreProcessor: sigma, kernel from it
        np.testing.assert_array_equal((made[index] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), expected)
    assert (made - frames()).abs().max() > 0.1


def test_tile_resample_is_prompt_travels_area_resize_brought_back_to_size():
    from PIL import Image

    tall = torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(3))
    made = preprocess_control(tall, "tile_resample:3")
    assert made.shape == tall.shape
    for index, frame in enumerate(tall):
        # TileResamplePreProcessor: the short side to 24 / 3, the long one scaled alike, by OpenCV's area resize;
        # then to the video's size, as diffusers' control image processor resizes (PIL's Lanczos).
        k = (24 / 3) / 24
        small = cv2.resize(eight_bit(frame), (int(24 * k), int(40 * k)), interpolation=cv2.INTER_AREA)
        expected = np.asarray(Image.fromarray(small).resize((24, 40), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal((made[index] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), expected)
    torch.testing.assert_close(preprocess_control(frames(), "tile_resample"), frames())  # rate 1: as it is


def test_invert_and_none():
    torch.testing.assert_close(preprocess_control(frames(), "invert"), 1 - frames())
    assert preprocess_control(frames(), "none") is not None
    torch.testing.assert_close(preprocess_control(frames(), None), frames())


@pytest.mark.parametrize("name, message", [
    ("dwpose", r"unknown control preprocessor 'dwpose'; known: canny, invert, tile_resample, blur, none"),
    ("invert:3", r"unknown control preprocessor 'invert:3'"),
    ("tile_resample:0.5", r"tile_resample takes a rate of at least 1 \(the short side divided by it\), as "
                          r"tile_resample:2; got 'tile_resample:0.5'"),
    ("tile_resample:nan", r"tile_resample takes a rate of at least 1"),
    ("blur:0", r"blur takes a sigma above 0 and at most 100, as blur:5; got 'blur:0'"),
    ("blur:10000", r"blur takes a sigma above 0 and at most 100"),
    ("blur:1:2", r"blur takes a sigma above 0"),
    ("canny:200:100", r"canny thresholds are two whole numbers LOW:HIGH with 0 <= LOW < HIGH"),
    ("canny:a:b", r"canny thresholds are two whole numbers"),
    (5, r"a control preprocessor is one of canny, invert, tile_resample, blur, none"),
])
def test_bad_names_are_one_line(name, message):
    with pytest.raises(KinemaError, match=message):
        parse_preprocess(name)


def test_one_per_controlnet_and_opencv_is_named_when_missing(monkeypatch):
    assert preprocessors_for(["canny", "none"], 2) == ["canny", None]
    assert preprocessors_for(None, 2) == [None, None]
    with pytest.raises(KinemaError, match=r"1 control preprocessor for 2 ControlNets; give one per ControlNet"):
        preprocessors_for("canny", 2)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    for name in ("canny", "tile_resample:2", "blur"):
        with pytest.raises(KinemaError, match=r"^canny, tile_resample and blur need OpenCV: pip install "
                                              r"opencv-python-headless"):
            preprocessors_for(name, 1)
    assert preprocessors_for("invert", 1) == ["invert"]
