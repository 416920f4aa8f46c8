"""The FastAPI app of `kinema serve`: jobs in, videos out (see docs/api.md for the endpoints and examples).

    POST   /v1/jobs               queue a job: a JSON object of job fields (kinema.pipelines.jobs.job_from_mapping),
                                  start/end image and input video as base64 (`image_base64`, `end_image_base64`,
                                  `video_base64`) or, as multipart/form-data, a `job` field holding that JSON plus
                                  `image` / `end_image` / `video` / `mask` files (a video: video-to-video, or
                                  with `extend_frames` a continuation; a mask: video inpainting)
    GET    /v1/jobs               list jobs, newest first (?status=, ?limit=, ?offset=)
    GET    /v1/jobs/{id}          a job: status (queued, running, done, failed, cancelled), progress, settings, error
    GET    /v1/jobs/{id}/result   a done job's video (?seed= for one of several); 409 while it is not done
    DELETE /v1/jobs/{id}          cancel: a queued job never runs, a running one stops at its next step
    GET    /v1/health             the server is up, and how many jobs each status has
    GET    /openapi.json, /docs   the OpenAPI spec (FastAPI's) and its browsable page

Every error is a JSON object `{"detail": "one line"}`: bad input is 422 (400 for a body that is not JSON, 413 over
the upload limit, 415 another content type), an unknown job 404, a job in the wrong state 409; the server's own
trouble is 5xx (507: no disk room for an upload, 503: its data folder was removed while it ran, 500: anything else).
With an API key, every request (the spec included) needs `Authorization: Bearer KEY`, else 401.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import io
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from kinema import __version__
from kinema.api.store import FINISHED, STATUSES, DataDirLock, JobRecord, JobStore, lock_data_dir
from kinema.api.worker import JobRunner, JobWorker
from kinema.data.probe import PIL_FORMATS
from kinema.errors import KinemaError, library_error_message, os_error_message, shorten
from kinema.fileio import json_kind
from kinema.jsonl import loads_once_each
from kinema.pipelines.request import MAX_FALLOFF, MAX_FPS, MAX_GUIDANCE, MAX_MASK_BLUR, MAX_SEED, MAX_STEPS, MIN_FPS

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 20
# Files a job may upload: form field (and `FIELD_base64` JSON key) -> how messages name it.
UPLOADS = {"image": "start image", "end_image": "end image", "video": "input video", "mask": "mask",
           "ip_image": "image prompt", "control_video": "control video"}
# Room in a request body besides its uploads (the job's own fields).
_BODY_ROOM = 1 << 20
# How long a stopping server waits for its running job to reach the end of a step (where it stops and goes back to
# the queue) before it puts the job back itself and exits: one step at a large size, or the decode, takes minutes.
STOP_WAIT_SECONDS = 10.0
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---------------------------------------------------------------- what the API returns


class Progress(BaseModel):
    """Sampling steps done of the job's total (a continuation past the model's window samples in segments, so its
    total grows as segments start)."""

    step: int
    total: int


class JobView(BaseModel):
    """A job as the API shows it."""

    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    created: str
    started: str | None
    finished: str | None
    progress: Progress
    cancel_requested: bool
    error: str | None
    videos: list[str]
    warnings: list[str]  # what the run logged as warnings: a prompt the model will not follow, settings doing nothing
    settings: dict[str, Any]


class JobList(BaseModel):
    """Jobs, newest first, and how many jobs each status has in all."""

    jobs: list[JobView]
    counts: dict[str, int]


class Health(BaseModel):
    """The server is up."""

    status: Literal["ok"]
    version: str
    counts: dict[str, int]


class ErrorBody(BaseModel):
    """Every error: one line saying what is wrong and how to fix it."""

    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": words} for code, words in (
        (400, "the body is not valid JSON"), (401, "missing or wrong API key"), (404, "no such job"),
        (409, "the job is not in a state that allows this"), (413, "over the upload limit"),
        (415, "not JSON or multipart/form-data"), (422, "bad job fields or parameters"),
        (500, "the server failed (its log has the details)"),
        (503, "the server's jobs database was removed while it ran"),
        (507, "no room on the server's disk for the upload"))}

_JOB_FIELDS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Job fields (kinema.pipelines.jobs.job_from_mapping); unset size, frames, steps, guidance and "
                   "scheduler take the model's defaults. Unknown keys are refused, naming the nearest valid one.",
    "properties": {
        "prompt": {"oneOf": [{"type": "string"}, {"type": "object"}],
                   "description": "text, or a prompt schedule {frame: text}"},
        "negative_prompt": {"type": "string"},
        "model": {"type": "string", "description": "a bundled model's name, a name in --models-dir, or a path"},
        "motion_module": {"type": "string"},
        "vae": {"type": "string", "description": "another VAE for an AnimateDiff model's own: an SD1.x VAE file or "
                                                "AutoencoderKL folder"},
        "loras": {"type": "array", "items": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}]}},
        "ip_adapter": {"oneOf": [{"type": "string"}, {"type": "object", "properties": {
            "path": {"type": "string"}, "scale": {"type": "number", "minimum": 0}}}],
                       "description": "an IP-Adapter file (AnimateDiff models), with its scale; needs ip_image"},
        "image_encoder": {"type": "string", "description": "the IP-Adapter's CLIP image encoder folder (default: "
                                                           "image_encoder/ beside the adapter)"},
        "controlnet": {"oneOf": [{"type": "string"}, {"type": "object", "properties": {
            "path": {"type": "string"}, "scale": {"type": "number", "minimum": 0}}}],
                       "description": "an SD1.5 ControlNet folder or file, or AnimateDiff v3's SparseCtrl (AnimateDiff "
                                      "models), with its scale; needs control_video"},
        "control_indices": {"type": "array", "items": {"type": "integer"},
                            "description": "the frames the control images are keyframes of (-1: the last); a "
                                           "ControlNet then steers those frames, and their neighbours by "
                                           "control_falloff"},
        "control_falloff": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 1,
                            "maxItems": MAX_FALLOFF,
                            "description": "a ControlNet's keyframes also steer the frames 1, 2, ... away at these "
                                           "weights (prompt travel's control_scale_list)"},
        "control_loop": {"type": "boolean", "description": "control_falloff wraps around the video's ends"},
        "control_start": {"type": "number", "minimum": 0, "maximum": 1,
                          "description": "the share of the steps after which the ControlNet steers (default 0)"},
        "control_end": {"type": "number", "minimum": 0, "maximum": 1,
                        "description": "the share of the steps after which it stops (default 1)"},
        "control_preprocess": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                               "description": "make the control images from ordinary frames: canny (canny:LOW:HIGH), "
                                              "tile_resample:RATE, blur:SIGMA, invert or none; a list with several "
                                              "ControlNets"},
        "pia_motion": {"type": "integer", "minimum": 0, "maximum": 8,
                       "description": "a PIA image animator's motion preset (0-2 small to large, 3-5 looping, 6-8 "
                                      "style transfer)"},
        "guess_mode": {"type": "boolean", "description": "ControlNet's guess mode: the control images lead, so the "
                                                         "prompt may be empty"},
        "frames": {"type": "integer", "minimum": 1},
        "height": {"type": "integer", "minimum": 8},
        "width": {"type": "integer", "minimum": 8},
        "steps": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS},
        "guidance": {"type": "number", "minimum": 1, "maximum": MAX_GUIDANCE},
        "scheduler": {"type": "string"},
        "seed": {"oneOf": [{"type": "integer", "maximum": MAX_SEED}, {"type": "array", "items": {"type": "integer"}}],
                 "description": "a seed or a list of them (one video each); -1 draws a random seed (recorded in the "
                                "job's settings)"},
        "seeds": {"type": "array", "items": {"type": "integer"}, "description": "one video per seed"},
        "resize": {"type": "boolean", "description": "resize the start image to height x width"},
        "fps": {"type": "number", "minimum": MIN_FPS, "maximum": MAX_FPS},
        "image_base64": {"type": "string", "description": "the start image (image-to-video), base64"},
        "end_image_base64": {"type": "string", "description": "the end image, base64 (needs a start image)"},
        "video_base64": {"type": "string", "description": "the input video, base64: video-to-video, or with "
                                                          "extend_frames a continuation"},
        "mask_base64": {"type": "string", "description": "video-to-video inpainting: white pixels remade, black "
                                                         "held; an image for every frame or a video, base64"},
        "ip_image_base64": {"type": "string", "description": "the IP-Adapter's image prompt, base64"},
        "control_video_base64": {"type": "string", "description": "the ControlNet's control images, base64: a video "
                                                                  "with one per frame, or one image for all"},
        "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                     "description": "video-to-video: how far the input is noised (1 redraws it)"},
        "mask_blur": {"type": "number", "minimum": 0, "maximum": MAX_MASK_BLUR,
                      "description": "with a mask: the radius in pixels of the blur that feathers its edge"},
        "extend_frames": {"type": "integer", "minimum": 1, "description": "append this many frames to the video"},
        "overlap_frames": {"type": "integer", "minimum": 1, "description": "continuation: the last frames that "
                                                                           "condition the next segment"},
        "segment_frames": {"type": "integer", "minimum": 1, "description": "continuation: frames per segment "
                                                                           "(default: the model's window)"},
        "mode": {"type": "string", "enum": ["text-to-video", "image-to-video", "video-to-video", "extend"],
                 "description": "optional: must agree with the inputs given (a job's settings carry it)"},
        "tokenizer": {"type": "string", "description": "a tokenizer folder, for single-file SD checkpoints"},
        "context": {"type": "object", "description": "context windows for videos past the model's window: length, "
                                                     "overlap, stride, schedule (uniform, static), fuse (flat, "
                                                     "pyramid, overlap-linear), closed_loop, freenoise"},
        "free_init": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "object"}],
                      "description": "FreeInit: iterations, or {iterations, method, spatial_stop, temporal_stop, "
                                     "order}"},
        "freeu": {"oneOf": [{"type": "boolean"}, {"type": "object"}],
                  "description": "FreeU (AnimateDiff models): true for SD1.5's factors, or {b1, b2, s1, s2}"},
        "interpolation": {"type": "string", "enum": ["linear", "slerp"],
                          "description": "prompt travel between keyframes"},
        "prompt_hold": {"type": "number", "minimum": 0, "maximum": 1,
                        "description": "the share of each gap a keyframe's prompt is held before blending"},
        "prompt_loop": {"type": "boolean", "description": "the prompt schedule wraps from the last keyframe to the "
                                                          "first"},
        "clip_skip": {"type": "integer", "minimum": 1, "description": "AnimateDiff models: 2 reads CLIP's "
                                                                      "next-to-last layer"},
        "timestep_spacing": {"type": "string", "enum": ["leading", "linspace", "trailing"]},
        "motion_scale": {"type": "number", "description": "factor on the motion modules' attention (a temperature)"},
        "motion_effect": {"type": "number", "description": "factor on the motion modules' residual (0: no motion "
                                                           "layers)"},
        "normalize_control": {"type": "boolean", "description": "turn the control images gray and stretch them to "
                                                                "[0, 1] (SparseCtrl scribbles)"},
        "speed": {"type": "string", "enum": ["fast", "balanced", "quality"],
                  "description": "a preset filling the speed settings the job leaves unset"},
        "dtype": {"type": "string", "enum": ["float32", "bfloat16", "float16"]},
        "quantize": {"type": "string", "enum": ["int8"]},
        "compile": {"type": "boolean", "description": "torch.compile the model"},
        "offload": {"type": "boolean", "description": "keep each model part off the accelerator until it runs"},
        "vae_tiling": {"type": "boolean", "description": "decode in spatial tiles"},
        "decode_chunk": {"type": "integer", "minimum": 1, "description": "frames per VAE call (SD VAE)"},
        "attention_chunk": {"type": "integer", "minimum": 1,
                            "description": "motion-module attention: sequences per call"},
        "cache_interval": {"type": "integer", "minimum": 1, "description": "step caching: deep features every "
                                                                           "this many steps"},
        "cfg_truncation": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                           "description": "the share of steps that keep classifier-free guidance"},
        "guidance_rescale": {"type": "number", "minimum": 0, "maximum": 1},
    },
}
_SUBMIT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _JOB_FIELDS_SCHEMA},
    "multipart/form-data": {"schema": {"type": "object", "required": ["job"], "properties": {
        "job": {"type": "string", "description": "the job fields as a JSON object"},
        "image": {"type": "string", "format": "binary", "description": "the start image"},
        "end_image": {"type": "string", "format": "binary", "description": "the end image"},
        "video": {"type": "string", "format": "binary", "description": "the input video"},
        "mask": {"type": "string", "format": "binary",
                 "description": "the pixels of the input video to remake (white), an image or a video"},
        "ip_image": {"type": "string", "format": "binary", "description": "the IP-Adapter's image prompt"},
        "control_video": {"type": "string", "format": "binary",
                          "description": "the ControlNet's control images (a video, or one image)"}}}}}}}


# ---------------------------------------------------------------- the key and the size limit, before any route


class _TooLarge(Exception):
    pass


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # A client's text repeated in a message may hold what UTF-8 cannot encode (a lone surrogate): escaped, not a 500.
    detail = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _host_name(value: str) -> str:
    """The name or address of a Host header or an Origin's authority, without its port, as `is_loopback` compares
    it (lower case, no trailing dot): `[::1]:8000` -> `::1`, `LocalHost.:8000` -> `localhost`."""
    if value.startswith("["):
        name = value[1:].partition("]")[0]
    else:
        name = value.rpartition(":")[0] if value.count(":") == 1 else value
    return name.rstrip(".").lower()


def _from_elsewhere(headers: dict[bytes, bytes]) -> str | None:
    """Why a request to a server without an API key (one listening on loopback) did not come from this machine's
    own clients, or None. A web page can post a form to http://127.0.0.1:PORT (a multipart POST needs no CORS
    preflight) and, through a name of its own that it points at 127.0.0.1 (DNS rebinding), read the answers; the
    Host and Origin headers, which a page cannot set, say so. curl, scripts and the API's own /docs page send a local
    Host and no Origin, or a local one."""
    from kinema.cli.serve import is_loopback

    sent = headers.get(b"host")  # none: HTTP/1.0, a health check; never a browser, which always sends it
    host = "" if sent is None else sent.decode("latin-1")
    if sent is not None and not is_loopback(_host_name(host)):
        return (f"the Host header {host!r} is not localhost or a loopback address: a server without an API key "
                "answers this machine's own clients only, not a web page that reached it through a name of its own; "
                "use http://127.0.0.1:PORT, or start kinema serve with --api-key")
    origin = headers.get(b"origin")
    if origin is not None:
        authority = origin.decode("latin-1").partition("://")[2]
        if not is_loopback(_host_name(authority)):
            return (f"a request from the web page at {origin.decode('latin-1')!r}: a server without an API key "
                    "answers this machine's own clients and its own /docs page only; start kinema serve with "
                    "--api-key for others")
    return None


class _Guard:
    """ASGI middleware in front of every route: the API key (compared in constant time), or without one a request
    from this machine alone (`_from_elsewhere`), and the request body limit (the declared length, and the bytes
    actually received for a body sent without one)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None:
            sent = headers.get(b"authorization", b"")
            scheme, _, token = sent.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                response = _error_response(401, "missing or wrong API key: send the header `Authorization: Bearer "
                                                "KEY` with the key kinema serve was started with",
                                           {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        else:
            refusal = _from_elsewhere(headers)
            if refusal is not None:
                await _error_response(403, refusal)(scope, receive, send)
                return
        too_large = _error_response(413, f"the request body is over the server's limit of {self.max_body} bytes "
                                         "(room for each upload a job takes at kinema serve's --max-upload-mb); "
                                         "send smaller files")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body:
            if not declared.isdigit():
                too_large = _error_response(400, "the Content-Length header is not a number")
            await too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await too_large(scope, receive, send)


# ---------------------------------------------------------------- reading a submission


def _one_line_validation_error(err: RequestValidationError) -> str:
    parts = []
    for problem in err.errors()[:3]:
        where = ".".join(str(part) for part in problem.get("loc", ()))
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return shorten("; ".join(parts) or "invalid request")


def _decode_base64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise KinemaError(f"{what} must be a base64 string, got {json_kind(text)}")
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    # Line breaks as `base64` and MIME wrap it (every 76 characters), and the URL-safe alphabet, are base64 too.
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)  # base64url is often sent unpadded (JWTs, Go's RawURLEncoding)
    try:
        return base64.b64decode(text, altchars=b"-_" if "-" in text or "_" in text else None, validate=True)
    except (binascii.Error, ValueError):
        raise KinemaError(f"{what} is not valid base64; send the file's bytes base64-encoded") from None


def _job_object(text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        raise KinemaError("the form field `job` must be text: the job fields as a JSON object")
    try:
        fields = loads_once_each(text)
    except KinemaError as err:
        raise KinemaError(f"the form field `job`: {err}") from None
    except ValueError as err:
        raise HTTPException(400, f"the form field `job` is not valid JSON: {err}") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise HTTPException(400, "the form field `job` is JSON nested too deeply to read") from None
    if not isinstance(fields, dict):
        raise KinemaError("the form field `job` must be a JSON object of job fields, such as {\"prompt\": \"...\"}")
    return fields


async def _read_upload(upload: UploadFile, what: str, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    _check_upload_size(data, what, limit)
    return data


def _check_upload_size(data: bytes, what: str, limit: int) -> None:
    if len(data) > limit:
        raise HTTPException(413, f"the {what} is over the server's upload limit of {limit} bytes; send a smaller file "
                                 "(the limit is kinema serve --max-upload-mb)")


async def _read_submission(request: Request, limit: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The job fields and the uploaded files (field -> bytes) of a POST /v1/jobs request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: dict[str, bytes] = {}
    if content_type == "application/json":
        try:
            fields = loads_once_each(await request.body())
        except KinemaError:
            raise
        except ValueError as err:  # also a body that is not UTF-8
            raise HTTPException(400, f"the body is not valid JSON: {shorten(str(err), 200)}") from None
        except RecursionError:  # the parser recurses once per nesting level
            raise HTTPException(400, "the body is JSON nested too deeply to read") from None
        if not isinstance(fields, dict):
            raise KinemaError("the body must be a JSON object of job fields, such as {\"prompt\": \"a red circle\"}")
        for name, what in UPLOADS.items():
            encoded = fields.pop(f"{name}_base64", None)
            if encoded is not None:  # null: left out, as for every key
                uploads[name] = _decode_base64(encoded, f"{name}_base64 (the {what})")
                _check_upload_size(uploads[name], what, limit)
        return fields, uploads
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=len(UPLOADS), max_fields=len(UPLOADS) + 1, max_part_size=_BODY_ROOM)
        except StarletteHTTPException as err:  # Starlette's words name no fix
            if "Part exceeded maximum size" not in str(err.detail):
                raise
            raise HTTPException(413, f"a form field that is no file is over {_BODY_ROOM // 2**20} MiB: the job holds "
                                     "less, and images and videos go as files (-F image=@start.png)") from None
        try:
            unknown = sorted(set(form.keys()) - {"job", *UPLOADS})
            if unknown:
                raise KinemaError(f"unknown form field {unknown[0]!r}; the form fields are job (the job as JSON), "
                                  f"{', '.join(UPLOADS)} (files)")
            repeated = sorted(name for name in set(form.keys()) if len(form.getlist(name)) > 1)
            if repeated:
                raise KinemaError(f"the form field {repeated[0]} is given more than once; send each field once")
            if "job" not in form:
                raise KinemaError("the form has no `job` field; send the job fields as JSON in a field named job")
            fields = _job_object(form["job"])
            for name, what in UPLOADS.items():
                if fields.pop(f"{name}_base64", None) is not None:  # null: left out
                    raise KinemaError(f"in a multipart form the {what} is a file: send it as the form field {name}, "
                                      f"not as {name}_base64 in the job")
            for name, what in UPLOADS.items():
                value = form.get(name)
                if value is None:
                    continue
                if not isinstance(value, UploadFile):
                    raise KinemaError(f"the form field {name} must be a file (the {what})")
                uploads[name] = await _read_upload(value, what, limit)
        finally:
            await form.close()
        return fields, uploads
    raise HTTPException(415, "send the job as application/json, or as multipart/form-data with a `job` field (JSON) "
                             "and image or video files")


def _image_suffix_checked(data: bytes, what: str, limit: int) -> str:
    """The file suffix of an uploaded image (from its content), after checking it is one and within `limit`."""
    from PIL import Image

    from kinema.pipelines.jobs import check_image_bytes

    check_image_bytes(data, max_bytes=limit, what=what)
    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
        return "." + (image.format or "img").lower()


def _checked(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`check(*args, **kwargs)` on a client's input: a failure the checks did not foresee (an image that makes PIL
    raise something else, a type nobody expected) is still bad input, a 422 with its traceback in the log."""
    try:
        return check(*args, **kwargs)
    except KinemaError:
        raise
    except Exception as err:
        logger.warning("input the checks did not foresee", exc_info=True)
        raise KinemaError(f"the job could not be read: {library_error_message(err)}") from err


@dataclass(frozen=True)
class JobLimits:
    """The largest job the server accepts, so that one request cannot hold the worker for days (a job past its
    model's window runs as many segments as it has frames). Each is checked when the job is submitted."""

    frames: int = 1024
    side: int = 2048
    steps: int = 500
    videos: int = 16

    def check(self, job: Any, input_frames: int | None = None) -> None:
        """One KinemaError line naming the first limit `job` (a kinema.pipelines.jobs.Job) goes over; an input
        video's `input_frames` count as made again (video-to-video) or continued (extend), and FreeInit's
        iterations multiply the steps."""
        request = job.request
        made = request.frames if input_frames is None else input_frames
        # FreeInit samples `iterations` times over: its steps count as many times.
        runs = request.free_init.iterations if request.free_init is not None else 1
        sizes = {"frames": made + (request.extend_frames or 0), "height": request.height, "width": request.width,
                 "steps": request.steps * runs, "seeds": len(request.seeds)}
        names = {"steps": f"steps x free_init.iterations ({request.steps} x {runs})"} if runs > 1 else {}
        for field, value in sizes.items():
            _refuse_over(names.get(field, field), value, *self._bounds()[field])

    def check_given(self, fields: Mapping[str, Any], input_frames: int | None = None) -> None:
        """The limits on the frames, size and steps a submission names (an uploaded video's `input_frames`, with
        its extend_frames, as its frames), checked before its model's rules, whose suggestions (the nearest frame
        count a Slice VAE makes) could go past them."""
        given = dict(fields)
        if input_frames is not None:
            extend = fields.get("extend_frames")
            given["frames"] = input_frames + (extend if isinstance(extend, int) and not isinstance(extend, bool)
                                              and extend > 0 else 0)
        for field in ("frames", "height", "width", "steps"):
            value = given.get(field)
            if isinstance(value, int) and not isinstance(value, bool):
                _refuse_over(field, value, *self._bounds()[field])

    def _bounds(self) -> dict[str, tuple[int, str | None]]:
        """Each limited field's limit and the server option that sets it (seeds: none)."""
        return {"frames": (self.frames, "--max-frames"), "height": (self.side, "--max-side"),
                "width": (self.side, "--max-side"), "steps": (self.steps, "--max-steps"), "seeds": (self.videos, None)}


def _refuse_over(name: str, value: int, limit: int, option: str | None) -> None:
    if value > limit:
        raise KinemaError(f"{name} is {value}, over this server's limit of {limit}; ask for less"
                          + (f" (the server's {option})" if option else " (one video per seed)"))


class _Server:
    """What the routes share: the settings, the store and the worker (made when the app starts)."""

    def __init__(self, data_dir: Path, models_dir: str | os.PathLike | None, max_upload_bytes: int,
                 limits: JobLimits, runner: JobRunner | None, poll_seconds: float, device: Any):
        self.data_dir = data_dir
        self.device = device
        self.limits = limits
        self.models_dir = models_dir
        self.max_upload_bytes = max_upload_bytes
        self.runner = runner
        self.poll_seconds = poll_seconds
        self.uploads_dir = data_dir / "uploads"
        self.results_dir = data_dir / "results"
        self._store: JobStore | None = None
        self._worker: JobWorker | None = None
        self._lock: DataDirLock | None = None

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise RuntimeError("the app has not started (use it inside `with TestClient(app)` or serve it)")
        gone = self._store.missing()
        if gone is not None:  # jobs accepted now would be lost: refused, and the worker takes none
            raise HTTPException(503, f"{gone}, so this server can keep no jobs; stop kinema serve and start it again "
                                     "with a new or empty --data-dir")
        return self._store

    @property
    def worker(self) -> JobWorker:
        if self._worker is None:
            raise RuntimeError("the app has not started (use it inside `with TestClient(app)` or serve it)")
        return self._worker

    def start(self) -> None:
        self._lock = lock_data_dir(self.data_dir)
        self.uploads_dir.mkdir(exist_ok=True)
        self.results_dir.mkdir(exist_ok=True)
        self._store = JobStore(self.data_dir)
        self._store.recover()
        self._worker = JobWorker(self._store, self.results_dir, models_dir=self.models_dir, device=self.device,
                                 runner=self.runner, poll_seconds=self.poll_seconds)
        self._worker.start()
        logger.info("kinema serve: jobs in %s (%s)", self._store.path, self._store.counts())

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.stop(STOP_WAIT_SECONDS)
        if self._store is not None:
            self._store.close()
        if self._lock is not None:
            self._lock.close()

    def queue(self, fields: dict[str, Any], uploads: dict[str, bytes]) -> JobRecord:
        """Check a submission the way `kinema generate` would (before any model loads), keep its uploads and queue
        it."""
        from kinema.pipelines.jobs import check_video_bytes, job_from_mapping

        for key in UPLOADS:
            if fields.get(key) is not None:
                raise KinemaError(f"the API reads no server paths: send the {UPLOADS[key]} as the multipart file "
                                  f"field {key} or as {key}_base64, not as {key!r}")
        store = self.store  # a data folder removed while serving: 503 now, before any upload is written
        job_id = uuid.uuid4().hex
        saved: list[Path] = []
        input_frames = None
        try:
            for key, data in uploads.items():
                if key == "video":
                    suffix, input_frames = _checked(check_video_bytes, data, max_bytes=self.max_upload_bytes,
                                                    what=UPLOADS[key])
                elif key in ("control_video", "mask"):  # a video, or one image for every frame: read as videos
                    suffix, _ = _checked(check_video_bytes, data, max_bytes=self.max_upload_bytes, what=UPLOADS[key])
                else:
                    suffix = _checked(_image_suffix_checked, data, UPLOADS[key], self.max_upload_bytes)
                path = self.uploads_dir / f"{job_id}-{key}{suffix}"
                try:
                    self.uploads_dir.mkdir(exist_ok=True)  # as the worker remakes results/, if it was removed
                    path.write_bytes(data)
                except OSError as err:
                    raise HTTPException(507 if err.errno == errno.ENOSPC else 500,
                                        f"the server could not keep the {UPLOADS[key]}: {os_error_message(err)}"
                                        ) from None
                saved.append(path)
                fields[key] = str(path)
            self.limits.check_given(fields, input_frames)
            job = _checked(job_from_mapping, fields, where="job", models_dir=self.models_dir, base=self.models_dir,
                           device=self.device, check_memory=False)  # the memory free when it runs, not now
            self.limits.check(job, input_frames)  # job_from_mapping checked the images' sizes against the video's
            store = self.store  # again: the folder may have gone while the job was checked
        except BaseException:  # nothing of a job that was not queued stays behind
            for path in saved:
                path.unlink(missing_ok=True)
            raise
        # job.settings() is what job_from_mapping takes back to make the same job after a restart: the seeds drawn,
        # the model files as resolved, the uploads as the server's files.
        record = store.add(job.settings(), job.settings(), job.request.sampling_steps() or job.request.steps,
                           job_id)
        self.worker.wake()
        return record


def _found(server: _Server, job_id: str) -> JobRecord:
    record = server.store.get(job_id)
    if record is None:
        raise HTTPException(404, f"no job {shorten(job_id, 80)}; GET /v1/jobs lists the jobs")
    return record


def create_app(data_dir: str | os.PathLike, *, api_key: str | None = None,
               models_dir: str | os.PathLike | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB << 20,
               limits: JobLimits | None = None, runner: JobRunner | None = None, poll_seconds: float = 0.5,
               device: Any = "cpu") -> FastAPI:
    """The kinema HTTP API as a FastAPI app; serve it with uvicorn (`kinema serve` does).

    Args:
        data_dir: the server's folder: the jobs database, uploads and results (`results/JOB_ID/`). One server at a
            time may use it.
        api_key: when set, every request needs `Authorization: Bearer API_KEY`.
        models_dir: where model names are also looked up, and relative model, motion-module and LoRA paths resolve.
        max_upload_bytes: the largest image a job may upload.
        limits: the largest job accepted (default `JobLimits()`).
        runner: what runs one job (default: the model, through kinema.pipelines.jobs.run_job); a seam for tests.
        poll_seconds: how often the idle worker looks for jobs.
        device: where the models run: a torch device or a kinema.devices name (auto, cpu, cuda, cuda:N, mps).

    The worker thread starts and stops with the app (its lifespan); a job left running by a stopped server is
    queued again.
    """
    server = _Server(Path(data_dir), models_dir, max_upload_bytes, limits or JobLimits(), runner, poll_seconds,
                     device)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(server.start)
        try:
            yield
        finally:
            await run_in_threadpool(server.stop)

    bearer = HTTPBearer(auto_error=False, description="kinema serve --api-key (or KINEMA_API_KEY)")
    app = FastAPI(title="kinema", version=__version__, lifespan=lifespan, responses=_ERRORS,
                  dependencies=[Depends(bearer)] if api_key else [],
                  description="Text-to-video and image-to-video generation as durable jobs. Errors are "
                              "{\"detail\": \"one line\"}.")
    app.state.server = server
    # Every upload a job may send, each at the limit and as base64 (a third larger than the file), and its fields.
    app.add_middleware(_Guard, api_key=api_key,
                       max_body=len(UPLOADS) * (max_upload_bytes * 4 // 3 + 4) + _BODY_ROOM)

    @app.exception_handler(KinemaError)
    async def bad_input(request: Request, err: KinemaError) -> JSONResponse:
        return _error_response(422, shorten(str(err), 1000))

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(422, _one_line_validation_error(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error_response(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        # What no check foresaw is still one JSON line, as every error; the log keeps the traceback and the words,
        # which may name the server's files: the client hears the kind of failure alone.
        logger.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return _error_response(500, f"the server failed ({type(err).__name__}); its log has the details")

    @app.post("/v1/jobs", status_code=201, response_model=JobView, openapi_extra=_SUBMIT_BODY,
              summary="Queue a generation job")
    async def submit_job(request: Request) -> JSONResponse:
        fields, uploads = await _read_submission(request, server.max_upload_bytes)
        record = await run_in_threadpool(server.queue, fields, uploads)
        return JSONResponse(record.public(), status_code=201, headers={"Location": f"/v1/jobs/{record.id}"})

    @app.get("/v1/jobs", response_model=JobList, summary="List jobs, newest first")
    def list_jobs(status: Literal["queued", "running", "done", "failed", "cancelled"] | None = None,
                  limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=1 << 40)) -> dict[str, Any]:
        jobs = server.store.list_jobs(status, limit, offset)
        return {"jobs": [record.public() for record in jobs], "counts": server.store.counts()}

    @app.get("/v1/jobs/{job_id}", response_model=JobView, summary="A job's status, progress and settings")
    def get_job(job_id: str) -> dict[str, Any]:
        return _found(server, job_id).public()

    @app.get("/v1/jobs/{job_id}/result", summary="A done job's video",
             responses={200: {"content": {"video/mp4": {}}, "description": "the video file"}})
    def get_result(job_id: str, seed: int | None = Query(None, description="which video, for a job of several "
                                                                            "seeds (default: the first)")
                   ) -> FileResponse:
        record = _found(server, job_id)
        if record.status != "done":
            reason = {"queued": "is queued", "running": f"is running (step {record.step} of {record.total})",
                      "failed": f"failed: {record.error}", "cancelled": "was cancelled"}[record.status]
            after = (f"its result exists once GET /v1/jobs/{job_id} says done" if record.status in ("queued", "running")
                     else "it has no result and never will: submit it again (POST /v1/jobs)")
            raise HTTPException(409, f"job {job_id} {reason}; {after}")
        seeds = list(record.spec.get("seeds", []))
        index = 0
        if seed is not None:
            if seed not in seeds or len(seeds) != len(record.videos):
                raise HTTPException(404, f"job {job_id} has no video of seed {seed}; its seeds are {seeds}")
            index = seeds.index(seed)
        if not record.videos:
            raise HTTPException(404, f"job {job_id} wrote no video")
        path = server.results_dir / record.id / record.videos[index]
        if not path.is_file():
            raise HTTPException(404, f"the video of job {job_id} is no longer on the server ({path.name})")
        return FileResponse(path, filename=f"{job_id}-{path.name}")

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, summary="Cancel a job",
                responses={202: {"model": JobView, "description": "a running job will stop at its next step"}})
    def cancel_job(job_id: str) -> JSONResponse:
        before = _found(server, job_id)
        if before.status in FINISHED:
            raise HTTPException(409, f"job {job_id} is already {before.status}; only queued and running jobs can be "
                                     "cancelled")
        record = server.store.cancel(job_id)
        assert record is not None
        if record.status in ("done", "failed"):  # it finished between the two reads
            raise HTTPException(409, f"job {job_id} is already {record.status}; only queued and running jobs can be "
                                     "cancelled")
        return JSONResponse(record.public(), status_code=202 if record.status == "running" else 200)

    @app.get("/v1/health", response_model=Health, summary="The server is up")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "counts": server.store.counts()}

    return app


__all__ = ["DEFAULT_MAX_UPLOAD_MB", "STATUSES", "JobLimits", "create_app"]
