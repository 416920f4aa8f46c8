"""kinema.pipelines.batch without a model: job IDs from the line's content, every line checked (with its number)
before anything runs, the append-only manifest surviving a torn line, the batch folder's output policy, and a failed
job recorded while the others go on. Runs with real generation are in tests/cli/test_batch_cli.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kinema.errors import KinemaError
from kinema.pipelines.batch import (
    MANIFEST_NAME,
    BatchJob,
    append_record,
    check_batch_output,
    job_id,
    read_jobs,
    read_manifest,
    run_batch,
    run_one,
)
from kinema.pipelines.jobs import FamilyCache, job_from_mapping

LINE = {"prompt": "a red circle moving right", "frames": 8, "steps": 2, "seed": 1}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_job_id_is_the_hash_of_the_line_content_so_an_edit_runs_again():
    reference = hashlib.sha256(json.dumps(LINE, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert job_id(LINE) == reference
    assert job_id(dict(reversed(list(LINE.items())))) == reference  # key order is not content
    assert job_id({**LINE, "seed": 2}) != reference
    assert job_id(LINE, occurrence=2) == f"{reference}-2"


def test_the_same_line_naming_other_files_is_another_job(tmp_path):
    # A relative path names the file beside the jobs file: a batch of one folder's line must not count another
    # folder's (another start image) as done. Lines whose paths are taken as written keep the plain hash.
    from PIL import Image

    line = {**LINE, "image": "start.png"}
    ids = []
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64), colour).save(tmp_path / name / "start.png")
        [job] = read_jobs(write_lines(tmp_path / name / "jobs.jsonl", [json.dumps(line)]))
        assert job.job.request.image == str(tmp_path / name / "start.png")
        ids.append(job.id)
    assert ids[0] != ids[1]
    absolute = {**LINE, "image": str(tmp_path / "a" / "start.png")}
    [job] = read_jobs(write_lines(tmp_path / "jobs.jsonl", [json.dumps(absolute)]))
    assert job.id == job_id(absolute)
    [job] = read_jobs(write_lines(tmp_path / "plain.jsonl", [json.dumps(LINE)]))
    assert job.id == job_id(LINE)
    # A pipe's relative paths are the current folder's (read from /dev/stdin they resolved against /dev).
    import subprocess
    import sys

    (tmp_path / "here").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "here" / "start.png")
    code = ("import sys; from kinema.pipelines.batch import read_jobs; "
            "print(read_jobs('/dev/stdin')[0].job.request.image)")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(line) + "\n", capture_output=True,
                          text=True, cwd=tmp_path / "here", timeout=120)
    assert done.stdout.strip() == str(tmp_path / "here" / "start.png"), done.stderr
    # Absolute paths in the forms a job rewrites (a LoRA object, a bare ControlNet path) are taken as written.
    from kinema.pipelines.batch import _resolved_paths
    from kinema.pipelines.jobs import Job
    from kinema.pipelines.request import GenerationRequest

    job = Job(request=GenerationRequest(prompt="x"), model="kinema-tiny-ad", loras=[("/abs/l.safetensors", 0.5)],
              controlnet=("/abs/cn", 1.0))
    assert _resolved_paths({"loras": [{"path": "/abs/l.safetensors", "weight": 0.5}], "controlnet": "/abs/cn"},
                           job) == {}
    assert _resolved_paths({"loras": [["l.safetensors", 0.5]], "controlnet": "/abs/cn"}, job) == {
        "loras": [["/abs/l.safetensors", 0.5]]}


def test_read_jobs_checks_every_line_and_names_the_first_bad_one(tmp_path):
    good = json.dumps(LINE)
    jobs = read_jobs(write_lines(tmp_path / "ok.jsonl", [good, "", "  ", json.dumps({**LINE, "seed": [3, 4]}), good]))
    assert [job.line for job in jobs] == [1, 4, 5]
    assert [list(job.job.request.seeds) for job in jobs] == [[1], [3, 4], [1]]
    assert jobs[2].id == f"{jobs[0].id}-2"  # the same line twice is two jobs
    assert (jobs[0].job.request.height, jobs[0].job.request.width) == (64, 64)  # kinema-tiny's defaults

    cases = {
        "{\"prompt\": \"x\",": r"line 3: not valid JSON at column",
        "[1, 2]": r"line 3 holds an array, not a job object",
        json.dumps({**LINE, "promt": "x"}): r"line 3: unknown key 'promt'; did you mean 'prompt'\?",
        json.dumps({**LINE, "image": "missing.png"}): r"line 3: no such image: missing.png",
        json.dumps({**LINE, "steps": "two"}): r"line 3: steps must be a whole number",
    }
    for bad, message in cases.items():
        path = write_lines(tmp_path / "bad.jsonl", [good, "", bad, good])
        with pytest.raises(KinemaError, match=message) as caught:
            read_jobs(path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    (tmp_path / "not-an-image.png").write_text("hello")
    with pytest.raises(KinemaError, match=r"line 1: .*not an image"):
        read_jobs(write_lines(tmp_path / "bad.jsonl", [json.dumps({**LINE, "image": "not-an-image.png"})]))
    with pytest.raises(KinemaError, match="holds no jobs"):
        read_jobs(write_lines(tmp_path / "empty.jsonl", ["", ""]))
    with pytest.raises(KinemaError, match="no such job file"):
        read_jobs(tmp_path / "nowhere.jsonl")


def test_the_manifest_skips_a_torn_line_and_the_next_record_starts_a_line_of_its_own(tmp_path):
    manifest = tmp_path / MANIFEST_NAME
    manifest.write_text(json.dumps({"kinema_batch": 1}) + "\n")
    append_record(manifest, {"job": "a", "status": "done"})
    with open(manifest, "ab") as file:  # what a machine crash mid-write could leave
        file.write(b'{"job": "b", "sta')
    append_record(manifest, {"job": "c", "status": "done"})
    assert [record.get("job") for record in read_manifest(tmp_path)] == [None, "a", "c"]
    assert manifest.read_text().splitlines()[2] == '{"job": "b", "sta'


def test_the_batch_folder_is_new_empty_or_an_earlier_batch(tmp_path):
    assert check_batch_output(tmp_path / "new") == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    check_batch_output(tmp_path / "empty")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(KinemaError, match="kinema did not write it"):
        check_batch_output(mine)
    (mine / MANIFEST_NAME).write_text("not ours\n")
    with pytest.raises(KinemaError, match="is not a kinema batch manifest"):
        check_batch_output(mine)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / MANIFEST_NAME).write_text(json.dumps({"kinema_batch": 1}) + "\n")
    assert check_batch_output(earlier) == earlier.resolve()
    with pytest.raises(KinemaError, match="give --ray local"):
        run_batch([], tmp_path / "new", workers=2)


class FailingCache:
    """A FamilyCache stand-in whose model never loads."""

    loads = 0

    def get(self, job):
        raise KinemaError("the model is broken; fix it")


def test_a_failed_job_is_recorded_with_its_error_and_leaves_no_folder(tmp_path):
    job = BatchJob(line=7, id="abc", job=job_from_mapping(LINE))
    record = run_one(job, tmp_path, FailingCache(), "worker-3")
    assert record["status"] == "failed" and record["error"] == "the model is broken; fix it"
    assert (record["line"], record["job"], record["worker"], record["outputs"], record["loaded"]) == (
        7, "abc", "worker-3", [], 0)
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def test_a_job_folder_renamed_into_place_just_before_a_crash_counts_as_done_and_gets_its_record(tmp_path):
    from kinema.fileio import write_manifest

    job = BatchJob(line=2, id="abc", job=job_from_mapping(LINE))
    out = tmp_path / "out"
    folder = out / "jobs" / "abc"
    folder.mkdir(parents=True)
    (folder / "video-seed1.mp4").write_bytes(b"video")
    write_manifest(folder, "job")  # what run_job's atomic_folder leaves: a whole job folder, marked
    (out / MANIFEST_NAME).write_text(json.dumps({"kinema_batch": 1}) + "\n")  # its record never came
    summary = run_batch([job], out)  # nothing to run: no model loads
    assert (summary.done, summary.skipped, summary.failed, summary.loads) == (0, 1, [], {})
    run, recovered = read_manifest(out)[1:]
    assert run["run"] == 1 and run["skipped"] == 1
    assert recovered == {"job": "abc", "line": 2, "status": "done", "run": 1, "recovered": True,
                         "outputs": ["jobs/abc/video-seed1.mp4"]}


def test_one_run_at_a_time_writes_into_a_batch_folder(tmp_path):
    from kinema.fileio import exclusive_lock
    from kinema.pipelines.batch import LOCK_NAME

    job = BatchJob(line=1, id="abc", job=job_from_mapping(LINE))
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_text(json.dumps({"kinema_batch": 1}) + "\n")
    with exclusive_lock(out / LOCK_NAME, "held by the first run"):  # the first run, still going
        with pytest.raises(KinemaError, match=r"another kinema batch is running into \S+out; wait for it"):
            run_batch([job], out, jobs_file="jobs.jsonl")
    assert [record for record in read_manifest(out) if "started" in record] == []  # the second recorded nothing


class FakeRay:
    """Just enough of Ray's API, run synchronously in this process, to test the fan-out: actors, one call at a time
    each, results in submission order; a call may kill its actor (RayActorError)."""

    class exceptions:  # noqa: N801 - mirrors ray.exceptions
        class RayError(Exception):
            pass

        class RayActorError(RayError):
            pass

    class Ref:
        def __init__(self, call):
            self.call = call

    def __init__(self, cpus: int):
        self.cpus, self.killed = cpus, 0

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": float(self.cpus)}

    def remote(self, **options):
        def make(cls):
            class Handle:
                def __init__(self, *args):
                    self.instance, self.dead = cls(*args), False

                def __getattr__(self, name):
                    method = getattr(self.instance, name)

                    def call(*args):
                        if self.dead:
                            raise FakeRay.exceptions.RayActorError("the actor is dead")
                        try:
                            return method(*args)
                        except FakeRay.exceptions.RayActorError:
                            self.dead = True
                            raise

                    return type("Method", (), {"remote": staticmethod(lambda *args: FakeRay.Ref(lambda: call(*args)))})

            return type("ActorClass", (), {"remote": staticmethod(lambda *args: Handle(*args))})

        return make

    def wait(self, refs, num_returns=1):
        return refs[:1], refs[1:]

    def get(self, refs):
        return [ref.call() for ref in refs] if isinstance(refs, list) else refs.call()

    def kill(self, actor):
        self.killed += 1

    def shutdown(self):
        raise AssertionError("a cluster this run did not start must be left running")


def fan_out(tmp_path, monkeypatch, cpus: int, workers: int | None, dying_lines: set[int], count: int = 6):
    """run_batch over FakeRay with jobs that do not generate: a job on a line of `dying_lines` kills its worker."""
    import sys

    import kinema.pipelines.batch as batch

    def fake_run_one(batch_job, out, cache, worker):
        if batch_job.line in dying_lines:
            raise FakeRay.exceptions.RayActorError("killed by the out-of-memory killer")
        loaded = int(cache.loads == 0)  # the worker's one model, with its first job
        cache.loads = 1
        return {"job": batch_job.id, "line": batch_job.line, "worker": worker, "status": "done", "outputs": [],
                "seconds": 0.0, "loaded": loaded}

    fake = FakeRay(cpus)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(batch, "ray_available", lambda: True)
    monkeypatch.setattr(batch, "run_one", fake_run_one)
    jobs = [BatchJob(line=n, id=f"job{n}", job=job_from_mapping({**LINE, "seed": n})) for n in range(1, count + 1)]
    summary = run_batch(jobs, tmp_path / "out", ray="auto", workers=workers)
    records = [r for r in read_manifest(tmp_path / "out") if "job" in r]
    return summary, records, fake


def test_jobs_run_here_grouped_by_model_so_each_loads_once(tmp_path, monkeypatch):
    """The cache keeps the two models used last: three models interleaved line by line loaded one per job."""
    import kinema.pipelines.batch as batch
    import kinema.pipelines.load as load

    class Family:
        pass

    monkeypatch.setattr(load, "load_family", lambda model, **options: Family())
    ran = []

    def fake_run_one(batch_job, out, cache, worker):
        cache.get(batch_job.job)
        ran.append(batch_job.line)
        return {"job": batch_job.id, "line": batch_job.line, "worker": worker, "status": "done", "outputs": [],
                "seconds": 0.0, "loaded": 0}

    monkeypatch.setattr(batch, "run_one", fake_run_one)
    dtypes = ["float32", "bfloat16", "float16"] * 2
    jobs = [BatchJob(line=n, id=f"job{n}", job=job_from_mapping({**LINE, "seed": n, "dtype": dtype}))
            for n, dtype in enumerate(dtypes, start=1)]
    loads = []
    original = FamilyCache.get

    def counting(cache, job):
        family = original(cache, job)
        loads.append(cache.loads)
        return family

    monkeypatch.setattr(FamilyCache, "get", counting)
    run_batch(jobs, tmp_path / "out")
    assert ran == [1, 4, 2, 5, 3, 6] and loads[-1] == 3


def test_ray_workers_are_fed_in_turn_and_a_dead_workers_jobs_go_to_the_others(tmp_path, monkeypatch):
    summary, records, fake = fan_out(tmp_path, monkeypatch, cpus=2, workers=None, dying_lines={2})
    assert [(r["line"], r["worker"], r["status"]) for r in records] == [
        (1, "worker-0", "done"), (2, "worker-1", "failed"), (3, "worker-0", "done"), (4, "worker-0", "done"),
        (5, "worker-0", "done"), (6, "worker-0", "done")]
    assert "the Ray worker failed" in records[1]["error"] and "out-of-memory" in records[1]["error"]
    assert (summary.done, len(summary.failed), summary.loads) == (5, 1, {"worker-0": 1})
    assert fake.killed == 2  # every actor is let go at the end


def test_when_every_ray_worker_died_the_rest_is_recorded_as_not_run(tmp_path, monkeypatch):
    summary, records, _ = fan_out(tmp_path, monkeypatch, cpus=8, workers=2, dying_lines={1, 2}, count=4)
    assert [(r["line"], r["status"]) for r in records] == [(1, "failed"), (2, "failed"), (3, "failed"),
                                                          (4, "failed")]
    assert [r["error"] for r in records[2:]] == ["no Ray worker was left to run it; run again to retry"] * 2
    assert summary.loads == {}


def test_more_ray_workers_than_cpus_are_capped_at_the_cpus(tmp_path, monkeypatch, caplog):
    summary, records, fake = fan_out(tmp_path, monkeypatch, cpus=1, workers=3, dying_lines=set(), count=3)
    assert {r["worker"] for r in records} == {"worker-0"} and fake.killed == 1
    assert "has 1 CPU(s), so 1 worker actors instead of 3" in caplog.text
