"""`kinema data ...`: make training data (`data synth`) and prompt sets to score models on (`data prompts`)."""

from __future__ import annotations

import argparse

from kinema.cli.args import add_command, add_group, example, fraction, positive_int, seed_number, whole_frame_rate


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema data` and its subcommands."""
    group = add_group(subparsers, "data", help="make synthetic training data and eval prompt sets",
                      description="Make synthetic training data (synth) and prompt sets for kinema eval (prompts).",
                      epilog=example("kinema data synth --out out/synth --n 20",
                                     "kinema data prompts --out out/prompts-31337 --seed 31337"))
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
    synth.add_argument("--seed", type=seed_number, default=0, help="dataset seed, >= 0 (default 0)")
    synth.add_argument("--frames", type=positive_int, default=16, help="frames per clip, 2 to 1024 (default 16)")
    synth.add_argument("--size", type=positive_int, default=64, help="width = height in pixels, a multiple of 16 "
                       "up to 1024 (default 64)")
    synth.add_argument("--fps", type=whole_frame_rate, default=8, help="frame rate stored in the videos (default 8)")
    synth.add_argument("--image-fraction", type=fraction, default=0.0,
                       help="share of entries written as single-frame PNG images for joint image+video training "
                            "(default 0)")
    synth.add_argument("--hold-out", default="", metavar="COMBOS",
                       help="colour:shape:motion combinations to leave out, comma-separated (e.g. "
                            "red:triangle:left,blue:circle:down): those clips are not written, for testing on "
                            "combinations a model never saw")
    synth.add_argument("--video-format", choices=("mp4", "png"), default="mp4",
                       help="mp4 (H.264, the default) or png: each clip a folder of lossless PNG frames, "
                            "videos/NNNN/, which needs no PyAV to write or to train on")
    synth.add_argument("--workers", type=positive_int, default=1,
                       help="processes that render and write clips (default 1); the dataset is the same for any "
                            "number")
    synth.add_argument("--overwrite", action="store_true", help="replace an earlier synth output at OUT")

    prompts = add_command(
        data_subparsers, "prompts", run=run_prompts, check=check_prompts, label="data prompts",
        help="write a prompt set for kinema eval from synthetic clips of a seed of your choice",
        description="Write OUT/synth.jsonl (and the start images in OUT/images/) for `kinema eval --prompts`: the "
                    "captions and labels of synthetic clips of --seed, chosen as the shipped set is (48 balanced "
                    "colour x shape x motion lines, 6 image-to-video lines, 2 lines of each held-out combination). "
                    "A seed no model trained on gives prompts it has not seen, the way to check that settings or "
                    "a model were not tuned to one prompt file; seed 9001 gives the shipped set.",
        epilog=example("kinema data prompts --out out/prompts-31337 --seed 31337",
                       "kinema eval --prompts out/prompts-31337/synth.jsonl --json"),
    )
    prompts.add_argument("--out", required=True, help="folder to create")
    prompts.add_argument("--seed", type=seed_number, required=True,
                         help="synth seed to draw the clips from (not a seed any model trained on)")
    prompts.add_argument("--overwrite", action="store_true", help="replace an earlier prompt set at OUT")


def check_synth(args: argparse.Namespace) -> None:
    """Frame count, size and image share within limits, and OUT a place synth may write."""
    from kinema.data.synth_limits import SYNTH_KIND, check_combinations, check_synth_args
    from kinema.fileio import check_output

    check_synth_args(args.frames, args.size, args.image_fraction)
    args.hold_out = check_combinations([[part.strip() for part in combo.split(":")]
                                        for combo in args.hold_out.split(",") if combo.strip()])
    check_output(args.out, SYNTH_KIND, folder=True, overwrite=args.overwrite)


def run_synth(args: argparse.Namespace) -> None:
    """Write the dataset and say how many entries of each type, where, and how long it took."""
    import time

    from kinema.data.synth import write_synth_dataset

    began = time.perf_counter()
    entries = write_synth_dataset(args.out, n=args.n, seed=args.seed, frames=args.frames, size=args.size,
                                  fps=args.fps, image_fraction=args.image_fraction, overwrite=args.overwrite,
                                  hold_out=args.hold_out, video_format=args.video_format,
                                  workers=args.workers, progress=not args.quiet)
    images = sum(entry["type"] == "image" for entry in entries)
    print(f"wrote {len(entries)} entries ({len(entries) - images} videos, {images} images) to {args.out} "
          f"in {time.perf_counter() - began:.1f} s")


def check_prompts(args: argparse.Namespace) -> None:
    """OUT a place a prompt set may be written."""
    from kinema.eval.prompts import PROMPT_SET_KIND
    from kinema.fileio import check_output

    check_output(args.out, PROMPT_SET_KIND, folder=True, overwrite=args.overwrite)


def run_prompts(args: argparse.Namespace) -> None:
    """Write the set and say what it holds and how to score a model on it."""
    from kinema.eval.prompts import read_prompts, write_synth_prompt_set

    path = write_synth_prompt_set(args.out, seed=args.seed, overwrite=args.overwrite)
    entries = read_prompts(path)
    images = sum(entry.image is not None for entry in entries)
    held_out = sum(entry.held_out for entry in entries)
    print(f"wrote {len(entries)} prompts ({images} image-to-video, {held_out} held out) to {path}; score a model "
          f"on them with: kinema eval --prompts {path}")
