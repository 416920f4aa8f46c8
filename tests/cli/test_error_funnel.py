"""One error funnel: every OS and library error reaches the user as one line that names the user's path and the
cause, never a temporary name, never a raw exception type alone, never cut mid-word."""

from __future__ import annotations

import errno
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from loaders.animatediff.animatediff_fixtures import original_motion_state_dict
from test_output_policy import snapshot

import kinema.loaders.checkpoint_io as checkpoint_io
from kinema.cli import main
from kinema.errors import KinemaError, library_error_message, os_error_message, shorten
from kinema.fileio import read_json
from kinema.loaders.checkpoint_io import read_state_dict, write_state_dict


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture
def motion_module(tmp_path) -> Path:
    path = tmp_path / "mm.safetensors"
    write_state_dict(original_motion_state_dict("v2"), path)
    return path


def one_line_without_temporaries(err: str) -> None:
    assert err.count("\n") == 1, err
    assert ".kinema-part-" not in err and ".kinema-old-" not in err and ".tmp" not in err
    assert "Traceback" not in err


def mounted_tmpfs(folder, options: str):
    """A real tmpfs mounted at `folder` with `options`, unmounted afterwards; the test is skipped where mounting is
    not allowed."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), so that a write runs out of space as it would on a full disk."""
    yield from mounted_tmpfs(tmp_path / "tiny_disk", "size=256k")


@pytest.fixture
def read_only_disk(tmp_path):
    """A real read-only file system (a tmpfs mounted ro), where even removing a missing name fails with EROFS."""
    yield from mounted_tmpfs(tmp_path / "read_only", "ro,size=64k")


def test_a_read_only_disk_is_one_line_naming_the_output(capsys, motion_module, read_only_disk):
    convert = ["convert", str(motion_module), str(read_only_disk / "adapter"), "--to", "diffusers"]
    synth = ["data", "synth", "--out", str(read_only_disk / "set"), "--n", "1", "--frames", "2", "--size", "16"]
    for args, target in ((convert, read_only_disk / "adapter"), (synth, read_only_disk / "set")):
        code, err = run(capsys, *args)
        assert code == 2  # refused by the output check, before anything is read or rendered
        one_line_without_temporaries(err)
        assert f"cannot write {target}: the file system is read-only" in err


@pytest.mark.parametrize(("name", "layout"), [("mm.safetensors", "kinema"), ("mm.ckpt", "original"),
                                              ("adapter", "diffusers")])
def test_full_disk_is_one_line_naming_the_output(tmp_path, capsys, motion_module, tiny_disk, name, layout):
    assert motion_module.stat().st_size > 300_000  # more than the disk holds
    target = tiny_disk / name
    code, err = run(capsys, "convert", str(motion_module), str(target), "--to", layout)
    assert code == 1
    one_line_without_temporaries(err)
    assert f"cannot write {target}" in err and "disk" in err and "full" in err
    assert list(tiny_disk.iterdir()) == []


def test_enospc_from_any_writer_names_the_target_not_the_temporary(tmp_path, monkeypatch):
    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_io, "save_file", full)
    with pytest.raises(KinemaError) as caught:
        write_state_dict({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert str(caught.value) == f"cannot write {tmp_path / 'w.safetensors'}: the disk is full; free some space or " \
                                "write somewhere else"
    assert list(tmp_path.iterdir()) == []


def test_torch_enforce_fail_on_a_full_disk_becomes_one_line(tmp_path, monkeypatch):
    def enforce_fail(obj, path):
        Path(path).write_bytes(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", enforce_fail)
    with pytest.raises(KinemaError, match=r"cannot write .*w\.ckpt: writing the file failed \(the disk is probably "
                                          r"full\)"):
        write_state_dict({"a": torch.zeros(2)}, tmp_path / "w.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_torch_zip_is_not_called_a_full_disk(tmp_path):
    """torch's zip reader fails "at inline_container" too; only its writer's failures there mean a full disk."""
    from kinema.errors import is_disk_full

    torch.save({"a": torch.zeros(2)}, tmp_path / "two.ckpt")
    with zipfile.ZipFile(tmp_path / "two.ckpt") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(tmp_path / "two.ckpt", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("zz/data.pkl", next(data for name, data in members.items() if name.endswith("data.pkl")))
    with pytest.raises(KinemaError) as refused:
        read_state_dict(tmp_path / "two.ckpt")
    assert "not a readable torch checkpoint" in str(refused.value) and "disk" not in str(refused.value)
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 240064 vs 240016"))


def test_permission_denied_names_the_users_folder(tmp_path, capsys, motion_module, monkeypatch):
    real_mkdir = os.mkdir

    def denied(path, *args, **kwargs):
        if ".kinema-part-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", denied)
    before = snapshot(tmp_path)
    code, err = run(capsys, "convert", str(motion_module), str(tmp_path / "adapter"), "--to", "diffusers")
    assert code == 1
    one_line_without_temporaries(err)
    assert f"cannot write {tmp_path / 'adapter'}: permission denied" in err
    assert snapshot(tmp_path) == before


def test_a_file_where_a_folder_is_needed(tmp_path, capsys, motion_module):
    (tmp_path / "models").write_text("a file")
    code, err = run(capsys, "convert", str(motion_module), str(tmp_path / "models" / "mm.safetensors"), "--to",
                    "kinema")
    assert code == 2
    one_line_without_temporaries(err)
    assert f"{tmp_path / 'models'} is a file, not a folder" in err


@pytest.mark.parametrize(("text", "where"), [('{"a": 1,}', "line 1 column 9"),
                                             ('{\n  "a": 1\n  "b": 2\n}', "line 3 column 3"),
                                             ("", "line 1 column 1")])
def test_bad_json_names_the_file_line_and_column(tmp_path, text, where):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(KinemaError, match=rf"config\.json \(the model's config\) is not valid JSON at {where}: "):
        read_json(path, "the model's config")


def test_json_edge_cases_get_their_own_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"ok": true}')  # a byte-order mark, as Windows editors write
    assert read_json(path) == {"ok": True}
    path.write_bytes(b"\x00\x01\xff\xfe binary")
    with pytest.raises(KinemaError, match="is not a text file, so it cannot be JSON"):
        read_json(path)
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n")
    with pytest.raises(KinemaError, match="is a Git LFS pointer"):
        read_json(path)
    with pytest.raises(KinemaError, match=f"cannot read {tmp_path / 'missing.json'}: no such file or folder"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(KinemaError, match=f"cannot read {tmp_path}: it is a folder, not a file"):
        read_json(tmp_path)


def test_a_motion_adapter_folder_with_broken_config_names_it(tmp_path, capsys, motion_module):
    folder = tmp_path / "adapter"
    assert run(capsys, "convert", str(motion_module), str(folder), "--to", "diffusers")[0] == 0
    (folder / "config.json").write_text('{"_class_name": "MotionAdapter",\n  "block_out_channels": [32, 64,]\n}')
    code, err = run(capsys, "inspect", str(folder))
    assert code == 1
    one_line_without_temporaries(err)
    assert f"{folder / 'config.json'}" in err and "not valid JSON at line 2 column" in err


def test_unexpected_library_errors_are_one_line_cut_at_a_word(tmp_path, capsys, monkeypatch, motion_module):
    import kinema.loaders.source as inspect_module

    long = "tensor shape mismatch while copying " * 40 + f"in {tmp_path}/.mm.safetensors.kinema-part-123 at end"

    def broken(path):
        raise RuntimeError(long)

    monkeypatch.setattr(inspect_module, "describe", broken)
    code, err = run(capsys, "inspect", str(motion_module))
    assert code == 1
    one_line_without_temporaries(err)
    message = err.removeprefix("kinema inspect: error: ").removesuffix(" (rerun with --debug for details)\n")
    assert message.startswith("RuntimeError: tensor shape mismatch") and message.endswith(" …")
    assert message.split()[-2] in long.split()  # whole words only
    assert len(message) <= 310


def test_os_errors_the_cli_did_not_foresee_name_the_path_and_cause(capsys, monkeypatch, motion_module):
    import kinema.loaders.source as inspect_module

    for error, cause in ((IsADirectoryError(errno.EISDIR, "Is a directory", "/data/x/.a.kinema-part-7"),
                          "/data/x/a: it is a folder, not a file"),
                         (FileExistsError(errno.EEXIST, "File exists", "/data/out"), "/data/out: it already exists"),
                         (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/o"),
                          "/mnt/ro/o: the file system is read-only"),
                         # no path to name: the cause alone, not "error: error: ..."
                         (OSError("Cannot find empty port in range: 7860-7860"),
                          "Cannot find empty port in range: 7860-7860")):
        def broken(path, error=error):
            raise error

        monkeypatch.setattr(inspect_module, "describe", broken)
        code, err = run(capsys, "inspect", str(motion_module))
        assert code == 1
        one_line_without_temporaries(err)
        assert err.startswith(f"kinema inspect: error: {cause}"), err
        assert ": error: error" not in err


def test_shorten_and_messages_never_cut_mid_word():
    text = "alpha beta gamma " * 50
    cut = shorten(text, 60)
    assert cut.endswith(" …") and all(word in ("alpha", "beta", "gamma", "…") for word in cut.split())
    assert shorten("short message", 60) == "short message"
    assert library_error_message(ValueError("x\n  y")) == "ValueError: x y"
    assert os_error_message(OSError(errno.ENOSPC, "No space"), "/a/b", "write") == \
        "cannot write /a/b: the disk is full; free some space or write somewhere else"
