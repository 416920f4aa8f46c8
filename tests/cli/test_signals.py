"""SIGTERM and SIGHUP (timeout, docker stop, Slurm, systemd, a closed terminal) clean up like Ctrl-C: a stopped
`kinema` leaves exactly what existed before it started. A SIGKILL cannot be caught; the next run removes what it
left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loaders.animatediff.animatediff_fixtures import SD15_CHANNELS, original_motion_state_dict
from test_output_policy import snapshot

from kinema.cli import main
from kinema.loaders.checkpoint_io import write_state_dict

KINEMA = [sys.executable, "-m", "kinema"]


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run to start writing")
        time.sleep(0.01)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".kinema-part-" in p.name]


def written_under_temporaries(folder: Path) -> int:
    """Bytes in files under kinema's temporaries in `folder` (a writer may rename its own files as we look)."""
    total = 0
    for temp in temporaries(folder):
        for path in temp.rglob("*"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
    return total


# A convert whose weights write blocks half-way (the file is on disk, not yet renamed), so the signal arrives at a
# known point: mid-write.
SLOW_WRITE = """
import sys, time
import kinema.loaders.checkpoint_io as io
real_save = io.save_file
def slow_save(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    print("writing", flush=True)
    time.sleep(60)
io.save_file = slow_save
from kinema.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("signum", "code", "layout"), [(signal.SIGTERM, 143, "kinema"),
                                                        (signal.SIGHUP, 129, "diffusers")])
def test_signal_mid_convert_leaves_what_existed_before(tmp_path, signum, code, layout):
    source = tmp_path / "mm.safetensors"
    write_state_dict(original_motion_state_dict("v2"), source)
    before = snapshot(tmp_path)
    target = tmp_path / ("out.safetensors" if layout == "kinema" else "out")
    run = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "convert", str(source), str(target), "--to", layout],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout.readline() == "writing\n"
    assert temporaries(tmp_path)  # the half-written output is there...
    run.send_signal(signum)
    _, err = run.communicate(timeout=60)
    assert run.returncode == code
    assert err == f"kinema convert: stopped by {signal.Signals(signum).name}; nothing half-written was left\n"
    assert snapshot(tmp_path) == before  # ...and gone


def test_sigterm_mid_synth_leaves_what_existed_before(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    run = subprocess.Popen([*KINEMA, "data", "synth", "--out", str(tmp_path / "sub" / "set"), "--n", "400"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "sub").is_dir() and any(p.rglob("*.mp4") for p in temporaries(tmp_path / "sub")))
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    assert err.strip().endswith("stopped by SIGTERM; nothing half-written was left")
    assert snapshot(tmp_path) == before  # the parent folder it created is gone too


def test_after_sigkill_the_next_run_removes_the_leftover(tmp_path):
    out = tmp_path / "set"
    run = subprocess.Popen([*KINEMA, "data", "synth", "--out", str(out), "--n", "400"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(p.rglob("*.mp4") for p in temporaries(tmp_path)))
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert temporaries(tmp_path)  # SIGKILL cannot be caught: the temporary stays...
    done = subprocess.run([*KINEMA, "data", "synth", "--out", str(out), "--n", "1", "--frames", "2", "--size", "16"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # ...until the next run to the same target


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after the command name, which may hold spaces
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_synth_workers_exit_when_their_parent_is_killed(tmp_path):
    run = subprocess.Popen([*KINEMA, "data", "synth", "--out", str(tmp_path / "set"), "--n", "4000", "--workers",
                            "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(p.rglob("*.mp4") for p in temporaries(tmp_path)))
    # The pool's two workers (and multiprocessing's resource tracker); on a busy machine the second may start late.
    wait_for(lambda: len(children_of(run.pid)) >= 2)
    workers = children_of(run.pid)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=30)  # they waited on their task pipe for ever


@pytest.mark.slow
def test_sigterm_mid_write_of_a_full_size_motion_module(tmp_path):
    """The audit's case: `convert --to kinema` of a full-size v2 module (1.8 GB) stopped by SIGTERM left a 1.8 GB
    hidden temp file."""
    source = tmp_path / "mm_sd_v15_v2.safetensors"
    write_state_dict(original_motion_state_dict("v2", SD15_CHANNELS), source)
    assert source.stat().st_size > 1.8e9
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out)
    run = subprocess.Popen([*KINEMA, "convert", str(source), str(out / "mm.safetensors"), "--to", "kinema"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: written_under_temporaries(out) > 100e6, timeout=300)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 143, err
    assert snapshot(out) == before
    os.unlink(source)


def swallowed_stop(signum: int) -> None:
    """Send this process `signum` and swallow what its handler raises, as a library (a __del__) may."""
    try:
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the handler runs between bytecodes, here
            pass
    except BaseException:
        pass


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_swallowed_by_a_library_still_stops_the_run(tmp_path, monkeypatch, capsys, signum, code):
    """A signal's exception raised inside code that swallows it (as numpy's lazy import of numpy.random once did,
    letting a SIGTERM'd synth run to the end) is raised again before the next clip."""
    from kinema.data import synth

    rendered = []
    render = synth.SynthMotionDataset.clip

    def clip_in_a_swallowing_library(self, index):
        if index == 2:
            swallowed_stop(signum)
        rendered.append(index)
        return render(self, index)

    monkeypatch.setattr(synth.SynthMotionDataset, "clip", clip_in_a_swallowing_library)
    before = snapshot(tmp_path)
    # What the process had (a shell's background job, e.g. under nohup, starts with SIGINT ignored, not Python's).
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "set"
    assert main(["data", "synth", "--out", str(out), "--n", "6", "--frames", "2", "--size", "16"]) == code
    assert rendered == [0, 1, 2]
    assert capsys.readouterr().err.strip().endswith("nothing half-written was left")
    assert snapshot(tmp_path) == before
    assert {stop: signal.getsignal(stop) for stop in handlers} == handlers  # handlers put back


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_swallowed_while_converting_writes_nothing(tmp_path, monkeypatch, capsys, signum, code):
    """A Ctrl-C that lands in a __del__ (Python prints "Exception ignored" and goes on), once seen in a convert of a
    900 MB module: the run wrote its output and exited 0. The output is not swapped in, and the run ends as a stop."""
    import kinema.loaders.checkpoint_io as checkpoint_io

    source = tmp_path / "mm.safetensors"
    write_state_dict(original_motion_state_dict("v2"), source)
    before = snapshot(tmp_path)
    save = checkpoint_io.save_file

    def save_then_swallow(tensors, path, metadata=None):
        save(tensors, path, metadata=metadata)
        swallowed_stop(signum)

    monkeypatch.setattr(checkpoint_io, "save_file", save_then_swallow)
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "diffusers"]) == code
    assert capsys.readouterr().err.strip().endswith("nothing half-written was left")
    assert snapshot(tmp_path) == before
