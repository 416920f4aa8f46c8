"""`kinema train CONFIG.yaml`: train motion modules, LoRAs, a V3 transformer or the Slice VAE (kinema.training)."""

from __future__ import annotations

import argparse
import json

from kinema.cli.args import add_command, example
from kinema.errors import KinemaError


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema train`."""
    from kinema.training.config import MODES

    modes = "; ".join(f"{name}: {text}" for name, text in MODES.items())
    parser = add_command(
        subparsers, "train", run=run, check=check, label="train",
        help="train a motion module, a LoRA, a V3 transformer or the Slice VAE from a YAML config",
        description="Train as CONFIG says (docs/training.md lists every key). The run folder (output:) gets "
                    "checkpoints every checkpoint.every steps (each written whole or not at all; the newest "
                    "checkpoint.keep kept), logs.csv, tensorboard/, validation videos and, at the end, final/ with "
                    f"the trained weights. Modes: {modes}. Several processes: `accelerate launch --num_processes N "
                    "-m kinema train CONFIG` on GPUs; on CPUs (gloo) `torchrun --nproc-per-node N -m kinema train "
                    "CONFIG` (accelerate's --cpu launches one process).",
        epilog=example("kinema train configs/train/animatediff-motion.yaml --dry-run",
                       "kinema train configs/train/animatediff-motion.yaml",
                       "kinema train configs/train/animatediff-motion.yaml --resume latest",
                       "kinema train configs/train/animatediff-motion.yaml --time-limit 25m",
                       "kinema train configs/train/animatediff-motion.yaml --set train.steps=2000 --resume latest"),
    )
    parser.add_argument("config", help="the run's YAML config")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue the run in the config's output folder from its newest checkpoint (latest) or "
                             "from the checkpoint folder PATH; the config must be the run's own (train.steps and "
                             "the logging, checkpoint and validation settings may change)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and data, load the model, print the trainable parameter count, the "
                             "data found, the memory estimate and the time of one step; write nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=20 (VALUE is read as YAML); repeatable")
    parser.add_argument("--time-limit", type=duration, metavar="DURATION",
                        help="wall time for this command, loading included (90s, 25m, 1.5h; a bare number is "
                             "seconds): the step that ends past it is the last, checkpointed, and the weights are "
                             "exported to final/ as at the end; `--resume latest` trains on to train.steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (--quiet: none either)")


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """Seconds in `text`: a positive number with an optional unit s, m or h (`90`, `90s`, `25m`, `1.5h`)."""
    value = text.strip().lower()
    scale = _UNITS.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and seconds < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: give a positive number of seconds, or one with "
                                         "a unit, e.g. 90s, 25m or 1.5h")
    return seconds


def _overrides(pairs: list[str]) -> dict:
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KinemaError(f"--set takes KEY=VALUE (e.g. train.steps=20), got {pair!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise KinemaError(f"--set {key.strip()}: the value {value!r} is not valid YAML; quote text, and write "
                              "lists as [1, 2]") from None
    return overrides


def check(args: argparse.Namespace) -> None:
    """The config reads and checks, and --resume is not combined with --dry-run."""
    from kinema.training.config import load_config

    if args.resume is not None and args.dry_run:
        raise KinemaError("--dry-run checks a run before it starts; drop --resume (or --dry-run)")
    if args.time_limit is not None and args.dry_run:
        raise KinemaError("--dry-run times one step and trains nothing; drop --time-limit (or --dry-run)")
    args.train_config = load_config(args.config, _overrides(args.set))


def run(args: argparse.Namespace) -> None:
    """Train, then say where the run and its weights are."""
    from kinema.training.trainer import train

    result = train(args.train_config, resume=args.resume, dry_run=args.dry_run,
                   progress=not (args.no_progress or args.quiet), time_limit=args.time_limit)
    if args.dry_run:
        if result.is_main:
            print(json.dumps(result.report, indent=1))
        return
    if result.run_folder is None or not result.is_main:
        return
    loss = f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""
    limited = " (the time limit's last step)" if result.time_limited else ""
    print(f"trained steps {result.start_step}..{result.end_step}{limited}{loss}; run folder {result.run_folder}"
          + (f", weights in {result.final}" if result.final else ""))
