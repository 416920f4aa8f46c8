"""`kinema doctor`: print `kinema.doctor.doctor_report`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kinema.cli.args import add_command, example

logger = logging.getLogger(__name__)


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema doctor`."""
    parser = add_command(
        subparsers, "doctor", run=run,
        help="report torch, device, video codecs, model folder and free memory",
        description="Check that this machine can run kinema and say where it looks for models.",
        epilog=example("kinema doctor --json"),
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> None:
    """Print the report, as aligned lines or one JSON object."""
    from kinema.cli.output import print_report
    from kinema.doctor import doctor_report

    report = doctor_report()
    print_report(report, args.json)
    folder = Path(report.get("models_dir") or "")
    if report.get("models_dir") and folder.exists() and not folder.is_dir():  # a missing one is normal
        logger.warning("the models folder %s is a file, so model names are not looked up there; move it, or set "
                       "KINEMA_HOME to another folder", folder)
    if ".mp4" in report.get("cannot_write", ()):
        from kinema.data.probe import FORMAT_ENCODERS
        from kinema.errors import KinemaError

        raise KinemaError(f"this PyAV's FFmpeg has no {FORMAT_ENCODERS['.mp4']} encoder, so kinema cannot write .mp4, "
                          "every command's default output; install PyAV from PyPI (its wheels bundle it), or give "
                          "-o a .gif, .webp or frames folder name")
