"""kinema-tiny-ad's recipe end to end (configs/train/kinema-tiny-ad-*.yaml at toy size): init-model, the VAE stage,
init-model with the trained VAE and its measured scale, the image stage, the motion stage on its export,
`bundle_model`, then `kinema generate` and `kinema eval` on the bundle. And the agreement that makes it work: the
motion stage's fresh modules and the loader's inflation read the same kinema.json "motion" settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from tiny_models import TINY_UNET

from kinema.cli import main
from kinema.errors import KinemaError
from kinema.models.initial import bundle_model, write_initial_model
from kinema.models.presets import KINEMA_TINY_AD_MOTION
from kinema.models.video_unet import VideoUNet
from kinema.training.config import load_config
from kinema.training.trainer import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


def stage_config(stage: str, tmp_path: Path, model: Path, data: Path, **overrides: object):
    """The stage's shipped config, shrunk: 2 steps of 2 samples at 32x32, every path under `tmp_path`."""
    return load_config(CONFIGS / f"kinema-tiny-ad-{stage}.yaml", {
        "output": str(tmp_path / stage), "model.path": str(model), "data.root": str(data),
        "data.size": [32, 32], "train.steps": 2, "train.batch_size": 2, "train.warmup_steps": 0,
        "log.every": 1, "log.tensorboard": False, **overrides})


def motion_heads(video_unet: torch.nn.Module) -> set[int]:
    """The head counts of every attention inside the motion modules."""
    return {module.heads for _, motion in video_unet.motion_modules() for module in motion.modules()
            if hasattr(module, "heads")}


@pytest.mark.slow
def test_recipe_from_init_to_generate_and_eval(tmp_path, synth_videos, capsys):
    write_initial_model("kinema-tiny-ad", tmp_path / "init")
    vae_run = train(stage_config("vae", tmp_path, tmp_path / "init", synth_videos), progress=False)
    assert main(["init-model", "kinema-tiny-ad", "--vae", str(vae_run.final / "vae"), "--scale-data",
                 str(synth_videos), "--out", str(tmp_path / "image-start")]) == 0
    image_run = train(stage_config("image", tmp_path, tmp_path / "image-start", synth_videos,
                                   **{"data.cache": str(tmp_path / "cache")}), progress=False)
    image_model = image_run.final / "model"
    assert sorted(p.name for p in image_model.iterdir()) == ["kinema.json", "scheduler", "unet", "vae"]
    motion_run = train(stage_config("motion", tmp_path, image_model, synth_videos,
                                    **{"data.cache": str(tmp_path / "cache"), "data.frames": 8}), progress=False)
    trained = motion_run.task.model
    assert motion_heads(trained) == {KINEMA_TINY_AD_MOTION["motion_module"]["num_attention_heads"]}

    motion_file = motion_run.final / "motion_module.safetensors"
    bundle = bundle_model(image_model, tmp_path / "bundle", extra={"motion_module.safetensors": motion_file})
    stored = load_file(bundle / "motion_module.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}

    from kinema.pipelines.load import load_family

    family = load_family(bundle)
    assert family.prediction_type == motion_run.task.family.prediction_type == "v_prediction"
    assert motion_heads(family.model) == motion_heads(trained)
    assert family.model.config.motion_module["norm_mode"] == KINEMA_TINY_AD_MOTION["motion_module"]["norm_mode"]
    # The loaded weights are the motion stage's export (its EMA weights), rounded to float16, read back as float32.
    exported = {name: tensor for name, tensor in load_file(motion_file).items() if not name.endswith(".pe")}
    loaded = family.model.motion_state_dict()
    assert sorted(loaded) == sorted(exported)
    for name, tensor in exported.items():
        assert loaded[name].dtype == torch.float32
        torch.testing.assert_close(loaded[name], tensor.half().float(), rtol=0, atol=0)

    video = tmp_path / "red.mp4"
    assert main(["generate", "a red circle moving right", "--model", str(bundle), "--steps", "2", "--frames", "8",
                 "-o", str(video), "--quiet"]) == 0
    assert video.is_file()
    capsys.readouterr()
    assert main(["eval", "--model", str(bundle), "--limit", "2", "--steps", "2", "--frames", "8",
                 "--no-continuation", "--json", "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["per_prompt"]) == 2


# The prompt-reading modules (AnimateDiff's Temporal_Cross; kinema-tiny-ad's) and published modules' two temporal
# attentions, as a kinema.json "motion" entry names them.
TEXT_ATTENTIONS = {"attention_kinds": ["temporal", "text", "temporal"], "cross_attention_dim": 384}
PLAIN_ATTENTIONS = {"attention_kinds": ["temporal", "temporal"], "cross_attention_dim": None}


@pytest.mark.parametrize("attentions", [PLAIN_ATTENTIONS, TEXT_ATTENTIONS], ids=["temporal", "text"])
def test_fresh_motion_modules_and_the_loader_read_the_same_settings(tmp_path, synth_videos, attentions):
    from kinema.loaders import describe
    from kinema.loaders.animatediff.write import save_motion_module
    from kinema.pipelines.load import load_family
    from kinema.training.tasks import load_training_family

    model = write_initial_model("kinema-tiny-ad", tmp_path / "model")
    manifest = json.loads((model / "kinema.json").read_text())
    assert manifest["motion"]["num_attention_heads"] == 4
    manifest["motion"].update(attentions)
    (model / "kinema.json").write_text(json.dumps(manifest))
    trained = load_training_family(stage_config("motion", tmp_path, model, synth_videos)).model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking modules (fresh ones are identities, whatever their heads)
        for _, motion in trained.motion_modules():
            for parameter in motion.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    module = save_motion_module(trained, model / "motion_module.safetensors", "original")
    # What the file alone says: its names read as SDXL's beta (3 levels; 8 heads, norms across frames, to other
    # tools), and the settings kinema stored in its metadata, as it was trained.
    report = describe(module)
    assert (report["version"], report["num_attention_heads"], report["norm_mode"]) == ("sdxl-beta", 4, "per_frame")
    assert report["settings_source"] == "the file's metadata"
    as_ckpt = save_motion_module(trained, tmp_path / "motion_module.ckpt", "original")
    assert describe(as_ckpt)["num_attention_heads"] == 8  # a .ckpt has no metadata: the names alone, a preset
    assert report.get("attention_kinds", ["temporal", "temporal"]) == attentions["attention_kinds"]
    loaded = load_family(model).model
    assert motion_heads(loaded) == motion_heads(trained) == {4}
    assert {module.takes_text for _, module in loaded.motion_modules()} == {attentions == TEXT_ATTENTIONS}
    latents = torch.randn(1, 4, 8, 4, 4, generator=generator)  # (B, C, F, h, w)
    text = torch.randn(1, 32, 384, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        expected, found = (unet(latents, timestep, encoder_hidden_states=text) for unet in (trained.eval(), loaded))
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


def test_motion_settings_entry_is_checked(tmp_path):
    from kinema.pipelines.load import model_motion_settings

    assert model_motion_settings(tmp_path) is None  # no kinema.json: AnimateDiff's version presets apply
    settings = {"max_frames": 32, "mid_block": False, "transformer_blocks": 1, "num_attention_heads": 4,
                "norm_num_groups": 32, "norm_mode": "per_frame", "resnet_norm_mode": "per_frame"}
    (tmp_path / "kinema.json").write_text(json.dumps({"motion": {**settings, **TEXT_ATTENTIONS}}))
    assert model_motion_settings(tmp_path) == KINEMA_TINY_AD_MOTION
    # An entry written before the attentions were named (the published layout's two temporal ones) still reads.
    (tmp_path / "kinema.json").write_text(json.dumps({"motion": settings}))
    plain = model_motion_settings(tmp_path)
    assert "attention_kinds" not in plain["motion_module"]
    video_unet = VideoUNet.from_unet2d(UNet2DConditionModel(**TINY_UNET), **plain)
    assert not any(module.takes_text for _, module in video_unet.motion_modules())
    bad = {"heads": ({**settings, "heads": 4}, "unknown: heads"),
           "missing": ({k: v for k, v in settings.items() if k != "max_frames"}, "missing: max_frames"),
           "norm": ({**settings, "norm_mode": "per_clip"}, "norm_mode must be 'per_frame' or 'across_frames'"),
           "count": ({**settings, "num_attention_heads": 0}, "num_attention_heads must be a positive whole number"),
           "list": ([4], "must be an object"),
           "kinds": ({**settings, "attention_kinds": ["temporal", "global"]}, "attention_kinds must be a list of"),
           "width": ({**settings, "cross_attention_dim": 0}, "cross_attention_dim must be null or")}
    for entry, message in bad.values():
        (tmp_path / "kinema.json").write_text(json.dumps({"motion": entry}))
        with pytest.raises(KinemaError, match=message):
            model_motion_settings(tmp_path)


def test_a_module_without_the_text_attentions_its_folder_names_is_refused(tmp_path, synth_videos):
    from kinema.loaders.animatediff.write import save_motion_module
    from kinema.pipelines.load import load_family
    from kinema.training.tasks import load_training_family

    model = write_initial_model("kinema-tiny-ad", tmp_path / "model")
    manifest = json.loads((model / "kinema.json").read_text())
    assert {key: manifest["motion"][key] for key in TEXT_ATTENTIONS} == TEXT_ATTENTIONS  # kinema-tiny-ad's own
    manifest["motion"].update(PLAIN_ATTENTIONS)
    (model / "kinema.json").write_text(json.dumps(manifest))
    plain = load_training_family(stage_config("motion", tmp_path, model, synth_videos)).model
    save_motion_module(plain, model / "motion_module.safetensors", "original")
    manifest["motion"].update(TEXT_ATTENTIONS)
    (model / "kinema.json").write_text(json.dumps(manifest))
    with pytest.raises(KinemaError, match=r"has attention_kinds=\['temporal', 'temporal'\] but .*kinema.json names "
                                          r"attention_kinds=\['temporal', 'text', 'temporal'\]: use a motion module"):
        load_family(model)
