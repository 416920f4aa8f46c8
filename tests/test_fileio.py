"""Atomic folder writes: whole or nothing."""

import re

import pytest

from kinema.errors import KinemaError
from kinema.fileio import atomic_folder


def old_output(target):
    """`target` as an earlier kinema output holding old.txt."""
    with atomic_folder(target, "test_output") as folder:
        (folder / "old.txt").write_text("old")
    return target


def test_a_finished_folder_replaces_the_old_one(tmp_path):
    target = old_output(tmp_path / "out")
    with atomic_folder(target, "test_output", overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()  # nothing shows until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["kinema-output.json", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left beside it


def test_a_failure_leaves_the_old_folder_and_no_debris(tmp_path):
    target = old_output(tmp_path / "out")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(target, "test_output", overwrite=True) as folder:
            (folder / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["kinema-output.json", "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_what_appears_at_the_target_while_the_work_runs_is_checked_again_at_the_swap(tmp_path):
    """The policy is checked when the write starts and again when it ends: a user's file put into the old output
    meanwhile, or an output another run wrote there meanwhile, is never replaced."""
    from kinema.errors import KinemaError
    from kinema.fileio import atomic_file

    target = old_output(tmp_path / "out")
    with pytest.raises(KinemaError, match="kinema never deletes them"):
        with atomic_folder(target, "test_output", overwrite=True) as folder:
            (folder / "new.txt").write_text("new")
            (target / "precious.txt").write_text("mine")  # the user's, while the work ran
    assert sorted(p.name for p in target.iterdir()) == ["kinema-output.json", "old.txt", "precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    other = tmp_path / "other"
    with pytest.raises(KinemaError, match="other"):
        with atomic_folder(other, "test_output") as folder:
            other.mkdir()  # made meanwhile by someone else
            (other / "theirs.txt").write_text("theirs")
            (folder / "ours.txt").write_text("ours")
    assert sorted(p.name for p in other.iterdir()) == ["theirs.txt"]
    with pytest.raises(KinemaError, match="file.bin already exists and kinema did not write it"):
        with atomic_file(tmp_path / "file.bin", "test_output") as written:
            written.write_bytes(b"kinema's")
            (tmp_path / "file.bin").write_text("the user's, written meanwhile")
    assert (tmp_path / "file.bin").read_text() == "the user's, written meanwhile"


def test_config_files_take_yaml_merge_keys_and_refuse_keys_given_twice_or_unhashable(tmp_path):
    from kinema.fileio import load_config_file

    (tmp_path / "merge.yaml").write_text("base: &b {a: 1, c: 3}\nx: {<<: *b, a: 2}\n")
    assert load_config_file(tmp_path / "merge.yaml") == {"base": {"a": 1, "c": 3}, "x": {"a": 2, "c": 3}}
    for text, said in (("a: 1\na: 2\n", "key 'a' is given twice; give each key once at line 2 column 1"),
                       ("? [a, b]\n: 1\n", "a key must be text or a number, not a list or mapping at line 1")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(KinemaError, match=re.escape(said)):
            load_config_file(tmp_path / "bad.yaml")


def test_a_files_fingerprint_changes_with_what_a_run_reads_and_only_that(tmp_path):
    from kinema.fileio import files_fingerprint

    data = tmp_path / "model"
    (data / "unet").mkdir(parents=True)
    (data / "unet" / "weights.safetensors").write_bytes(b"a" * 5000)
    first = files_fingerprint(data, 1024)
    (data / ".cache").mkdir()
    (data / ".cache" / "x").write_bytes(b"x")  # hidden: a temporary or a tool's own
    assert files_fingerprint(data, 1024) == first
    (data / "unet" / "weights.safetensors").write_bytes(b"b" + b"a" * 4999)  # rewritten, same size
    assert files_fingerprint(data, 1024) != first
    assert files_fingerprint(data, 0) == files_fingerprint(data, 0)
    (data / "unet" / "more.safetensors").write_bytes(b"")
    assert files_fingerprint(data, 1024) != first
    assert files_fingerprint(tmp_path / "missing") == files_fingerprint(tmp_path / "empty-nothing")
