"""Batch generation: one job per line of a JSON Lines file, run in turn here or fanned out over a Ray cluster, with a
manifest that lets a re-run after a crash pick up where the last one stopped.

The output folder `DIR` holds:

- `DIR/jobs/ID/`: one folder per finished job (its videos, their settings sidecars, `job.json` and `report.json`,
  as kinema.pipelines.jobs.run_job writes them), written whole or not at all (kinema.fileio.atomic_folder). A job
  is done exactly when its folder exists and carries kinema's mark, so a re-run skips it and never redoes it.
- `DIR/manifest.jsonl`: what happened, one JSON object per line, only ever appended: a header, then per run a
  `run` record, per job a record (`line`, `job` (its ID), `status` "done" or "failed", `outputs`, `seconds`, `worker`,
  `loaded`: how many models the job had to load, `error` for a failure) and per worker at the end of a run its
  `loads` (how many times it loaded a model, the sum of its jobs' `loaded`) and `jobs`. Each record is one
  write(2) call and the reader skips a torn last line, so a killed run cannot leave the manifest unreadable.

A job's ID is a hash of its line's content (whitespace and key order aside) and of the files its relative paths
resolved to: an edited line, or the same line naming other files, is a new job and runs again; an untouched one is
skipped. Every line is read and checked (kinema.pipelines.jobs.job_from_mapping) before
any model loads; a bad line is one KinemaError naming its line number.

Locally the jobs run in turn on one FamilyCache (a model loads once for all jobs that share it). With Ray, each
worker actor owns a FamilyCache, so a model loads once per worker, not per job; the driver alone writes the
manifest. Ray is optional (the `batch` extra) and imported only when asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError, library_error_message

if TYPE_CHECKING:
    from kinema.pipelines.jobs import FamilyCache, Job

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".kinema-batch.lock"  # held by the run writing into the folder
JOBS_FOLDER = "jobs"
HEADER_KEY = "kinema_batch"  # the manifest's first record names the format: this key, with FORMAT_VERSION
FORMAT_VERSION = 1
LOCAL_RAY = "local"  # --ray local: start a Ray cluster on this machine for the run
RAY_MISSING = 'batch generation on Ray needs Ray, which is not installed; pip install "kinema[batch]"'
# How long a cluster's address has to answer before the run is refused: Ray's own connect retries for minutes.
RAY_CONNECT_SECONDS = 10.0
_ID_LENGTH = 16  # hex digits of sha256: 64 bits, no collision in any batch a person writes


# ---------------------------------------------------------------- reading the jobs


@dataclass
class BatchJob:
    """One line of a jobs file: where it was (`line`, 1-based), its `id` (see `job_id`) and the checked `job`."""

    line: int
    id: str
    job: Job


def job_id(data: Mapping[str, Any], occurrence: int = 1, resolved: Mapping[str, Any] | None = None) -> str:
    """The ID of a job line: a hash of its content as canonical JSON (so whitespace and key order do not count, and
    any edit does), and of `resolved`, where its paths resolved to when they are not those it gives (a relative
    path, a model under --models-dir): the same line in another folder names other files, so it is another job.
    The same line given again gets `-2`, `-3`, ... (`occurrence`): its own job, e.g. with seed -1."""
    content: Any = {"line": data, "resolved": resolved} if resolved else data
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:_ID_LENGTH]
    return digest if occurrence == 1 else f"{digest}-{occurrence}"


JOB_EXAMPLE = '{"prompt": "a red circle moving right", "seed": 1}'


def read_jobs(path: str | os.PathLike, *, models_dir: str | os.PathLike | None = None,
              device: Any = "cpu") -> list[BatchJob]:
    """Read and check every job of the JSON Lines file `path` (one JSON object per line; blank lines are skipped),
    before any model loads: each line goes through `job_from_mapping` (relative paths resolve against the file's
    folder, or the current one for a pipe, model names also against `models_dir`; speed presets take `device`'s
    settings, None: Ray workers', unknown here). Raises one KinemaError naming the first bad line's number."""
    from kinema.jsonl import read_json_lines
    from kinema.pipelines.jobs import job_from_mapping

    path = Path(path)
    jobs: list[BatchJob] = []
    seen: dict[str, int] = {}
    # A pipe (/dev/stdin, <(...)) has no folder of its own: its relative paths are the shell's, the current folder's.
    base = path.parent if path.is_file() else Path.cwd()
    for where, number, data in read_json_lines(path, what="job", example=JOB_EXAMPLE):
        try:
            job = job_from_mapping(data, where=where, models_dir=models_dir, base=base, device=device)
        except KinemaError as err:
            message = str(err)
            raise KinemaError(message if f"line {number}" in message else f"{where}: {message}") from None
        resolved = _resolved_paths(data, job)
        first = job_id(data, resolved=resolved)
        seen[first] = seen.get(first, 0) + 1
        jobs.append(BatchJob(line=number, id=job_id(data, seen[first], resolved), job=job))
    return jobs


def _resolved_paths(data: Mapping[str, Any], job: Job) -> dict[str, Any]:
    """The files the job line `data` names, as `job` resolved them, where that is not how the line gives them (its
    path strings compared, whatever form holds them: a LoRA object or pair, a path or a {path, scale} object)."""
    from kinema.pipelines.jobs import PATH_KEYS
    from kinema.pipelines.request import paths_in

    settings = job.settings()
    return {key: settings.get(key) for key in PATH_KEYS
            if data.get(key) is not None and paths_in(settings.get(key)) != paths_in(data[key])}


# ---------------------------------------------------------------- the manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append `record` to the manifest `path` as one JSON line, in one write(2) call on an O_APPEND descriptor and
    synced to disk: a killed run leaves either the whole line or (on a crash of the machine) a torn last line that
    `read_manifest` skips; the next record then starts on a line of its own."""
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        size = os.fstat(descriptor).st_size
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = 0
        while written < len(line):  # a regular file takes it whole; the loop only guards a short write
            written += os.write(descriptor, line[written:])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_manifest(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of `out`'s manifest in order (the header first); a torn line that a crash left is skipped.
    Raises one KinemaError when `out` holds no batch manifest."""
    path = Path(out) / MANIFEST_NAME
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        raise KinemaError(f"{out} holds no batch manifest ({MANIFEST_NAME}); give the --out folder of a "
                          "`kinema batch` run") from None
    records = []
    for raw in lines:
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            records.append(record)
    if not records or records[0].get(HEADER_KEY) is None:
        raise KinemaError(f"{path} is not a kinema batch manifest (its first line does not name the format); "
                          "give the --out folder of a `kinema batch` run")
    return records


def _is_batch_folder(out: Path) -> bool:
    try:
        read_manifest(out)
    except KinemaError:
        return False
    return True


def check_batch_output(out: str | os.PathLike) -> Path:
    """The output policy for a batch folder: a new or empty folder, or the folder of an earlier batch run (which
    this run resumes). Anything else raises one KinemaError line. Returns the real path."""
    from kinema.fileio import check_output

    out = Path(out)
    if out.is_dir() and _is_batch_folder(out):
        return Path(os.path.realpath(out))
    if (out / MANIFEST_NAME).exists():
        raise KinemaError(f"{out / MANIFEST_NAME} is not a kinema batch manifest, so kinema did not write {out}; "
                          "choose a new or empty folder")
    return check_output(out, "batch", folder=True)


def _start_manifest(out: Path) -> Path:
    """Create `out` and its manifest (the header record written whole through a rename) if they are not there."""
    path = out / MANIFEST_NAME
    (out / JOBS_FOLDER).mkdir(parents=True, exist_ok=True)
    if not path.exists():
        from kinema import __version__

        temporary = out / f".{MANIFEST_NAME}.kinema-part-{os.getpid()}"
        temporary.write_text(json.dumps({HEADER_KEY: FORMAT_VERSION, "kinema": __version__, "created": _now()})
                             + "\n")
        os.replace(temporary, path)
    return path


def job_folder(out: str | os.PathLike, id: str) -> Path:
    """Where the job `id` of the batch in `out` writes its files."""
    return Path(out) / JOBS_FOLDER / id


def is_done(out: str | os.PathLike, id: str) -> bool:
    """Whether job `id` finished: its folder is there whole, with kinema's mark (a killed job leaves only a hidden
    temporary, which the next write removes)."""
    from kinema.fileio import output_kind
    from kinema.pipelines.jobs import JOB_OUTPUT_KIND

    return output_kind(job_folder(out, id)) == JOB_OUTPUT_KIND


# ---------------------------------------------------------------- running one job


def _outputs(out: Path, folder: Path) -> list[str]:
    """The files of a finished job folder, relative to `out` (so the batch folder can move)."""
    from kinema.fileio import MANIFEST

    return sorted(str(path.relative_to(out)) for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)


def run_one(batch_job: BatchJob, out: str | os.PathLike, cache: FamilyCache, worker: str) -> dict[str, Any]:
    """Run one job into `out/jobs/ID/` (written whole or not at all) with `cache`'s models and return its manifest
    record; a job that fails is recorded as failed with its one-line error and the worker goes on. Ctrl-C and
    SIGTERM are not failures: they stop the run (nothing half-written stays)."""
    from kinema.pipelines.jobs import run_job

    out = Path(out)
    target = job_folder(out, batch_job.id)
    started = time.perf_counter()
    record: dict[str, Any] = {"job": batch_job.id, "line": batch_job.line, "worker": worker}
    loads_before = cache.loads
    try:
        run_job(batch_job.job, target, cache=cache)  # writes the folder whole or not at all (atomic_folder)
    except Exception as err:  # one bad job must not stop the others; its error is kept in the manifest
        message = str(err) if isinstance(err, KinemaError) else library_error_message(err)
        record.update(status="failed", error=message, outputs=[])
    else:
        record.update(status="done", outputs=_outputs(out, target))
    record.update(seconds=round(time.perf_counter() - started, 3), loaded=cache.loads - loads_before)
    return record


def _worker_name(index: int) -> str:
    return f"worker-{index}"


# ---------------------------------------------------------------- the run


@dataclass
class BatchSummary:
    """What a run did: jobs `done` now, `skipped` (done by an earlier run), `failed` (their records), and per worker
    how many times it loaded a model (`loads`)."""

    out: Path
    run: int
    done: int = 0
    skipped: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    loads: dict[str, int] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        """The manifest file of the batch."""
        return self.out / MANIFEST_NAME


Record = Callable[[dict[str, Any]], None]


def run_batch(
    jobs: Sequence[BatchJob],
    out: str | os.PathLike,
    *,
    ray: str | None = None,
    workers: int | None = None,
    jobs_file: str | os.PathLike | None = None,
    on_record: Callable[[dict[str, Any], int, int], None] | None = None,
    device: str = "cpu",
) -> BatchSummary:
    """Run every job of `jobs` (from `read_jobs`) that is not done yet into `out` and record each in the manifest.

    Args:
        jobs: the checked jobs, in file order.
        out: the batch folder: new, empty, or an earlier run's (resumed: finished jobs are skipped).
        ray: None runs the jobs here in turn on one FamilyCache; a Ray address ("auto", "ray://HEAD:10001",
            "HEAD:6379") fans them out over that cluster, `"local"` starts a cluster on this machine for the run.
        workers: Ray only: how many worker actors (each loads a model once and serves many jobs); None: one per
            CPU of the cluster (with "local": `workers` CPUs, default all of this machine's). At most one per job.
        jobs_file: recorded in the manifest's run record.
        on_record: called with each job's manifest record once it is written, the number of jobs finished (done or
            failed) in this run so far, and how many this run has to do: for progress.
        device: where each worker runs its models, a kinema.devices name resolved on the worker's own machine
            (auto: its first CUDA GPU, else its CPU). On Ray, `cuda` gives each worker actor a GPU of its own.
    Returns:
        A BatchSummary; failed jobs are in it (and the manifest), not raised, so that one bad job does not stop
        the rest.
    """
    if workers is not None and ray is None:
        raise KinemaError("workers are Ray worker actors; give --ray local (or a cluster's address) with --workers")
    if workers is not None and workers < 1:
        raise KinemaError(f"workers must be at least 1, got {workers}")
    if ray is not None:
        ray_host_port(ray)
    if ray is not None and not ray_available():
        raise KinemaError(RAY_MISSING)
    real = check_batch_output(out)
    finished = [batch_job for batch_job in jobs if is_done(real, batch_job.id)]
    finished_ids = {batch_job.id for batch_job in finished}
    pending = [batch_job for batch_job in jobs if batch_job.id not in finished_ids]
    # Ray is connected (and the cluster checked for the device) before the batch folder is touched.
    with _ray_session(ray, workers, device) if ray is not None and pending else nullcontext():
        return _run_pending(jobs, real, finished, pending, ray, workers, jobs_file, on_record, device)


def _run_pending(jobs: Sequence[BatchJob], real: Path, finished: list[BatchJob], pending: list[BatchJob],
                 ray: str | None, workers: int | None, jobs_file: str | os.PathLike | None,
                 on_record: Callable[[dict[str, Any], int, int], None] | None, device: str) -> BatchSummary:
    """`run_batch` from its manifest on: the run's records, the pending jobs run, the workers' records. One run at a
    time writes into a batch folder (a lock held to the end): two would make the same jobs and record both."""
    from kinema.fileio import exclusive_lock

    manifest = _start_manifest(real)
    with exclusive_lock(real / LOCK_NAME, f"another kinema batch is running into {real}; wait for it to finish "
                                          "(it resumes where it stops), or give this one another --out"):
        # Jobs another run finished since run_batch looked are done, not run again.
        since = {batch_job.id for batch_job in pending if is_done(real, batch_job.id)}
        return _run_locked(jobs, real, manifest, finished + [job for job in pending if job.id in since],
                           [job for job in pending if job.id not in since], ray, workers, jobs_file, on_record, device)


def _run_locked(jobs: Sequence[BatchJob], real: Path, manifest: Path, finished: list[BatchJob],
                pending: list[BatchJob], ray: str | None, workers: int | None, jobs_file: str | os.PathLike | None,
                on_record: Callable[[dict[str, Any], int, int], None] | None, device: str) -> BatchSummary:
    records = read_manifest(real)
    run = 1 + sum(1 for record in records if "started" in record)
    recorded_done = {record["job"] for record in records if record.get("status") == "done" and "job" in record}
    summary = BatchSummary(out=real, run=run, skipped=len(finished))
    append_record(manifest, {"run": run, "started": _now(), "jobs_file": None if jobs_file is None
                             else os.path.abspath(jobs_file), "jobs": len(jobs), "skipped": summary.skipped,
                             "runner": "local" if ray is None else "ray", "ray": ray, "host": socket.gethostname()})
    for batch_job in finished:
        if batch_job.id not in recorded_done:  # its folder was renamed into place just before a crash, unrecorded
            append_record(manifest, {"job": batch_job.id, "line": batch_job.line, "status": "done", "run": run,
                                     "outputs": _outputs(real, job_folder(real, batch_job.id)), "recovered": True})
    total = len(pending)

    def record(entry: dict[str, Any]) -> None:
        entry["run"] = run
        append_record(manifest, entry)
        if entry["status"] == "done":
            summary.done += 1
            logger.info("job %s (line %d) done in %.1f s on %s [%d/%d]", entry["job"], entry["line"],
                        entry["seconds"], entry["worker"], summary.done + len(summary.failed), total)
        else:
            summary.failed.append(entry)
            logger.warning("job %s (line %d) failed: %s", entry["job"], entry["line"], entry["error"])
        if on_record is not None:
            on_record(entry, summary.done + len(summary.failed), total)

    if pending:
        if ray is None:
            workers_seen = _run_here(pending, real, record, device)
        else:
            workers_seen = _run_on_ray(pending, real, record, workers, device)
        for worker in workers_seen:
            append_record(manifest, {**worker, "run": run})
            summary.loads[worker["worker"]] = worker["loads"]
    return summary


def _run_here(pending: Sequence[BatchJob], out: Path, record: Record, device: str) -> list[dict[str, Any]]:
    """Run the jobs in turn in this process on one FamilyCache, grouped by model (in file order within a model), so
    that each model loads once though the cache keeps only the two used last; returns the one worker's record."""
    from kinema.interrupt import stop_if_requested

    worker = BatchWorker(_worker_name(0), str(out), device)
    keyed = [(repr(batch_job.job.model_key()), batch_job) for batch_job in pending]
    order = {key: index for index, key in enumerate(dict.fromkeys(key for key, _ in keyed))}
    for _, batch_job in sorted(keyed, key=lambda pair: order[pair[0]]):
        stop_if_requested()
        record(worker.run(batch_job))
    return [worker.summary()]


# ---------------------------------------------------------------- Ray


def ray_available() -> bool:
    """Whether Ray is installed (found without importing it: importing Ray takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


class BatchWorker:
    """One worker (a Ray actor, or this process when run here): a name, the batch folder and a FamilyCache that
    keeps its models between jobs. Its `loads` add up what each job loaded, so they count every model load the
    worker made, whichever cache made it."""

    def __init__(self, name: str, out: str, device: str = "cpu") -> None:
        from kinema.pipelines.jobs import FamilyCache

        self.name, self.out, self.cache = name, out, FamilyCache(device=device)
        self.jobs = self.loads = 0

    def run(self, batch_job: BatchJob) -> dict[str, Any]:
        """Run one job; its manifest record."""
        entry = run_one(batch_job, self.out, self.cache, self.name)
        self.jobs += 1
        self.loads += entry["loaded"]
        return entry

    def summary(self) -> dict[str, Any]:
        """The worker's manifest record: its model loads and jobs."""
        return {"worker": self.name, "loads": self.loads, "jobs": self.jobs, "host": socket.gethostname(),
                "pid": os.getpid(), "device": str(self.cache.device)}


def ray_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray cluster's address ("HEAD:6379", "ray://HEAD:10001"); None for "local" and "auto". One
    KinemaError line for anything else, before any connection is tried."""
    if address in (LOCAL_RAY, "auto"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 address in brackets
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KinemaError(f"--ray {address!r} is not a Ray address; give local (a cluster started here for the "
                          "run), auto (the cluster this machine joined), HEAD:6379 or ray://HEAD:10001")
    return host, int(port)


def _check_reachable(address: str) -> None:
    """Refuse, in one line and within RAY_CONNECT_SECONDS, a cluster address nothing answers at: Ray would retry
    for minutes, printing its own connection warnings."""
    host_port = ray_host_port(address)
    if host_port is None:
        return
    try:
        socket.create_connection(host_port, timeout=RAY_CONNECT_SECONDS).close()
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise KinemaError(f"cannot connect to the Ray cluster at {address!r} ({why} at {host_port[0]}:"
                          f"{host_port[1]}); start it with `ray start --head`, check the address and port, or give "
                          "--ray local") from None


def _connect(ray_module: Any, address: str, workers: int | None) -> None:
    """`ray.init` for `address` ("local": a new cluster of `workers` CPUs here). A local start is tried twice: Ray
    gives its node a fixed 30 s to register, which a busy machine can miss once."""
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                               "log_to_driver": False}
    _check_reachable(address)
    tries = 2 if address == LOCAL_RAY else 1
    for attempt in range(1, tries + 1):
        try:
            if address == LOCAL_RAY:
                ray_module.init(address="local", num_cpus=workers, **options)
            else:
                ray_module.init(address=address, **options)
            return
        except Exception as err:  # Ray raises bare Exceptions for a node that did not start
            ray_module.shutdown()  # whatever half started goes
            if attempt < tries:
                logger.warning("the local Ray cluster did not start (%s); trying again", library_error_message(err))
                continue
            if address == LOCAL_RAY:
                raise KinemaError(f"the local Ray cluster did not start ({library_error_message(err)}); the "
                                  "machine may be too busy: run the same command again") from None
            raise KinemaError(f"cannot connect to the Ray cluster at {address!r} ({library_error_message(err)}); "
                              "start it with `ray start --head`, or give --ray local") from None


@contextmanager
def _ray_session(address: str, workers: int | None, device: str) -> Iterator[None]:
    """Ray connected for the run (a cluster started here, `address` "local", is stopped at the end), with a GPU
    somewhere in it when `device` is cuda (run_batch has checked that Ray is installed)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        _connect(ray, address, workers)
    try:
        if device.startswith("cuda") and int(ray.cluster_resources().get("GPU", 0)) < 1:
            raise KinemaError(f"device {device}: the Ray cluster has no GPU; use --device cpu (or auto)")
        yield
    finally:
        if started_here:
            ray.shutdown()


def _run_on_ray(pending: Sequence[BatchJob], out: Path, record: Record, workers: int | None,
                device: str = "cpu") -> list[dict[str, Any]]:
    """Fan the jobs out over worker actors on the connected Ray cluster (`_ray_session`), each fed one job at a time
    as it finishes the last; jobs that share a model are queued together, so a worker tends to keep serving the
    model it has loaded."""
    import ray

    actors: list[Any] = []
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if workers is not None and workers > cpus:  # an actor that finds no free CPU would wait, and its jobs too
            logger.warning("the Ray cluster has %d CPU(s), so %d worker actors instead of %d", cpus, cpus, workers)
        count = min(workers or cpus, cpus, len(pending))
        # Ray hides the GPUs from an actor that asks for none, so a worker on `cuda` asks for one of its own.
        gpus = 1 if device.startswith("cuda") else 0
        if gpus:
            count = min(count, int(ray.cluster_resources().get("GPU", 0)))
        actor_class = ray.remote(num_cpus=1, num_gpus=gpus)(BatchWorker)
        actors = [actor_class.remote(_worker_name(index), str(out), device) for index in range(count)]
        queue = deque(sorted(pending, key=lambda batch_job: repr(batch_job.job.model_key())))
        running: dict[Any, tuple[Any, BatchJob]] = {}

        def feed(actor: Any) -> None:
            if queue:
                batch_job = queue.popleft()
                running[actor.run.remote(batch_job)] = (actor, batch_job)

        for actor in actors:  # each actor gets its first job at once, so none sits idle while another loads
            feed(actor)
        alive = set(range(count))
        while running:
            (ready,), _ = ray.wait(list(running), num_returns=1)
            actor, batch_job = running.pop(ready)
            index = actors.index(actor)
            try:
                entry = ray.get(ready)
            except ray.exceptions.RayError as err:  # the actor died (out of memory, node lost), or Ray failed it
                if isinstance(err, ray.exceptions.RayActorError):
                    alive.discard(index)
                entry = {"job": batch_job.id, "line": batch_job.line, "worker": _worker_name(index),
                         "status": "failed", "outputs": [], "seconds": None, "loaded": 0,
                         "error": f"the Ray worker failed ({library_error_message(err)}); run again to retry"}
            record(entry)
            if index in alive:
                feed(actor)
            elif not alive:  # the last worker is gone: what is left is recorded as not run, not waited for
                for left in queue:
                    record({**entry, "job": left.id, "line": left.line,
                            "error": "no Ray worker was left to run it; run again to retry"})
                queue.clear()
        return ray.get([actors[index].summary.remote() for index in sorted(alive)])
    finally:
        for actor in actors:
            ray.kill(actor)
