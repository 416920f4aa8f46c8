"""The thread that runs the API's queued jobs, one at a time, oldest first.

Each job runs through `kinema.pipelines.jobs.run_job` with one `FamilyCache` for the server's life, so a model is
loaded once and serves the jobs that ask for it (the two used last stay loaded, `FamilyCache`'s default, so memory
stays bounded however many models clients ask for). The step callback records progress and is where a job stops:
it raises `kinema.pipelines.jobs.Cancelled` when a DELETE asked to cancel the job (the job ends `cancelled`) or when
the server is stopping (the job goes back to the queue and runs again after the restart).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kinema.api.store import JobRecord, JobStore
from kinema.errors import KinemaError, library_error_message
from kinema.log import warnings_of_this_thread

logger = logging.getLogger(__name__)

# (step, timestep, latents) after each sampling step, as generate() calls it
StepCallback = Callable[[int, Any, Any], None]
# What runs one job: (its spec, its result folder, the step callback) -> the videos written. The default loads the
# model and generates; tests of the queue give a cheap stand-in.
JobRunner = Callable[[dict[str, Any], Path, StepCallback], list[Path]]


def _cancelled_type() -> type[Exception]:
    from kinema.pipelines.jobs import Cancelled

    return Cancelled


class JobWorker:
    """Runs queued jobs of `store` in a background thread, writing each job's files into `results_dir / JOB_ID`.

    Args:
        store: the jobs table.
        results_dir: the folder of the result folders.
        models_dir: where model names are also looked up (as `job_from_mapping` does).
        runner: what runs one job (default: `run_job` with the worker's `FamilyCache`).
        poll_seconds: how often an idle worker looks for jobs that `wake()` was not told about.
        device: where the models run (`FamilyCache`'s device).
    """

    def __init__(self, store: JobStore, results_dir: str | os.PathLike, *, models_dir: str | os.PathLike | None = None,
                 runner: JobRunner | None = None, poll_seconds: float = 0.5, device: Any = "cpu"):
        self.store = store
        self.results_dir = Path(results_dir)
        self.models_dir = models_dir
        self.device = device
        self.runner: JobRunner = runner or self._run_with_model
        self.poll_seconds = poll_seconds
        self.cache: Any = None  # kinema.pipelines.jobs.FamilyCache, made by the first job that needs a model
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._records = threading.Lock()  # who records the running job's end: the thread, or stop() past its wait
        self._running: str | None = None
        self._left = False  # stop() stopped waiting: the thread records nothing more

    def start(self) -> None:
        """Start the worker thread."""
        self._stop.clear()
        self._left = False
        self._thread = threading.Thread(target=self._loop, name="kinema-api-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread: a running job stops at its next step and goes back to the queue. Past `timeout` seconds
        (None: no limit) a job still inside one step (a large size's step, or its decode, can take minutes) goes back
        to the queue here and the thread, a daemon, is left to end with the process, recording nothing more: a
        server told to stop does not hang on it."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return
        self._thread.join(timeout)
        self._thread = None
        with self._records:
            self._left, running = True, self._running
        if running is not None:
            self.store.requeue(running)
            logger.warning("job %s: back in the queue, left inside a step (the server stopped without waiting for "
                           "it)", running)

    def _record(self, update: Callable[[], None]) -> bool:
        """Record the running job's end with `update`, unless `stop` has left the thread (it put the job back in
        the queue itself); whether it was recorded."""
        with self._records:
            if self._left:
                return False
            self._running = None
            update()
            return True

    def wake(self) -> None:
        """Tell the worker a job was queued (it also polls)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if self.store.missing() is not None:  # what it would record is lost: the routes say so (503)
                self._wake.wait(self.poll_seconds)
                continue
            record = self.store.claim_next()
            if record is None:
                self._wake.wait(self.poll_seconds)
                continue
            self._run(record)

    def _run(self, record: JobRecord) -> None:
        cancelled = _cancelled_type()
        steps = 0

        def on_step(step: int, timestep: Any, latents: Any) -> None:
            nonlocal steps
            steps += 1
            if self.store.progress(record.id, steps) or self._stop.is_set():
                raise cancelled(record.id)

        with self._records:
            self._running = record.id
        logger.info("job %s: running", record.id)
        try:
            with warnings_of_this_thread(lambda text: self.store.warn(record.id, text)):
                videos = self.runner(record.spec, self.results_dir / record.id, on_step)
        except cancelled:
            if self._stop.is_set():
                if self._record(lambda: self.store.requeue(record.id)):
                    logger.info("job %s: back in the queue (the server is stopping)", record.id)
            elif self._record(lambda: self.store.mark_cancelled(record.id)):
                logger.info("job %s: cancelled", record.id)
        except KinemaError as err:
            message = str(err)
            if self._record(lambda: self.store.fail(record.id, message)):
                logger.warning("job %s: failed: %s", record.id, message)
        except Exception as err:  # a job's failure must not stop the worker; the log keeps the traceback
            message = library_error_message(err)
            if self._record(lambda: self.store.fail(record.id, message)):
                logger.exception("job %s: failed", record.id)
        else:
            names = [os.path.relpath(path, self.results_dir / record.id) for path in videos]
            if self._record(lambda: self.store.finish(record.id, names)):
                logger.info("job %s: done", record.id)

    def _run_with_model(self, spec: dict[str, Any], out: Path, on_step: StepCallback) -> list[Path]:
        from kinema.pipelines.jobs import FamilyCache, job_from_mapping, run_job

        if self.cache is None:
            self.cache = FamilyCache(device=self.device)
        job = job_from_mapping(spec, models_dir=self.models_dir, device=self.device)
        # overwrite: a job re-run after a restart replaces what its earlier, interrupted run left in its folder
        return run_job(job, out, cache=self.cache, callback=on_step, progress=False, overwrite=True)
