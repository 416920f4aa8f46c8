"""The training config: defaults, every key checked, one line per mistake, overrides and paths."""

import os

import pytest
import yaml

from kinema.errors import KinemaError
from kinema.training.config import (
    MODES,
    TrainConfig,
    config_from_dict,
    load_config,
    resume_identity,
    with_new_defaults,
)

BASE = {"mode": "motion", "output": "runs/a", "model": {"path": "sd"}, "data": {"root": "data"}}


def config(**changes) -> TrainConfig:
    values = {key: dict(value) if isinstance(value, dict) else value for key, value in BASE.items()}
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            values.setdefault(section, {})[key] = value
        else:
            values[section] = value
    return config_from_dict(values)


def test_defaults_fill_what_the_file_leaves_out():
    made = config()
    assert made.train.steps == 1000 and made.train.batch_size == 1 and made.data.frames == 16
    assert made.data.size == [64, 64] and made.lora.targets == "motion" and made.checkpoint.keep == 3
    assert made.global_batch == 1


@pytest.mark.parametrize("changes, message", [
    ({"mode": "dance"}, "unknown mode 'dance'; choose one of: motion"),
    ({"mode": ""}, "no mode given"),
    ({"train__setps": 3}, "unknown config key train.setps; did you mean train.steps?"),
    ({"train__zzz": 3}, "unknown config key train.zzz; known keys here: steps"),
    ({"trian": {}}, "unknown config key trian; did you mean train?"),
    ({"train__steps": "many"}, "config key train.steps must be a whole number, got 'many'"),
    ({"train__steps": 0}, "config key train.steps must be at least 1, got 0"),
    ({"train__steps": True}, "config key train.steps must be a whole number"),
    ({"vae__kl_weight": float("inf")}, "config key vae.kl_weight must be a finite number, got inf"),
    ({"vae__temporal_weight": "inf"}, "config key vae.temporal_weight must be a finite number"),
    ({"train__max_grad_norm": float("nan")}, "config key train.max_grad_norm must be a finite number"),
    ({"train__adam_betas": [0.9, float("inf")]}, "config key train.adam_betas[1] must be a finite number"),
    ({"data__size": [30, 64]}, "data.size must be [height, width], multiples of 8"),
    ({"data__size": [8, 100000]}, "multiples of 8 (the VAE's downscale) up to 4096, got [8, 100000]"),
    ({"data__buckets": []}, "data.buckets is empty; list [height, width, frames] buckets, or leave it out"),
    ({"seed": 2**32}, "config key seed must be from 0 to 2**32 - 1 (4294967295), got 4294967296"),
    ({"seed": -1}, "config key seed must be from 0 to 2**32 - 1 (4294967295), got -1"),
    ({"validation__seed": 2**64}, f"config key validation.seed must be from 0 to 2**64 - 1, got {2**64}"),
    ({"data__text_dropout": 1.5}, "data.text_dropout is a fraction in [0, 1]"),
    ({"train__lr_schedule": "step"}, "unknown train.lr_schedule 'step'"),
    ({"mode": "lora", "train__trainable_modules": ["proj_out"]}, "train.trainable_modules is for modes full and "
     "motion"),
    ({"train__trainable_modules": [""]}, "train.trainable_modules must be a list of non-empty names"),
    ({"lora__targets": "everything"}, "unknown lora.targets 'everything'"),
    ({"validation__every": 5}, "validation.prompts is empty"),
    ({"validation__steps": 0}, "config key validation.steps must be at least 1, got 0"),
    ({"validation__frames": 0}, "config key validation.frames must be from 1 to 1024 (or null for data.frames)"),
    ({"validation__frames": 100000}, "config key validation.frames must be from 1 to 1024 (or null for data.frames)"),
    ({"validation__guidance": 0.5}, "config key validation.guidance must be at least 1"),
    ({"validation__every": 5, "validation__prompts": ["a cat"], "validation__steps": 900},
     "validation: steps must be at most 500"),
    ({"validation__every": 5, "validation__prompts": ["a cat"], "validation__guidance": 1e6},
     "validation: guidance must be a finite number from 1 to 100"),
    ({"train__adam_eps": -1.0}, "config key train.adam_eps must be > 0, got -1.0"),
    ({"train__weight_decay": -5.0}, "config key train.weight_decay must be >= 0, got -5.0"),
    ({"data__num_workers": -1}, "config key data.num_workers must be >= 0"),
    ({"train": 3}, "config key train must be a mapping"),
    ({"output": ""}, "no output folder"),
    ({"mode": "vae", "train__gradient_checkpointing": True}, "the Slice VAE has no gradient checkpointing"),
    ({"mode": "vae", "validation__every": 2, "validation__prompts": ["x"]}, "mode vae makes no validation videos"),
    ({"train__snr_gamma": 0}, "train.snr_gamma must be a positive number (5 in the Min-SNR paper"),
    ({"mode": "vae", "train__snr_gamma": 5}, "train.snr_gamma weights the denoising loss; mode vae trains a VAE"),
    ({"train__timesteps": "logit_normal", "train__logit_std": 0.0}, "train.logit_std a positive one, got 0.0 and 0.0"),
    ({"train__timesteps": "uniform", "train__logit_mean": -1.0}, "train.logit_mean and train.logit_std shape the "
                                                                  "logit-normal timestep draw; add train.timesteps: "
                                                                  "logit_normal"),
    ({"mode": "vae", "train__logit_mean": -1.0}, "train.logit_mean and train.logit_std shape the logit-normal"),
    ({"mode": "vae", "vae__temporal_weight": -0.5}, "vae.temporal_weight must be >= 0 (0 turns it off), got -0.5"),
    ({"data__decode_timeout": 0}, "data.decode_timeout is the seconds a file may take to decode, above 0 (or null"),
    ({"data__buckets": [[30, 32, 4]]}, "each of data.buckets is [height, width, frames], height and width multiples "
                                       "of 8"),
])
def test_each_mistake_is_one_line_naming_the_key(changes, message):
    with pytest.raises(KinemaError) as caught:
        config(**changes)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_every_mode_is_offered_in_the_refusal():
    with pytest.raises(KinemaError) as caught:
        config(mode="x")
    assert all(mode in str(caught.value) for mode in MODES)


def test_numbers_yaml_reads_as_text_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mode: lora\noutput: runs/x\nmodel: {path: m}\ndata: {root: d}\ntrain: {learning_rate: 1e-4}\n")
    assert load_config(path).train.learning_rate == pytest.approx(1e-4)


def test_overrides_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    made = load_config(path, {"train.steps": 7, "lora.rank": 2})
    assert made.train.steps == 7 and made.lora.rank == 2
    assert made.output == os.path.join(str(tmp_path), "runs", "a") and os.path.isabs(made.model.path)
    with pytest.raises(KinemaError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(KinemaError, match=r"is a folder; give the config file in it \(a .yaml or .json file\)$"):
        load_config(tmp_path)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(KinemaError, match=r"empty.yaml is empty: write the run's settings in it \(mode, model.path"):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("mode: [\n")
    with pytest.raises(KinemaError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    # YAML keeps the last of two `data:` sections, dropping the first's settings without a word.
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump(BASE) + "data: {frames: 8}\n")
    with pytest.raises(KinemaError, match=r"twice.yaml is not valid YAML \(key 'data' is given twice; give each key "
                                          r"once at line \d+ column 1\); fix the file there"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(KinemaError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_a_bundled_model_name_is_its_folder_and_a_path_still_wins(tmp_path, monkeypatch):
    """model.path takes a bundled model's name, as --model does (to continue training the shipped weights)."""
    from kinema.bundled import bundled_model_path

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    made = load_config(path, {"model.path": "kinema-tiny"})
    assert made.model.path == os.path.abspath(bundled_model_path("kinema-tiny"))
    (tmp_path / "kinema-tiny").mkdir()  # a folder of that name where the command runs is what the user means
    assert load_config(path, {"model.path": "kinema-tiny"}).model.path == str(tmp_path / "kinema-tiny")


def test_resume_identity_ignores_length_and_observation_only():
    base = resume_identity(config())
    assert resume_identity(config(train__steps=5, log__every=1, checkpoint__keep=9, data__num_workers=2)) == base
    assert resume_identity(config(train__learning_rate=1e-3)) != base
    assert resume_identity(config(data__frames=8)) != base
    # A decaying schedule is stretched by the run's length, so there steps are part of the run's identity.
    linear = resume_identity(config(train__lr_schedule="linear"))
    assert resume_identity(config(train__lr_schedule="linear", train__steps=5)) != linear


def test_a_run_from_before_a_setting_existed_still_matches_at_its_default():
    from kinema.training.checkpoint import config_differences, fingerprint

    now = resume_identity(config())
    older = {name: dict(v) if isinstance(v, dict) else v for name, v in now.items()}
    del older["vae"]["adversarial_weight"], older["vae"]["adversarial_start"]
    assert fingerprint(older) != fingerprint(now)
    assert fingerprint(with_new_defaults(older)) == fingerprint(now)
    changed = resume_identity(config(vae__adversarial_weight=0.5))
    assert config_differences(with_new_defaults(older), changed) == ["vae.adversarial_weight: 0.0 -> 0.5"]


def test_settings_the_mode_does_not_read_are_said(caplog):
    with caplog.at_level("WARNING", logger="kinema.training.config"):
        config(lora__rank=64, vae__kl_weight=0.5)  # mode motion
        config(train__lr_schedule="constant", train__warmup_steps=100)
        config(mode="lora", lora__rank=64, train__warmup_steps=100)  # read: nothing said
        # Said, not refused: a run started with it resumes only with its own config.
        assert config(train__trainable_modules=[]).train.trainable_modules == []
        config(train__warmup_steps=3, train__steps=3)
        config(validation__prompts=["a cat"])
        # Left to the model's recipe (EasyAnimate V3 draws logit-normally): checked once the model is read.
        assert config(train__logit_mean=-0.5).train.logit_mean == -0.5
    assert [record.getMessage() for record in caplog.records] == [
        "lora.rank is a setting of mode lora, and mode motion does not read it",
        "vae.kl_weight is a setting of mode vae, and mode motion does not read it",
        "train.warmup_steps warms up a schedule with a warm-up, and train.lr_schedule constant has none: it changes "
        "nothing (constant_with_warmup has one)",
        "train.trainable_modules is an empty list, read as null: the default set trains; list the parts to train with "
        "the motion modules (mode motion) or of the transformer (mode full), or write null",
        "train.warmup_steps (3) is not below train.steps (3): the learning rate never reaches train.learning_rate; "
        "lower the warm-up or raise the steps",
        "validation.prompts are listed but validation.every is 0, so no validation videos are made; set "
        "validation.every to render them every that many steps"]
