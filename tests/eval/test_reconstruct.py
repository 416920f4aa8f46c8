"""score_reconstructions: the detectors on VAE reconstructions of synth clips, against the clips' ground truth."""

import math

import pytest
import torch

import kinema
from kinema.data.synth import synth_clip
from kinema.eval.metrics import MAX_PSNR_DB
from kinema.eval.reconstruct import score_reconstructions


class _PixelFamily:
    """A stand-in VAE whose latents are the frames themselves, passed through `change` on the way back."""

    latent_channels = 3
    spatial_factor = 1

    def __init__(self, change=lambda frames: frames):
        self.model = torch.nn.Linear(1, 1)
        self.change = change

    def encode_frames(self, frames):  # (B, F, 3, H, W) -> (B, 3, F, H, W)
        return frames.permute(0, 2, 1, 3, 4)

    def decode(self, latents):
        return self.change(latents.permute(0, 2, 1, 3, 4))

    def pixel_frames(self, latent_frames):
        return latent_frames

    def decode_bytes(self, videos, frames, height, width):
        return None  # no estimate, as a VideoFamily without one


def test_a_lossless_vae_lets_everything_through():
    scores = score_reconstructions("unused", count=4, family=_PixelFamily())
    assert (scores["n"], scores["color_acc"], scores["shape_acc"], scores["motion_acc"]) == (4, 1.0, 1.0, 1.0)
    assert scores["psnr"] == MAX_PSNR_DB  # capped like every PSNR kinema eval reports, so --json stays valid JSON
    assert scores["settings"] == {"model": "unused", "clips": 4, "synth_seed": 9001, "frames": 16, "size": 64,
                                  "kinema_version": kinema.__version__}


def test_a_reconstruction_with_no_object_counts_as_wrong_and_says_why():
    scores = score_reconstructions("unused", count=2, family=_PixelFamily(lambda frames: frames * 0 + 0.35))
    assert (scores["color_acc"], scores["shape_acc"], scores["motion_acc"]) == (0.0, 0.0, 0.0)
    assert all(row["detected"] == {"color": None, "shape": None, "motion": None} and "no object found" in
               row["problem"] for row in scores["per_clip"])


def test_a_vae_that_swaps_red_and_blue_loses_colour_and_its_psnr_is_the_plain_formula():
    def swap(frames):
        return frames.flip(2)  # (B, F, 3, H, W): RGB -> BGR

    scores = score_reconstructions("unused", count=4, family=_PixelFamily(swap))
    truth = [synth_clip(9001, i, 16, 64) for i in range(4)]
    expected_psnr = []
    for clip in truth:
        original = torch.from_numpy(clip.frames.copy()).float() / 255
        error = (original.flip(-1) - original).pow(2).mean().item()
        expected_psnr.append(-10 * math.log10(error))
    assert scores["psnr"] == pytest.approx(sum(expected_psnr) / 4, rel=1e-5)
    assert scores["color_acc"] < 1.0 and scores["shape_acc"] == 1.0 and scores["motion_acc"] == 1.0
    assert [row["truth"]["color"] for row in scores["per_clip"]] == [clip.ground_truth["colour"] for clip in truth]
