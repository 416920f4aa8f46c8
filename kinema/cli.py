"""The `kinema` command: one entry point, one subcommand per job.

Every subcommand is a pair: `_add_NAME(subparsers)` declares its arguments (with an example in its help) and
`_run_NAME(args)` does the work by calling the library, so the Python API and the CLI never diverge.
Exit codes: 0 success, 2 bad usage (argparse, checked before any heavy import), 1 failure, 130 Ctrl-C,
143 SIGTERM, 129 SIGHUP. Errors print one line on stderr (`--debug`, before or after the subcommand, adds the
traceback). SIGTERM and SIGHUP clean up like Ctrl-C: nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable

from kinema import __version__
from kinema.errors import KinemaError, library_error_message, os_error_message


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _example(text: str) -> str:
    return f"example:\n  {text}"


# Options every subcommand accepts wherever they stand on the line. SUPPRESS: a subcommand that was not given
# `--debug` must not reset the value the main parser set.
_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="show the full traceback on errors")


def _subparser(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[_COMMON], **kwargs)


# ---------------------------------------------------------------- doctor


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub, "doctor",
        help="report torch, device, video codecs, model folder and free memory",
        description="Check that this machine can run kinema and say where it looks for models.",
        epilog=_example("kinema doctor --json"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_run_doctor)


def _free_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def doctor_report() -> dict:
    """What kinema sees on this machine, as plain data."""
    import av
    import torch

    from kinema.paths import models_dir

    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    wanted = ["libx264", "h264", "mpeg4", "gif", "libwebp", "webp", "png", "vp9", "libvpx-vp9"]
    encoders = [name for name in wanted if name in av.codecs_available]
    free = _free_memory_bytes()
    return {
        "kinema": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "pyav": av.__version__,
        "video_codecs": encoders,
        "models_dir": str(models_dir()),
        "free_memory_gib": round(free / 2**30, 2) if free is not None else None,
    }


def _print_report(report: dict, as_json: bool) -> None:
    """One JSON object, or one `key: value` line per field with the keys right-aligned."""
    if as_json:
        print(json.dumps(report))
        return
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:>{width}}: {value}")


def _run_doctor(args: argparse.Namespace) -> None:
    _print_report(doctor_report(), args.json)


# ---------------------------------------------------------------- data


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = _subparser(sub, "data", help="make and inspect training data", description="Make and inspect training data.")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = _subparser(
        data_sub, "synth",
        help="render a synthetic motion dataset (coloured shapes moving over muted backgrounds)",
        description="Render N captioned clips to OUT/videos/NNNN.mp4 (and OUT/images/NNNN.png) plus "
                    "OUT/metadata.json. The same seed always gives the same clips. OUT must be new or empty; "
                    "--overwrite replaces an earlier synth output (never files kinema did not write), once the new "
                    "set is complete.",
        epilog=_example("kinema data synth --out out/synth --n 20 --seed 0 --frames 16 --size 64"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--out", required=True, help="dataset folder to create")
    s.add_argument("--n", type=_positive_int, required=True, help="number of clips")
    s.add_argument("--seed", type=_non_negative_int, default=0, help="dataset seed, >= 0 (default 0)")
    s.add_argument("--frames", type=_positive_int, default=16, help="frames per clip, 2 to 1024 (default 16)")
    s.add_argument("--size", type=_positive_int, default=64, help="width = height in pixels, a multiple of 16 "
                   "up to 1024 (default 64)")
    s.add_argument("--fps", type=_positive_int, default=8, help="frame rate stored in the videos (default 8)")
    s.add_argument("--image-fraction", type=_fraction, default=0.0,
                   help="share of entries written as single-frame PNG images for joint image+video training "
                        "(default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier synth output at OUT")
    s.set_defaults(func=_run_data_synth, check=_check_data_synth)


def _check_data_synth(args: argparse.Namespace) -> None:
    from kinema.data.synth_limits import SYNTH_KIND, check_synth_args
    from kinema.fileio import check_output

    check_synth_args(args.frames, args.size, args.image_fraction)
    check_output(args.out, SYNTH_KIND, folder=True, overwrite=args.overwrite)


def _run_data_synth(args: argparse.Namespace) -> None:
    import time

    from kinema.data.synth import write_synth_dataset

    began = time.perf_counter()
    entries = write_synth_dataset(args.out, n=args.n, seed=args.seed, frames=args.frames, size=args.size,
                                  fps=args.fps, image_fraction=args.image_fraction, overwrite=args.overwrite)
    images = sum(entry["type"] == "image" for entry in entries)
    print(f"wrote {len(entries)} entries ({len(entries) - images} videos, {images} images) to {args.out} "
          f"in {time.perf_counter() - began:.1f} s")


# ---------------------------------------------------------------- inspect, convert


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub, "inspect",
        help="say what a weights file or model folder is (format, version, keys, parameters, frames)",
        description="Recognise a motion module (AnimateDiff file or diffusers MotionAdapter folder), motion LoRA "
                    "or EasyAnimate folder and print its format, version, key and parameter counts (buffers "
                    "excluded), frame-encoding length, dtype, mid block and channels. Reads tensors only; pickles "
                    "that need code are refused.",
        epilog=_example("kinema inspect models/mm_sd_v15_v2.ckpt --json"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="weights file or model folder")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_run_inspect, check=_check_inspect)


def _check_inspect(args: argparse.Namespace) -> None:
    if not os.path.lexists(args.path):
        raise KinemaError(f"no such file or folder: {args.path}")


def _run_inspect(args: argparse.Namespace) -> None:
    from kinema.loaders.describe import describe

    _print_report(describe(args.path), args.json)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub, "convert",
        help="rewrite a motion module, motion LoRA or EasyAnimate transformer in another layout, weights unchanged",
        description="Convert an AnimateDiff motion module between layouts: `original` (.ckpt or .safetensors with "
                    "the published names and pos_encoder.pe tables), `diffusers` (a MotionAdapter folder) and "
                    "`kinema` (.safetensors with its motion settings in the metadata).\n"
                    "Convert a motion LoRA between `original` (processor.to_q_lora.down/up), `diffusers` (what "
                    "diffusers' conversion script writes), `diffusers_peft` (lora_A/lora_B, what "
                    "`load_lora_weights` reads) and `kinema`.\n"
                    "Convert an EasyAnimate V3 transformer folder between `original` (V3's config.json and names, "
                    "with its stored frame tables) and `kinema` (VideoDiT's config, no tables). "
                    "Weights are copied exactly.",
        epilog="example:\n"
               "  kinema convert models/mm_sd_v15_v2.ckpt models/mm_sd_v15_v2_diffusers --to diffusers\n"
               "  kinema convert models/v2_lora_ZoomIn.ckpt models/zoom_in_peft.safetensors --to diffusers_peft\n"
               "  kinema convert models/EasyAnimateV3-XL-2-InP-512x512 models/v3_kinema_transformer --to kinema",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="motion-module or motion-LoRA file, MotionAdapter folder or EasyAnimate folder")
    p.add_argument("output", help="file to write (.safetensors/.ckpt) or, for a MotionAdapter or an EasyAnimate "
                                  "transformer, a folder")
    # Written out rather than taken from kinema.loaders.convert.LAYOUTS so `--help` need not import torch.
    p.add_argument("--to", required=True, choices=["original", "diffusers", "diffusers_peft", "kinema"],
                   help="target layout")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier kinema output at OUTPUT (never a file or folder kinema did not write)")
    p.set_defaults(func=_run_convert, check=_check_convert)


def _check_convert(args: argparse.Namespace) -> None:
    from kinema.fileio import check_output

    if not os.path.lexists(args.input):
        raise KinemaError(f"no such file or folder: {args.input}")
    check_output(args.output, None, folder=None, overwrite=args.overwrite, inputs=(args.input,))


def _run_convert(args: argparse.Namespace) -> None:
    from kinema.loaders.convert import convert

    out, notes = convert(args.input, args.output, args.to, overwrite=args.overwrite)
    print(f"wrote {out} ({args.to} layout)")
    for note in notes:
        print(f"note: {note}")


# ---------------------------------------------------------------- entry point

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_doctor, _add_data, _add_inspect, _add_convert]


def build_parser() -> argparse.ArgumentParser:
    """The `kinema` argument parser with every subcommand in `_COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="kinema",
        description="Text-to-video and image-to-video diffusion: AnimateDiff and EasyAnimate V3.",
        epilog="Run `kinema COMMAND --help` for each command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"kinema {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that every `finally` and cleanup runs, as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    for name in ("SIGTERM", "SIGHUP"):  # a second signal must not cut the cleanup short
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Terminated(signum)


def _fail(command: str, message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"kinema {command}: error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run `kinema` with `argv` (default: the command line); returns the exit code: 0 ok, 1 failure, 2 bad usage,
    130/143/129 interrupted by Ctrl-C/SIGTERM/SIGHUP."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = " ".join(part for part in (args.command, getattr(args, "data_command", None)) if part)
    debug = getattr(args, "debug", False)
    # Usage checks (argument combinations, paths) run before heavy imports; a bad one is bad usage: exit 2.
    check = getattr(args, "check", None)
    if check is not None:
        try:
            check(args)
        except KinemaError as err:
            print(f"kinema {command}: error: {err}", file=sys.stderr)
            return 2
    handled = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {signum: signal.getsignal(signum) for signum in handled}
    try:
        for signum in handled:
            signal.signal(signum, _terminate)
    except ValueError:  # not the main thread (main() called from a worker): leave signals alone
        previous = {}
    try:
        args.func(args)
    except KinemaError as err:
        return _fail(command, str(err), debug)
    except KeyboardInterrupt:
        print(f"kinema {command}: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"kinema {command}: stopped by {stop}; nothing half-written was left", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        sys.stderr.close()
        return 0
    except OSError as err:
        return _fail(command, os_error_message(err), debug)
    except Exception as err:  # an unexpected failure still gets one line; --debug shows where
        return _fail(command, f"{library_error_message(err)} (rerun with --debug for details)", debug)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
