"""What every `kinema` subcommand shares: the common options, the argument types and the way a command is added.

Only argparse, the standard library and kinema's plain-data request (no torch) are imported here, so that `kinema
--help` and usage errors stay fast.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kinema.devices import AUTO, DEVICE_HELP, check_device_name
from kinema.errors import KinemaError
from kinema.pipelines.request import MAX_FPS, MAX_SEED, MIN_FPS

# What a command module gives `add_command`: `run(args)` does the work; `check(args)` validates the arguments
# before any heavy import and raises KinemaError for bad usage (exit 2).
Run = Callable[[argparse.Namespace], None]
Check = Callable[[argparse.Namespace], None]


def add_common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Add `--debug`, `--verbose` and `--quiet` to `parser`.

    The top-level parser holds the defaults (`defaults=True`); subcommands get the same options with SUPPRESS as
    default, so that a subcommand that was not given one does not reset what the top-level parser set. That way each
    option works before or after the command.
    """
    default: Any = False if defaults else argparse.SUPPRESS
    parser.add_argument("--debug", action="store_true", default=default, help="show the full traceback on errors")
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="also show kinema's progress messages (log level info)")
    parser.add_argument("--quiet", action="store_true", default=default,
                        help="show only errors: no warnings, no progress bars")


COMMON = argparse.ArgumentParser(add_help=False)
add_common_options(COMMON, defaults=False)


def add_group(subparsers: argparse._SubParsersAction, name: str, **parser_options: Any) -> argparse.ArgumentParser:
    """A subcommand that only holds subcommands of its own (`kinema data synth`); add those with `add_command`."""
    return subparsers.add_parser(name, parents=[COMMON], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 **parser_options)


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    *,
    run: Run,
    check: Check | None = None,
    label: str | None = None,
    **parser_options: Any,
) -> argparse.ArgumentParser:
    """Add subcommand `name` that calls `run(args)`, after `check(args)` where given; returns its parser for the
    arguments. `label` is how messages name the command (default `name`; e.g. "data synth" for a nested one)."""
    # No abbreviations: `kinema v2v ... --image x` must not be read as --image-encoder (v2v has no --image).
    parser = subparsers.add_parser(name, parents=[COMMON], formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False, **parser_options)
    parser.set_defaults(run=run, check=check, label=label or name)
    return parser


def example(*lines: str) -> str:
    """An epilog showing example command lines."""
    return "example:\n" + "".join(f"  {line}\n" for line in lines).rstrip("\n")


def checked_number(parse: Callable[[str], Any], expected: str, accepts: Callable[[Any], bool], rule: str
                   ) -> Callable[[str], Any]:
    """An argparse type: `parse(text)`, refused as "expected {expected}" when it does not parse and as "must be
    {rule}" when `accepts(value)` is false."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    return convert


positive_int = checked_number(int, "a whole number", lambda value: value > 0, "a positive whole number")
non_negative_int = checked_number(int, "a whole number", lambda value: value >= 0, "0 or more")
# A seed seeds a torch.Generator, which takes 0 .. 2**64 - 1 (kinema.pipelines.request.MAX_SEED).
seed_number = checked_number(int, "a whole number", lambda value: 0 <= value <= MAX_SEED,
                             "from 0 to 2**64 - 1")
frame_rate = checked_number(float, "a number", lambda value: MIN_FPS <= value <= MAX_FPS,
                            f"from {MIN_FPS} to {MAX_FPS:g} frames per second")
whole_frame_rate = checked_number(int, "a whole number", lambda value: 1 <= value <= MAX_FPS,
                                  f"from 1 to {MAX_FPS:g} frames per second")
fraction = checked_number(float, "a number between 0 and 1", lambda value: 0.0 <= value <= 1.0, "between 0 and 1")


def output_path(text: str) -> str:
    """argparse type of `-o`: a name, not the empty string (which pathlib reads as the current folder). A name ending
    in a path separator, and `.` or `..`, is a folder to write the default-named video into (`output_in`), kept
    absolute and ending in a separator because pathlib drops both marks."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a file name such as out/fox.mp4, a folder name for frames, "
                                         "or a folder ending in / to write the video into")
    if os.path.basename(text) in ("", ".", ".."):
        return os.path.join(os.path.abspath(text), "")
    return text


def output_in(given: str | None, default: Path) -> Path:
    """OUT for `-o given`: `default` when not given; the folder `given` (`output_path` ends it in a separator)
    with `default`'s file name; else `given` itself (a video file, or a frames folder)."""
    if given is None:
        return default
    if given.endswith(("/", os.sep)):
        return Path(given) / default.name
    return Path(given)


def add_device_option(parser: argparse.ArgumentParser | Any) -> None:
    """Add `--device` (kinema.devices: auto, cpu, cuda, cuda:N or mps; default auto) to `parser` or an argument
    group; the name is checked here, whether this machine has the device once the command runs."""
    parser.add_argument("--device", type=_device_name, default=AUTO, help=DEVICE_HELP)


def _device_name(text: str) -> str:
    try:
        return check_device_name(text)
    except KinemaError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_port_free(host: str, port: int) -> None:
    """Raise one `KinemaError` line when a server could not listen on `host`:`port` (in use, not an address of this
    machine, or a privileged port), before the server and its models load; port 0 (any free port) always can."""
    if port != 0:
        listen_on(host, port).close()


def listen_on(host: str, port: int) -> socket.socket:
    """A socket listening on `host`:`port` (0: any free port), for a server that takes one (uvicorn): held from
    before its models load, so nothing can take the port in between. One `KinemaError` line when it cannot listen
    (in use, not an address of this machine, or a privileged port)."""
    import errno

    from kinema.errors import KinemaError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise KinemaError(f"--host {host} is not a host name or address this machine can resolve; give an address "
                          "such as 127.0.0.1") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: a closing port is free
        # Listening at once: on Linux another SO_REUSEADDR socket may bind a port bound but not yet listening.
        listener.bind(address)
        listener.listen(2048)
    except OSError as err:
        listener.close()
        why = {errno.EADDRINUSE: f"port {port} is in use on {host} (another server, or this one already "
                                 "running?); stop it or choose another --port",
               errno.EADDRNOTAVAIL: f"--host {host} is not an address of this machine; give one of its "
                                    "addresses, 127.0.0.1 or 0.0.0.0",
               errno.EACCES: f"port {port} needs administrator rights on this system; choose one above 1023"}
        raise KinemaError(why.get(err.errno or 0, f"cannot listen on {host}:{port}: {err.strerror}")) from None
    return listener
