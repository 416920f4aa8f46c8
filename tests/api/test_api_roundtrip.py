"""The API with the real bundled model (kinema-tiny, 8 frames, 2 steps): a text-to-video round trip decoded with
PyAV, image-to-video from an uploaded start image, extending an uploaded video, and cancelling a job while the model
samples it."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from kinema.api.app import create_app


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    """One server with the real model for the module, so kinema-tiny loads once."""
    data = tmp_path_factory.mktemp("api-model") / "data"
    with TestClient(create_app(data, poll_seconds=0.05), base_url="http://127.0.0.1",
                    raise_server_exceptions=False) as client:
        yield client, data


def decoded_frames(video: bytes) -> list[np.ndarray]:
    """Every frame of an mp4 as (H, W, 3) uint8, read by PyAV."""
    with av.open(io.BytesIO(video)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_round_trip_submit_poll_fetch_and_decode(model_server, wait):
    client, data = model_server
    # Trailing spacing: 2 steps of DDIM's leading spacing start far below pure noise, which generate() warns of.
    request = {"prompt": "a red circle moving right", "frames": 8, "steps": 2, "height": 64, "width": 64, "seed": 7,
               "timestep_spacing": "trailing"}
    submitted = client.post("/v1/jobs", json=request)
    assert submitted.status_code == 201, submitted.text
    job = wait(client, submitted.json()["id"], timeout=300)
    assert job["status"] == "done", job["error"]
    assert job["progress"] == {"step": 2, "total": 2}
    assert job["settings"]["seeds"] == [7] and job["settings"]["model"] == "kinema-tiny"
    result = client.get(f"/v1/jobs/{job['id']}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    frames = decoded_frames(result.content)
    assert len(frames) == request["frames"] and job["warnings"] == []
    assert {frame.shape for frame in frames} == {(request["height"], request["width"], 3)}
    # the result folder keeps the settings beside the video
    folder = data / "results" / job["id"]
    assert (folder / "job.json").is_file() and (folder / "video-seed7.mp4.json").is_file()


@pytest.mark.slow
def test_image_to_video_from_an_uploaded_start_image(model_server, wait):
    client, _ = model_server
    start = np.zeros((64, 64, 3), np.uint8)
    start[:, :32] = (200, 40, 40)
    start[:, 32:] = (40, 40, 200)
    png = io.BytesIO()
    Image.fromarray(start).save(png, format="PNG")
    fields = {"prompt": "a red circle moving right", "frames": 8, "steps": 2, "seed": 1,
              "image_base64": base64.b64encode(png.getvalue()).decode()}
    job_id = client.post("/v1/jobs", json=fields).json()["id"]
    job = wait(client, job_id, timeout=300)
    assert job["status"] == "done", job["error"]
    assert job["settings"]["mode"] == "image-to-video"
    # the server kept the upload's bytes and generated from that file
    assert Path(job["settings"]["image"]).read_bytes() == png.getvalue()
    frames = decoded_frames(client.get(f"/v1/jobs/{job_id}/result").content)
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)


def test_extending_an_uploaded_video(model_server, wait, tmp_path):
    from kinema.data.synth import synth_clip
    from kinema.data.video_io import write_video

    client, _ = model_server
    write_video(synth_clip(9001, 2, 8, 64).frames, tmp_path / "clip.mp4")
    sent = (tmp_path / "clip.mp4").read_bytes()
    submitted = client.post("/v1/jobs", data={"job": '{"prompt": "a red circle moving right", "extend_frames": 4, '
                                                     '"steps": 2, "seed": 3}'}, files={"video": ("clip.mp4", sent)})
    assert submitted.status_code == 201, submitted.text
    job = wait(client, submitted.json()["id"], timeout=300)
    assert job["status"] == "done", job["error"]
    assert job["settings"]["mode"] == "extend"
    frames = decoded_frames(client.get(f"/v1/jobs/{job['id']}/result").content)
    given = decoded_frames(sent)
    assert len(frames) == len(given) + 4 and frames[0].shape == (64, 64, 3)
    # the input comes back first (through a second H.264 pass, so within a few levels)
    assert np.abs(np.stack(frames[:4]).astype(int) - np.stack(given[:4]).astype(int)).mean() < 4


def test_cancelling_while_the_model_samples_stops_the_job_and_writes_nothing(model_server, wait):
    client, data = model_server
    job_id = client.post("/v1/jobs", json={"prompt": "a blue square", "frames": 8, "steps": 500}).json()["id"]
    deadline = time.monotonic() + 300
    while client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 202
    job = wait(client, job_id, timeout=60)
    assert job["status"] == "cancelled"
    assert job["progress"]["step"] < 500
    assert not (data / "results" / job_id).exists()


def test_a_jobs_warnings_reach_its_client(model_server, wait):
    # They went to the server's log alone: a prompt outside the bundled world, settings that change nothing.
    client, _ = model_server
    request = {"prompt": "an astronaut riding a horse", "negative_prompt": "blue", "guidance": 1, "frames": 8,
               "steps": 1, "seed": 1, "timestep_spacing": "trailing"}
    job = wait(client, client.post("/v1/jobs", json=request).json()["id"], timeout=300)
    assert job["status"] == "done", job["error"]
    [world, guidance] = job["warnings"]
    assert world.startswith("the bundled models only know coloured shapes") and "'an astronaut riding a horse'" in world
    assert guidance.startswith("guidance 1 turns classifier-free guidance off, so the negative prompt changes nothing")
