"""Property-based: schemathesis generates requests from the served OpenAPI spec (valid and invalid bodies, parameters
and uploads) and no answer is a 500. Generation is a stand-in (the test is about HTTP handling, not pixels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from kinema.api.app import create_app

KEY = {"Authorization": "Bearer property-test-key"}
EXAMPLES = 20  # per operation and mode (valid, invalid): 6 operations x 2 x 20 requests


def instant_runner(spec: dict[str, Any], out: Path, on_step: Any) -> list[Path]:
    on_step(0, None, None)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"video-seed{seed}.mp4" for seed in spec["seeds"]]
    for path in paths:
        path.write_bytes(b"video")
    return paths


def test_no_request_the_spec_allows_or_breaks_gets_a_500(tmp_path):
    from schemathesis.python.asgi import shutdown_lifespans

    app = create_app(tmp_path / "data", api_key=KEY["Authorization"].split()[1], runner=instant_runner,
                     max_upload_bytes=64 << 10, poll_seconds=0.05)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=KEY)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 6
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                          database=None)
                def no_server_error(case: Any) -> None:
                    case.call_and_validate(headers=KEY, checks=[not_a_server_error])

                no_server_error()
    finally:
        shutdown_lifespans()  # stops the app schemathesis started: its worker thread and its database


def test_the_spec_describes_every_job_key():
    # A client generated from the spec can send every field a job takes (the uploads as FIELD_base64).
    from kinema.api.app import _JOB_FIELDS_SCHEMA, UPLOADS
    from kinema.pipelines.jobs import JOB_KEYS

    described = set(_JOB_FIELDS_SCHEMA["properties"])
    assert set(JOB_KEYS) - set(UPLOADS) <= described
    assert {f"{name}_base64" for name in UPLOADS} <= described
    assert described - {f"{name}_base64" for name in UPLOADS} <= set(JOB_KEYS)
