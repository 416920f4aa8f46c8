"""`kinema batch` end to end on the bundled kinema-tiny (8 frames, 2 steps): bad lines refused with their line
numbers before anything heavy is imported; a run killed with SIGKILL half-way and run again skips the finished jobs
and finishes the rest, here (no Ray) and on a local Ray cluster of 2 workers, where each worker loads the model once
(counted in the manifest); a batch video equals the same job generated directly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kinema.cli import main
from kinema.data.video_io import read_video
from kinema.pipelines.batch import ray_available, read_manifest

KINEMA = [sys.executable, "-m", "kinema"]
PROMPTS = ["a red circle moving right", "a blue square moving left", "a green triangle moving up",
           "a yellow circle moving down"]
needs_ray = pytest.mark.skipif(not ray_available(), reason='Ray is not installed (pip install "kinema[batch]")')


def write_jobs(path: Path, count: int) -> Path:
    lines = [json.dumps({"prompt": PROMPTS[index % len(PROMPTS)], "frames": 8, "steps": 2, "seed": index})
             for index in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def done_records(out: Path, run: int | None = None) -> list[dict]:
    try:
        records = read_manifest(out)
    except Exception:  # not written yet
        return []
    return [r for r in records if r.get("status") == "done" and (run is None or r.get("run") == run)]


def session_processes(session: int) -> list[int]:
    """Every process of the session `session` (the killed run's Ray processes live on in it)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if name.isdigit() and int(stat.rpartition(")")[2].split()[3]) == session and stat.split()[2] != "Z":
            found.append(int(name))
    return found


def kill_session(session: int) -> None:
    """SIGKILL every process left in the session this test started, one by one by id."""
    for pid in session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_half_way(command: list[str], out: Path, env: dict[str, str], total: int, timeout: float = 600) -> int:
    """Start `kinema batch` in a session of its own, SIGKILL it once a job is recorded done (before the last), and
    everything it started with it; returns how many jobs were done then."""
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not done_records(out):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "no job finished in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        kill_session(process.pid)
        if process.stderr:
            process.stderr.close()
    done = len(done_records(out))
    assert 1 <= done < total
    return done


def check_finished(out: Path, jobs: Path, run: int) -> list[dict]:
    """Every job of `jobs` has a whole folder matching its line and no temporary is left; the records of `run`."""
    lines = [json.loads(line) for line in jobs.read_text().splitlines()]
    folders = sorted((out / "jobs").iterdir())
    assert len(folders) == len(lines) and not [p for p in folders if p.name.startswith(".")]
    settings = [json.loads((folder / "job.json").read_text()) for folder in folders]
    assert sorted((s["prompt"], s["seeds"]) for s in settings) == sorted((j["prompt"], [j["seed"]]) for j in lines)
    for folder, entry in zip(folders, settings, strict=True):
        frames = read_video(folder / f"video-seed{entry['seeds'][0]}.mp4").frames
        assert tuple(frames.shape[:2]) == (8, 3) and tuple(frames.shape[2:]) == (64, 64)
    return [r for r in read_manifest(out) if r.get("run") == run]


def test_bad_lines_are_refused_with_their_numbers_before_anything_heavy(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a red circle", "seed": 1}) + "\n\n"
                    + json.dumps({"prompt": "a red circle", "sed": 2}) + "\n")
    code = ("import sys; from kinema.cli import main; code = main(sys.argv[1:]); "
            "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, "batch", str(jobs), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"]  # bad usage, and no model could have loaded: torch never came
    assert done.stderr.strip() == (f"kinema batch: error: {jobs} line 3: unknown key 'sed'; did you mean 'seed'?")
    assert not (tmp_path / "out").exists()


def test_workers_need_ray_and_a_missing_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 1)
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--workers", "2"]) == 2
    assert "give --ray local" in capsys.readouterr().err
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--models-dir", str(tmp_path / "nowhere")]) == 2
    assert f"no models folder {tmp_path / 'nowhere'}; give an existing folder" in capsys.readouterr().err
    for device in ("cuda:1", "mps"):  # one machine's device, where each Ray worker runs on its own
        assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--ray", "local", "--device", device]) == 2
        assert f"--device {device} names a device of one machine" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr("kinema.pipelines.batch.ray_available", lambda: False)
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--ray", "local"]) == 2
    assert capsys.readouterr().err.strip() == (
        'kinema batch: error: batch generation on Ray needs Ray, which is not installed; pip install "kinema[batch]"')


def test_a_bad_ray_address_is_refused_before_anything_runs(tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 1)
    for address in ("", "head", "head:port", "ray://head:70000"):
        assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--ray", address]) == 2
        assert f"error: --ray {address!r} is not a Ray address; give local" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_ray
def test_a_ray_address_nothing_answers_at_is_refused_within_seconds(tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 1)
    with socket.socket() as unused:  # a port nothing listens on: bound, never listening
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
        began = time.monotonic()
        assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--ray", address]) == 1
    assert time.monotonic() - began < 30  # Ray's own retries ran for minutes
    assert capsys.readouterr().err.strip().startswith(f"kinema batch: error: cannot connect to the Ray cluster at "
                                                      f"{address!r} (")
    assert not (tmp_path / "out").exists()


def test_a_local_run_killed_half_way_resumes_where_it_stopped(tmp_path, capsys):
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", 4), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done_before = kill_half_way([*KINEMA, "batch", str(jobs), "--out", str(out)], out, env, total=4)

    assert main(["batch", str(jobs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"{4 - done_before} job(s) done, {done_before} already done, 0 failed" in printed[-1]
    assert [line.split(" (")[0] for line in printed[:-1]] == [
        f"[{index + 1}/{4 - done_before}] line {done_before + index + 1}" for index in range(4 - done_before)]
    second = check_finished(out, jobs, run=2)
    assert sorted(r["line"] for r in second if r.get("status") == "done") == list(range(done_before + 1, 5))
    assert [(r["worker"], r["loads"]) for r in second if "pid" in r] == [("worker-0", 1)]
    assert [r["loaded"] for r in second if r.get("status") == "done"] == [1] + [0] * (3 - done_before)
    # Nothing that finished before the kill ran again: its files are the first run's.
    first = {r["job"] for r in done_records(out, run=1)}
    assert len(first) == done_before and not first & {r["job"] for r in done_records(out, run=2)}


def ray_env(temp: str) -> dict[str, str]:
    # A short temporary folder: Ray's socket paths under it must stay within the 107-byte limit of Unix sockets.
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": temp}


@pytest.mark.slow
@needs_ray
def test_eight_jobs_on_two_ray_workers_load_the_model_once_per_worker(tmp_path, monkeypatch, capsys):
    from kinema.pipelines.generation import generate
    from kinema.pipelines.jobs import job_from_mapping
    from kinema.pipelines.load import load_family

    jobs, out = write_jobs(tmp_path / "jobs.jsonl", 8), tmp_path / "out"
    with tempfile.TemporaryDirectory(prefix="kr", dir="/tmp") as temp:
        monkeypatch.setenv("RAY_TMPDIR", temp)
        if not torch.cuda.is_available():  # a cluster without a GPU is told before the batch folder is made
            assert main(["batch", str(jobs), "--out", str(out), "--ray", "local", "--device", "cuda"]) == 1
            assert "device cuda: the Ray cluster has no GPU" in capsys.readouterr().err and not out.exists()
        assert main(["batch", str(jobs), "--out", str(out), "--ray", "local", "--workers", "2", "--quiet"]) == 0
    assert "8 job(s) done, 0 already done, 0 failed" in capsys.readouterr().out
    records = check_finished(out, jobs, run=1)
    workers = {r["worker"]: r for r in records if "pid" in r}
    assert sorted(workers) == ["worker-0", "worker-1"]
    assert [workers[name]["loads"] for name in sorted(workers)] == [1, 1]
    assert all(worker["device"] == "cpu" for worker in workers.values())  # auto: Ray hides GPUs from actors
    assert sum(worker["jobs"] for worker in workers.values()) == 8 and all(w["jobs"] >= 1 for w in workers.values())
    done = [r for r in records if r.get("status") == "done"]
    assert {r["worker"] for r in done} == set(workers)
    assert all(sum(r["loaded"] for r in done if r["worker"] == name) == 1 for name in workers)  # its first job

    # The reference: the same line generated directly, with no batch, actor or cache in between.
    line = json.loads(jobs.read_text().splitlines()[5])
    job = job_from_mapping(line)
    expected = generate(load_family(job.model), job.request).frames[0]  # (F, 3, H, W) in [0, 1]
    folder = next(f for f in (out / "jobs").iterdir() if json.loads((f / "job.json").read_text())["seeds"] == [5])
    written = read_video(folder / "video-seed5.mp4").frames  # (F, 3, H, W) in [-1, 1], through the mp4 codec
    error = np.abs((written.numpy() + 1) / 2 - expected.numpy()).mean()
    assert error < 0.03, error


@pytest.mark.slow
@needs_ray
def test_a_ray_run_killed_half_way_resumes_and_each_worker_loads_once(tmp_path, monkeypatch, capsys):
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", 8), tmp_path / "out"
    with tempfile.TemporaryDirectory(prefix="kr", dir="/tmp") as temp:
        command = [*KINEMA, "batch", str(jobs), "--out", str(out), "--ray", "local", "--workers", "2"]
        done_before = kill_half_way(command, out, ray_env(temp), total=8)
    with tempfile.TemporaryDirectory(prefix="kr", dir="/tmp") as temp:  # a new cluster: nothing of the killed one
        monkeypatch.setenv("RAY_TMPDIR", temp)
        assert main(["batch", str(jobs), "--out", str(out), "--ray", "local", "--workers", "2", "--quiet"]) == 0
    assert f"{8 - done_before} job(s) done, {done_before} already done, 0 failed" in capsys.readouterr().out
    second = check_finished(out, jobs, run=2)
    assert len([r for r in second if r.get("status") == "done"]) == 8 - done_before
    loads = {r["worker"]: r["loads"] for r in second if "pid" in r}
    assert loads == ({"worker-0": 1, "worker-1": 1} if 8 - done_before > 1 else {"worker-0": 1})
    first = {r["job"] for r in done_records(out, run=1)}
    assert len(first) == done_before and not first & {r["job"] for r in done_records(out, run=2)}


def test_the_docs_commands_parse_and_their_kinema_tiny_jobs_check(tmp_path):
    import re
    import shlex

    from kinema.cli import build_parser
    from kinema.pipelines.batch import read_jobs

    page = (Path(__file__).resolve().parents[2] / "docs" / "batch.md").read_text()
    commands = [shlex.split(line) for block in re.findall(r"^```bash\n(.*?)^```$", page, re.DOTALL | re.MULTILINE)
                for line in block.splitlines() if line.startswith("kinema ")]
    assert len(commands) == 3 and any("--ray" in words and "auto" in words for words in commands)
    for words in commands:
        assert build_parser().parse_args(words[1:]).command == "batch"
    lines = re.search(r"^```json\n(.*?)^```$", page, re.DOTALL | re.MULTILINE).group(1).splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    jobs = read_jobs(write_lines(tmp_path / "jobs.jsonl", [line for line in lines if '"model"' not in line]))
    assert len(jobs) == 3 and [list(job.job.request.seeds) for job in jobs[:2]] == [[1], [2, 3]]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path
