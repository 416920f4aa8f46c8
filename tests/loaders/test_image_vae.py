"""Another VAE for an SD1.5 model (kinema.loaders.image_vae): the files people keep, each read to the same weights
diffusers' own loaders read from it (`AutoencoderKL.from_single_file`, `from_pretrained`), and everything else
refused in one line before any weights are read."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from loaders.test_stable_diffusion import TINY_VAE
from safetensors.torch import save_file
from tiny_models import perturb
from tiny_sd import deprecated_vae_state, ldm_vae_state, tiny_sd_parts, write_sd_configs, write_sd_single_file

import kinema
from kinema.errors import KinemaError
from kinema.loaders.image_vae import is_image_vae, read_image_vae
from kinema.loaders.source import Source, describe_source

TINY_CONFIG = dict(AutoencoderKL.from_config(TINY_VAE).config)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(3)
    return perturb(AutoencoderKL(**TINY_VAE), 11).eval()


@pytest.fixture(scope="module")
def files(vae, tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    vae.save_config(root / "config")
    save_file(ldm_vae_state(vae), root / "pruned.safetensors")
    save_file(ldm_vae_state(vae, training=True), root / "full.safetensors")
    torch.save({"state_dict": ldm_vae_state(vae, training=True), "global_step": 840000}, root / "full.ckpt")
    save_file(ldm_vae_state(vae, prefix="first_stage_model."), root / "cut.safetensors")
    save_file(deprecated_vae_state(vae), root / "old-diffusers.safetensors")
    vae.save_pretrained(root / "folder")
    old = root / "old-folder"
    old.mkdir()
    (old / "config.json").write_text((root / "folder" / "config.json").read_text())
    save_file(deprecated_vae_state(vae), old / "diffusion_pytorch_model.safetensors")
    return root


def same(got: AutoencoderKL, expected: AutoencoderKL) -> bool:
    ours, theirs = got.state_dict(), expected.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())


@pytest.mark.parametrize("name", ["pruned.safetensors", "full.safetensors", "full.ckpt", "cut.safetensors"])
def test_an_original_file_reads_as_diffusers_from_single_file_reads_it(vae, files, name):
    reference = AutoencoderKL.from_single_file(str(files / name), config=str(files / "config"),
                                               local_files_only=True)
    ours = read_image_vae(files / name, dict(vae.config))
    assert same(ours, reference) and same(ours, vae)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours.decode(ours.encode(images).latent_dist.mean).sample,
                           reference.decode(reference.encode(images).latent_dist.mean).sample)


@pytest.mark.parametrize("name", ["folder", "old-folder"])
def test_a_folder_reads_as_diffusers_from_pretrained_reads_it(vae, files, name):
    reference = AutoencoderKL.from_pretrained(files / name)  # renames the old attention names itself
    ours = read_image_vae(files / name, dict(vae.config))
    assert same(ours, reference) and same(ours, vae)


def test_a_file_of_old_diffusers_names_reads_as_its_folder_does(vae, files):
    assert same(read_image_vae(files / "old-diffusers.safetensors", dict(vae.config)),
                AutoencoderKL.from_pretrained(files / "old-folder"))


def test_describe_names_the_layout_and_leaves_out_the_training_entries(vae, files):
    report = kinema.describe(files / "folder")
    assert report["kind"] == "image_vae" and report["format"] == "diffusers-folder"
    assert (report["latent_channels"], report["downscale"], report["scaling_factor"]) == (4, 2, 0.18215)
    assert report["parameters"] == sum(p.numel() for p in vae.parameters())
    with pytest.raises(KinemaError, match=r"full.safetensors: its weights do not fit Stable Diffusion 1.5's VAE: "
                                          r"\d+ missing .*mismatched .*encoder.conv_in.weight: file \(32, 3, 3, 3\) vs "
                                          r"model \(128, 3, 3, 3\)"):
        kinema.describe(files / "full.safetensors")  # a file alone is checked against SD1.5's VAE
    report = kinema.load  # the registry's loader takes the model's VAE config
    loaded = report(files / "full.ckpt", vae_config=dict(vae.config))
    assert same(loaded, vae)


def test_other_files_are_not_vaes(files, tmp_path):
    sd_file = write_sd_single_file(tmp_path / "sd.safetensors", tiny_sd_parts())
    configs = write_sd_configs(tmp_path / "configs", tiny_sd_parts())
    assert describe_source(Source(sd_file, {"config": configs}))["kind"] == "stable_diffusion"  # a VAE and a UNet
    assert not is_image_vae(Source(sd_file))
    video_vae = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3,
                                                                                                               3, 3)}
    save_file(video_vae, tmp_path / "slice.safetensors")  # 3D convolutions: a video VAE's weights
    with pytest.raises(KinemaError, match="slice.safetensors: not a format kinema knows"):
        kinema.describe(tmp_path / "slice.safetensors")
    two = ldm_vae_state(read_image_vae(files / "pruned.safetensors", TINY_CONFIG))
    save_file(two | {f"first_stage_model.{k}": v.clone() for k, v in two.items()}, tmp_path / "two.safetensors")
    assert not is_image_vae(Source(tmp_path / "two.safetensors"))


MISSING = object()


def folder_with(files, folder, key, value):
    """The VAE folder with its config's `key` set to `value` (left out for MISSING)."""
    folder.mkdir()
    config = json.loads((files / "folder" / "config.json").read_text()) | {key: value}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not MISSING}))
    weights = "diffusion_pytorch_model.safetensors"
    (folder / weights).symlink_to(files / "folder" / weights)
    return folder


@pytest.mark.parametrize(("key", "value", "model", "message"), [
    ("scaling_factor", 0.13025, {}, "its scaling_factor is 0.13025 and the model's VAE's 0.18215, so it works in "
                                    "another latent space"),
    ("block_out_channels", [32, 64, 64], {}, "it downscales 4x and the model's VAE 2x"),
    # Left out, the config takes diffusers' default, which a model of another scale does not share.
    ("scaling_factor", MISSING, {"scaling_factor": 0.5}, "its scaling_factor is 0.18215 and the model's VAE's 0.5"),
    ("scaling_factor", "0.18215", {}, r"its config.json's scaling_factor is \"0.18215\", not a number above 0 "
                                      r"\(SD1.5's VAEs: 0.18215\): restore the config.json the VAE came with"),
    ("scaling_factor", None, {}, "its config.json's scaling_factor is null, not a number above 0"),
    ("latent_channels", "4", {}, r"its config.json's latent_channels is \"4\", not a positive whole number"),
    ("block_out_channels", 5, {}, "its config.json's block_out_channels is 5, not a list of positive whole numbers"),
    ("block_out_channels", MISSING, {}, r"its config does not build an AutoencoderKL \(IndexError: .*\): restore"),
])
def test_a_folder_of_another_latent_space_or_a_broken_config_is_refused(vae, files, tmp_path, key, value, model,
                                                                         message):
    folder = folder_with(files, tmp_path / "vae", key, value)
    with pytest.raises(KinemaError, match=f"^{tmp_path / 'vae'}: {message}"):
        read_image_vae(folder, {**vae.config, **model})


def test_an_incomplete_or_broken_file_is_one_line(vae, files, tmp_path):
    state = ldm_vae_state(vae)
    del state["decoder.conv_out.bias"]
    save_file(state, tmp_path / "cut-short.safetensors")
    with pytest.raises(KinemaError, match=r"cut-short.safetensors: its weights do not fit the model's VAE: 1 missing "
                                          r"\(e.g. decoder.conv_out.bias\)"):
        read_image_vae(tmp_path / "cut-short.safetensors", dict(vae.config))
    state = ldm_vae_state(vae) | {"decoder.up.0.extra.weight": torch.zeros(2)}
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(KinemaError, match="extra.safetensors: its weights do not fit the model's VAE: 1 "
                                          "unexpected .e.g. decoder.up.0.extra.weight"):
        read_image_vae(tmp_path / "extra.safetensors", dict(vae.config))
    state = ldm_vae_state(vae)
    state["quant_conv.bias"] = torch.full_like(state["quant_conv.bias"], float("nan"))
    save_file(state, tmp_path / "nan.safetensors")
    with pytest.raises(KinemaError, match="nan.safetensors: .*not finite|nan.safetensors: .*NaN"):
        read_image_vae(tmp_path / "nan.safetensors", dict(vae.config))
