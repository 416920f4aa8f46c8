"""The output policy (kinema.fileio): kinema never deletes or overwrites what it did not write.

Each case is one the reliability audit reproduced against `kinema convert` and `kinema data synth`; every refusal is
one line, exit 2, and leaves the file system exactly as it was.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from loaders.animatediff.animatediff_fixtures import original_motion_state_dict
from safetensors import safe_open

from kinema.cli import main
from kinema.errors import KinemaError
from kinema.fileio import atomic_folder, check_output, clean_stale, output_kind
from kinema.loaders.checkpoint_io import read_state_dict, write_state_dict


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for folders) and symlink targets: the whole state to compare."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = f"-> {os.readlink(path)}".encode()
        else:
            found[key] = path.read_bytes() if path.is_file() else None
    return found


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def motion_module(tmp_path) -> Path:
    path = tmp_path / "in" / "mm_sd_v15_v2.safetensors"
    path.parent.mkdir()
    write_state_dict(original_motion_state_dict("v2"), path)
    return path


def user_project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "README.md").write_text("my notes")
    (root / "src").mkdir()
    (root / "src" / "train.py").write_text("print('mine')")
    return root


# ---------------------------------------------------------------- convert


def test_convert_refuses_a_folder_of_user_files_even_with_overwrite(tmp_path, capsys, motion_module):
    project = user_project(tmp_path / "project")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, "convert", str(motion_module), str(project), "--to", "diffusers", *extra)
        assert code == 2 and err.count("\n") == 1
        assert "kinema did not write it (it holds README.md, src)" in err
    assert snapshot(tmp_path) == before


def test_convert_refuses_a_regular_file(tmp_path, capsys, motion_module):
    target = tmp_path / "out"
    target.write_text("a file of mine")
    before = snapshot(tmp_path)
    code, err = run(capsys, "convert", str(motion_module), str(target), "--to", "diffusers", "--overwrite")
    assert code == 2 and "kinema did not write it" in err
    assert snapshot(tmp_path) == before


def test_convert_to_a_file_layout_onto_a_folder_says_what_path_to_give(tmp_path, capsys, motion_module):
    (tmp_path / "empty").mkdir()
    (tmp_path / "kept.safetensors").write_text("a file of mine")
    code, err = run(capsys, "convert", str(motion_module), str(tmp_path / "empty"), "--to", "original")
    assert code == 1 and err.rstrip().endswith("empty is a folder; give the path of a file inside it, with its "
                                               "extension")
    code, err = run(capsys, "convert", str(motion_module), str(tmp_path / "kept.safetensors"), "--to", "original")
    assert code == 2 and err.rstrip().endswith("kinema never replaces what it did not write: choose a new file")


def test_convert_into_the_folder_holding_the_input_is_refused(tmp_path, capsys, motion_module):
    (motion_module.parent / "neighbour.ckpt").write_bytes(b"keep")
    before = snapshot(tmp_path)
    for target in (motion_module.parent, tmp_path, motion_module):
        code, err = run(capsys, "convert", str(motion_module), str(target), "--to", "diffusers", "--overwrite")
        assert code == 2 and f"holds the input {motion_module}" in err or "is the input" in err
    assert snapshot(tmp_path) == before


def test_convert_into_its_own_input_folder_is_refused(tmp_path, capsys, motion_module):
    # A MotionAdapter folder converted back into itself replaced its own weights file with another layout's.
    assert run(capsys, "convert", str(motion_module), str(tmp_path / "ad"), "--to", "diffusers")[0] == 0
    before = snapshot(tmp_path)
    for target, extra in (("diffusion_pytorch_model.safetensors", ["--overwrite"]), ("x.safetensors", [])):
        code, err = run(capsys, "convert", str(tmp_path / "ad"), str(tmp_path / "ad" / target), "--to", "original",
                        *extra)
        assert code == 2 and f"the output {tmp_path / 'ad' / target} is inside the input {tmp_path / 'ad'}" in err
    assert snapshot(tmp_path) == before


def test_easyanimate_convert_onto_its_models_folder_is_refused(tmp_path, capsys):
    models = tmp_path / "EasyAnimateV3-XL-2-InP-512x512"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "image_encoder"):
        (models / part).mkdir(parents=True)
        (models / part / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    for source, target in ((models, models), (models / "transformer", models), (models, models / "transformer")):
        code, err = run(capsys, "convert", str(source), str(target), "--to", "kinema", "--overwrite")
        assert code == 2 and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before


def test_convert_overwrites_only_its_own_output_of_the_same_kind(tmp_path, capsys, motion_module):
    target = tmp_path / "adapter"
    assert run(capsys, "convert", str(motion_module), str(target), "--to", "diffusers")[0] == 0
    assert output_kind(target) == "motion_module"
    code, err = run(capsys, "convert", str(motion_module), str(target), "--to", "diffusers")
    assert code == 2 and "pass --overwrite" in err
    assert run(capsys, "convert", str(motion_module), str(target), "--to", "diffusers", "--overwrite")[0] == 0
    (target / "notes.txt").write_text("added by the user")
    code, err = run(capsys, "convert", str(motion_module), str(target), "--to", "diffusers", "--overwrite")
    assert code == 2 and "also holds files kinema did not write or that were edited since (notes.txt)" in err
    assert (target / "notes.txt").read_text() == "added by the user"

    single = tmp_path / "mm.safetensors"
    assert run(capsys, "convert", str(motion_module), str(single), "--to", "kinema")[0] == 0
    assert run(capsys, "convert", str(motion_module), str(single), "--to", "original", "--overwrite")[0] == 0
    with safe_open(str(single), "pt") as f:
        assert f.metadata()["kinema_output"] == "motion_module"
    synth = tmp_path / "synth"
    assert run(capsys, "data", "synth", "--out", str(synth), "--n", "1", "--frames", "2", "--size", "16")[0] == 0
    code, err = run(capsys, "convert", str(motion_module), str(synth), "--to", "diffusers", "--overwrite")
    assert code == 1 and "another kind (synth_dataset, not motion_module)" in err  # known once the input is read


def test_ckpt_outputs_carry_the_mark_and_still_load_with_weights_only(tmp_path, motion_module):
    import torch

    out = write_state_dict(read_state_dict(motion_module), tmp_path / "mm.ckpt", kind="motion_module")
    assert output_kind(out) == "motion_module"
    assert set(torch.load(out, weights_only=True)) == set(read_state_dict(motion_module))
    plain = tmp_path / "plain.ckpt"
    torch.save({"a": torch.ones(1)}, plain)
    assert output_kind(plain) is None


# ---------------------------------------------------------------- data synth


def test_synth_never_wipes_a_folder_holding_a_file_named_synth_json(tmp_path, capsys):
    work = user_project(tmp_path / "work")
    (work / "synth.json").write_text('{"my": "own settings"}')
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "step_1000.safetensors").write_bytes(b"weights")
    before = snapshot(tmp_path)
    code, err = run(capsys, "data", "synth", "--out", str(work), "--n", "2", "--overwrite")
    assert code == 2 and "kinema did not write it" in err
    assert snapshot(tmp_path) == before


def test_user_files_inside_an_earlier_synth_output_are_never_lost(tmp_path, capsys):
    out = tmp_path / "set"
    assert run(capsys, "data", "synth", "--out", str(out), "--n", "2", "--frames", "2", "--size", "16")[0] == 0
    (out / "my_split.txt").write_text("train: 0")
    code, err = run(capsys, "data", "synth", "--out", str(out), "--n", "3", "--frames", "2", "--size", "16",
                    "--overwrite")
    assert code == 2 and "did not write or that were edited since (my_split.txt)" in err
    assert (out / "my_split.txt").read_text() == "train: 0"
    (out / "my_split.txt").unlink()
    entries = json.loads((out / "metadata.json").read_text())
    entries[0]["text"] = "a caption I corrected by hand"
    (out / "metadata.json").write_text(json.dumps(entries))
    code, err = run(capsys, "data", "synth", "--out", str(out), "--n", "3", "--frames", "2", "--size", "16",
                    "--overwrite")
    assert code == 2 and "edited since (metadata.json)" in err
    assert "corrected by hand" in (out / "metadata.json").read_text()


def test_a_large_file_rewritten_at_its_size_is_the_users(tmp_path):
    # Files over 16 MiB are not hashed whole (saves stay fast): weights edited at the same size were replaced.
    import shutil

    out = tmp_path / "model"
    with atomic_folder(out, "test_output") as folder:
        (folder / "weights.bin").write_bytes(np.random.default_rng(0).bytes(17 * 2**20))
    shutil.copytree(out, tmp_path / "copied", copy_function=shutil.copy)  # `cp -r`: new inodes and times
    shutil.copytree(out, tmp_path / "restored")
    for folder in (out, tmp_path / "copied"):  # as kinema wrote them: replaceable
        check_output(folder, "test_output", folder=True, overwrite=True)
    with open(out / "weights.bin", "r+b") as f:  # edited in place: same size, other bytes
        f.seek(5 * 2**20)
        f.write(np.random.default_rng(1).bytes(2**20))
    data = (tmp_path / "restored" / "weights.bin").read_bytes()
    (tmp_path / "restored" / "weights.bin").unlink()  # saved anew, as safetensors' save_file does: a new inode
    (tmp_path / "restored" / "weights.bin").write_bytes(data[:-4096] + bytes(4096))
    for folder in (out, tmp_path / "restored"):
        with pytest.raises(KinemaError, match=r"edited since \(weights.bin\)"):
            check_output(folder, "test_output", folder=True, overwrite=True)


def test_the_empty_current_folder_is_written_into(tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    assert run(capsys, "data", "synth", "--out", ".", "--n", "1", "--frames", "2", "--size", "16")[0] == 0
    assert here.stat().st_ino == inode and Path.cwd() == here  # the same folder, filled, not replaced
    assert (here / "metadata.json").is_file() and output_kind(here) == "synth_dataset"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_running_inside_an_earlier_output_is_refused_cleanly(tmp_path, capsys, monkeypatch):
    out = tmp_path / "set"
    assert run(capsys, "data", "synth", "--out", str(out), "--n", "1", "--frames", "2", "--size", "16")[0] == 0
    before = snapshot(tmp_path)
    monkeypatch.chdir(out)
    code, err = run(capsys, "data", "synth", "--out", ".", "--n", "1", "--frames", "2", "--size", "16", "--overwrite")
    assert code == 2 and "the folder you are working in" in err
    assert snapshot(tmp_path) == before  # no `..XXXX.old/` left beside it


# ---------------------------------------------------------------- modes and links


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_honour_the_umask(tmp_path, capsys, motion_module, umask_022):
    folder = tmp_path / "adapter"
    assert run(capsys, "convert", str(motion_module), str(folder), "--to", "diffusers")[0] == 0
    assert mode(folder) == 0o755
    assert {mode(p) for p in folder.iterdir()} == {0o644}
    single = tmp_path / "mm_kinema.safetensors"
    assert run(capsys, "convert", str(motion_module), str(single), "--to", "kinema")[0] == 0
    assert mode(single) == 0o644
    os.chmod(single, 0o600)  # a replaced output keeps the mode its owner gave it
    assert run(capsys, "convert", str(motion_module), str(single), "--to", "kinema", "--overwrite")[0] == 0
    assert mode(single) == 0o600


def test_synth_in_a_setgid_shared_folder(tmp_path, capsys, umask_022):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    args = ["--n", "1", "--frames", "2", "--size", "16"]
    assert run(capsys, "data", "synth", "--out", str(shared), *args)[0] == 0  # empty: written into, mode kept
    assert mode(shared) == 0o2775
    inner = shared / "set"
    assert run(capsys, "data", "synth", "--out", str(inner), *args)[0] == 0
    assert mode(inner) == 0o2755  # group bit inherited from the setgid parent, the rest from the umask
    assert all(mode(p) == 0o644 for p in inner.rglob("*") if p.is_file())


def test_a_symlinked_target_is_written_through_never_replaced(tmp_path, capsys):
    real = tmp_path / "real_set"
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(KinemaError, match="symbolic link to .*real_set, which does not exist"):
        check_output(link, "synth_dataset", folder=True)
    real.mkdir()
    assert run(capsys, "data", "synth", "--out", str(link), "--n", "1", "--frames", "2", "--size", "16")[0] == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "metadata.json").is_file()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_at_the_target_is_refused_without_opening_it(tmp_path):
    # Judging whether kinema wrote it opened it, and opening a FIFO waits for a writer: convert hung forever.
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    for folder in (False, None):
        with pytest.raises(KinemaError, match="is a FIFO, socket or device, not a file or folder kinema writes"):
            check_output(fifo, "motion_module", folder=folder, overwrite=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_a_killed_run_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    target = tmp_path / "out"
    dead_pid = 2**22 + 12345  # above the kernel's default pid_max: no such process
    stale = tmp_path / f".out.kinema-part-{dead_pid}"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    mine = tmp_path / ".out.not-kinema"
    mine.mkdir()
    with atomic_folder(target, "test_output") as folder:
        (folder / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.not-kinema", "out"]


def test_an_output_being_replaced_when_killed_is_put_back(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target, "test_output") as folder:
        (folder / "a.txt").write_text("first")
    dead_pid = 2**22 + 12346
    target.rename(tmp_path / f".out.kinema-old-{dead_pid}")  # killed between the two renames of the swap
    with pytest.raises(KinemaError, match="pass --overwrite"):
        with atomic_folder(target, "test_output") as folder:
            pass
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_name_near_the_length_limit_still_writes(tmp_path):
    target = tmp_path / ("v" * 240 + ".safetensors")
    write_state_dict({"a": torch.zeros(2)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("name", ["v" * 235, "日" * 80])  # 235 characters; 240 bytes in 80 characters
def test_a_long_video_name_and_its_sidecar_get_their_own_temporaries(tmp_path, name):
    # Cut to 200 characters, NAME.mp4 and NAME.mp4.json shared a temporary: the sidecar's removal took the video.
    from kinema.data.video_io import write_video

    target = tmp_path / f"{name}.mp4"
    write_video(np.zeros((2, 16, 16, 3), np.uint8), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name, f"{target.name}.json"]


def test_an_output_a_killed_earlier_kinema_was_replacing_under_a_long_name_is_put_back(tmp_path):
    # Before the cut counted bytes, a long name's temporary was its first 200 characters.
    target = tmp_path / ("v" * 230 + ".mp4")
    old = tmp_path / f".{target.name[:200]}.kinema-old-{2**22 + 7}"  # a pid above the kernel's default pid_max
    old.write_bytes(b"the video being replaced")
    clean_stale(target)
    assert target.read_bytes() == b"the video being replaced" and not old.exists()


def test_a_video_output_that_is_a_symbolic_link_is_refused(tmp_path):
    # Written through, its settings and latents went beside the link, and the target's own sidecar went on describing
    # the video it had replaced; kinema then refused its own file.
    from kinema.data.video_io import write_video
    from kinema.pipelines.outputs import check_video_outputs

    real, link = tmp_path / "real.mp4", tmp_path / "link.mp4"
    write_video(np.zeros((2, 16, 16, 3), np.uint8), real, settings={"prompt": "a red circle"})
    link.symlink_to(real)
    before = snapshot(tmp_path)
    message = rf"link.mp4 is a symbolic link to {real}; a video's settings and latents go beside the name it is "
    with pytest.raises(KinemaError, match=message):
        check_video_outputs([link], overwrite=True)
    with pytest.raises(KinemaError, match=message):
        write_video(np.zeros((2, 16, 16, 3), np.uint8), link, overwrite=True)
    assert snapshot(tmp_path) == before


def test_a_users_file_where_the_settings_sidecar_goes_stops_the_video_write(tmp_path):
    from kinema.data.video_io import write_video

    (tmp_path / "clip.mp4.json").write_text('{"my": "notes"}')
    before = snapshot(tmp_path)
    frames = torch.zeros(2, 3, 16, 16)
    for overwrite in (False, True):
        with pytest.raises(KinemaError, match=r"clip\.mp4\.json already exists and kinema did not write it"):
            write_video(frames, tmp_path / "clip.mp4", overwrite=overwrite)
    assert snapshot(tmp_path) == before


def test_an_edit_that_keeps_a_files_size_is_still_the_users(tmp_path, capsys):
    out = tmp_path / "set"
    assert run(capsys, "data", "synth", "--out", str(out), "--n", "2", "--frames", "2", "--size", "16")[0] == 0
    text = (out / "metadata.json").read_text()
    edited = text.replace("circle", "CIRCLE", 1) if "circle" in text else text.replace("square", "SQUARE", 1)
    assert edited != text and len(edited) == len(text)
    (out / "metadata.json").write_text(edited)
    code, err = run(capsys, "data", "synth", "--out", str(out), "--n", "2", "--frames", "2", "--size", "16",
                    "--overwrite")
    assert code == 2 and "edited since (metadata.json)" in err
    assert (out / "metadata.json").read_text() == edited


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif", ".webp"])
def test_a_video_is_kinemas_only_while_it_and_its_sidecar_carry_the_same_settings(tmp_path, suffix):
    from kinema.data.probe import read_embedded_settings, read_sidecar
    from kinema.data.video_io import write_video

    frames = torch.zeros(2, 3, 16, 16)
    clip, side = tmp_path / f"clip{suffix}", tmp_path / f"clip{suffix}.json"
    write_video(frames, clip, settings={"prompt": 'a "red" circle & more'})
    assert read_embedded_settings(clip) == read_sidecar(clip)  # the pair, in every format kinema writes
    assert (output_kind(clip), output_kind(side)) == ("video", "video_settings")
    write_video(frames, clip, settings={"prompt": "again"}, overwrite=True)  # its own output: replaced
    assert read_sidecar(clip)["prompt"] == "again"

    # A user's video of the same format put in its place, the sidecar left as it was: never replaced.
    write_video(frames + 0.5, tmp_path / f"theirs{suffix}", settings={"prompt": "theirs"})
    os.replace(tmp_path / f"theirs{suffix}", clip)
    before = snapshot(tmp_path)
    with pytest.raises(KinemaError, match=rf"clip\{suffix} already exists and kinema did not write it"):
        write_video(frames, clip, overwrite=True)
    assert snapshot(tmp_path) == before

    # A kinema sidecar with the user's notes added: the pair is broken, so neither is replaced.
    write_video(frames, tmp_path / f"new{suffix}", settings={"prompt": "new"})
    noted = {**read_sidecar(tmp_path / f"new{suffix}"), "notes": "keep the second take"}
    (tmp_path / f"new{suffix}.json").write_text(json.dumps(noted))
    before = snapshot(tmp_path)
    with pytest.raises(KinemaError, match=rf"new\{suffix} already exists and kinema did not write it \(or it and "
                                          rf"its settings new\{suffix}.json no longer agree: one was edited\)"):
        write_video(frames, tmp_path / f"new{suffix}", overwrite=True)
    assert snapshot(tmp_path) == before
    assert output_kind(side) is None and output_kind(tmp_path / f"new{suffix}.json") is None
    # A user's file with a .json of their own beside it: no word of settings that disagree.
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "notes.txt.json").write_text('{"mine": true}')
    with pytest.raises(KinemaError, match=r"notes.txt already exists and kinema did not write it; kinema never"):
        check_output(tmp_path / "notes.txt", "video", folder=False, overwrite=True)


def test_a_sidecar_left_without_its_video_is_replaced_only_with_overwrite(tmp_path):
    from kinema.data.probe import read_sidecar
    from kinema.data.video_io import write_video

    frames = torch.zeros(2, 3, 16, 16)
    write_video(frames, tmp_path / "clip.mp4", settings={"prompt": "first"})
    (tmp_path / "clip.mp4").unlink()
    with pytest.raises(KinemaError, match=r"clip\.mp4\.json"):
        write_video(frames, tmp_path / "clip.mp4", settings={"prompt": "second"})
    assert read_sidecar(tmp_path / "clip.mp4")["prompt"] == "first"
    write_video(frames, tmp_path / "clip.mp4", settings={"prompt": "second"}, overwrite=True)
    assert read_sidecar(tmp_path / "clip.mp4")["prompt"] == "second"


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    """As root no folder is read-only to this process, so the OS's refusal is simulated where kinema asks it to
    create a file: the refusal names the output and leaves nothing."""
    import errno

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).parent == tmp_path / "locked":
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    for target, folder in ((tmp_path / "locked" / "clip.mp4", False), (tmp_path / "locked" / "new" / "set", True)):
        with pytest.raises(KinemaError, match=rf"^cannot write {target}: the file system is read-only; write "
                                              "somewhere else$"):
            check_output(target, None, folder=folder)
    assert snapshot(tmp_path) == {"locked": None}
    assert check_output(tmp_path / "free.mp4", "video", folder=False) == tmp_path / "free.mp4"
    assert snapshot(tmp_path) == {"locked": None}  # the check leaves nothing behind


def test_a_training_run_folder_is_known_as_kinemas_run_and_never_replaced_by_another_kind(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "kinema-run.json").write_text(json.dumps({"kind": "training_run", "config": {}}))
    assert output_kind(run) == "training_run"
    before = snapshot(tmp_path)
    with pytest.raises(KinemaError, match=r"run is an earlier kinema output of another kind \(training_run, not "
                                          r"model\); choose another path$"):
        check_output(run, "model", folder=True, overwrite=True)
    assert snapshot(tmp_path) == before
    (run / "kinema-run.json").write_text(json.dumps({"kind": "my notes"}))
    assert output_kind(run) is None


def test_a_refused_run_still_removes_every_videos_leftovers(tmp_path):
    # A run killed while writing seed 3 left its temporary; the next run, refused at seed 1 (already there), used to
    # stop checking before it reached seed 3 and left the temporary for good.
    from kinema.pipelines.outputs import check_video_outputs

    (tmp_path / "a-seed1.mp4").write_bytes(b"not kinema's")
    stale = tmp_path / f".a-seed3.mp4.kinema-part-{2**22 + 12347}"
    stale.mkdir()
    with pytest.raises(KinemaError, match="a-seed1.mp4 already exists and kinema did not write it"):
        check_video_outputs([tmp_path / f"a-seed{seed}.mp4" for seed in (1, 2, 3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-seed1.mp4"]


def test_a_run_stopped_after_sampling_says_where_its_latents_are(tmp_path, capsys, monkeypatch):
    from kinema.pipelines import outputs

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "write_result", stopped)
    out = tmp_path / "a.mp4"
    assert main(["generate", "a red circle", "--steps", "1", "-o", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"the final latents are kept in {out}.latents.safetensors: the same command again writes its videos " \
           f"without sampling again (or `kinema decode {out}.latents.safetensors`" in err
    assert err.endswith("interrupted; nothing half-written was left\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4.latents.safetensors"]


def test_a_cut_short_safetensors_output_is_kept_and_named_for_what_it_is(tmp_path):
    """kinema's mark is in the header: a file cut short (or with its header damaged) cannot show it, so it is never
    replaced, and the refusal says why rather than that kinema did not write it."""
    path = tmp_path / "run.latents.safetensors"
    write_state_dict({"latents": torch.zeros(1, 4, 2, 2, 2)}, path, kind="latents")
    whole = path.read_bytes()
    flipped = bytearray(whole)
    flipped[13] ^= 0x04  # "__metadata__" becomes "__matadata__": an entry that is no tensor
    for damaged, what in ((whole[:-1], "whose header says"), (bytes(flipped), "with a damaged header")):
        path.write_bytes(damaged)
        for overwrite in (False, True):
            with pytest.raises(KinemaError, match=rf"run.latents.safetensors already exists and is a safetensors file "
                                                  rf"{what}.*, so kinema cannot tell whether it wrote it, .*delete it "
                                                  rf"yourself if it is an output of yours"):
                check_output(path, "latents", folder=False, overwrite=overwrite)
        assert path.read_bytes() == damaged
