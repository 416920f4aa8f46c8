"""A real `kinema serve` process killed with SIGKILL while jobs are queued and one runs; a restarted server on the
same data folder finishes every job (the real bundled model, 8 frames at 64x64)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import httpx
import pytest

KEY = "restart-test-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def kinema_serve(data: Path, log: Path) -> Iterator[tuple[subprocess.Popen, httpx.Client]]:
    """A `kinema serve` process on a free port and a client for it; killed (and waited for) on the way out."""
    port = free_port()
    env = {**os.environ, "KINEMA_API_KEY": KEY}
    with open(log, "ab") as output:
        process = subprocess.Popen([sys.executable, "-m", "kinema", "serve", "--port", str(port), "--data-dir",
                                    str(data)], stdout=output, stderr=subprocess.STDOUT, env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if client.get("/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "kinema serve did not come up:\n" + log.read_text()
            time.sleep(0.2)
        yield process, client
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
        process.wait(30)


def poll(client: httpx.Client, job_id: str) -> dict:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_a_server_killed_mid_queue_finishes_every_job_after_a_restart(tmp_path):
    data, log = tmp_path / "data", tmp_path / "serve.log"
    jobs = [{"prompt": "a red circle moving right", "frames": 8, "steps": 40, "seed": 0}] + [
        {"prompt": f"a blue square moving left {i}", "frames": 8, "steps": 2, "seed": i} for i in range(1, 4)]
    with kinema_serve(data, log) as (process, client):
        ids = []
        for job in jobs:
            response = client.post("/v1/jobs", json=job)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        deadline = time.monotonic() + 300
        while poll(client, ids[0])["progress"]["step"] < 1:  # the first job is sampling, the others wait
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    with kinema_serve(data, log) as (_, client):
        statuses = [poll(client, job_id)["status"] for job_id in ids]
        assert statuses[0] in ("queued", "running") and statuses[1:] == ["queued"] * 3  # job 0 was re-queued
        deadline = time.monotonic() + 600
        while any(poll(client, job_id)["status"] in ("queued", "running") for job_id in ids):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        for job_id, job in zip(ids, jobs, strict=True):
            record = poll(client, job_id)
            assert record["status"] == "done", record["error"]
            assert record["settings"]["seeds"] == [job["seed"]]
            video = client.get(f"/v1/jobs/{job_id}/result")
            assert video.status_code == 200
            with av.open(io.BytesIO(video.content)) as container:
                frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
            assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
        assert client.get("/v1/jobs").json()["counts"]["done"] == 4
    # what the killed run of job 0 left half-written was cleared when its second run wrote its folder
    assert sorted(os.listdir(data / "results")) == sorted(ids)


@pytest.mark.slow
def test_sigterm_stops_the_server_with_its_running_job_back_in_the_queue(tmp_path):
    from kinema.api.store import JobStore

    data, log = tmp_path / "data", tmp_path / "serve.log"
    with kinema_serve(data, log) as (process, client):
        job_id = client.post("/v1/jobs", json={"prompt": "a red circle", "frames": 8, "steps": 500}).json()["id"]
        deadline = time.monotonic() + 300
        while poll(client, job_id)["progress"]["step"] < 1:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in log.read_text()
    store = JobStore(data)
    try:
        record = store.get(job_id)
        assert record is not None and record.status == "queued" and record.attempts == 0
    finally:
        store.close()
