"""The API's queue with a stand-in runner: concurrent submissions, cancel (queued and running), restart recovery,
listing, and the states a result can be asked for in."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from kinema.api.store import JobStore


def test_twenty_concurrent_submissions_all_finish_and_none_is_lost(serve, fake_runner, wait):
    prompts = [f"a red circle moving right {i}" for i in range(20)]
    with serve(runner=fake_runner) as client:
        def submit(prompt: str) -> str:
            response = client.post("/v1/jobs", json={"prompt": prompt, "steps": 2})
            assert response.status_code == 201, response.text
            assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
            return response.json()["id"]

        with ThreadPoolExecutor(20) as pool:
            ids = list(pool.map(submit, prompts))
        assert len(set(ids)) == 20
        jobs = [wait(client, job_id) for job_id in ids]
        assert [job["status"] for job in jobs] == ["done"] * 20
        assert [job["settings"]["prompt"] for job in jobs] == prompts
        assert all(job["progress"] == {"step": 2, "total": 2} for job in jobs)
        assert sorted(fake_runner.started) == sorted(prompts)  # each ran exactly once
        listed = client.get("/v1/jobs", params={"limit": 1000}).json()
        assert sorted(job["id"] for job in listed["jobs"]) == sorted(ids)
        assert listed["counts"]["done"] == 20
        for job_id, prompt in zip(ids, prompts, strict=True):
            result = client.get(f"/v1/jobs/{job_id}/result")
            assert result.status_code == 200
            assert result.content == f"fake video of {prompt} seed 0".encode()


def test_cancelling_a_queued_job_means_it_never_runs(serve, fake_runner, wait):
    with serve(runner=fake_runner) as client:
        fake_runner.gate.clear()  # hold the first job at its first step
        first = client.post("/v1/jobs", json={"prompt": "first", "steps": 2}).json()["id"]
        second = client.post("/v1/jobs", json={"prompt": "second", "steps": 2}).json()["id"]
        wait(client, first, ("running",))
        cancelled = client.delete(f"/v1/jobs/{second}")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        fake_runner.gate.set()
        assert wait(client, first)["status"] == "done"
        assert client.get(f"/v1/jobs/{second}").json()["status"] == "cancelled"
        assert fake_runner.started == ["first"]
        result = client.get(f"/v1/jobs/{second}/result")
        assert result.status_code == 409
        assert result.json()["detail"] == f"job {second} was cancelled; it has no result and never will: submit it " \
                                          "again (POST /v1/jobs)"
        again = client.delete(f"/v1/jobs/{second}")
        assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


def test_cancelling_a_running_job_stops_it_at_its_next_step(serve, fake_runner, wait, tmp_path):
    with serve(runner=fake_runner) as client:
        fake_runner.gate.clear()
        job_id = client.post("/v1/jobs", json={"prompt": "long", "steps": 50}).json()["id"]
        wait(client, job_id, ("running",))
        fake_runner.gate.set()
        assert fake_runner.at_step.wait(10)
        response = client.delete(f"/v1/jobs/{job_id}")
        assert response.status_code in (200, 202)
        job = wait(client, job_id)
        assert job["status"] == "cancelled"
        assert job["progress"]["step"] < 50
        assert fake_runner.finished == []
        assert not (tmp_path / "data" / "results" / job_id).exists()
        # the worker goes on with the next job
        after = client.post("/v1/jobs", json={"prompt": "after", "steps": 1}).json()["id"]
        assert wait(client, after)["status"] == "done"


def test_a_stopped_server_requeues_its_running_job_and_resumes_the_queue(serve, fake_runner, wait, tmp_path):
    data = tmp_path / "data"
    with serve(data_dir=data, runner=fake_runner) as client:
        fake_runner.gate.clear()
        ids = [client.post("/v1/jobs", json={"prompt": f"job {i}", "steps": 3}).json()["id"] for i in range(3)]
        wait(client, ids[0], ("running",))
        # Job 0 reaches its next step while the app is stopping: that is where it stops.
        threading.Timer(0.3, fake_runner.gate.set).start()
    # The app stopped (its lifespan ended) with job 0 running: back in the queue, no attempt counted.
    store = JobStore(data)
    assert [store.get(job_id).status for job_id in ids] == ["queued"] * 3  # type: ignore[union-attr]
    store.close()
    with serve(data_dir=data, runner=fake_runner) as client:
        assert [wait(client, job_id)["status"] for job_id in ids] == ["done"] * 3
    assert fake_runner.finished == ["job 0", "job 1", "job 2"]


def test_a_server_stops_without_waiting_for_a_step_that_does_not_end(serve, fake_runner, wait, tmp_path,
                                                                      monkeypatch):
    """A step at a large size (or the decode) can take minutes, and the server waited for it with no limit: a
    SIGTERM, then every Ctrl-C, left it neither serving nor exiting. Past STOP_WAIT_SECONDS the job goes back to the
    queue and the thread, left to the process's end, records nothing more."""
    import kinema.api.app as app_module

    monkeypatch.setattr(app_module, "STOP_WAIT_SECONDS", 0.2)
    data = tmp_path / "data"
    began = time.monotonic()
    with serve(data_dir=data, runner=fake_runner) as client:
        fake_runner.gate.clear()  # the job's first step does not end while the server stops
        job_id = client.post("/v1/jobs", json={"prompt": "slow", "steps": 3}).json()["id"]
        wait(client, job_id, ("running",))
    assert time.monotonic() - began < 8
    store = JobStore(data)
    record = store.get(job_id)
    assert record is not None and (record.status, record.attempts) == ("queued", 0)
    fake_runner.gate.set()  # the left thread's step ends now: it records nothing
    time.sleep(0.3)
    assert store.get(job_id).status == "queued"  # type: ignore[union-attr]
    store.close()
    with serve(data_dir=data, runner=fake_runner) as client:
        assert wait(client, job_id)["status"] == "done"


def test_recover_requeues_running_jobs_cancels_those_asked_and_fails_repeat_crashers(tmp_path):
    store = JobStore(tmp_path)
    ids = [store.add({"n": i}, {}, 2).id for i in range(4)]
    for _ in range(3):
        assert store.claim_next() is not None
    store.cancel(ids[1])  # running: only marked
    store.close()  # as if killed: three jobs left running
    store = JobStore(tmp_path)
    store.recover()
    assert [store.get(job_id).status for job_id in ids] == ["queued", "cancelled", "queued", "queued"]  # type: ignore[union-attr]
    for _ in range(2):  # job 0 is claimed and "crashes" the server two more times
        assert store.claim_next().id == ids[0]  # type: ignore[union-attr]
        store.recover()
    assert store.get(ids[0]).status == "failed"  # type: ignore[union-attr]
    assert "stopped 3 times" in store.get(ids[0]).error  # type: ignore[union-attr,operator]
    store.close()


def test_a_done_job_reads_complete_when_it_ran_fewer_steps_than_queued(tmp_path):
    # FreeInit counted at queueing but turned off by the model (image-to-video without inpaint channels).
    store = JobStore(tmp_path)
    job_id = store.add({}, {}, 6).id
    assert store.claim_next() is not None
    store.progress(job_id, 1)
    store.progress(job_id, 2)
    assert store.get(job_id).public()["progress"] == {"step": 2, "total": 6}  # type: ignore[union-attr]
    store.finish(job_id, ["a.mp4"])
    record = store.get(job_id)
    assert (record.status, record.public()["progress"]) == ("done", {"step": 2, "total": 2})  # type: ignore[union-attr]
    store.close()


def test_unknown_jobs_are_404_and_results_wait_for_done(serve, fake_runner, wait):
    with serve(runner=fake_runner) as client:
        for method, path in (("get", "/v1/jobs/nope"), ("get", "/v1/jobs/nope/result"), ("delete", "/v1/jobs/nope")):
            response = client.request(method, path)
            assert response.status_code == 404
            assert "no job nope" in response.json()["detail"]
        fake_runner.gate.clear()
        job_id = client.post("/v1/jobs", json={"prompt": "p", "steps": 1, "seeds": [3, 5]}).json()["id"]
        early = client.get(f"/v1/jobs/{job_id}/result")
        assert early.status_code == 409
        assert "is queued" in early.json()["detail"] or "is running (step 0 of 2)" in early.json()["detail"]
        fake_runner.gate.set()
        wait(client, job_id)
        assert client.get(f"/v1/jobs/{job_id}/result", params={"seed": 5}).content == b"fake video of p seed 5"
        assert client.get(f"/v1/jobs/{job_id}/result").content == b"fake video of p seed 3"
        missing = client.get(f"/v1/jobs/{job_id}/result", params={"seed": 4})
        assert missing.status_code == 404 and "[3, 5]" in missing.json()["detail"]
        assert client.get("/v1/jobs", params={"status": "done"}).json()["jobs"][0]["id"] == job_id
        assert client.get("/v1/jobs", params={"status": "queued"}).json()["jobs"] == []


def test_a_jobs_settings_posted_again_make_the_same_job(serve, fake_runner, wait):
    with serve(runner=fake_runner) as client:
        first = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 1, "seed": -1}).json()
        assert first["settings"]["seeds"][0] >= 0  # the random seed as drawn
        again = client.post("/v1/jobs", json=first["settings"])
        assert again.status_code == 201, again.text
        assert again.json()["settings"] == first["settings"]
        assert [wait(client, job["id"])["status"] for job in (first, again.json())] == ["done", "done"]


def test_a_data_folder_an_earlier_kinema_made_gains_the_warnings_column(tmp_path):
    import sqlite3

    from kinema.api.store import DATABASE

    tmp_path.mkdir(exist_ok=True)
    old = sqlite3.connect(tmp_path / DATABASE)  # the table as it was before warnings were kept
    old.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT "
                "NULL, created REAL NOT NULL, started REAL, finished REAL, spec TEXT NOT NULL, settings TEXT NOT NULL, "
                "step INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0, error TEXT, videos TEXT NOT NULL "
                "DEFAULT '[]', cancel_requested INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0)")
    old.execute("INSERT INTO jobs (id, status, created, spec, settings) VALUES ('a', 'done', 0, '{}', '{}')")
    old.commit()
    old.close()
    store = JobStore(tmp_path)
    assert store.get("a").public()["warnings"] == []  # type: ignore[union-attr]
    job_id = store.add({}, {}, 2).id
    store.claim_next()  # job "a" is done: the new one runs
    store.warn(job_id, "said once")
    store.warn(job_id, "said once")
    assert store.get(job_id).public()["warnings"] == ["said once"]  # type: ignore[union-attr]
    store.close()
