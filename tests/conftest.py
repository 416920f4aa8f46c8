"""Fixtures for every test: one torch thread, and the tiny models of tests/tiny_models.py."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny_models import SMALLEST_SLICE_VAE, tiny_slice_vae, tiny_unet2d, tiny_video_dit, tiny_video_unet

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
