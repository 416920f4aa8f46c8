"""kinema init-model: the untrained folders of kinema's own models are seeded, loadable and carry their kinema.json."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kinema.cli import main
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
    assert manifest["prediction_type"] == "v_prediction"
    # The folder says how its weights were made (a trained folder's kinema.json is copied from here).
    assert manifest["initialised_with"] == {"seed": 3, "vae": None, "scale_data": None, "layers": 6, "heads": 4,
                                            "patch_size": 2}


def test_the_default_dit_is_the_shipped_one_and_the_size_options_change_it(tmp_path, capsys):
    """init-model's default DiT has the bundled kinema-tiny's architecture; --layers, --heads and --patch-size make
    another that loads and generates (text states projected to the new width)."""
    from kinema.bundled import bundled_model_path
    from kinema.cli import main
    from kinema.pipelines.generation import generate
    from kinema.pipelines.load import load_family
    from kinema.pipelines.request import GenerationRequest

    def config(folder):
        found = json.loads((folder / "transformer" / "config.json").read_text())
        return {k: v for k, v in found.items() if not k.startswith("_")}

    assert config(write_initial_model("kinema-tiny", tmp_path / "default")) == config(bundled_model_path("kinema-tiny"))
    assert main(["init-model", "kinema-tiny", "--patch-size", "1", "--heads", "8", "--layers", "4",
                 "--out", str(tmp_path / "p1")]) == 0
    sized = config(tmp_path / "p1")
    assert (sized["patch_size"], sized["num_layers"], sized["num_attention_heads"], sized["cross_attention_dim"]) == (
        1, 4, 8, 256)
    modules = [(m["type"], m["num_attention_heads"]) for m in sized["motion_modules"]]
    assert modules == [("temporal", 8), ("hybrid", 8)] * 2
    for option, value in (("--heads", "100000"), ("--layers", "100000"), ("--layers", "0")):
        with pytest.raises(SystemExit) as usage:  # argparse's usage error, before any weights are made
            main(["init-model", "kinema-tiny", option, value, "--out", str(tmp_path / "huge")])
        assert usage.value.code == 2 and not (tmp_path / "huge").exists()
    family = load_family(tmp_path / "p1")
    video = generate(family, GenerationRequest(prompt="a red circle moving right", frames=8, steps=1, seeds=[0]),
                     progress=False).frames
    assert video.shape == (1, 8, 3, 64, 64) and torch.isfinite(video).all()


@pytest.mark.parametrize(("name", "size", "message"), [
    # Each setting is named as Python's key and as init-model's option, for callers of either.
    ("kinema-tiny-ad", {"heads": 8},
     r"heads \(--heads\) is kinema-tiny's setting; kinema-tiny-ad takes vae_downsample \(--vae-downsample\)"),
    ("kinema-tiny", {"vae_downsample": 4},
     r"vae_downsample \(--vae-downsample\) is kinema-tiny-ad's setting; kinema-tiny takes layers \(--layers\)"),
    ("kinema-tiny", {"width": 256},
     r"unknown kinema-tiny size setting 'width'; use layers \(--layers\), heads \(--heads\), "
     r"patch_size \(--patch-size\)"),
    ("kinema-tiny", {"layers": 1}, "at least 2 layers"),
    ("kinema-tiny", {"heads": 0}, r"heads \(--heads\) must be a whole number of at least 1, got 0"),
    ("kinema-tiny", {"patch_size": 3}, "patch size must be 1, 2 or 4"),
    ("kinema-tiny-ad", {"vae_downsample": 2}, "the image VAE's downsampling must be 4 or 8, got 2"),
])
def test_bad_sizes_write_nothing(tmp_path, name, size, message):
    with pytest.raises(KinemaError, match=message):
        write_initial_model(name, tmp_path / "out", size=size)
    assert not (tmp_path / "out").exists()


def test_kinema_tiny_ad_folder_predicts_the_velocity(tmp_path):
    from kinema.bundled import model_prediction_type

    folder = write_initial_model("kinema-tiny-ad", tmp_path / "ad")
    assert json.loads((folder / "kinema.json").read_text())["prediction_type"] == "v_prediction"
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert model_prediction_type(folder) == "v_prediction"


def test_the_image_vae_downsampling_option_sizes_the_vae_and_the_unet(tmp_path):
    """`--vae-downsample 4` gives kinema-tiny-ad a 3-level VAE (16x16 latents at 64x64) and a UNet whose sample_size
    says so; the folder loads and makes 64x64 video, its native size for eval; the default is the shipped layout."""
    from diffusers import AutoencoderKL

    from kinema.bundled import bundled_model_path
    from kinema.cli import main
    from kinema.eval.run import native_size
    from kinema.pipelines.generation import generate
    from kinema.pipelines.load import load_family
    from kinema.pipelines.request import GenerationRequest

    def config(folder, part):
        return {k: v for k, v in json.loads((folder / part / "config.json").read_text()).items()
                if not k.startswith("_") and k != "scaling_factor"}

    default = write_initial_model("kinema-tiny-ad", tmp_path / "default")
    for part in ("unet", "vae"):
        assert config(default, part) == config(bundled_model_path("kinema-tiny-ad"), part)
    assert main(["init-model", "kinema-tiny-ad", "--vae-downsample", "4", "--out", str(tmp_path / "ad4")]) == 0
    vae = AutoencoderKL.from_pretrained(tmp_path / "ad4" / "vae")
    assert vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 16, 16)
    assert config(tmp_path / "ad4", "unet")["sample_size"] == 16
    # The shipped motion modules fit: the UNet's widths are the same, only its latents are larger.
    family = load_family(tmp_path / "ad4",
                         motion_module=bundled_model_path("kinema-tiny-ad") / "motion_module.safetensors")
    assert native_size(family) == 64
    video = generate(family, GenerationRequest(prompt="a red circle moving right", frames=8, steps=1, seeds=[0]),
                     progress=False).frames
    assert video.shape == (1, 8, 3, 64, 64) and torch.isfinite(video).all()
    with pytest.raises(KinemaError, match="a trained VAE keeps the downsampling it was trained with"):
        write_initial_model("kinema-tiny-ad", tmp_path / "again", vae=tmp_path / "ad4" / "vae",
                            size={"vae_downsample": 4})


def test_scaling_factor_is_one_over_the_latent_std(tmp_path, synth_videos):
    from kinema.data.video_io import read_video
    from kinema.models.slice_vae import SliceVAE

    torch.manual_seed(0)
    vae = SliceVAE(**{**KINEMA_TINY_SLICE_VAE, "ch_mult": (1, 1, 1)}).eval()
    factor = latent_scaling_factor(vae, synth_videos, clips=2)
    entries = [e for e in json.loads((synth_videos / "metadata.json").read_text()) if e["type"] == "video"][:2]
    with torch.no_grad():
        means = [vae.encode(read_video(synth_videos / e["file_path"], max_frames=8).frames.permute(1, 0, 2, 3)[None])
                 .latent_dist.mean for e in entries]
    assert factor == pytest.approx(1 / torch.cat([m.flatten() for m in means]).std().item(), rel=1e-6)


def test_bad_requests():
    with pytest.raises(KinemaError, match="unknown model 'kinema-huge'"):
        write_initial_model("kinema-huge", "/nonexistent/x")


def test_the_vae_it_starts_from_is_an_input_it_never_writes_over(tmp_path):
    write_initial_model("kinema-tiny", tmp_path / "first")
    vae = tmp_path / "first" / "vae"
    for out, overwrite in ((vae / "inside", False), (tmp_path / "first", True)):  # in it, or the folder holding it
        with pytest.raises(KinemaError, match="input"):
            write_initial_model("kinema-tiny", out, vae=vae, overwrite=overwrite)
        assert main(["init-model", "kinema-tiny", "--out", str(out), "--vae", str(vae),
                     *(["--overwrite"] if overwrite else [])]) == 2
    assert not (vae / "inside").exists() and (vae / "config.json").is_file()


def exported_v3_folder(folder):
    """A stage export of the EasyAnimate family, as the DiT stage's final/model: transformer/, vae/, kinema.json and
    a kinema output manifest (the run's, which a bundle does not take along)."""
    from tiny_models import SMALLEST_SLICE_VAE, tiny_slice_vae, tiny_video_dit

    tiny_video_dit().save_pretrained(folder / "transformer")
    tiny_slice_vae(**SMALLEST_SLICE_VAE).save_pretrained(folder / "vae")
    (folder / "kinema.json").write_text(json.dumps({"name": "kinema-tiny", "family": "easyanimate"}))
    (folder / "kinema-output.json").write_text("{}")
    return folder


def test_bundle_stores_float16_that_the_loaders_read_as_float32(tmp_path):
    from safetensors import safe_open

    from kinema.loaders.easyanimate.transformer import load_video_dit
    from kinema.loaders.easyanimate.vae import load_slice_vae
    from kinema.models.initial import bundle_model

    source = exported_v3_folder(tmp_path / "export")
    notes = tmp_path / "NOTES.txt"
    notes.write_text("trained 2 steps\n")
    bundle = bundle_model(source, tmp_path / "bundle", extra={"NOTES.txt": notes})
    weights = [p.relative_to(source) for p in sorted(source.rglob("*.safetensors"))]
    assert len(weights) == 2
    for name in weights:
        original, stored = load_file(source / name), load_file(bundle / name)
        assert sorted(stored) == sorted(original)
        for key, tensor in original.items():
            assert stored[key].dtype == torch.float16
            assert torch.equal(stored[key], tensor.half())
        with safe_open(str(source / name), "pt") as before, safe_open(str(bundle / name), "pt") as after:
            assert after.metadata() == before.metadata()
    for name in ("kinema.json", "transformer/config.json", "vae/config.json"):
        assert (bundle / name).read_bytes() == (source / name).read_bytes()
    assert (bundle / "NOTES.txt").read_text() == "trained 2 steps\n"
    assert json.loads((bundle / "kinema-output.json").read_text())["kinema_output"] == "model"  # its own mark
    # The folder loader's calls (kinema.loaders.easyanimate.folder), in float32: the stored float16 values, upcast.
    dit = load_video_dit(bundle / "transformer", dtype=torch.float32)
    vae = load_slice_vae(bundle / "vae", torch_dtype=torch.float32)
    for model, part in ((dit, "transformer"), (vae, "vae")):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        loaded = model.state_dict()
        for key, tensor in load_file(bundle / part / "diffusion_pytorch_model.safetensors").items():
            assert torch.equal(loaded[key], tensor.float())


def test_bundle_refusals_leave_nothing(tmp_path):
    from safetensors.torch import save_file

    from kinema.models.initial import bundle_model

    source = exported_v3_folder(tmp_path / "export")
    out = tmp_path / "bundle"
    with pytest.raises(KinemaError, match="has no kinema.json: give a stage's exported final/model"):
        bundle_model(source / "vae", out)
    with pytest.raises(KinemaError, match=r"would take \d+\.\d MB, over the 0.01 MB .*largest: transformer/"):
        bundle_model(source, out, max_megabytes=0.01)
    with pytest.raises(KinemaError, match="already holds vae; bundle another name"):
        bundle_model(source, out, extra={"vae": source / "vae"})
    with pytest.raises(KinemaError, match="not a plain file or folder name"):
        bundle_model(source, out, extra={"sub/mm.safetensors": source / "kinema.json"})
    pickle = tmp_path / "mm.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(KinemaError, match="mm.ckpt is a pickle; a bundle holds safetensors only"):
        bundle_model(source, out, extra={"mm.ckpt": pickle})
    huge = tmp_path / "huge.safetensors"
    save_file({"w": torch.tensor([1.0, 1e6])}, str(huge))
    with pytest.raises(KinemaError, match="w holds values beyond float16's range; bundle with storage_dtype="):
        bundle_model(source, out, extra={"huge.safetensors": huge})
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["export", "huge.safetensors",
                                                                                "mm.ckpt"]
    assert load_file(bundle_model(source, out, extra={"huge.safetensors": huge}, storage_dtype=None)
                     / "huge.safetensors")["w"].dtype == torch.float32


def test_the_window_changes_no_output_within_it():
    """kinema-tiny's 4-latent-frame window: the frame encodings are sinusoids, so a model built with a longer table
    gives the same output on 4 frames from the same weights (the window can be set without retraining)."""
    from kinema.models.video_dit import VideoDiT

    torch.manual_seed(0)
    window = VideoDiT(**kinema_tiny_transformer()).eval()
    longer = kinema_tiny_transformer()
    longer["motion_modules"] = [{**spec, "max_frames": 64} for spec in longer["motion_modules"]]
    wide = VideoDiT(**longer).eval()
    wide.load_state_dict(window.state_dict(), strict=True)
    latents, timesteps, text = torch.randn(2, 12, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 32, 384)
    with torch.no_grad():
        assert torch.equal(window(latents, timesteps, text), wide(latents, timesteps, text))
    assert (window.max_frames, wide.max_frames) == (4, 64)


@pytest.mark.parametrize("name", ["kinema-tiny", "kinema-tiny-ad"])
def test_each_bundled_folder_is_what_its_manifest_says_bundle_model_wrote(name):
    """A bundled folder's kinema-output.json lists every file at its size: a hand edit (a new default in kinema.json)
    would otherwise make the next `bundle_model` refuse the folder as the user's work."""
    from kinema.bundled import bundled_model_path
    from kinema.fileio import _foreign_files

    folder = bundled_model_path(name)
    written = json.loads((folder / "kinema-output.json").read_text())["files"]
    assert written and _foreign_files(folder) == []
    assert all((folder / path).is_file() for path in written)


def test_a_vae_folder_without_weights_is_refused_before_anything_loads(tmp_path, capsys):
    from kinema.cli import main

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    for given, words in ((tmp_path / "none", "is not a VAE folder (no config.json)"),
                         (tmp_path / "vae", "holds a config.json but no weights (.safetensors): give the whole VAE "
                                            "folder")):
        assert main(["init-model", "kinema-tiny-ad", "--vae", str(given), "--out", str(tmp_path / "out")]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_vae_of_the_other_models_kind_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch):
    from kinema.cli import main
    from kinema.models.initial import write_initial_model

    for name in ("kinema-tiny", "kinema-tiny-ad"):
        write_initial_model(name, tmp_path / name)
    monkeypatch.setattr("kinema.models.initial.write_initial_model", lambda *a, **k: pytest.fail("loaded"))
    for model, other, vae_kind, wanted in (("kinema-tiny-ad", "kinema-tiny", "a SliceVAE", "an AutoencoderKL"),
                                           ("kinema-tiny", "kinema-tiny-ad", "an AutoencoderKL", "a SliceVAE")):
        vae = tmp_path / other / "vae"
        assert main(["init-model", model, "--vae", str(vae), "--out", str(tmp_path / "out")]) == 2
        assert f"{vae} is {vae_kind} (a {other} VAE), and {model} takes {wanted}: give the final/vae of a vae " \
               f"stage trained on a {model} folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # The library refuses it as the command does (it failed in diffusers: "SpatialTemporalDownBlock3D does not exist").
    with pytest.raises(KinemaError, match=r"vae is a SliceVAE \(a kinema-tiny VAE\), and kinema-tiny-ad takes an "
                                          r"AutoencoderKL"):
        write_initial_model("kinema-tiny-ad", tmp_path / "api", vae=tmp_path / "kinema-tiny" / "vae")
    assert not (tmp_path / "api").exists()
