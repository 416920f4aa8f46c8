"""Fixtures for the HTTP API tests: an in-process server (FastAPI's TestClient, which runs the app's lifespan and so
its worker thread) with a stand-in runner where a test is about the queue rather than the pixels."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kinema.api.app import create_app


class FakeRunner:
    """Stands in for the model: calls the step callback once per requested step (waiting on `gate` before each, so
    a test can hold a job at a step), then writes one small file per seed, as run_job names them."""

    def __init__(self, step_seconds: float = 0.0):
        self.step_seconds = step_seconds
        self.gate = threading.Event()
        self.gate.set()
        self.started: list[str] = []  # prompts, in the order their jobs started
        self.finished: list[str] = []
        self.at_step = threading.Event()  # set once a job has done a step
        self._lock = threading.Lock()

    def __call__(self, spec: dict[str, Any], out: Path, on_step: Callable[[int, Any, Any], None]) -> list[Path]:
        with self._lock:
            self.started.append(spec["prompt"])
        for step in range(spec["steps"]):
            if not self.gate.wait(10):
                raise TimeoutError("the test never opened the gate")
            time.sleep(self.step_seconds)
            on_step(step, None, None)
            self.at_step.set()
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for seed in spec["seeds"]:
            path = out / f"video-seed{seed}.mp4"
            path.write_bytes(f"fake video of {spec['prompt']} seed {seed}".encode())
            paths.append(path)
        with self._lock:
            self.finished.append(spec["prompt"])
        return paths


@pytest.fixture
def fake_runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def serve(tmp_path: Path) -> Callable[..., Any]:
    """`with serve(**create_app options) as client:` a started app on a fresh data folder (or `data_dir=`)."""

    @contextmanager
    def serving(data_dir: Path | None = None, **options: Any) -> Iterator[TestClient]:
        options.setdefault("poll_seconds", 0.05)
        app = create_app(data_dir or tmp_path / "data", **options)
        with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
            yield client

    return serving


def wait_until(client: TestClient, job_id: str, statuses: tuple[str, ...] = ("done", "failed", "cancelled"),
               timeout: float = 60.0) -> dict[str, Any]:
    """Poll GET /v1/jobs/ID until the job's status is one of `statuses`; returns the job."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def wait() -> Callable[..., dict[str, Any]]:
    return wait_until
