"""Fixtures for every test: one torch thread, the tiny models of tests/tiny_models.py, and tiny models and data on
disk for training (an SD1.5 folder with a v3 motion module, a V3 InP folder, synthetic clips), each written once per
session."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny_models import SMALLEST_SLICE_VAE, tiny_slice_vae, tiny_unet2d, tiny_video_dit, tiny_video_unet

from kinema.data.synth import write_synth_dataset
from kinema.models.slice_vae import SliceVAE
from kinema.models.video_dit import VideoDiT
from kinema.models.video_unet import VideoUNet


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models in the tests are tiny: on a 2-core machine, handing each small op to a thread pool costs far more
    # than the maths (measured under load: 12 s vs 0.4 s for one video UNet forward). Results are compared exactly
    # only between runs in this same setting, else with tolerances.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def same_random_state_for_every_test():
    # pytest-xdist deals tests out to its workers in another order on each run, so without this a test's unseeded
    # draws (fresh motion modules, random LoRA weights) would depend on which tests ran before it in its process, and
    # a tolerance could hold on one run and not the next.
    torch.manual_seed(0)
    yield


@pytest.fixture
def encoded_frames(monkeypatch) -> dict[str, list]:
    """The frames each `write_video` call hands to the encoder, by file name (a list: one entry per write).

    Tests that make a video twice compare these, not the decoded files: libx264 is not bit-reproducible (fed
    identical YUV frames it wrote a different stream in 4 of 30 runs, decoded pixels one level off).
    """
    import numpy as np

    from kinema.data import video_io

    encoded: dict[str, list] = {}
    write_video = video_io.write_video

    def recording_write_video(frames, path, *args, **kwargs):
        encoded.setdefault(Path(path).name, []).append(np.array(frames))
        return write_video(frames, path, *args, **kwargs)

    monkeypatch.setattr(video_io, "write_video", recording_write_video)
    return encoded


@pytest.fixture(scope="module")
def unet2d() -> UNet2DConditionModel:
    """The tiny SD1.5-shaped 2D UNet (`TINY_UNET`), seeded; shared by a module's tests, so do not change it."""
    return tiny_unet2d()


@pytest.fixture
def video_unet(unet2d: UNet2DConditionModel) -> VideoUNet:
    """`unet2d` inflated with fresh (identity) temporal motion modules; a new one per test."""
    return tiny_video_unet(unet2d)


@pytest.fixture
def video_dit() -> VideoDiT:
    """A fresh tiny text-to-video DiT (`TINY_DIT`, 4 channels, no image tokens); a new one per test."""
    return tiny_video_dit()


@pytest.fixture
def slice_vae() -> SliceVAE:
    """A fresh `SMALLEST_SLICE_VAE` (one resnet per block, 8 channels throughout), seeded; a new one per test."""
    return tiny_slice_vae(**SMALLEST_SLICE_VAE)


@pytest.fixture(scope="session")
def sd_model(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD1.5 diffusers folder and a v3 motion module made for it."""
    from tiny_sd import tiny_sd_parts, write_motion_module, write_sd_folder

    root = tmp_path_factory.mktemp("sd")
    return {"path": write_sd_folder(root / "sd", tiny_sd_parts()),
            "motion_module": write_motion_module(root / "mm.safetensors", version="v3")}


@pytest.fixture(scope="session")
def v3_model(tmp_path_factory) -> Path:
    """A tiny EasyAnimate V3 InP folder (with its CLIP image encoder)."""
    from tiny_easyanimate import source_model, write_full_folder

    root = tmp_path_factory.mktemp("v3") / "model"
    write_full_folder(root, source_model())
    return root


@pytest.fixture(scope="session")
def synth_videos(tmp_path_factory) -> Path:
    """Four 8-frame 32x32 synthetic clips and two images."""
    root = tmp_path_factory.mktemp("data") / "synth"
    write_synth_dataset(root, n=6, seed=0, frames=8, size=32, image_fraction=0.34, progress=False)
    return root


@pytest.fixture(scope="session")
def one_clip(tmp_path_factory) -> Path:
    """One 8-frame 32x32 synthetic clip: what an overfit check memorises."""
    root = tmp_path_factory.mktemp("one") / "synth"
    write_synth_dataset(root, n=1, seed=0, frames=8, size=32, progress=False)
    return root
