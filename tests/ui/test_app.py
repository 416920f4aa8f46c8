"""kinema.ui.app without a browser: the page builds, starts on the bundled model's kinema.json defaults, and a job
run by its worker relays steps, previews and warnings, and stops when asked, leaving nothing written."""

import json
import queue
import threading

import pytest

from kinema.bundled import bundled_model_path
from kinema.errors import KinemaError
from kinema.pipelines.jobs import FamilyCache, job_from_mapping
from kinema.pipelines.request import GENERATE_DEFAULTS
from kinema.pipelines.speed import SPEED_PRESETS
from kinema.ui.app import (
    build_app,
    check_form,
    form_defaults,
    newest_steps,
    run_in_worker,
    speed_form_values,
)


def test_the_page_starts_on_the_bundled_model_with_its_defaults(tmp_path):
    defaults = json.loads((bundled_model_path("kinema-tiny") / "kinema.json").read_text())["defaults"]
    assert form_defaults("kinema-tiny") == defaults
    assert form_defaults(str(bundled_model_path("kinema-tiny"))) == defaults  # its folder, as a path
    (tmp_path / "notes").mkdir()  # a path typed in that is no model filled the library's 512x512 without a word
    (tmp_path / "notes" / "x.txt").write_text("not a model")
    with pytest.raises(KinemaError, match="notes: not a format kinema knows"):
        form_defaults(str(tmp_path / "notes"))
    app = build_app(models_dir=None, outputs_dir=tmp_path / "outputs", concurrency=2)
    config = app.get_config_file()
    values = {block["props"].get("elem_id"): block["props"].get("value") for block in config["components"]}
    assert values["model"] == "kinema-tiny"
    assert (values["steps"], values["frames"]) == (defaults["steps"], defaults["frames"])
    assert app._queue.default_concurrency_limit == 2
    # Generations (Generate or Enter in the prompt) share the queue's limit; scans, gallery and settings never wait.
    limits = {fn.name: (fn.concurrency_limit, len(fn.targets)) for fn in app.fns.values()}
    assert limits.pop("generate_video") == ("default", 2)
    limits.pop(None)  # gradio's own event for the Stop button's cancels (no function: it drops the generation)
    assert {limit for limit, _ in limits.values()} == {None}


def test_a_bad_form_gets_the_jobs_one_line_message():
    with pytest.raises(KinemaError, match=r"^form: unknown scheduler 'fast'; choose one of ddim, "):
        check_form({"mode": "text-to-video", "prompt": "a red circle", "scheduler": "fast"}, None)
    with pytest.raises(KinemaError, match=r"^form: the text 'a \\ud800 circle' holds a lone surrogate"):
        check_form({"mode": "text-to-video", "prompt": "a \ud800 circle"}, None)


def test_the_worker_relays_steps_and_warnings_and_stops_when_asked(tmp_path):
    # A prompt outside kinema-tiny's world: the model logs a warning, from the worker thread.
    # 20 steps: ample room for the stop to land before the end, however the threads are scheduled.
    job = job_from_mapping({"prompt": "a cat playing the piano", "frames": 8, "steps": 20})
    assert job.request.sampling_steps() == 20
    out = tmp_path / "job"
    stop = threading.Event()
    seen = []
    for kind, payload in run_in_worker(job, out, FamilyCache(), stop):
        seen.append(kind)
        if kind == "step":
            assert payload[0] >= 1 and payload[1].shape == (256, 256, 3)
            stop.set()
    assert seen[-2:] == ["step", "stopped"] and "warning" in seen
    assert not out.exists()


def test_a_job_stopped_by_the_apps_own_stop_is_stopped_not_failed(tmp_path, monkeypatch):
    """Ctrl-C reaches the job's thread at its next step (kinema.interrupt): the page showed an error box
    "KeyboardInterrupt:" and the log a failed job."""
    import kinema.ui.app as app_module
    from kinema.interrupt import Terminated

    for stop in (KeyboardInterrupt(), Terminated(15)):
        def interrupted(*args, stop=stop, **kwargs):
            raise stop

        monkeypatch.setattr(app_module, "run_job", interrupted)
        job = job_from_mapping({"prompt": "a red circle", "frames": 8, "steps": 2})
        assert list(run_in_worker(job, tmp_path / "job", FamilyCache(), threading.Event())) == [
            ("stopped", "the app is stopping")]


def test_a_backlog_of_steps_reaches_the_page_as_the_newest_step_only():
    events = queue.Queue()
    for event in [("step", 1), ("step", 2), ("warning", "w"), ("step", 3), ("step", 4), ("done", ["v.mp4"]),
                  ("step", 5)]:
        events.put(event)
    assert list(newest_steps(events)) == [("step", 2), ("warning", "w"), ("step", 4), ("done", ["v.mp4"])]


def test_a_speed_preset_shows_its_sampler_and_steps_and_quality_or_none_the_models():
    defaults = form_defaults("kinema-tiny")
    fast = SPEED_PRESETS["fast"]
    assert speed_form_values("fast", "kinema-tiny") == (fast["scheduler"], fast["steps"])
    for preset in ("quality", ""):
        assert speed_form_values(preset, "kinema-tiny") == (defaults["scheduler"], defaults["steps"])


def test_choosing_a_model_keeps_the_speed_presets_sampler_and_steps():
    # The model's defaults once replaced the preset's in the form (ddim at 25 steps, recorded as speed "fast").
    fast = SPEED_PRESETS["fast"]
    chosen = form_defaults("kinema-tiny-ad", "fast")
    plain = form_defaults("kinema-tiny-ad")
    assert (chosen["scheduler"], chosen["steps"]) == (fast["scheduler"], fast["steps"]) != (plain["scheduler"],
                                                                                            plain["steps"])
    assert {k: v for k, v in chosen.items() if k not in ("scheduler", "steps")} == {
        k: v for k, v in plain.items() if k not in ("scheduler", "steps")}


def test_an_uploaded_image_reaches_kinemas_check_unopened(tmp_path):
    # gradio opened uploads with PIL first: a text file named x.png failed as a traceback on every tab.
    import gradio as gr
    from gradio.data_classes import ImageData
    from PIL import UnidentifiedImageError

    from kinema.pipelines.jobs import check_image_file
    from kinema.ui.app import image_path_input

    fake = tmp_path / "x.png"
    fake.write_text("not an image")
    payload = ImageData(path=str(fake), orig_name="x.png")
    with pytest.raises(UnidentifiedImageError):
        gr.Image(type="filepath").preprocess(payload)
    component = image_path_input()
    assert component.preprocess(payload) == str(fake) and component.preprocess(None) is None
    with pytest.raises(KinemaError, match="x.png is not an image"):
        check_image_file(str(fake), "start image")


def test_only_the_inputs_the_job_reads_are_kept(tmp_path):
    # Uploads left in other tabs were hashed and copied into the outputs folder with every video.
    from PIL import Image

    from kinema.ui.app import _input_paths

    Image.new("RGB", (64, 64)).save(tmp_path / "start.png")
    job = job_from_mapping({"prompt": "a red circle", "image": str(tmp_path / "start.png"), "steps": 1})
    assert _input_paths(job) == {str(tmp_path / "start.png")}
    assert _input_paths(job_from_mapping({"prompt": "a red circle", "steps": 1})) == set()


def test_loading_settings_keeps_the_image_fields_reading_uploads_unopened(tmp_path):
    # An update to a field makes gradio build a plain gr.Image for the session, which opens uploads with PIL again:
    # after one "Load these settings", a text file named y.png failed as gradio's traceback.
    import asyncio

    import gradio as gr
    from gradio.state_holder import SessionState

    app = build_app(models_dir=None, outputs_dir=tmp_path / "out")
    image = next(b for b in app.blocks.values() if isinstance(b, gr.Image) and b.label == "Start image")
    load = next(fn for fn in app.fns.values() if fn.name == "load_into_form")
    state = SessionState(app)
    settings = job_from_mapping({"prompt": "a red circle", "steps": 1}).settings()  # a text-to-video job's
    asyncio.run(app.postprocess_data(load, list(load.fn(settings, None, None)), state))
    shown = state[image._id] if image._id in state else image
    fake = tmp_path / "y.png"
    fake.write_text("not an image")
    from gradio.data_classes import ImageData

    assert shown.preprocess(ImageData(path=str(fake), orig_name="y.png")) == str(fake)


def test_uploading_a_video_to_extend_shows_its_model_with_that_models_defaults(tmp_path):
    # The field was set without the model's defaults, so the steps and sampler stayed the previous model's; a video
    # whose model is gone left the field as it was without a word.
    import numpy as np

    from kinema.data.video_io import write_video

    app = build_app(models_dir=None, outputs_dir=tmp_path / "out")
    upload = next(fn for fn in app.fns.values() if fn.name == "extend_video_uploaded")
    write_video(np.zeros((8, 64, 64, 3), np.uint8), tmp_path / "ad.mp4",
                settings={"prompt": "a red circle moving right", "model": "kinema-tiny-ad"})
    model, motion_module, *numbers = upload.fn(str(tmp_path / "ad.mp4"), "")
    defaults = form_defaults("kinema-tiny-ad")
    assert (model, motion_module) == ("kinema-tiny-ad", "")
    assert numbers == [defaults[key] for key in GENERATE_DEFAULTS]
    write_video(np.zeros((8, 64, 64, 3), np.uint8), tmp_path / "gone.mp4",
                settings={"prompt": "x", "model": str(tmp_path / "deleted-model")})
    with pytest.warns(UserWarning, match="the model that made this video, .*deleted-model, is not here"):
        upload.fn(str(tmp_path / "gone.mp4"), "")


def test_stop_cancels_the_pages_generation_waiting_or_running(tmp_path):
    """Stop found a page's job only once it ran: pressed while it waited in the queue it was lost, and the job ran
    whole later. The Stop button now cancels the generate event too (gradio drops it from the queue), beside
    stopping a running job at its next step."""
    app = build_app(models_dir=None, outputs_dir=tmp_path / "out")
    dependencies = app.get_config_file()["dependencies"]
    generation = next(d["id"] for d in dependencies if d.get("api_name") == "generate_video")
    stop = next(d for d in dependencies if d.get("api_name") == "stop_job")
    assert any(d.get("cancels") == [generation] and d["targets"] == stop["targets"] for d in dependencies)


def test_an_uploads_error_names_the_file_as_the_user_named_it():
    # gradio keeps an upload at a path of its own: "the image /tmp/gradio/<hash>/cat.png is not an image".
    from kinema.ui.app import _upload_names

    upload = "/tmp/gradio/0123abcd/cat.png"
    assert _upload_names(f"form: the image {upload} is not an image; give a PNG", [upload, "/tmp/x/dog.png"]) == \
        "form: the image cat.png is not an image; give a PNG"
