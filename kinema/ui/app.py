"""The web app (`kinema ui`): a gradio Blocks page over kinema.pipelines.jobs.

Every generation is a job: the form becomes a mapping (kinema.ui.form), `job_from_mapping` checks it (the same
one-line refusals as the CLI and the HTTP API, shown as a gradio error), and `run_job` makes it into a folder of its
own under the outputs folder with one `FamilyCache`, which keeps the two models used last loaded for the jobs
that follow. The job runs in a worker thread; the event handler, a generator, relays its step callbacks as gradio
progress and latent previews (kinema.ui.preview), and its kinema warnings as gradio warnings. Generations share
gradio's queue: `concurrency` of them run at once, and the light events (scans, gallery, settings) do not wait behind
them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from kinema.bundled import DEFAULT_MODEL
from kinema.errors import KinemaError, count_words, library_error_message, os_error_message
from kinema.interrupt import Terminated
from kinema.log import warnings_of_this_thread
from kinema.pipelines.jobs import (
    RANDOM_SEED_LIMIT,
    Cancelled,
    FamilyCache,
    Job,
    job_from_mapping,
    model_defaults_for,
    run_job,
)
from kinema.pipelines.request import (
    GENERATE_DEFAULTS,
    LIBRARY_DEFAULTS,
    MAX_MASK_BLUR,
    PIA_MOTION_NAMES,
    input_paths,
)
from kinema.pipelines.speed import SPEED_PRESETS
from kinema.sampling.schedulers import SCHEDULERS
from kinema.ui.form import (
    EXTEND,
    IMAGE_TO_VIDEO,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    form_to_mapping,
    settings_to_form,
    size_of_image,
    video_model_parts,
    video_settings,
)
from kinema.ui.gallery import GalleryEntry, keep_input, new_job_folder, read_gallery
from kinema.ui.models import ModelChoices, scan_models
from kinema.ui.preview import latent_preview

logger = logging.getLogger(__name__)

LORA_SLOTS = 3
TABS = ((TEXT_TO_VIDEO, "Text to Video"), (IMAGE_TO_VIDEO, "Image to Video"), (EXTEND, "Long video / Extend"),
        (VIDEO_TO_VIDEO, "Video to Video"))
FAMILY_DEFAULT = ""  # the scheduler choice "the model's own default"
NO_SPEED = ""  # the speed choice "no preset: the form's settings as they are"
NO_CHOICE = ""
# PIA's motion presets, "" for none.
PIA_MOTION_CHOICES: list[tuple[str, str | int]] = [
    ("none", ""), *((f"{index}: {name}", index) for index, name in enumerate(PIA_MOTION_NAMES))]
# Uploads live in gradio's cache, which is cleared: jobs name lasting copies (kinema.ui.gallery.keep_input).
INPUT_KEYS = ("image", "end_image", "v2v_video", "v2v_mask", "extend_video", "control_video", "control_video_2")
# Every hour, gradio deletes its cached copies (uploads, files it served) older than a day.
CACHE_CLEANING = (3600, 86400)


# ---------------------------------------------------------------- plain helpers (no gradio state)


# The video tabs' resize box: for an input whose size the model cannot make (each side a multiple of 16, say).
RESIZE_LABEL = "Resize the video to the Width x Height below (else it keeps its own size)"


def image_path_input(**options: Any) -> gr.Image:
    """A gr.Image (type filepath) handing over the uploaded file's path unopened. gradio opens an upload with PIL
    before any handler runs, so a file that is not an image (or a decompression bomb) failed as its traceback,
    before kinema's own one-line check, and on every tab, as generate takes every tab's inputs. (Its method is
    replaced on the instance: a subclass would make gradio write an app.pyi beside this file.)"""
    component = gr.Image(type="filepath", **options)
    plain = component.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and payload.path is not None and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return plain(payload)  # a pasted image, a data: URL, is decoded by gr.Image

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def _input_paths(job: Job) -> set[str]:
    """The absolute paths of the input files `job` reads (kinema.pipelines.request.input_paths)."""
    return {os.path.abspath(path) for path in input_paths(job.request)}


def form_defaults(model: str, preset: str | None = None) -> dict[str, Any]:
    """The size, frames, steps, guidance and scheduler the form shows for `model`: its kinema.json defaults where it
    has them, else the library's (`LIBRARY_DEFAULTS`), as `kinema generate` fills unset options; with a speed
    `preset` (kinema.pipelines.speed), its sampler and steps where it sets them, as `--speed` does. A path that is no
    model to generate with is one KinemaError line now, not the library's 512x512 filled in without a word."""
    values = {key: LIBRARY_DEFAULTS[key] for key in GENERATE_DEFAULTS if key in LIBRARY_DEFAULTS}
    values["scheduler"] = FAMILY_DEFAULT
    _, defaults = model_defaults_for(model, GENERATE_DEFAULTS, checked=True)
    values.update(defaults)
    settings = SPEED_PRESETS.get(preset or "", {})
    values.update({key: settings[key] for key in ("scheduler", "steps") if key in settings})
    return values


def speed_form_values(preset: str, model: str) -> tuple[Any, Any]:
    """The (sampler, steps) the form shows for speed `preset` on `model`: the preset's, or the model's defaults for
    a preset that keeps them ("quality", or none)."""
    values = form_defaults(model, preset)
    return values["scheduler"], values["steps"]


def error_message(err: BaseException) -> str:
    """The one line a failed job shows: kinema's own message, else the library's wording of the error."""
    if isinstance(err, KinemaError):
        return str(err)
    if isinstance(err, OSError):
        return os_error_message(err)
    return library_error_message(err)


def extra_note_text(extra: dict[str, Any]) -> str:
    """What the page says about a loaded video's settings that the form has no field for ("" when none)."""
    if not extra:
        return ""
    listed = ", ".join(f"{key} {json.dumps(value)}" for key, value in extra.items())
    return f"Also from the loaded video (no field for them here; the next video uses them): {listed}"


def check_form(values: dict[str, Any], models_dir: str | os.PathLike | None, device: Any = "cpu") -> Job:
    """The job of the form `values` for the models on `device`, checked by `job_from_mapping` (KinemaError: one
    line, as the CLI and API say it)."""
    return job_from_mapping(form_to_mapping(values), where="form", models_dir=models_dir, device=device)


def _upload_names(message: str, uploads: list[str]) -> str:
    """`message` with each uploaded file named as the user named it: gradio keeps an upload at a path of its own
    (/tmp/gradio/<hash>/cat.png), which said nothing the user could find."""
    for path in uploads:
        message = message.replace(path, os.path.basename(path))
    return message


def newest_steps(events: queue.Queue) -> Iterator[tuple[str, Any]]:
    """The events of `events` in order until one of "done", "stopped" or "error", but of several "step" events
    waiting at once only the newest: a page slower than the sampler gets the current step and preview, not a
    backlog (the step events carry the count of steps done)."""
    waiting: tuple[str, Any] | None = None
    while True:
        kind, payload = waiting if waiting is not None else events.get()
        waiting = None
        while kind == "step":
            try:
                newer = events.get_nowait()
            except queue.Empty:
                break
            if newer[0] != "step":
                waiting = newer
                break
            payload = newer[1]
        yield kind, payload
        if kind in ("done", "stopped", "error"):
            return


def run_in_worker(job: Job, out: Path, cache: FamilyCache, stop: threading.Event) -> Iterator[tuple[str, Any]]:
    """Run `job` into `out` on a worker thread and yield what happens, in order: ("step", (steps done, preview
    image)) for the newest sampling step (`newest_steps`), ("warning", text) per kinema warning, then one of
    ("done", video paths), ("stopped", None or why) or ("error", exception). Setting `stop` (or closing this generator)
    stops the job at its next step."""
    events: queue.Queue = queue.Queue()
    steps_done = 0

    def callback(step: int, timestep: Any, latents: Any) -> None:
        nonlocal steps_done
        if stop.is_set():
            raise Cancelled()
        steps_done += 1
        events.put(("step", (steps_done, latent_preview(latents))))

    def work() -> None:
        try:
            with warnings_of_this_thread(lambda text: events.put(("warning", text))):
                events.put(("done", run_job(job, out, cache=cache, callback=callback)))
        except Cancelled:
            events.put(("stopped", None))
        except (KeyboardInterrupt, Terminated):  # the app is stopping (Ctrl-C, SIGTERM): stopped, not failed
            events.put(("stopped", "the app is stopping"))
        except BaseException as err:  # reported to the user; the worker thread must not die silently
            events.put(("error", err))

    worker = threading.Thread(target=work, name="kinema-ui-job", daemon=True)
    try:
        worker.start()
        yield from newest_steps(events)
    finally:
        stop.set()  # the page went away or the generator was closed: stop sampling at the next step
        worker.join()


# ---------------------------------------------------------------- the page


def _choices(entries: list[tuple[str, str]], none: str | None = None) -> list[tuple[str, str]]:
    return ([(none, NO_CHOICE)] if none is not None else []) + entries


def _scan_note(scan: ModelChoices, models_dir: Path | None) -> str:
    where = f"`{models_dir}`" if models_dir is not None else "no models folder"
    kinds = [(scan.models, "model"), (scan.motion_modules, "motion module"), (scan.loras, "LoRA")]
    kinds += [(scan.controlnets, "ControlNet")] if scan.controlnets else []
    counts = ", ".join(count_words(len(found), name) for found, name in kinds)
    note = f"Models folder: {where} — {counts}."
    if scan.skipped:
        note += f" Skipped {len(scan.skipped)}: " + "; ".join(f"`{label}` ({why})" for label, why in scan.skipped[:5])
    return note


def build_app(models_dir: str | os.PathLike | None = None, outputs_dir: str | os.PathLike = "out/ui", *,
              concurrency: int = 1, cache: FamilyCache | None = None) -> gr.Blocks:
    """The web app as a gradio Blocks page, its queue set to run `concurrency` generations at once.

    Args:
        models_dir: the folder the model, motion module and LoRA pickers scan (the bundled models are always
            offered); None: the bundled models alone.
        outputs_dir: where each generation's job folder goes (created on first use) and the gallery reads from.
        concurrency: generations that run at once; the others wait in gradio's queue.
        cache: the loaded models, shared by every job (default: a new `FamilyCache`).
    Serve it with `launch_app`, which lets gradio serve the videos of `outputs_dir`.
    """
    models_path = Path(models_dir) if models_dir is not None else None
    outputs = Path(outputs_dir)
    family_cache = cache if cache is not None else FamilyCache()
    # The stop of each running generation, per page (gradio session): a page's generations, one or several (an API
    # client's), each stop at their next step when it presses Stop. A generation still waiting in the queue is
    # dropped by gradio itself (the Stop button cancels the generate event).
    running: dict[str, set[threading.Event]] = {}
    running_lock = threading.Lock()
    scan = scan_models(models_path)
    start = form_defaults(DEFAULT_MODEL)
    scheduler_choices = [("the model's default", FAMILY_DEFAULT)] + [(name, name) for name in SCHEDULERS]
    speed_choices = [("as set here", NO_SPEED)] + [(name, name) for name in SPEED_PRESETS]

    with gr.Blocks(title="kinema", analytics_enabled=False, delete_cache=CACHE_CLEANING) as app:
        gr.Markdown("# kinema\nText, image and video to video with AnimateDiff and EasyAnimate V3 models. "
                    "It starts on the bundled model; add your own with `kinema ui --models-dir DIR`.")
        mode = gr.State(TEXT_TO_VIDEO)
        gallery_settings = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="a red circle moving right (or a prompt schedule as JSON: "
                                                "{\"0\": \"...\", \"16\": \"...\"})")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                with gr.Tabs(selected=TEXT_TO_VIDEO) as tabs:
                    tab_blocks = {}
                    with gr.Tab(TABS[0][1], id=TEXT_TO_VIDEO) as tab_blocks[TEXT_TO_VIDEO]:
                        gr.Markdown("A video from the prompt alone. Frames past the model's window are made with "
                                    "context windows.")
                    with gr.Tab(TABS[1][1], id=IMAGE_TO_VIDEO) as tab_blocks[IMAGE_TO_VIDEO]:
                        with gr.Row():
                            image = image_path_input(label="Start image", sources=["upload", "clipboard"])
                            end_image = image_path_input(label="End image (optional)", sources=["upload", "clipboard"])
                        with gr.Row():
                            resize = gr.Checkbox(label="Resize the images to the video's size", value=True)
                            image_size = gr.Button("Make the video the start image's size", elem_id="image-size")
                            pia_motion = gr.Dropdown(label="PIA motion preset (a PIA motion module only)",
                                                     choices=PIA_MOTION_CHOICES, value="", elem_id="pia-motion")
                    with gr.Tab(TABS[2][1], id=EXTEND) as tab_blocks[EXTEND]:
                        extend_video = gr.Video(label="Video to continue", sources=["upload"], include_audio=True)
                        extend_frames = gr.Number(label="Frames to append", value=16, precision=0)
                        extend_resize = gr.Checkbox(label=RESIZE_LABEL, value=False)
                    with gr.Tab(TABS[3][1], id=VIDEO_TO_VIDEO) as tab_blocks[VIDEO_TO_VIDEO]:
                        v2v_video = gr.Video(label="Input video", sources=["upload"], include_audio=True)
                        strength = gr.Slider(label="Strength (how much of the input is noised away)", minimum=0.05,
                                             maximum=1.0, step=0.05, value=0.6)
                        v2v_mask = gr.File(label="Mask (optional, video inpainting): its white pixels are remade and "
                                                 "its black ones held; an image for every frame, or a video",
                                           type="filepath", file_types=["image", "video"], elem_id="v2v-mask")
                        v2v_mask_blur = gr.Slider(label="Mask blur (pixels): feathers the mask's edge, 0 keeps it "
                                                        "hard", minimum=0, maximum=MAX_MASK_BLUR, step=0.5, value=0,
                                                  elem_id="v2v-mask-blur")
                        v2v_resize = gr.Checkbox(label=RESIZE_LABEL, value=False)
                with gr.Accordion("Model", open=True):
                    with gr.Row():
                        model = gr.Dropdown(label="Model", choices=scan.models, value=DEFAULT_MODEL,
                                            allow_custom_value=True, elem_id="model", scale=3)
                        motion_module = gr.Dropdown(label="Motion module (SD1.5 models)",
                                                    choices=_choices(scan.motion_modules, "none"), value=NO_CHOICE,
                                                    allow_custom_value=True, scale=3)
                        rescan = gr.Button("Rescan models folder", scale=1)
                    lora_paths, lora_weights = [], []
                    for slot in range(LORA_SLOTS):
                        with gr.Row():
                            lora_paths.append(gr.Dropdown(label=f"LoRA {slot + 1}", value=NO_CHOICE,
                                                          choices=_choices(scan.loras, "none"),
                                                          allow_custom_value=True, scale=3))
                            lora_weights.append(gr.Number(label="weight", value=1.0, step=0.05, scale=1))
                    scan_note = gr.Markdown(_scan_note(scan, models_path))
                with gr.Accordion("ControlNet (AnimateDiff models)", open=False):
                    with gr.Row():
                        controlnet = gr.Dropdown(label="ControlNet or SparseCtrl",
                                                 choices=_choices(scan.controlnets, "none"), value=NO_CHOICE,
                                                 allow_custom_value=True, scale=3, elem_id="controlnet")
                        controlnet_scale = gr.Number(label="scale", value=1.0, step=0.05, scale=1)
                    with gr.Row():
                        control_video = gr.File(label="Control video or images (pose, depth, edges; SparseCtrl "
                                                      "keyframes)", type="filepath", file_types=["video", "image"],
                                                elem_id="control-video")
                        control_indices = gr.Textbox(label="Keyframe frames (e.g. 0, -1; empty: an image per "
                                                           "frame)",
                                                     elem_id="control-indices")
                        guess_mode = gr.Checkbox(label="Guess mode (the control images lead; the prompt may be "
                                                       "empty)", value=False, elem_id="guess-mode")
                    with gr.Row():  # a second ControlNet steering together with the first (a depth map and a pose)
                        controlnet_2 = gr.Dropdown(label="Second ControlNet (optional)",
                                                   choices=_choices(scan.controlnets, "none"), value=NO_CHOICE,
                                                   allow_custom_value=True, scale=3, elem_id="controlnet-2")
                        controlnet_scale_2 = gr.Number(label="scale", value=1.0, step=0.05, scale=1)
                        control_video_2 = gr.File(label="Its control video or image", type="filepath",
                                                  file_types=["video", "image"], elem_id="control-video-2")
                # No minimum or maximum on the numbers: the job's check refuses bad ones, in the CLI's and API's words.
                with gr.Row():
                    speed = gr.Dropdown(label="Speed", choices=speed_choices, value=NO_SPEED, elem_id="speed")
                    scheduler = gr.Dropdown(label="Sampler", choices=scheduler_choices, value=start["scheduler"])
                    steps = gr.Number(label="Steps", value=start["steps"], precision=0, elem_id="steps")
                    guidance = gr.Number(label="Guidance", value=start["guidance"], step=0.5)
                    guidance_rescale = gr.Number(label="Guidance rescale (0: off; 0.7 for v-prediction models)",
                                                 value=0.0, step=0.1, elem_id="guidance-rescale")
                with gr.Row():
                    width = gr.Number(label="Width", value=start["width"], precision=0, step=8)
                    height = gr.Number(label="Height", value=start["height"], precision=0, step=8)
                    frames = gr.Number(label="Frames", value=start["frames"], precision=0,
                                       elem_id="frames")
                with gr.Row():
                    motion_effect = gr.Number(label="Motion effect (0: none, 1: as trained)", value=1.0, step=0.1,
                                              elem_id="motion-effect")
                    motion_scale = gr.Number(label="Motion scale (attention sharpness, 1: as trained)", value=1.0,
                                             step=0.1, elem_id="motion-scale")
                with gr.Row():
                    # Text: a browser's numbers are exact only to 2**53, and seeds go to 2**64 - 1.
                    seed = gr.Textbox(label="Seed (-1: random)", value="0", max_lines=1, elem_id="seed")
                    random_seed = gr.Button("Random seed", elem_id="random-seed")
                # Settings of a loaded video that the form has no field for; the next job takes them as they were.
                extra = gr.State({})
                with gr.Row():
                    extra_note = gr.Markdown("", elem_id="extra-settings")
                    forget_extra = gr.Button("Forget them", visible=False, elem_id="forget-extra")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=2):
                preview = gr.Image(label="Latent preview", interactive=False, elem_id="latent-preview", height=256)
                video = gr.Video(label="Result", interactive=False, autoplay=True, loop=True, elem_id="result-video")
                status = gr.Markdown(elem_id="status")
        gr.Markdown("## Earlier results")
        gallery = gr.Gallery(label="Gallery (select a video to see its settings)", columns=4, height="auto",
                             fit_columns=False, object_fit="contain", interactive=False, elem_id="gallery")
        with gr.Row():
            selected_settings = gr.JSON(label="Settings of the selected video", elem_id="selected-settings")
        with gr.Row():
            load_settings = gr.Button("Load these settings into the form", elem_id="load-settings")
            refresh_gallery = gr.Button("Refresh gallery")

        form_fields: dict[str, Any] = {
            "prompt": prompt, "negative_prompt": negative, "model": model, "motion_module": motion_module,
            "scheduler": scheduler, "steps": steps, "width": width, "height": height, "frames": frames,
            "guidance": guidance, "seed": seed, "image": image, "end_image": end_image, "resize": resize,
            "v2v_video": v2v_video, "strength": strength, "v2v_mask": v2v_mask,
            "v2v_mask_blur": v2v_mask_blur, "extend_video": extend_video,
            "extend_frames": extend_frames, "speed": speed, "v2v_resize": v2v_resize, "extend_resize": extend_resize,
            "motion_effect": motion_effect, "motion_scale": motion_scale, "controlnet": controlnet,
            "controlnet_scale": controlnet_scale, "control_video": control_video, "control_indices": control_indices,
            "guess_mode": guess_mode, "pia_motion": pia_motion, "controlnet_2": controlnet_2,
            "controlnet_scale_2": controlnet_scale_2, "control_video_2": control_video_2,
            "guidance_rescale": guidance_rescale,
        }

        # ---- events

        def gallery_value() -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
            entries: list[GalleryEntry] = read_gallery(outputs)
            return [(str(entry.video), entry.caption) for entry in entries], [entry.settings for entry in entries]

        def show_gallery() -> tuple[Any, Any]:
            return gallery_value()

        app.load(show_gallery, outputs=[gallery, gallery_settings], concurrency_limit=None)
        refresh_gallery.click(show_gallery, outputs=[gallery, gallery_settings], concurrency_limit=None)

        for tab_mode, tab in tab_blocks.items():
            tab.select(lambda chosen=tab_mode: chosen, outputs=mode, concurrency_limit=None)

        # The job's own range for random seeds (-1).
        random_seed.click(lambda: str(secrets.randbelow(RANDOM_SEED_LIMIT)), outputs=seed, concurrency_limit=None)

        def size_from_image(path: str | None) -> tuple[Any, Any, Any]:
            if not path:
                raise gr.Error("upload a start image first")
            try:
                size_width, size_height = size_of_image(path)
            except KinemaError as err:
                raise gr.Error(str(err), print_exception=False) from None
            return size_width, size_height, True

        image_size.click(size_from_image, inputs=image, outputs=[width, height, resize], concurrency_limit=None)

        def rescan_models() -> tuple[Any, ...]:
            found = scan_models(models_path)
            return (gr.update(choices=found.models), gr.update(choices=_choices(found.motion_modules, "none")),
                    *[gr.update(choices=_choices(found.loras, "none")) for _ in lora_paths],
                    gr.update(choices=_choices(found.controlnets, "none")),
                    gr.update(choices=_choices(found.controlnets, "none")), _scan_note(found, models_path))

        rescan.click(rescan_models, outputs=[model, motion_module, *lora_paths, controlnet, controlnet_2, scan_note],
                     concurrency_limit=None)

        def model_chosen(chosen: str, preset: str) -> tuple[Any, ...]:
            """The model's defaults, under the speed preset chosen (which a new model must not undo)."""
            try:
                defaults = form_defaults(chosen or DEFAULT_MODEL, preset)
            except KinemaError as err:
                gr.Warning(str(err))
                return tuple(gr.skip() for _ in GENERATE_DEFAULTS)
            return tuple(defaults[key] for key in GENERATE_DEFAULTS)

        def extend_video_uploaded(video: str | None, preset: str) -> tuple[Any, ...]:
            """The model and motion module that made the video to continue, shown in their fields with the model's
            defaults (as choosing it does): what the job continues it with unless another is chosen. A video
            without stored settings leaves them; one whose model is gone says so."""
            recorded = video_settings(video)
            parts = video_model_parts(video, recorded)
            if not parts:
                if isinstance(recorded.get("model"), str):
                    gr.Warning(f"the model that made this video, {recorded['model']}, is not here; it is continued "
                               "with the model chosen")
                return (gr.skip(), gr.skip(), *(gr.skip() for _ in GENERATE_DEFAULTS))
            return (parts["model"], parts.get("motion_module") or NO_CHOICE, *model_chosen(parts["model"], preset))

        extend_video.upload(extend_video_uploaded, inputs=[extend_video, speed],
                            outputs=[model, motion_module, *[form_fields[key] for key in GENERATE_DEFAULTS]],
                            concurrency_limit=None)

        # .input, not .change: loading a gallery video's settings sets the model too, and must keep its numbers.
        model.input(model_chosen, inputs=[model, speed], outputs=[form_fields[key] for key in GENERATE_DEFAULTS],
                    concurrency_limit=None)

        def speed_chosen(preset: str, chosen_model: str) -> tuple[Any, Any]:
            """A preset shows its sampler and steps in the form (what the job will use); its other settings
            (precision, step caching, guidance truncation) go with the job's speed key."""
            try:
                return speed_form_values(preset, chosen_model or DEFAULT_MODEL)
            except KinemaError as err:  # a model path that has gone: the form keeps its numbers
                gr.Warning(str(err))
                return gr.skip(), gr.skip()

        speed.input(speed_chosen, inputs=[speed, model], outputs=[scheduler, steps], concurrency_limit=None)

        def select_video(settings_list: list[dict[str, Any]], event: gr.SelectData) -> Any:
            if event.index is None or not 0 <= event.index < len(settings_list):
                return None
            return settings_list[event.index]

        gallery.select(select_video, inputs=gallery_settings, outputs=selected_settings, concurrency_limit=None)

        form_outputs = [mode, tabs, *form_fields.values(), *lora_paths, *lora_weights, extra, extra_note,
                        forget_extra]

        def load_into_form(settings: Any, shown_image: Any = None, shown_end_image: Any = None) -> tuple[Any, ...]:
            if not isinstance(settings, dict):
                raise gr.Error("select a video in the gallery first")
            try:
                values = settings_to_form(settings)
            except KinemaError as err:  # a hand-edited job.json
                raise gr.Error(str(err), print_exception=False) from None
            extra_values = values.pop("extra")
            if isinstance(settings.get("controlnet"), list) and len(settings["controlnet"]) > 2:
                gr.Warning(f"the video was steered by {len(settings['controlnet'])} ControlNets; the form holds "
                           "two, so the first two were loaded")
            loras = values.pop("loras")
            if len(loras) > LORA_SLOTS:
                gr.Warning(f"the video used {len(loras)} LoRAs; the form holds {LORA_SLOTS}, so the first "
                           f"{LORA_SLOTS} were loaded")
            loras = (loras + [[NO_CHOICE, 1.0]] * LORA_SLOTS)[:LORA_SLOTS]
            if isinstance(values.get("control_video"), list):  # keyframe images from a job file: no field holds them
                gr.Warning("the video's control images were a list of files, which the form cannot hold; upload "
                           "them again as one video or image")
                values["control_video"] = None
            for key in INPUT_KEYS:
                if values.get(key) and not Path(values[key]).is_file():
                    gr.Warning(f"the {key.replace('_', ' ')} this video was made from is gone; upload it again")
                    values[key] = None
            values["motion_module"] = values.get("motion_module") or NO_CHOICE
            values["controlnet"] = values.get("controlnet") or NO_CHOICE
            values["controlnet_2"] = values.get("controlnet_2") or NO_CHOICE
            values["scheduler"] = values.get("scheduler") or FAMILY_DEFAULT
            values["speed"] = values.get("speed") or NO_SPEED
            # The image fields get their own value back, never an update: gradio answers an update by building a
            # plain gr.Image for the session, which would open uploads again (image_path_input).
            values.setdefault("image", shown_image)
            values.setdefault("end_image", shown_end_image)
            field_updates = [values[key] if key in values else gr.skip() for key in form_fields]
            return (values["mode"], gr.Tabs(selected=values["mode"]), *field_updates,
                    *[path or NO_CHOICE for path, _ in loras], *[weight for _, weight in loras], extra_values,
                    extra_note_text(extra_values), gr.Button(visible=bool(extra_values)))

        load_settings.click(load_into_form, inputs=[selected_settings, image, end_image], outputs=form_outputs,
                            concurrency_limit=None)
        forget_extra.click(lambda: ({}, "", gr.Button(visible=False)), outputs=[extra, extra_note, forget_extra],
                           concurrency_limit=None)

        def stop_job(request: gr.Request) -> str:
            with running_lock:
                for event in running.get(request.session_hash or "", ()):
                    event.set()
            return ("Stopped: a generation still waiting never starts; a running one ends at its next sampling step "
                    "and writes nothing (one already decoding finishes)")

        # gradio finds its progress tracker by this default value.
        def generate_video(data: dict[Any, Any], request: gr.Request,
                           progress: gr.Progress = gr.Progress()  # noqa: B008
                           ) -> Iterator[dict[Any, Any]]:
            session = request.session_hash or ""
            stop_event = threading.Event()
            with running_lock:
                running.setdefault(session, set()).add(stop_event)
            try:
                yield from _generate(data, stop_event, progress)
            finally:
                with running_lock:
                    running[session].discard(stop_event)
                    if not running[session]:
                        del running[session]

        def _generate(data: dict[Any, Any], stop_event: threading.Event, progress: gr.Progress
                      ) -> Iterator[dict[Any, Any]]:
            values = {key: data[component] for key, component in form_fields.items()}
            values["mode"] = data[mode]
            values["extra"] = data[extra]
            values["loras"] = [[data[path], data[weight]] for path, weight in zip(lora_paths, lora_weights,
                                                                                      strict=True)]
            uploads = [values[key] for key in INPUT_KEYS if values.get(key)]
            try:
                # Bad input is refused before anything is copied, and only the inputs the job reads are kept (an
                # upload left in another tab is neither hashed nor copied).
                used = _input_paths(check_form(values, models_path, family_cache.device))
                for key in INPUT_KEYS:
                    if values.get(key):
                        values[key] = str(keep_input(values[key], outputs)) if os.path.abspath(values[key]) in used \
                            else None
                job = check_form(values, models_path, family_cache.device)
            except KinemaError as err:
                raise gr.Error(_upload_names(str(err), uploads), print_exception=False) from None
            except OSError as err:
                raise gr.Error(_upload_names(os_error_message(err), uploads), print_exception=False) from None
            out = new_job_folder(outputs, job.settings())
            total = job.request.sampling_steps()
            progress((0, total), desc="loading the model and starting")
            for kind, payload in run_in_worker(job, out, family_cache, stop_event):
                if kind == "step":
                    done_steps, picture = payload
                    progress((done_steps, total), desc=f"step {done_steps}" + (f" of {total}" if total else ""))
                    yield {preview: picture, status: f"Sampling: step {done_steps}"}
                elif kind == "warning":
                    gr.Warning(payload)
                elif kind == "stopped":
                    yield {status: f"Stopped{f' ({payload})' if payload else ''}: nothing was written."}
                elif kind == "error":
                    if not isinstance(payload, (KinemaError, OSError)):
                        logger.error("job %s failed", out.name, exc_info=payload)
                    raise gr.Error(error_message(payload), print_exception=False)
                else:
                    items, settings_list = gallery_value()
                    seeds = ", ".join(str(s) for s in job.request.seeds)
                    yield {video: str(payload[0]), gallery: items, gallery_settings: settings_list,
                           selected_settings: settings_list[0] if settings_list else None,
                           status: f"Done: seed {seeds}. Saved in {out}"}

        # One event for both triggers, so the queue's concurrency limit counts every generation together.
        generation = gr.on([generate.click, prompt.submit], generate_video,
                           inputs={mode, extra, *form_fields.values(), *lora_paths, *lora_weights},
                           outputs=[preview, video, status, gallery, gallery_settings, selected_settings])
        # The page's Stop: gradio drops its generation still waiting in the queue (a Stop that found no running job
        # was lost, and the job ran whole later) and ends a running one's event, whose job stop_job stops at its
        # next step.
        stop.click(stop_job, outputs=status, concurrency_limit=None, cancels=[generation])
    app.queue(default_concurrency_limit=concurrency)
    return app


def launch_app(app: gr.Blocks, *, outputs_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 7860,
               max_upload_bytes: int | None = 50 * 2**20, block: bool = True, quiet: bool = False) -> None:
    """Serve `app` at http://HOST:PORT; gradio may serve the videos under `outputs_dir` (the gallery's). `block`:
    until Ctrl-C (then the server stops); else return once it is up (stop it with `app.close()`)."""
    Path(outputs_dir).mkdir(parents=True, exist_ok=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("kinema ui listens on %s: anyone who can reach this machine can use it (there is no password)",
                       host)
    try:
        app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet, share=False,
                   inbrowser=False, show_error=True, allowed_paths=[str(Path(outputs_dir).resolve())],
                   max_file_size=max_upload_bytes, ssr_mode=False)
    except OSError:
        # gradio binds the port itself, so it can be taken between `kinema ui`'s check and here; gradio's message
        # then names its own settings (GRADIO_SERVER_PORT, launch()), kinema's names --port.
        from kinema.cli.args import check_port_free

        check_port_free(host, port)
        raise
