"""Control maps from ordinary frames: Canny edges equal OpenCV's Canny on the 8-bit frames (what ControlNet's
annotator and controlnet_aux's CannyDetector run), inverted images, and the names' checks."""

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


def test_invert_and_none():
    torch.testing.assert_close(preprocess_control(frames(), "invert"), 1 - frames())
    assert preprocess_control(frames(), "none") is not None
    torch.testing.assert_close(preprocess_control(frames(), None), frames())


@pytest.mark.parametrize("name, message", [
    ("blur", r"unknown control preprocessor 'blur'; known: canny, invert, none"),
    ("invert:3", r"unknown control preprocessor 'invert:3'"),
    ("canny:200:100", r"canny thresholds are two whole numbers LOW:HIGH with 0 <= LOW < HIGH"),
    ("canny:a:b", r"canny thresholds are two whole numbers"),
    (5, r"a control preprocessor is one of canny, invert, none"),
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
    with pytest.raises(KinemaError, match=r"Canny edges need OpenCV: pip install opencv-python-headless"):
        preprocessors_for("canny", 1)
    assert preprocessors_for("invert", 1) == ["invert"]
