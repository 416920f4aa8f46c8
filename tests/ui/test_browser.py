"""The web app end to end in a real browser: Debian's Chromium, headless, driven by Playwright (nothing downloaded).

The app is launched in this process on a free port with the bundled kinema-tiny; the test types a prompt, makes
a cheap video (8 frames, 4 steps, 64x64), checks that the <video> element plays it and that the gallery shows it
with its settings. Screenshots go to $KINEMA_TEST_ARTIFACTS/ui/ when set, else to the test's tmp_path.
"""

import json
import os
import socket
from pathlib import Path

import av
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a red circle moving right"
# Model load and a 2-step video take a few seconds alone; a loaded CI machine gets ample room.
GENERATION_TIMEOUT_MS = 180_000
UPLOAD_LIMIT = 100_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def artifacts(tmp_path) -> Path:
    root = os.environ.get("KINEMA_TEST_ARTIFACTS")
    folder = Path(root) / "ui" if root else tmp_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e .[dev])")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    from kinema.ui.app import build_app, launch_app

    outputs = tmp_path_factory.mktemp("ui") / "outputs"
    app = build_app(models_dir=None, outputs_dir=outputs)
    port = free_port()
    launch_app(app, outputs_dir=outputs, port=port, block=False, quiet=True, max_upload_bytes=UPLOAD_LIMIT)
    try:
        yield f"http://127.0.0.1:{port}/", outputs
    finally:
        app.close(verbose=False)


def test_generate_in_the_browser_plays_the_video_and_lists_it_with_its_settings(browser, served_app, artifacts):
    from playwright import sync_api

    url, outputs = served_app
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    page.set_default_timeout(90_000)  # each later wait: a loaded CI machine may be slow to render
    page.goto(url)
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#steps input").fill("4")  # 2 or 3 DDIM steps start far below pure noise: warned of, in a toast
    page.locator("#frames input").fill("8")
    page.locator("#generate").click()

    video = page.locator("#result-video video")
    video.wait_for(state="attached", timeout=GENERATION_TIMEOUT_MS)
    page.screenshot(path=str(artifacts / "1-generated.png"), full_page=True)
    playing = video.evaluate("""async (element) => {
        element.muted = true;
        await element.play();
        const started = element.currentTime;
        // The result loops: read at the loop's seek back to 0, readyState is briefly 1, so keep the best seen.
        let readyState = element.readyState;
        for (let i = 0; i < 8; i++) {
            await new Promise((done) => setTimeout(done, 50));
            readyState = Math.max(readyState, element.readyState);
        }
        return {readyState, duration: element.duration, advanced: element.currentTime !== started,
                width: element.videoWidth};
    }""")
    assert playing["readyState"] >= 2 and playing["duration"] > 0 and playing["advanced"], playing
    assert playing["width"] == 64

    # What the page shows against what is on disk, read without kinema: PyAV for the video, JSON for the job.
    folders = [folder for folder in outputs.iterdir() if (folder / "job.json").is_file()]
    assert len(folders) == 1
    written = json.loads((folders[0] / "job.json").read_text())
    assert written["prompt"] == PROMPT and written["frames"] == 8 and written["steps"] == 4
    with av.open(str(folders[0] / "video-seed0.mp4")) as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == 8 and (decoded[0].width, decoded[0].height) == (64, 64)

    gallery = page.locator("#gallery")
    gallery.get_by_text(f"{PROMPT} · seed 0 · 8 frames 64x64 · 4 steps").wait_for()
    gallery.locator("button").filter(has=page.locator("video")).first.click()
    settings = page.locator("#selected-settings")
    settings.get_by_text(PROMPT).first.wait_for()
    page.screenshot(path=str(artifacts / "2-gallery-settings.png"), full_page=True)
    assert "kinema-tiny" in settings.inner_text()

    page.locator("#steps input").fill("5")
    page.locator("#prompt textarea").fill("something else")
    page.locator("#load-settings").click()
    expect = sync_api.expect
    expect(page.locator("#prompt textarea")).to_have_value(PROMPT)
    expect(page.locator("#steps input")).to_have_value("4")

    page.locator("#random-seed").click()
    expect(page.locator("#seed input")).not_to_have_value("0")
    assert 0 <= int(page.locator("#seed input").input_value()) < 2**32

    # Bad input is refused by the job's check, in the words of the CLI and the API, before any model work.
    page.locator("#steps input").fill("0")
    page.locator("#generate").click()
    expect(page.locator(".toast-body", has_text="form: steps must be at least 1").first).to_contain_text(
        "form: steps must be at least 1, got 0")
    assert len([folder for folder in outputs.iterdir() if (folder / "job.json").is_file()]) == 1


def test_an_upload_over_the_limit_is_refused(served_app):
    import httpx

    url, _ = served_app
    refused = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", b"0" * (UPLOAD_LIMIT + 1))})
    assert refused.status_code == 413, refused.text
    accepted = httpx.post(f"{url}gradio_api/upload", files={"files": ("small.png", b"0" * 100)})
    assert accepted.status_code == 200, accepted.text


def write_clip(path: Path, frames: int = 8, size: int = 64) -> None:
    """A small H.264 clip written with PyAV: what the gallery shows for a job folder written by hand."""
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            picture = np.full((size, size, 3), 40 + 20 * index, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())


def test_a_loaded_video_brings_the_settings_the_form_has_no_field_for(browser, served_app):
    """A video made through the API or the CLI with settings the form lacks (guidance truncation, fps) loads them
    as "extra": the page lists them, the next video is made with them, and "Forget them" drops them."""
    from playwright import sync_api

    from kinema.pipelines.jobs import JOB_FILE, job_from_mapping

    url, outputs = served_app
    prompt = "a green square moving up"
    job = job_from_mapping({"prompt": prompt, "frames": 8, "steps": 2, "seed": 5, "cfg_truncation": 0.5, "fps": 12})
    folder = outputs / "20200101-000000-a-green-square"
    folder.mkdir(parents=True)
    write_clip(folder / "video-seed5.mp4")
    (folder / JOB_FILE).write_text(json.dumps(job.settings()))
    before = {path.parent.name for path in outputs.glob(f"*/{JOB_FILE}")}

    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    page.set_default_timeout(90_000)
    page.goto(url)
    expect = sync_api.expect
    gallery = page.locator("#gallery")
    gallery.get_by_text(f"{prompt} · seed 5").first.click()
    page.locator("#selected-settings").get_by_text(prompt).first.wait_for()
    page.locator("#load-settings").click()
    expect(page.locator("#prompt textarea")).to_have_value(prompt)
    note = page.locator("#extra-settings")
    expect(note).to_contain_text("cfg_truncation 0.5")
    expect(note).to_contain_text("fps 12")

    page.locator("#generate").click()
    page.locator("#status").get_by_text("Done: seed 5").wait_for(timeout=GENERATION_TIMEOUT_MS)
    [made] = {path.parent.name for path in outputs.glob(f"*/{JOB_FILE}")} - before
    written = json.loads((outputs / made / JOB_FILE).read_text())
    assert written["prompt"] == prompt and written["cfg_truncation"] == 0.5 and written["fps"] == 12

    page.locator("#forget-extra").click()
    expect(page.locator("#forget-extra")).to_be_hidden()
    expect(note).not_to_contain_text("cfg_truncation")


def test_stop_in_the_browser_drops_a_generation_waiting_in_the_queue(browser, tmp_path):
    """Stop found a page's job only once it ran: pressed while it waited behind another page's, it was lost and the
    job ran whole later. The Stop button cancels the page's generate event: gradio drops the waiting one."""
    from playwright import sync_api

    from kinema.ui.app import build_app, launch_app

    outputs = tmp_path / "outputs"
    app = build_app(models_dir=None, outputs_dir=outputs, concurrency=1)
    port = free_port()
    launch_app(app, outputs_dir=outputs, port=port, block=False, quiet=True)
    try:
        first, second = browser.new_page(), browser.new_page()
        for page, steps in ((first, "400"), (second, "4")):
            page.set_default_timeout(90_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#steps input").fill(steps)
            page.locator("#frames input").fill("8")
        first.locator("#generate").click()
        sync_api.expect(first.locator("#status")).to_contain_text("Sampling: step")
        second.locator("#generate").click()  # waits in the queue behind the first page's
        second.wait_for_timeout(1000)
        second.locator("#stop").click()
        sync_api.expect(second.locator("#status")).to_contain_text("Stopped")
        first.locator("#stop").click()  # the first page's running job ends at its next step
        sync_api.expect(first.locator("#status")).to_contain_text("Stopped")
        first.wait_for_timeout(3000)  # the dropped generation would have started by now, and written
        assert not [folder for folder in outputs.iterdir() if folder.is_dir() and (folder / "job.json").is_file()]
    finally:
        app.close(verbose=False)
