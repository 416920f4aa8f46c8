"""kinema's V3 transformer and Slice VAE against outputs computed by EasyAnimate's own V3 code.

The fixtures in tests/fixtures/easyanimate_v3/ were written by make_fixtures.py there, running EasyAnimate at
616a35425d3100d3e10adb58dc554794f8a7e9cb (the last V3 commit) in its own environment (diffusers 0.28.2): a
28-block, 32-wide V3 InP transformer and a ch-8 Slice VAE, every weight random (motion modules, U-ViT skip linears
and CLIP projection included), saved as V3 folders; inputs and V3's outputs beside them. kinema reads the folders
through its public loaders, so key names, config translation, block order, skip wiring, CLIP tokens, masks and the
slice schedules are all checked against V3 itself, never against kinema's own earlier output.

Tolerance: the same float32 maths run by different kernels (diffusers 0.28 vs current attention and position-table
code, another torch build, thread count) differs by a few ulps of the O(1)-O(5) outputs; the largest difference
measured when the fixtures were made was 4.8e-6. atol/rtol below leave 10x room, while each of the bugs this file
was written to catch (motion module after the cross-attention, the 12 -> 15 skip dropped, latent frames reversed
within a slice) moves the outputs by 0.1 or more.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kinema.loaders.easyanimate.transformer import load_video_dit
from kinema.loaders.easyanimate.vae import load_slice_vae

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "easyanimate_v3"
EASYANIMATE_V3_COMMIT = "616a35425d3100d3e10adb58dc554794f8a7e9cb"
TOLERANCE = dict(atol=5e-5, rtol=5e-5)


@pytest.fixture(scope="module")
def transformer():
    # V3's file keeps its weights in float16 (fixture size); EasyAnimate upcast them to float32, and so does this.
    return load_video_dit(FIXTURES / "transformer", dtype=torch.float32)


@pytest.fixture(scope="module")
def vae():
    return load_slice_vae(FIXTURES / "vae", torch_dtype=torch.float32)


def reference(name: str) -> dict[str, torch.Tensor]:
    path = FIXTURES / name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["easyanimate_commit"] == EASYANIMATE_V3_COMMIT
    return load_file(path)


def test_fixture_exercises_every_v3_only_part(transformer):
    # V3 starts these parts at zero; at zero, moving, dropping or rewiring them would change nothing.
    parts = {
        "U-ViT skip linears": [fc.weight for fc in transformer.long_connect_fc],
        "CLIP projection": [transformer.clip_projection.linear_2.weight],
        "motion module outputs": [block.attn_temporal.temporal_transformer.proj_out.weight
                                  for block in transformer.transformer_blocks],
    }
    for part, weights in parts.items():
        assert all(w.abs().mean() > 0.01 for w in weights), part
    assert len(transformer.transformer_blocks) == 28 and len(transformer.long_connect_fc) == 13


@pytest.mark.parametrize("frames", [1, 4])
def test_transformer_matches_easyanimate_v3(transformer, frames):
    io = {name.removeprefix(f"f{frames}."): t for name, t in reference("transformer_io.safetensors").items()
          if name.startswith(f"f{frames}.")}
    with torch.no_grad():
        output = transformer(
            io["latents"], io["timestep"], io["encoder_hidden_states"],
            encoder_attention_mask=io["encoder_attention_mask"], inpaint_latents=io["inpaint_latents"],
            clip_image_embeds=io["clip_image_embeds"], clip_attention_mask=io["clip_attention_mask"],
        )
    torch.testing.assert_close(output, io["output"], **TOLERANCE)


@pytest.mark.parametrize("frames", [1, 8, 16])
def test_slice_vae_encode_matches_easyanimate_v3(vae, frames):
    io = reference("vae_io.safetensors")
    with torch.no_grad():
        posterior = vae.encode(io[f"encode.f{frames}.video"]).latent_dist
    torch.testing.assert_close(posterior.mean, io[f"encode.f{frames}.mean"], **TOLERANCE)
    torch.testing.assert_close(posterior.logvar, io[f"encode.f{frames}.logvar"], **TOLERANCE)


@pytest.mark.parametrize("latent_frames", [1, 2, 4, 6])
def test_slice_vae_decode_matches_easyanimate_v3(vae, latent_frames):
    # 6 latent frames = 3 slices: the middle one shares features with a neighbour on each side.
    io = reference("vae_io.safetensors")
    with torch.no_grad():
        video = vae.decode(io[f"decode.f{latent_frames}.latents"]).sample
    torch.testing.assert_close(video, io[f"decode.f{latent_frames}.video"], **TOLERANCE)
