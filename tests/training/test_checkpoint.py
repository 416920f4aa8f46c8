"""Training run folders: start/resume policy, checkpoints written whole and read back bit-exact, pruning that spares
the user's files, leftovers of killed saves, RNG streams, and damaged or unsafe checkpoint files."""

import hashlib
import json
import logging
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kinema.errors import KinemaError
from kinema.fileio import MANIFEST
from kinema.training.checkpoint import (
    CHECKPOINT_KIND,
    RUN_FILE,
    RunFolder,
    config_differences,
    fingerprint,
    rng_state,
    set_rng_state,
)

CONFIG = {"model": {"path": "sd15", "motion": "mm.safetensors"}, "data": {"frames": 16, "size": 64},
          "lr": 1e-4, "steps": 100}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def changed(config, **sections):
    new = json.loads(json.dumps(config))
    for section, values in sections.items():
        if isinstance(values, dict):
            new[section].update(values)
        else:
            new[section] = values
    return new


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_is_sha256_of_sorted_json_without_ignored_keys():
    reordered = {"steps": 100, "lr": 1e-4, "data": {"size": 64, "frames": 16},
                 "model": {"motion": "mm.safetensors", "path": "sd15"}}
    expected = hashlib.sha256(json.dumps({k: v for k, v in CONFIG.items() if k != "steps"},
                                         sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert fingerprint(reordered, ignore=["steps"]) == expected
    assert fingerprint(CONFIG, ignore=["steps"]) == fingerprint(changed(CONFIG, steps=5000), ignore=["steps"])
    assert fingerprint(CONFIG) != fingerprint(changed(CONFIG, steps=5000))
    assert fingerprint(CONFIG) != fingerprint(changed(CONFIG, data={"frames": 8}))


def test_config_differences_are_dotted_sorted_and_skip_ignored_keys():
    new = changed(CONFIG, data={"frames": 8, "stride": 2}, model={"path": "other"}, steps=7)
    del new["lr"]
    assert config_differences(CONFIG, new, ignore=["steps"]) == [
        "data.frames: 16 -> 8", "data.stride: (absent) -> 2", "lr: 0.0001 -> (absent)",
        'model.path: "sd15" -> "other"']
    assert config_differences(CONFIG, json.loads(json.dumps(CONFIG))) == []


def test_a_config_that_is_not_json_is_refused():
    with pytest.raises(KinemaError, match="not plain JSON") as err:
        fingerprint({"data": {"root": object()}})
    one_line(err)


# ---------------------------------------------------------------- starting a run


def test_a_new_run_is_made_in_a_new_folder_with_its_record(tmp_path):
    path = tmp_path / "runs" / "first"
    run = RunFolder.open(path, CONFIG, resume=None, keep=2, ignore=["steps"])
    assert run.path == path
    record = json.loads((path / RUN_FILE).read_text())
    assert record["kind"] == "training_run"
    assert record["config"] == CONFIG
    assert record["fingerprint"] == fingerprint(CONFIG, ["steps"])
    assert {"kinema_version", "created"} <= set(record)
    assert sorted(p.name for p in path.iterdir()) == [RUN_FILE]  # no temporaries left
    assert run.checkpoints() == []


def test_an_empty_folder_is_used(tmp_path):
    RunFolder.open(tmp_path, CONFIG, resume=None, keep=2)
    assert (tmp_path / RUN_FILE).is_file()


def test_a_foreign_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(KinemaError, match="not empty and holds no training run.*notes.txt") as err:
        RunFolder.open(tmp_path, CONFIG, resume=None, keep=2)
    one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(KinemaError, match="is a file") as err:
        RunFolder.open(tmp_path / "out", CONFIG, resume=None, keep=2)
    one_line(err)


def test_an_existing_run_needs_resume(tmp_path):
    run = RunFolder.open(tmp_path, CONFIG, resume=None, keep=2)
    with pytest.raises(KinemaError, match="saved no checkpoint.*--resume latest"):
        RunFolder.open(tmp_path, CONFIG, resume=None, keep=2)
    run.save(10, {"model": {"w": torch.ones(2)}}, {})
    with pytest.raises(KinemaError, match="already holds a training run; pass --resume latest") as err:
        RunFolder.open(tmp_path, CONFIG, resume=None, keep=2)
    one_line(err)


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(KinemaError, match="keep"):
        RunFolder.open(tmp_path, CONFIG, resume=None, keep=0)


# ---------------------------------------------------------------- resuming


@pytest.fixture
def saved_run(tmp_path):
    run = RunFolder.open(tmp_path / "run", CONFIG, resume=None, keep=5, ignore=["steps"])
    for step in (10, 20, 30):
        run.save(step, {"model": {"w": torch.full((3,), float(step))}}, {"step": step})
    return run


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(KinemaError, match="holds no training run") as err:
        RunFolder.open(tmp_path, CONFIG, resume="latest", keep=2)
    one_line(err)


def test_resume_with_another_config_names_the_differences(saved_run):
    other = changed(CONFIG, data={"frames": 8})
    with pytest.raises(KinemaError, match=r"data\.frames: 16 -> 8.*run's own config") as err:
        RunFolder.open(saved_run.path, other, resume="latest", keep=5, ignore=["steps"])
    assert RUN_FILE in one_line(err)


def test_resume_names_at_most_three_differences(saved_run):
    other = changed(CONFIG, data={"frames": 8, "size": 32}, model={"path": "x", "motion": "y"})
    with pytest.raises(KinemaError, match="and 1 more") as err:
        RunFolder.open(saved_run.path, other, resume="latest", keep=5, ignore=["steps"])
    assert one_line(err).count(" -> ") == 3


def test_ignored_keys_may_change_on_resume(saved_run):
    run = RunFolder.open(saved_run.path, changed(CONFIG, steps=5000), resume="latest", keep=5, ignore=["steps"])
    assert run.resolve("latest") == saved_run.path / "checkpoints" / "step-00000030"


def test_resolve_takes_a_checkpoint_of_this_run_only(saved_run, tmp_path):
    twenty = saved_run.path / "checkpoints" / "step-00000020"
    assert saved_run.resolve(str(twenty)) == twenty
    other = RunFolder.open(tmp_path / "other", CONFIG, resume=None, keep=5, ignore=["steps"])
    other.save(20, {"model": {"w": torch.zeros(1)}}, {})
    with pytest.raises(KinemaError, match=r"it is a checkpoint of another run \(.*other\), not of the run in ") as err:
        saved_run.resolve(str(other.path / "checkpoints" / "step-00000020"))
    assert "step-00000030" in one_line(err)
    import shutil

    renamed = saved_run.path / "checkpoints" / "keep-me"  # the run's own, under a name it does not keep
    shutil.copytree(twenty, renamed)
    with pytest.raises(KinemaError, match=r"keep-me: it is a checkpoint, but not one the run in .* keeps \(its own "
                                          r"are checkpoints/step-NNNNNNNN\)"):
        saved_run.resolve(str(renamed))
    (tmp_path / "half").mkdir()  # a folder that is no checkpoint at all
    with pytest.raises(KinemaError, match="is not a complete checkpoint of the run"):
        saved_run.resolve(str(tmp_path / "half"))
    with pytest.raises(KinemaError, match="does not exist"):
        saved_run.resolve(str(tmp_path / "nowhere"))


def test_resume_opens_a_run_without_checkpoints_and_resolve_refuses(tmp_path):
    # open() checks the run only: processes beside the main one open a freshly started run with "latest"
    RunFolder.open(tmp_path, CONFIG, resume=None, keep=2)
    run = RunFolder.open(tmp_path, CONFIG, resume="latest", keep=2)
    with pytest.raises(KinemaError, match="no checkpoint in .* yet") as err:
        run.resolve("latest")
    one_line(err)


# ---------------------------------------------------------------- save and load


def quadratic_loss(params, target):
    return sum(((p - t) ** 2).sum() for p, t in zip(params, target, strict=True))


def adam_step(params, optimizer, target):
    optimizer.zero_grad()
    quadratic_loss(params, target).backward()
    optimizer.step()


def test_round_trip_is_bit_exact_and_the_optimizer_continues_identically(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    target = [torch.randn(4, 3), torch.randn(3)]
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        adam_step(params, optimizer, target)

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "model": {"a": params[0], "b": params[1]},
        "ema": {"half": torch.randn(2, 2).to(torch.bfloat16), "ids": torch.arange(5), "tied": base,
                "tied_row": base[1], "strided": base.t()},
    }
    state = {"optimizer": optimizer.state_dict(), "counter": 3, "names": ("x", "y"), "nothing": None}
    run = RunFolder.open(tmp_path / "run", CONFIG, resume=None, keep=2)
    folder = run.save(3, tensors, state)
    assert folder == tmp_path / "run" / "checkpoints" / "step-00000003"
    assert json.loads((folder / "checkpoint.json").read_text())["groups"] == ["ema", "model"]
    assert json.loads((folder / MANIFEST).read_text())["kinema_output"] == CHECKPOINT_KIND

    loaded = run.load(folder)
    assert loaded.step == 3
    for group, named in tensors.items():
        assert loaded.tensors[group].keys() == named.keys()
        for name, tensor in named.items():
            assert loaded.tensors[group][name].dtype == tensor.dtype
            assert torch.equal(loaded.tensors[group][name], tensor.detach())
    assert loaded.state["counter"] == 3 and loaded.state["names"] == ("x", "y") and loaded.state["nothing"] is None

    fresh = [torch.nn.Parameter(loaded.tensors["model"]["a"].clone()),
             torch.nn.Parameter(loaded.tensors["model"]["b"].clone())]
    fresh_optimizer = torch.optim.AdamW(fresh, lr=0.05, weight_decay=0.1)
    fresh_optimizer.load_state_dict(loaded.state["optimizer"])
    adam_step(params, optimizer, target)
    adam_step(fresh, fresh_optimizer, target)
    for never_saved, resumed in zip(params, fresh, strict=True):
        assert torch.equal(never_saved, resumed)


def test_saving_a_step_again_replaces_it(tmp_path):
    run = RunFolder.open(tmp_path, CONFIG, resume=None, keep=3)
    run.save(5, {"model": {"w": torch.zeros(2)}}, {"v": 1})
    run.save(5, {"model": {"w": torch.ones(2)}}, {"v": 2})
    loaded = run.load(run.resolve("latest"))
    assert torch.equal(loaded.tensors["model"]["w"], torch.ones(2)) and loaded.state["v"] == 2
    assert [step for step, _ in run.checkpoints()] == [5]


class NotPlain:
    pass


@pytest.mark.parametrize("state, where", [
    ({"scale": np.float64(1.0)}, "state['scale'] is a numpy.float64"),
    ({"sched": [NotPlain()]}, "state['sched'][0] is a "),
])
def test_a_state_torch_cannot_read_back_safely_is_refused_before_writing(tmp_path, state, where):
    run = RunFolder.open(tmp_path, CONFIG, resume=None, keep=3)
    with pytest.raises(KinemaError, match="weights_only") as err:
        run.save(1, {"model": {"w": torch.zeros(1)}}, state)
    assert where in one_line(err)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_tensor_groups_are_refused(tmp_path):
    run = RunFolder.open(tmp_path, CONFIG, resume=None, keep=3)
    with pytest.raises(KinemaError, match="group name"):
        run.save(1, {"../model": {"w": torch.zeros(1)}}, {})
    with pytest.raises(KinemaError, match="not named tensors"):
        run.save(1, {"model": {"w": [1.0]}}, {})


# ---------------------------------------------------------------- keeping the newest K


def test_only_the_newest_k_kinema_checkpoints_stay(tmp_path, caplog):
    run = RunFolder.open(tmp_path, CONFIG, resume=None, keep=2)
    for step in (1, 2, 3):
        run.save(step, {"model": {"w": torch.full((2,), float(step))}}, {})
    assert [step for step, _ in run.checkpoints()] == [2, 3]

    (run.path / "checkpoints" / "step-00000002" / "my-notes.txt").write_text("keep me")
    with caplog.at_level(logging.WARNING, logger="kinema"):
        run.save(4, {"model": {"w": torch.zeros(2)}}, {})
        run.save(5, {"model": {"w": torch.zeros(2)}}, {})
    assert [step for step, _ in run.checkpoints()] == [2, 4, 5]
    assert (run.path / "checkpoints" / "step-00000002" / "my-notes.txt").read_text() == "keep me"
    warnings = [r.getMessage() for r in caplog.records if "step-00000002" in r.getMessage()]
    assert len(warnings) == 1 and "my-notes.txt" in warnings[0]
    # nothing else is left beside the checkpoints: the removed ones went whole
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004", "step-00000005"]


def test_an_edited_checkpoint_file_is_kept(tmp_path):
    run = RunFolder.open(tmp_path, CONFIG, resume=None, keep=1)
    first = run.save(1, {"model": {"w": torch.zeros(2)}}, {})
    with open(first / "state.pt", "ab") as f:
        f.write(b"edited")
    run.save(2, {"model": {"w": torch.zeros(2)}}, {})
    assert [step for step, _ in run.checkpoints()] == [1, 2]


# ---------------------------------------------------------------- a save killed with SIGKILL


def test_a_killed_save_leaves_nothing_that_looks_complete_and_is_cleaned_next_time(tmp_path):
    run = RunFolder.open(tmp_path, CONFIG, resume=None, keep=3)
    run.save(1, {"model": {"w": torch.zeros(2)}}, {})
    leftover = run.path / "checkpoints" / f".step-00000002.kinema-part-{dead_pid()}"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (leftover / MANIFEST).write_text(json.dumps({"kinema_output": CHECKPOINT_KIND, "files": {}}))
    assert [step for step, _ in run.checkpoints()] == [1]
    assert run.resolve("latest").name == "step-00000001"
    run.save(3, {"model": {"w": torch.zeros(2)}}, {})
    assert not leftover.exists()
    assert [step for step, _ in run.checkpoints()] == [1, 3]


def test_a_live_process_temporary_is_left_alone(tmp_path):
    run = RunFolder.open(tmp_path, CONFIG, resume=None, keep=3)
    run.save(1, {"model": {"w": torch.zeros(2)}}, {})
    busy = run.path / "checkpoints" / ".step-00000002.kinema-part-1"  # pid 1 is always alive
    busy.mkdir()
    run.save(3, {"model": {"w": torch.zeros(2)}}, {})
    assert busy.exists()


# ---------------------------------------------------------------- random streams


def draws():
    return (torch.rand(5).tolist(), [random.random() for _ in range(5)], np.random.rand(5).tolist(),
            random.gauss(0, 1), np.random.randn(3).tolist())


def test_rng_round_trip_through_a_checkpoint_repeats_every_stream(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1)  # leaves a cached second gaussian in python's state
    np.random.randn()  # and in numpy's
    run = RunFolder.open(tmp_path, CONFIG, resume=None, keep=3)
    run.save(1, {}, {"rng": rng_state()})
    first = draws()
    draws()  # move every stream on
    set_rng_state(run.load(run.resolve("latest")).state["rng"])
    assert draws() == first


def test_an_incomplete_rng_state_is_refused():
    with pytest.raises(KinemaError, match="lacks numpy"):
        set_rng_state({"torch": torch.get_rng_state(), "cuda": [], "python": random.getstate()})


# ---------------------------------------------------------------- damaged or unsafe files


@pytest.fixture
def two_checkpoints(tmp_path):
    run = RunFolder.open(tmp_path / "run", CONFIG, resume=None, keep=3)
    run.save(1, {"model": {"w": torch.zeros(64)}}, {"optimizer": {"m": torch.ones(64)}})
    newest = run.save(2, {"model": {"w": torch.ones(64)}}, {"optimizer": {"m": torch.ones(64)}})
    return run, newest


def record_size(folder, name):
    """Make the manifest agree with a file replaced on purpose (its size and SHA-256), as a checkpoint crafted by
    someone else would."""
    import hashlib

    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = (folder / name).stat().st_size
    manifest["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_a_truncated_state_file_names_the_file_and_the_other_checkpoints(two_checkpoints):
    run, newest = two_checkpoints
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(KinemaError) as err:
        run.load(newest)
    message = one_line(err)
    assert f"{newest / 'state.pt'} was truncated or changed since it was saved ({len(data) // 2} bytes" in message
    assert f"--resume PATH, one of: {run.path / 'checkpoints' / 'step-00000001'}" in message


def test_a_corrupt_state_file_of_the_right_size_is_one_error_line(two_checkpoints):
    run, newest = two_checkpoints
    data = bytearray((newest / "state.pt").read_bytes())
    data[-200:] = bytes(200)  # the zip's central directory
    (newest / "state.pt").write_bytes(bytes(data))
    with pytest.raises(KinemaError, match=r"state.pt was changed since it was saved \(same size, other contents\)"):
        run.load(newest)  # the manifest's SHA-256 finds it first
    record_size(newest, "state.pt")  # a manifest that agrees: the reader finds it
    with pytest.raises(KinemaError, match="state.pt cannot be read") as err:
        run.load(newest)
    assert "step-00000001" in one_line(err)


@pytest.mark.parametrize("name", ["checkpoint.json", "model.safetensors"])
def test_an_edit_that_keeps_the_size_is_found_before_training_goes_on(two_checkpoints, name):
    """A step number edited in checkpoint.json (2 -> 5) would skip steps; bytes overwritten in the weights would
    train on from damage. Both keep the file's size."""
    run, newest = two_checkpoints
    path = newest / name
    data = path.read_bytes()
    changed = data.replace(b'"step": 2', b'"step": 5') if name == "checkpoint.json" else data[:-8] + bytes(8)
    assert changed != data and len(changed) == len(data)
    path.write_bytes(changed)
    with pytest.raises(KinemaError, match=rf"{name} was changed since it was saved \(same size, other contents\)"):
        run.load(newest)


def test_a_copied_run_with_large_weights_resumes_and_an_in_place_edit_is_still_found(tmp_path):
    # Weights over 16 MiB are known by the SHA-256 of a sample of their bytes: a copy (cp -r, a download) is the same
    # run, and weights saved anew at their size (safetensors' save_file: a new inode) are an edit.
    import shutil

    run = RunFolder.open(tmp_path / "run", CONFIG, resume=None, keep=3)
    big = {"model": {"w": torch.arange(5 * 2**20, dtype=torch.float32)}}  # 20 MiB
    run.save(1, big, {"optimizer": {"m": torch.ones(4)}})
    shutil.copytree(tmp_path / "run", tmp_path / "copied", copy_function=shutil.copy)  # new inodes and times
    copied = RunFolder.open(tmp_path / "copied", CONFIG, resume="latest", keep=3)
    assert torch.equal(copied.load(copied.resolve("latest")).tensors["model"]["w"], big["model"]["w"])
    from safetensors.torch import load_file, save_file

    weights = copied.resolve("latest") / "model.safetensors"
    tensors = load_file(weights)
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    save_file({name: tensor * 0 for name, tensor in tensors.items()}, weights, metadata=metadata)  # same size
    with pytest.raises(KinemaError, match=r"model.safetensors was changed since it was saved \(same size"):
        copied.load(copied.resolve("latest"))


def test_a_state_file_that_asks_for_code_is_refused(two_checkpoints):
    run, newest = two_checkpoints
    torch.save({"optimizer": NotPlain()}, newest / "state.pt")
    record_size(newest, "state.pt")
    with pytest.raises(KinemaError, match="asks to run code .*NotPlain.*never does") as err:
        run.load(newest)
    one_line(err)


def test_a_truncated_weights_file_is_one_error_line(two_checkpoints):
    run, newest = two_checkpoints
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[:40])
    record_size(newest, "model.safetensors")
    with pytest.raises(KinemaError, match="model.safetensors cannot be read") as err:
        run.load(newest)
    one_line(err)


def test_latest_refuses_to_resume_behind_a_newer_checkpoint_it_cannot_read(two_checkpoints):
    run, newest = two_checkpoints
    manifest = json.loads((newest / MANIFEST).read_text())
    del manifest["files"]
    (newest / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KinemaError, match=r"step-00000002 is newer than the last complete checkpoint \(step 1\) but "
                                          r"not one kinema can read .*; move it out of .* to resume from step 1$"):
        run.resolve("latest")
