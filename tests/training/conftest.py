"""Tiny models and data on disk for the trainer's tests: an SD1.5 folder with a v3 motion module (AnimateDiff), a
V3 InP folder (EasyAnimate) and a synthetic motion dataset, each written once per test session."""

from pathlib import Path

import pytest
import yaml

from kinema.data.synth import write_synth_dataset


@pytest.fixture(scope="session")
def sd_model(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD1.5 diffusers folder and a v3 motion module made for it."""
    from tiny_sd import tiny_sd_parts, write_motion_module, write_sd_folder

    root = tmp_path_factory.mktemp("sd")
    return {"path": write_sd_folder(root / "sd", tiny_sd_parts()),
            "motion_module": write_motion_module(root / "mm.safetensors", version="v3")}


@pytest.fixture(scope="session")
def v3_model(tmp_path_factory) -> Path:
    """A tiny EasyAnimate V3 InP folder (with its CLIP image encoder)."""
    from tiny_easyanimate import source_model, write_full_folder

    root = tmp_path_factory.mktemp("v3") / "model"
    write_full_folder(root, source_model())
    return root


@pytest.fixture(scope="session")
def synth_videos(tmp_path_factory) -> Path:
    """Four 8-frame 32x32 synthetic clips and two images."""
    root = tmp_path_factory.mktemp("data") / "synth"
    write_synth_dataset(root, n=6, seed=0, frames=8, size=32, image_fraction=0.34)
    return root


@pytest.fixture(scope="session")
def one_clip(tmp_path_factory) -> Path:
    """One 8-frame 32x32 synthetic clip: what an overfit check memorises."""
    root = tmp_path_factory.mktemp("one") / "synth"
    write_synth_dataset(root, n=1, seed=0, frames=8, size=32)
    return root


def write_config(folder: Path, **sections) -> Path:
    """A config YAML in `folder` from keyword sections (mode=..., data={...}, ...)."""
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path
