"""FreeU on kinema's video UNet: equal to diffusers' enable_freeu on identical weights (full and step-cached
passes), set per call and per thread, and its factors checked."""

import math
import threading

import pytest
import torch
from diffusers import MotionAdapter, UNetMotionModel
from tiny_models import perturb

from kinema.errors import KinemaError
from kinema.loaders.animatediff.keys import diffusers_to_original_key
from kinema.models.freeu import freeu
from kinema.models.video_unet import VideoUNet
from kinema.pipelines.request import FreeUSettings, GenerationRequest

SETTINGS = FreeUSettings(b1=1.3, b2=1.4, s1=0.9, s2=0.2)  # ComfyUI's FreeU_V2 defaults, none of them kinema's


def inputs(frames=4, size=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, frames, size, size, generator=gen), torch.tensor([10, 700]),
            torch.randn(2, 7, 32, generator=gen))


@pytest.fixture(scope="module")
def models(unet2d):
    """diffusers' UNetMotionModel with random motion weights, and kinema's VideoUNet holding the same weights."""
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False)
    perturb(adapter, seed=3, scale=0.1)
    reference = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    video = VideoUNet.from_unet2d(unet2d, motion_module={"type": "temporal", "norm_mode": "across_frames",
                                                         "max_frames": 32}).eval()
    video.load_motion_state_dict({diffusers_to_original_key(k): v for k, v in reference.state_dict().items()
                                  if ".motion_modules." in k and not k.endswith("pos_embed.pe")})
    return reference, video


def reference_output(reference, x, t, text, settings):
    reference.enable_freeu(**vars(settings))
    try:
        with torch.no_grad():
            return reference(x, t, text.repeat_interleave(x.shape[2], dim=0)).sample
    finally:
        reference.disable_freeu()


@pytest.mark.parametrize("size", [16, 12], ids=["power-of-two", "other-size"])
def test_freeu_equals_diffusers_enable_freeu(models, size):
    reference, video = models
    x, t, text = inputs(size=size)
    expected = reference_output(reference, x, t, text, SETTINGS)
    with torch.no_grad(), freeu(SETTINGS):
        out = video(x, t, text)
        _, deep = video.forward_deep_cached(x, t, text)
        shallow, _ = video.forward_deep_cached(x, t, text, deep_features=deep)
    assert (out - expected).abs().max().item() <= 1e-4
    assert (shallow - expected).abs().max().item() <= 1e-4  # the step-cached pass runs the same hooks
    with torch.no_grad():
        plain = video(x, t, text)
    # FreeU changes the prediction by far more than the tolerance, and is off again after the block.
    assert (plain - expected).abs().max().item() > 1e-2
    assert (plain - reference(x, t, text.repeat_interleave(x.shape[2], dim=0)).sample).abs().max().item() <= 1e-4


def test_each_factor_acts(models):
    _, video = models
    x, t, text = inputs()
    with torch.no_grad():
        with freeu(FreeUSettings(1, 1, 1, 1)):  # all ones: FreeU's identity
            ones = video(x, t, text)
        assert (ones - video(x, t, text)).abs().max().item() <= 1e-5
        for name in ("b1", "b2", "s1", "s2"):
            with freeu(FreeUSettings(**{"b1": 1, "b2": 1, "s1": 1, "s2": 1, name: 0.5})):
                assert (video(x, t, text) - ones).abs().max().item() > 1e-3, name


def test_freeu_is_per_thread(models):
    _, video = models
    x, t, text = inputs()
    with torch.no_grad():
        plain = video(x, t, text)
        with freeu(SETTINGS):
            seen = {}
            worker = threading.Thread(target=lambda: seen.update(out=video(x, t, text)))
            worker.start()
            worker.join()
            inside = video(x, t, text)
    assert torch.equal(seen["out"], plain)  # another thread runs without this block's FreeU
    assert (inside - plain).abs().max().item() > 1e-2


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1.5", True])
def test_bad_factors_are_one_line(bad):
    with pytest.raises(KinemaError, match=r"FreeU factor s2 must be a finite number above 0.*leave it unset"):
        FreeUSettings(s2=bad)


def test_a_request_refuses_freeu_that_is_not_settings():
    with pytest.raises(KinemaError, match=r"freeu must be FreeUSettings\(b1=.*got \{'b1': 1.5\}"):
        GenerationRequest("a cat", freeu={"b1": 1.5}).check()
