"""The video-model contract tests (`VideoModelTests`) applied to every host and motion module kinema ships, and to
the custom motion module of docs/custom_motion_module.md."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import documented_motion_module, perturb, tiny_pixart, tiny_unet2d, tiny_video_dit
from video_model_tests import VideoModelTests

from kinema.models.motion import MOTION_MODULES
from kinema.models.video_dit import VideoDiT
from kinema.models.video_unet import VideoUNet

# The page's own class, run from the page, under a name of this module's: bound here so that models using it pickle.
DOCUMENTED_MODULE = "documented_temporal_conv"
TemporalConv = documented_motion_module(DOCUMENTED_MODULE, __name__)


@pytest.fixture(scope="module", autouse=True)
def unregister_documented_module():
    yield
    MOTION_MODULES.pop(DOCUMENTED_MODULE, None)  # leave the global registry as other tests expect it


class VideoUNetTests(VideoModelTests):
    video_config: dict[str, Any] = {}

    def make_model(self) -> VideoUNet:
        model = VideoUNet.from_unet2d(tiny_unet2d(), **self.video_config)
        return perturb(model, seed=5).eval()

    def make_inputs(self, frames: int, batch: int = 2) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(frames)
        return {"sample": torch.randn(batch, 4, frames, 16, 16, generator=gen),
                "timestep": torch.tensor([10, 700, 300])[:batch],
                "encoder_hidden_states": torch.randn(batch, 7, 32, generator=gen)}

    def fresh_inflation(self, frames: int) -> tuple[VideoUNet, dict[str, Any], torch.Tensor]:
        unet2d = tiny_unet2d()
        fresh = VideoUNet.from_unet2d(unet2d, **self.video_config).eval()
        inputs = self.make_inputs(frames)
        with torch.no_grad():
            expected = torch.stack([
                unet2d(inputs["sample"][:, :, f], inputs["timestep"], inputs["encoder_hidden_states"]).sample
                for f in range(frames)], dim=2)
        return fresh, inputs, expected


class TestVideoUNetTemporal(VideoUNetTests):
    video_config = {"motion_module": {"type": "temporal", "norm_mode": "per_frame"}}


class TestVideoUNetV1AcrossFramesResnets(VideoUNetTests):
    video_config = {"motion_module": {"type": "temporal", "max_frames": 24}, "resnet_norm_mode": "across_frames"}

    def fresh_inflation(self, frames: int) -> None:
        return None  # resnets normalised across frames are not the image UNet's per-image norms


class TestVideoUNetDocumentedCustomModule(VideoUNetTests):
    video_config = {"motion_module": {"type": DOCUMENTED_MODULE, "kernel_size": 3}}

    def test_the_module_is_the_documented_one(self, model):
        assert all(isinstance(module, TemporalConv) for _, module in model.motion_modules())
        assert not hasattr(TemporalConv, "set_attention_chunk_size") and not hasattr(TemporalConv, "max_frames")


class TestVideoDiT(VideoModelTests):
    # Inpaint (InP) model with image tokens: every kind of conditioning the DiT takes.
    def make_model(self) -> VideoDiT:
        return perturb(tiny_video_dit(in_channels=12, image_embed_dim=32), seed=5).eval()

    def make_inputs(self, frames: int, batch: int = 2) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(frames)
        mask = torch.ones(batch, 5)
        mask[-1, -2:] = 0  # the last clip's text is padded
        return {"sample": torch.randn(batch, 4, frames, 8, 8, generator=gen),
                "timestep": torch.tensor([10, 500, 900])[:batch],
                "encoder_hidden_states": torch.randn(batch, 5, 48, generator=gen), "encoder_attention_mask": mask,
                "inpaint_latents": torch.randn(batch, 8, frames, 8, 8, generator=gen),
                "clip_image_embeds": torch.randn(batch, 32, generator=gen)}

    def fresh_inflation(self, frames: int) -> tuple[VideoDiT, dict[str, Any], torch.Tensor]:
        pixart = tiny_pixart()
        fresh = VideoDiT.from_image_dit(pixart, in_channels=12, image_embed_dim=32).eval()
        # Zero weights on the extra input channels and masked-out (zero-init) image tokens change nothing.
        inputs = {**self.make_inputs(frames), "clip_attention_mask": torch.zeros(2, 8)}
        with torch.no_grad():
            expected = torch.stack([
                pixart(inputs["sample"][:, :, f], encoder_hidden_states=inputs["encoder_hidden_states"],
                       timestep=inputs["timestep"], encoder_attention_mask=inputs["encoder_attention_mask"]).sample
                for f in range(frames)], dim=2)
        return fresh, inputs, expected
