"""An InP model without CLIP image tokens (kinema-tiny's design): image-to-video and continuation take the start
frames through the masked-video latents alone."""

import pytest
import torch

from kinema.data.synth import synth_clip
from kinema.data.video_io import to_float_frames
from kinema.models.initial import write_initial_model
from kinema.pipelines.generation import generate
from kinema.pipelines.load import load_family
from kinema.pipelines.request import GenerationRequest


@pytest.fixture(scope="module")
def tiny_inp(tmp_path_factory):
    return load_family(write_initial_model("kinema-tiny", tmp_path_factory.mktemp("kt") / "model"))


def test_image_conditioning_without_image_tokens(tiny_inp):
    start = (to_float_frames(synth_clip(9001, 0, 2, 64).frames)[:1] + 1) / 2  # (1, 3, 64, 64) in [0, 1]
    video = torch.zeros(1, 16, 3, 64, 64)
    video[:, 0] = start
    keep = torch.zeros(16, dtype=torch.bool)
    keep[0] = True
    cond, uncond = tiny_inp.inpaint_conditioning(video, keep, start)
    assert set(cond) == set(uncond) == {"inpaint_latents"}
    masked = torch.where(keep[None, None, :, None, None], video.permute(0, 2, 1, 3, 4) * 2 - 1, torch.tensor(-1.0))
    latent = tiny_inp.vae.config.latent_channels  # inpaint latents: the mask latents, then the masked video
    torch.testing.assert_close(cond["inpaint_latents"][:, latent:], tiny_inp._encode_pixels(masked))


def test_image_to_video_and_extension_run(tiny_inp, tmp_path):
    image = tmp_path / "start.png"
    from PIL import Image

    Image.fromarray(synth_clip(9001, 1, 2, 64).frames[0]).save(image)
    size = {"height": 64, "width": 64, "steps": 2, "seeds": [0]}
    result = generate(tiny_inp, GenerationRequest(prompt="a red circle moving right", image=str(image), frames=8,
                                                  **size), progress=False)
    assert result.frames.shape == (1, 8, 3, 64, 64) and torch.isfinite(result.frames).all()
    longer = generate(tiny_inp, GenerationRequest(prompt="a red circle moving right", video=result.frames[0],
                                                  extend_frames=8, segment_frames=8, **size), progress=False)
    assert longer.frames.shape == (1, 16, 3, 64, 64)
