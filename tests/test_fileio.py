"""Atomic folder writes: whole or nothing."""

import pytest

from kinema.fileio import atomic_folder


def test_a_finished_folder_replaces_the_old_one(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target, "test_output") as folder:
        (folder / "old.txt").write_text("old")
    with atomic_folder(target, "test_output", overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()  # nothing shows until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["kinema-output.json", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left beside it


def test_a_failure_leaves_the_old_folder_and_no_debris(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target, "test_output") as folder:
        (folder / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(target, "test_output", overwrite=True) as folder:
            (folder / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["kinema-output.json", "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
