"""`kinema serve`: the HTTP API (kinema.api) on uvicorn.

`check` refuses, before FastAPI or torch is imported: a host other than loopback without an API key (anyone who can
reach the port could otherwise run jobs and read every result), a data folder holding the user's files or used by
another server, a models folder that does not exist, a bad port or upload limit.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from kinema.cli.args import add_command, add_device_option, checked_number, example, listen_on, positive_int
from kinema.errors import KinemaError
from kinema.pipelines.request import MAX_STEPS

API_KEY_VARIABLE = "KINEMA_API_KEY"
DEFAULT_DATA_DIR = Path("kinema-serve")
DEFAULT_MAX_UPLOAD_MB = 20  # kinema.api.app.DEFAULT_MAX_UPLOAD_MB, repeated so --help imports no FastAPI
port_number = checked_number(int, "a port number", lambda value: 0 <= value <= 65535, "between 0 and 65535")

DESCRIPTION = (
    "Serve kinema as an HTTP API: POST /v1/jobs queues a generation job (JSON; start image as an upload or base64), "
    "GET /v1/jobs/ID shows its status and progress, GET /v1/jobs/ID/result returns the video, DELETE /v1/jobs/ID "
    "cancels it, GET /v1/jobs lists jobs; the OpenAPI spec is at /openapi.json (browsable at /docs). Jobs are kept "
    "in a SQLite database under --data-dir with their results and settings: they survive a client that disconnects "
    "and a server restart (queued jobs resume, running ones run again). One job runs at a time; each model is "
    "loaded once. Bound to anything but loopback, the server needs an API key (--api-key, or the KINEMA_API_KEY "
    "variable, which other users cannot read in the process list): every request then needs "
    "`Authorization: Bearer KEY`. See docs/api.md."
)


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema serve`."""
    parser = add_command(
        subparsers, "serve", run=run_serve, check=check_serve,
        help="serve the HTTP API: durable generation jobs over JSON",
        description=DESCRIPTION,
        epilog=example("kinema serve --port 8000",
                       "KINEMA_API_KEY=$(openssl rand -hex 16) kinema serve --host 0.0.0.0 --data-dir /srv/kinema "
                       "--models-dir models"),
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; any other needs a key)")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--api-key", metavar="KEY",
                        help=f"require `Authorization: Bearer KEY` on every request (default ${API_KEY_VARIABLE})")
    parser.add_argument("--data-dir", metavar="DIR", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"jobs database, uploads and results (default ./{DEFAULT_DATA_DIR}); new, empty, or "
                             "an earlier server's")
    parser.add_argument("--models-dir", metavar="DIR", type=Path,
                        help="where jobs' model names (and relative model, motion-module and LoRA paths) are found")
    parser.add_argument("--max-upload-mb", metavar="N", type=positive_int, default=DEFAULT_MAX_UPLOAD_MB,
                        help="largest file a job may upload (image, video, mask, control video), in MiB "
                             f"(default {DEFAULT_MAX_UPLOAD_MB})")
    # kinema.api.app.JobLimits' defaults, repeated so --help imports no FastAPI
    parser.add_argument("--max-frames", metavar="N", type=positive_int, default=1024,
                        help="most frames a job may ask for (default 1024)")
    parser.add_argument("--max-side", metavar="N", type=positive_int, default=2048,
                        help="largest height or width a job may ask for (default 2048)")
    add_device_option(parser)
    parser.add_argument("--max-steps", metavar="N", type=positive_int, default=MAX_STEPS,
                        help=f"most sampling steps a job may ask for (default {MAX_STEPS}, what any request takes)")


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:  # a host name, which may resolve to any interface
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, which Python calls no loopback
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def check_serve(args: argparse.Namespace) -> None:
    """Bad usage of `kinema serve`, refused before any heavy import."""
    from kinema.api.store import check_data_dir

    if args.api_key is not None and not args.api_key.strip():  # taken for "no key" without a word
        raise KinemaError("--api-key is empty; give a key (e.g. openssl rand -hex 16), or leave the option out to "
                          "serve on loopback without one")
    args.api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    if args.api_key is None and not is_loopback(args.host):
        raise KinemaError(f"--host {args.host} lets other machines in, so the server needs an API key: give "
                          f"--api-key KEY or set {API_KEY_VARIABLE} (or listen on 127.0.0.1)")
    check_data_dir(args.data_dir)
    if args.models_dir is not None and not args.models_dir.is_dir():
        raise KinemaError(f"no models folder {args.models_dir}; give an existing folder with --models-dir")


def run_serve(args: argparse.Namespace) -> None:
    """Serve the API until Ctrl-C or SIGTERM (a running job goes back to the queue)."""
    from kinema.devices import resolve_device

    device = resolve_device(args.device)  # a device this machine lacks: one line before the data folder is locked
    # The port is held from here on: nothing can take it while the app starts (uvicorn serves this socket).
    with listen_on(args.host, args.port) as listener:
        import uvicorn

        from kinema.api.app import JobLimits, create_app
        from kinema.api.store import lock_data_dir

        lock_data_dir(args.data_dir).close()  # another server on the folder: one line now, not a failed startup later
        app = create_app(args.data_dir, api_key=args.api_key, models_dir=args.models_dir,
                         max_upload_bytes=args.max_upload_mb << 20,
                         limits=JobLimits(frames=args.max_frames, side=args.max_side, steps=args.max_steps),
                         device=device)
        port = listener.getsockname()[1]
        if not args.quiet:  # uvicorn says nothing of a socket it is handed, and --port 0 picks the port here
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"kinema serve: listening on http://{host}:{port} (the API's page: http://{host}:{port}/docs); "
                  f"jobs in {args.data_dir}", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=args.host, port=port,
                                log_level="warning" if args.quiet else "info", timeout_graceful_shutdown=30)
        uvicorn.Server(config).run(sockets=[listener])
