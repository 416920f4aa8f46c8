"""kinema.ui.preview: the latent preview's shape and pixels against a numpy rewrite of its rule."""

import numpy as np
import pytest
import torch

from kinema.errors import KinemaError
from kinema.ui.preview import SD_LATENT_RGB, latent_preview, latent_projection


def numpy_preview_pixel(frame: np.ndarray, projection: np.ndarray, y: int, x: int) -> np.ndarray:
    """One latent pixel's colour: channels -> RGB by `projection`, each colour stretched over the frame's range."""
    rgb = np.einsum("chw,ck->hwk", frame, projection)
    low, high = rgb.min(axis=(0, 1)), rgb.max(axis=(0, 1))
    return np.round((rgb[y, x] - low) / (high - low) * 255)


@pytest.mark.parametrize(("channels", "height", "width", "scale"), [(4, 8, 8, 32), (8, 8, 12, 21), (16, 64, 64, 4)])
def test_the_preview_is_the_first_frame_of_the_first_video_enlarged(channels, height, width, scale):
    latents = torch.randn(2, channels, 3, height, width, generator=torch.Generator().manual_seed(channels))
    picture = latent_preview(latents)

    assert picture.shape == (height * scale, width * scale, 3) and picture.dtype == np.uint8
    frame = latents[0, :, 0].numpy()
    projection = np.asarray(SD_LATENT_RGB) if channels == 4 else latent_projection(channels).numpy()
    for y, x in [(0, 0), (height - 1, width - 1), (height // 2, 1)]:
        block = picture[y * scale:(y + 1) * scale, x * scale:(x + 1) * scale].reshape(-1, 3)
        assert (block == block[0]).all()
        np.testing.assert_allclose(block[0], numpy_preview_pixel(frame, projection, y, x), atol=1)
    latents[1:] = 0
    latents[0, :, 1:] = 0  # later frames and other videos do not enter the preview
    np.testing.assert_array_equal(latent_preview(latents), picture)


def test_the_projection_is_fixed_and_a_flat_frame_does_not_divide_by_zero():
    np.testing.assert_array_equal(latent_projection(8).numpy(), latent_projection(8).numpy())
    assert latent_preview(torch.zeros(1, 8, 1, 4, 4)).max() == 0
    with pytest.raises(KinemaError, match=r"\(B, C, F', h, w\)"):
        latent_preview(torch.zeros(8, 4, 4))
