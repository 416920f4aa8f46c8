"""kinema.ui.models: the pickers' scan of a models folder, against a folder whose every entry is known by
construction."""

import os

from tiny_sd import (
    tiny_sd_parts,
    write_domain_adapter,
    write_kohya_lora,
    write_motion_lora,
    write_motion_module,
    write_sd_folder,
)

from kinema.ui.models import scan_models

# Both models ship in the package, the default first.
BUNDLED = [("kinema-tiny (bundled)", "kinema-tiny"), ("kinema-tiny-ad (bundled)", "kinema-tiny-ad")]


def test_the_scan_sorts_a_models_folder_into_models_motion_modules_and_loras(tmp_path):
    root = tmp_path / "models"
    parts = tiny_sd_parts()
    write_sd_folder(root / "Stable-diffusion" / "tiny-sd", parts)
    write_motion_module(root / "mm_tiny_v3.safetensors", version="v3")
    write_domain_adapter(root / "Lora" / "v3_sd15_adapter.ckpt", parts["unet"])
    write_motion_lora(root / "Lora" / "zoom_in.safetensors")
    write_kohya_lora(root / "Lora" / "style.safetensors")
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(16, 32)).save_pretrained(
        root / "ControlNet" / "control_tiny")
    (root / "broken.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    (root / "notes.txt").write_text("not weights")
    (root / ".cache").mkdir()
    write_motion_module(root / ".cache" / "hidden.safetensors")

    found = scan_models(root)

    assert found.models == [*BUNDLED,
                            ("Stable-diffusion/tiny-sd/", str(root.resolve() / "Stable-diffusion" / "tiny-sd"))]
    assert found.motion_modules == [("mm_tiny_v3.safetensors", str(root.resolve() / "mm_tiny_v3.safetensors"))]
    assert found.loras == [("Lora/style.safetensors", str(root.resolve() / "Lora" / "style.safetensors")),
                           ("Lora/v3_sd15_adapter.ckpt", str(root.resolve() / "Lora" / "v3_sd15_adapter.ckpt")),
                           ("Lora/zoom_in.safetensors", str(root.resolve() / "Lora" / "zoom_in.safetensors"))]
    assert found.controlnets == [("ControlNet/control_tiny/", str(root.resolve() / "ControlNet" / "control_tiny"))]
    assert [label for label, _ in found.skipped] == ["broken.safetensors"]
    assert "LFS" in found.skipped[0][1] or "pointer" in found.skipped[0][1]
    # A link back to a folder above listed everything again once per level.
    (root / "Lora" / "again").symlink_to(root)
    assert scan_models(root) == found


def test_without_a_models_folder_the_bundled_models_are_offered(tmp_path):
    assert scan_models(None).models == BUNDLED
    assert scan_models(tmp_path / "missing").models == BUNDLED


def test_a_file_changed_since_the_last_scan_is_described_again(tmp_path):
    path = write_motion_module(tmp_path / "mm.safetensors", version="v3")
    assert scan_models(tmp_path).motion_modules
    write_kohya_lora(path)
    os.utime(path, ns=(1, 1))  # a new time stamp even on a coarse clock
    found = scan_models(tmp_path)
    assert not found.motion_modules and found.loras == [("mm.safetensors", str(path.resolve()))]


def test_the_scan_note_counts_in_words():
    from kinema.ui.app import _scan_note
    from kinema.ui.models import ModelChoices

    one = ModelChoices(models=[("kinema-tiny", "kinema-tiny")], loras=[("a", "/a"), ("b", "/b")])
    assert _scan_note(one, None) == "Models folder: no models folder — 1 model, 0 motion modules, 2 LoRAs."
    one.controlnets = [("cn", "/cn")]  # counted only when the folder has some, as few do
    assert _scan_note(one, None).endswith("2 LoRAs, 1 ControlNet.")
