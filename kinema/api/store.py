"""The API's jobs, kept in an embedded SQLite database (stdlib sqlite3, write-ahead log) so that they outlive a
client that disconnects and a server that stops or is killed.

A job's row holds what rebuilds it (`spec`: the submitted fields with the seeds actually drawn and uploads replaced
by the server-side files they were saved to), what it records (`settings`: `Job.settings()`), its status
(queued -> running -> done / failed / cancelled), progress and the names of its videos. Every change is one SQL
statement or one transaction under the store's lock, so a job is never lost or run twice within a server, and
`recover()` at start puts back what a stopped server left running.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
DATABASE = "jobs.sqlite3"
LOCK_FILE = "server.lock"
# What a data folder holds; a folder with anything else in it is not one (and kinema writes into none of the user's).
DATA_DIR_NAMES = (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", LOCK_FILE, "uploads", "results")
# A job that was running each of this many times the server stopped is taken to be what stops it (memory, a crash in
# native code) and fails rather than being re-queued forever.
MAX_ATTEMPTS = 3
MAX_WARNINGS = 20  # a job's warnings kept for its view (each said once)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    spec TEXT NOT NULL,
    settings TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    videos TEXT NOT NULL DEFAULT '[]',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    warnings TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
_COLUMNS = ("id", "status", "created", "started", "finished", "spec", "settings", "step", "total", "error", "videos",
            "cancel_requested", "attempts", "warnings")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
# Columns a later kinema added (as _SCHEMA declares them), which JobStore adds to an earlier server's table when it
# opens it: its jobs had none recorded.
_ADDED_COLUMNS = {"warnings": "TEXT NOT NULL DEFAULT '[]'"}


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


@dataclass(frozen=True)
class JobRecord:
    """One row of the jobs table."""

    id: str
    status: str
    created: float
    started: float | None
    finished: float | None
    spec: dict[str, Any]
    settings: dict[str, Any]
    step: int
    total: int
    error: str | None
    videos: list[str]
    cancel_requested: bool
    attempts: int
    warnings: list[str]

    def public(self) -> dict[str, Any]:
        """The job as the API shows it (JSON-ready): times in ISO 8601 UTC, progress as step of total, and the
        warnings its run logged (a prompt the model will not follow, settings that change nothing)."""
        return {"id": self.id, "status": self.status, "created": _iso(self.created), "started": _iso(self.started),
                "finished": _iso(self.finished), "progress": {"step": self.step, "total": self.total},
                "cancel_requested": self.cancel_requested, "error": self.error, "videos": self.videos,
                "warnings": self.warnings, "settings": self.settings}


def _record(row: tuple) -> JobRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    return JobRecord(**{**values, "spec": json.loads(values["spec"]), "settings": json.loads(values["settings"]),
                        "videos": json.loads(values["videos"]), "cancel_requested": bool(values["cancel_requested"]),
                        "warnings": json.loads(values["warnings"])})


class JobStore:
    """The jobs table in `DATABASE` under `folder` (created). Safe to share between threads."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / DATABASE
        self._lock = threading.Lock()
        # One connection behind a lock: the worker thread and the request threads take turns; autocommit, with
        # explicit transactions where a change reads before it writes.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an accepted job is on disk before the client hears so
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, declaration in _ADDED_COLUMNS.items():
            if name not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
        self._identity = _file_identity(self.path)

    def missing(self) -> str | None:
        """Why the database file this store writes is no longer at `path` (removed or replaced while the server
        ran, so what it records would be lost), or None while it is."""
        if _file_identity(self.path) != self._identity:
            return f"the jobs database {self.path} was removed or replaced while the server ran"
        return None

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, parameters: tuple = ()) -> JobRecord | None:
        with self._lock:
            # fetchall: a statement with RETURNING holds its write until its rows are read to the end
            rows = self._db.execute(sql, parameters).fetchall()
        return _record(rows[0]) if rows else None

    def add(self, spec: dict[str, Any], settings: dict[str, Any], total: int, job_id: str | None = None
            ) -> JobRecord:
        """Queue a new job; `total` is its number of sampling steps (for progress)."""
        job_id = job_id or uuid.uuid4().hex
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, status, created, spec, settings, total) VALUES (?, ?, ?, ?, ?, ?)",
                             (job_id, "queued", time.time(), json.dumps(spec), json.dumps(settings), total))
        record = self.get(job_id)
        assert record is not None
        return record

    def get(self, job_id: str) -> JobRecord | None:
        """The job with id `job_id`, or None."""
        return self._one(f"{_SELECT} WHERE id = ?", (job_id,))

    def list_jobs(self, status: str | None = None, limit: int = 100, offset: int = 0) -> list[JobRecord]:
        """Jobs, newest first, optionally only those of one status."""
        where, parameters = ("WHERE status = ?", (status,)) if status is not None else ("", ())
        with self._lock:
            rows = self._db.execute(f"{_SELECT} {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                                    (*parameters, limit, offset)).fetchall()
        return [_record(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """How many jobs have each status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | dict(rows)

    def claim_next(self) -> JobRecord | None:
        """Mark the oldest queued job running and return it (None when none waits). One statement, so two claims
        never get the same job."""
        return self._one(
            f"UPDATE jobs SET status = 'running', started = ?, step = 0, warnings = '[]', attempts = attempts + 1 "
            f"WHERE seq = "
            f"(SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1) RETURNING {', '.join(_COLUMNS)}",
            (time.time(),))

    def progress(self, job_id: str, step: int) -> bool:
        """Record that a running job has done `step` sampling steps (the total grows with it, for continuations that
        sample in several segments); returns whether a cancel was asked for the job."""
        with self._lock:
            row = self._db.execute("UPDATE jobs SET step = ?, total = MAX(total, ?) WHERE id = ? AND "
                                   "status = 'running' RETURNING cancel_requested", (step, step, job_id)).fetchall()
        return bool(row and row[0][0])

    def _end(self, job_id: str, status: str, error: str | None = None, videos: list[str] | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET status = ?, finished = ?, error = ?, videos = ? WHERE id = ?",
                             (status, time.time(), error, json.dumps(videos or []), job_id))

    def warn(self, job_id: str, text: str) -> None:
        """Record a warning the job's run logged (the first MAX_WARNINGS, each once), shown with the job."""
        with self._transaction() as db:
            row = db.execute("SELECT warnings FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            warnings = json.loads(row[0])
            if text not in warnings and len(warnings) < MAX_WARNINGS:
                db.execute("UPDATE jobs SET warnings = ? WHERE id = ?", (json.dumps([*warnings, text]), job_id))

    def finish(self, job_id: str, videos: list[str]) -> None:
        """Mark a job done with the names of its videos (inside its result folder); its progress total becomes the
        steps it ran, which the total queued can overstate (FreeInit, which a model without inpaint channels turns
        off for image-to-video, is counted before the model is loaded)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'done', finished = ?, error = NULL, videos = ?, "
                             "total = CASE WHEN step > 0 THEN step ELSE total END WHERE id = ?",
                             (time.time(), json.dumps(videos), job_id))

    def fail(self, job_id: str, error: str) -> None:
        """Mark a job failed with a one-line reason."""
        self._end(job_id, "failed", error=error)

    def mark_cancelled(self, job_id: str) -> None:
        """Mark a job cancelled (a running job that stopped at a step after `cancel`)."""
        self._end(job_id, "cancelled", error="cancelled by a DELETE request")

    def requeue(self, job_id: str) -> None:
        """Put a running job back in the queue (the server is stopping), unless a cancel was asked for it."""
        with self._transaction() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row[0]:
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, error = ? WHERE id = ?",
                           (time.time(), "cancelled by a DELETE request", job_id))
            else:
                db.execute("UPDATE jobs SET status = 'queued', step = 0, attempts = attempts - 1 WHERE id = ?",
                           (job_id,))

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a job: a queued one is cancelled at once (it never runs); a running one is marked
        `cancel_requested` (the worker stops it at its next step); a finished one is left as it is. Returns the job
        after the change, or None when there is no such job."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, error = ? WHERE id = ? AND "
                       "status = 'queued'", (time.time(), "cancelled by a DELETE request", job_id))
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,))
        return self.get(job_id)

    def recover(self) -> None:
        """At start, put back what a stopped server left running: re-queued, or cancelled where a cancel had been
        asked, or failed after `MAX_ATTEMPTS` runs that each ended with the server stopping."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, error = ? WHERE status = 'running' AND "
                       "cancel_requested = 1", (now, "cancelled by a DELETE request"))
            db.execute("UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE status = 'running' AND "
                       "attempts >= ?", (now, f"the server stopped {MAX_ATTEMPTS} times while this job ran; it may "
                                              "need more memory than the server has (try fewer frames or a smaller "
                                              "size)", MAX_ATTEMPTS))
            db.execute("UPDATE jobs SET status = 'queued', step = 0 WHERE status = 'running'")


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


def check_data_dir(folder: str | os.PathLike) -> Path:
    """`folder` as a server's data folder: new, empty, or one a server made (holding only `DATA_DIR_NAMES`); one
    KinemaError line otherwise, so the server writes into no folder of the user's."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise KinemaError(f"the data folder {path} is a file; give a folder (new or empty) with --data-dir")
    database = path / DATABASE
    if database.exists() or database.is_symlink():  # read, never written, before it is known to be a server's
        problem = _not_a_jobs_database(database)
        if problem is not None:
            raise KinemaError(f"{database} is not a kinema serve jobs database ({problem}), so {path} is no server's "
                              "data folder; give a new or empty folder with --data-dir")
    entries = set(os.listdir(path)) if path.is_dir() else set()
    foreign = sorted(entries - set(DATA_DIR_NAMES))
    # Without the database, a results/ or uploads/ holding anything is no server's either (a server's own folders
    # come with its database).
    filled = sorted(name for name in entries & set(DATA_DIR_NAMES) if (path / name).is_dir() and any(
        (path / name).iterdir()))
    if (foreign or filled) and not database.is_file():
        raise KinemaError(f"{path} holds files that are not a kinema serve data folder's (such as "
                          f"{(foreign or filled)[0]}); give a new or empty folder with --data-dir")
    return path


def _not_a_jobs_database(path: Path) -> str | None:
    """What makes `path` no jobs database a server wrote (None: it is one), read without changing a byte: an SQLite
    file whose `jobs` table has every column kinema's has."""
    if not path.is_file() or path.is_symlink():
        return "not a plain file"
    with open(path, "rb") as file:
        if file.read(16) != b"SQLite format 3\0":
            return "not an SQLite database"
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            columns = {row[0] for row in db.execute("SELECT name FROM pragma_table_info('jobs')")}
    except sqlite3.Error as err:
        return f"unreadable: {err}"
    missing = [column for column in _COLUMNS if column not in columns and column not in _ADDED_COLUMNS]
    if missing:
        return "it has no jobs table" if not columns else f"its jobs table has no {missing[0]} column"
    return None


class DataDirLock:
    """An exclusive lock on a data folder for the life of a server (released by the kernel if it is killed), so
    two servers never run the same jobs."""

    def __init__(self, folder: str | os.PathLike):
        from kinema.fileio import exclusive_lock

        path = check_data_dir(folder)
        path.mkdir(parents=True, exist_ok=True)
        self._file = exclusive_lock(path / LOCK_FILE, f"another kinema serve is using the data folder {path}; stop "
                                                      "it, or give this one another --data-dir")

    def close(self) -> None:
        """Release the lock."""
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def lock_data_dir(folder: str | os.PathLike) -> DataDirLock:
    """Lock `folder` (checked with `check_data_dir`, created) for this server; one KinemaError line when another
    server holds it."""
    return DataDirLock(folder)
