"""The `kinema` command: one entry point, one subcommand per job.

Each command group is a module of this package with one `add(subparsers)` that declares its subcommands (with an
example in their help) through `kinema.cli.args.add_command`: a `check(args)` for usage, run before any heavy
import, and a `run(args)` that does the work by calling the library, so the Python API and the CLI never diverge.
Adding a command is a new module and one line in `COMMAND_GROUPS`.

Exit codes: 0 success, 2 bad usage (argparse, or a failed check), 1 failure, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP.
Errors print one line on stderr (`--debug`, before or after the subcommand, adds the traceback). SIGTERM and SIGHUP
clean up like Ctrl-C: nothing half-written is left behind. Library messages show on stderr as `kinema: LEVEL: ...`:
warnings and errors by default, info too with `--verbose`, errors only with `--quiet`. Progress bars, kinema's and
those transformers draws itself, show on a terminal only, and not with `--quiet`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from kinema import __version__
from kinema.cli import batch, data, doctor, eval, generate, serve, train, ui, weights
from kinema.cli.args import add_common_options
from kinema.errors import KinemaError, library_error_message, os_error_message
from kinema.interrupt import Terminated, stop_if_requested, stop_on_signals
from kinema.log import cli_level, library_progress_bars, log_to_stderr

# Every command group, in the order `kinema --help` lists them.
COMMAND_GROUPS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    doctor.add,
    generate.add,
    batch.add,
    ui.add,
    serve.add,
    train.add,
    eval.add,
    data.add,
    weights.add,
)


class _Parser(argparse.ArgumentParser):
    """argparse with one line for bad usage, as kinema's own checks give: argparse prints the whole usage block
    first, 30-odd lines for `kinema generate`, above the one that says what was wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `kinema` argument parser with every subcommand of `COMMAND_GROUPS` (their parsers take its class)."""
    parser = _Parser(
        prog="kinema",
        description="Text-to-video and image-to-video diffusion: AnimateDiff and EasyAnimate V3.",
        epilog="Run `kinema COMMAND --help` for each command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"kinema {__version__}")
    add_common_options(parser, defaults=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMAND_GROUPS:
        add(subparsers)
    return parser


def _fail(label: str, message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"kinema {label}: error: {message}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace, label: str) -> int:
    """`args.run(args)` under the error policy: every failure is one line and an exit code, never a traceback
    (unless --debug)."""
    try:
        with stop_on_signals():
            args.run(args)
            stop_if_requested()  # a stop a library swallowed (raised in a __del__, say) still ends as a stop
    except KinemaError as err:
        return _fail(label, str(err), args.debug)
    except KeyboardInterrupt:
        print(f"kinema {label}: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"kinema {label}: stopped by {stop}; nothing half-written was left", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        sys.stderr.close()
        return 0
    except OSError as err:
        return _fail(label, os_error_message(err), args.debug)
    except Exception as err:  # an unexpected failure still gets one line; --debug shows where
        return _fail(label, f"{library_error_message(err)} (rerun with --debug for details)", args.debug)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `kinema` with `argv` (default: the command line); returns the exit code: 0 ok, 1 failure, 2 bad usage,
    130/143/129 interrupted by Ctrl-C/SIGTERM/SIGHUP."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.verbose and args.quiet:
        print(f"kinema {args.label}: error: --verbose and --quiet contradict each other; give one of them",
              file=sys.stderr)
        return 2
    # Library bars follow kinema's own: on a terminal, and not under --quiet.
    bars = not args.quiet and sys.stderr.isatty()
    with log_to_stderr(cli_level(args.verbose, args.quiet)), library_progress_bars(bars):
        # Usage checks (argument combinations, paths) run before heavy imports; a bad one is bad usage: exit 2.
        if args.check is not None:
            try:
                args.check(args)
            except KinemaError as err:
                if args.debug:
                    traceback.print_exc()
                print(f"kinema {args.label}: error: {err}", file=sys.stderr)
                return 2
            except OSError as err:
                return _fail(args.label, os_error_message(err), args.debug)
            except Exception as err:  # a check that failed unexpectedly still gets one line, as the work does
                return _fail(args.label, f"{library_error_message(err)} (rerun with --debug for details)",
                             args.debug)
        return _run(args, args.label)


if __name__ == "__main__":
    sys.exit(main())
