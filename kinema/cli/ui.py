"""`kinema ui`: the web app (kinema.ui, on gradio) in a browser, serving the bundled model with no set-up.

`check` settles the folders and the port before gradio, torch or any model is imported, so bad usage exits 2 at
once; gradio itself is imported in `run` only (`kinema --help` stays fast).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kinema.cli.args import add_command, add_device_option, check_port_free, checked_number, example, positive_int
from kinema.errors import KinemaError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_OUTPUTS = Path("out") / "ui"
DEFAULT_MAX_UPLOAD_MB = 50.0

DESCRIPTION = (
    "Start the web app: tabs for text to video, image to video, long video / extend and video to video; pickers for "
    "the model, motion module and LoRAs found in --models-dir (and the bundled models); live progress with a latent "
    "preview; a gallery of earlier results whose settings load back into the form. Every video goes into a folder "
    "of its own under --outputs-dir (video-seedS.mp4 with its settings, job.json). Generations wait in "
    "one queue; --concurrency of them run at once."
)

port_number = checked_number(int, "a whole number", lambda value: 1 <= value <= 65535, "a port from 1 to 65535")
positive_number = checked_number(float, "a number", lambda value: value > 0, "a positive number")


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema ui`."""
    parser = add_command(
        subparsers, "ui", run=run_ui, check=check_ui,
        help="start the web app (gradio) for making videos in a browser",
        description=DESCRIPTION,
        epilog=example("kinema ui", "kinema ui --port 7861 --models-dir models --outputs-dir out/ui"),
    )
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 lets anyone "
                             "on the network use it, with no password)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--models-dir", metavar="DIR",
                        help="folder scanned for models, motion modules and LoRAs (default: $KINEMA_HOME/models, "
                             "else ~/.cache/kinema/models; the bundled models are always offered)")
    parser.add_argument("--outputs-dir", metavar="DIR", default=str(DEFAULT_OUTPUTS),
                        help=f"where each generation's folder goes, and the gallery reads from (default "
                             f"{DEFAULT_OUTPUTS})")
    parser.add_argument("--concurrency", type=positive_int, default=1,
                        help="generations run at once; the rest wait in the queue (default 1)")
    add_device_option(parser)
    parser.add_argument("--max-upload-mb", type=positive_number, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest image or video upload in MiB (default {DEFAULT_MAX_UPLOAD_MB:g})")


def check_ui(args: argparse.Namespace) -> None:
    """Bad usage of `kinema ui`, refused before any heavy import: a models folder that is a file or missing when
    given, an outputs folder that is a file."""
    from kinema.paths import models_dir

    if args.models_dir is not None:
        folder = Path(args.models_dir)
        if not folder.is_dir():
            raise KinemaError(f"--models-dir {folder} is {'a file' if folder.exists() else 'missing'}; give the "
                              "folder holding your models (or leave it out for the bundled ones)")
        args.models_dir = folder
    else:
        args.models_dir = models_dir()
    args.outputs_dir = Path(args.outputs_dir)
    if args.outputs_dir.exists() and not args.outputs_dir.is_dir():
        raise KinemaError(f"--outputs-dir {args.outputs_dir} is a file; give a folder (it is created if missing)")


def run_ui(args: argparse.Namespace) -> None:
    """Build the app and serve it until Ctrl-C (or SIGTERM: the server is closed either way)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise KinemaError("the web app needs gradio, which is not installed: pip install \"kinema[ui]\"")
    check_port_free(args.host, args.port)
    from kinema.devices import resolve_device
    from kinema.pipelines.jobs import FamilyCache
    from kinema.ui.app import build_app, launch_app

    app = build_app(models_dir=args.models_dir, outputs_dir=args.outputs_dir, concurrency=args.concurrency,
                    cache=FamilyCache(device=resolve_device(args.device)))
    try:
        launch_app(app, outputs_dir=args.outputs_dir, host=args.host, port=args.port,
                   max_upload_bytes=int(args.max_upload_mb * 2**20), block=True, quiet=args.quiet)
    finally:
        app.close(verbose=False)
