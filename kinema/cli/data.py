"""`kinema data ...`: make training data (`data synth`)."""

from __future__ import annotations

import argparse

from kinema.cli.args import add_command, add_group, example, fraction, non_negative_int, positive_int


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema data` and its subcommands."""
    group = add_group(subparsers, "data", help="make and inspect training data",
                      description="Make and inspect training data.")
    data_subparsers = group.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    synth = add_command(
        data_subparsers, "synth", run=run_synth, check=check_synth, label="data synth",
        help="render a synthetic motion dataset (coloured shapes moving over muted backgrounds)",
        description="Render N captioned clips to OUT/videos/NNNN.mp4 (and OUT/images/NNNN.png) plus "
                    "OUT/metadata.json. The same seed always gives the same clips. OUT must be new or empty; "
                    "--overwrite replaces an earlier synth output (never files kinema did not write), once the new "
                    "set is complete.",
        epilog=example("kinema data synth --out out/synth --n 20 --seed 0 --frames 16 --size 64"),
    )
    synth.add_argument("--out", required=True, help="dataset folder to create")
    synth.add_argument("--n", type=positive_int, required=True, help="number of clips")
    synth.add_argument("--seed", type=non_negative_int, default=0, help="dataset seed, >= 0 (default 0)")
    synth.add_argument("--frames", type=positive_int, default=16, help="frames per clip, 2 to 1024 (default 16)")
    synth.add_argument("--size", type=positive_int, default=64, help="width = height in pixels, a multiple of 16 "
                       "up to 1024 (default 64)")
    synth.add_argument("--fps", type=positive_int, default=8, help="frame rate stored in the videos (default 8)")
    synth.add_argument("--image-fraction", type=fraction, default=0.0,
                       help="share of entries written as single-frame PNG images for joint image+video training "
                            "(default 0)")
    synth.add_argument("--hold-out", default="", metavar="COMBOS",
                       help="colour:shape:motion combinations to leave out, comma-separated (e.g. "
                            "red:triangle:left,blue:circle:down): those clips are not written, for testing on "
                            "combinations a model never saw")
    synth.add_argument("--overwrite", action="store_true", help="replace an earlier synth output at OUT")


def check_synth(args: argparse.Namespace) -> None:
    """Frame count, size and image share within limits, and OUT a place synth may write."""
    from kinema.data.synth_limits import SYNTH_KIND, check_combinations, check_synth_args
    from kinema.fileio import check_output

    check_synth_args(args.frames, args.size, args.image_fraction)
    args.hold_out = check_combinations([combo.split(":") for combo in args.hold_out.split(",") if combo.strip()])
    check_output(args.out, SYNTH_KIND, folder=True, overwrite=args.overwrite)


def run_synth(args: argparse.Namespace) -> None:
    """Write the dataset and say how many entries of each type, where, and how long it took."""
    import time

    from kinema.data.synth import write_synth_dataset

    began = time.perf_counter()
    entries = write_synth_dataset(args.out, n=args.n, seed=args.seed, frames=args.frames, size=args.size,
                                  fps=args.fps, image_fraction=args.image_fraction, overwrite=args.overwrite,
                                  hold_out=args.hold_out)
    images = sum(entry["type"] == "image" for entry in entries)
    print(f"wrote {len(entries)} entries ({len(entries) - images} videos, {images} images) to {args.out} "
          f"in {time.perf_counter() - began:.1f} s")
