"""kinema init-model: the untrained folders of kinema's own models are seeded, loadable and carry their kinema.json."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kinema.errors import KinemaError
from kinema.models.initial import latent_scaling_factor, write_initial_model
from kinema.models.presets import KINEMA_TINY_SLICE_VAE, kinema_tiny_transformer


def test_kinema_tiny_folder_is_seeded_and_loads(tmp_path):
    from kinema.models.slice_vae import SliceVAE
    from kinema.models.video_dit import VideoDiT

    first = write_initial_model("kinema-tiny", tmp_path / "a", seed=3)
    second = write_initial_model("kinema-tiny", tmp_path / "b", seed=3)
    other = write_initial_model("kinema-tiny", tmp_path / "c", seed=4)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(folder / weights) for folder in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    dit = VideoDiT.from_pretrained(first / "transformer")
    assert dit.config.in_channels == kinema_tiny_transformer()["in_channels"] == 3 * dit.config.out_channels
    assert sum(p.numel() for p in dit.parameters()) < 6e6
    vae = SliceVAE.from_pretrained(first / "vae")
    assert vae.config.latent_channels == KINEMA_TINY_SLICE_VAE["latent_channels"]
    manifest = json.loads((first / "kinema.json").read_text())
    assert manifest["family"] == "easyanimate" and manifest["text_encoder"]["hub_id"].endswith("all-MiniLM-L6-v2")


def test_scaling_factor_is_one_over_the_latent_std(tmp_path, synth_videos):
    from kinema.data.video_io import read_video
    from kinema.models.slice_vae import SliceVAE

    torch.manual_seed(0)
    vae = SliceVAE(**{**KINEMA_TINY_SLICE_VAE, "ch_mult": (1, 1, 1, 1)}).eval()
    factor = latent_scaling_factor(vae, synth_videos, clips=2)
    entries = [e for e in json.loads((synth_videos / "metadata.json").read_text()) if e["type"] == "video"][:2]
    with torch.no_grad():
        means = [vae.encode(read_video(synth_videos / e["file_path"], max_frames=8).frames.permute(1, 0, 2, 3)[None])
                 .latent_dist.mean for e in entries]
    assert factor == pytest.approx(1 / torch.cat([m.flatten() for m in means]).std().item(), rel=1e-6)


def test_bad_requests():
    with pytest.raises(KinemaError, match="unknown model 'kinema-huge'"):
        write_initial_model("kinema-huge", "/nonexistent/x")
