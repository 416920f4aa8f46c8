"""`kinema eval`: generate a video per prompt of a prompt set and score what the model made (kinema.eval.run).

`check` reads and checks the whole prompt file and the output folder before anything heavy is imported, so a
missing file, a bad line or an output the policy refuses exits 2 before any model loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kinema.bundled import DEFAULT_MODEL
from kinema.cli.args import add_command, add_device_option, checked_number, example, positive_int, seed_number
from kinema.cli.generate import parse_lora
from kinema.errors import KinemaError
from kinema.pipelines.request import SPEEDS

DESCRIPTION = (
    "Generate one video per line of a prompt set (JSON Lines: {\"prompt\", \"color\", \"shape\", \"motion\", "
    "\"image\"?, \"seed\"?, \"held_out\"?}) and score it: detectors read the colour, shape and motion of the object "
    "in the frames and compare them with the line's labels (held-out combinations are reported apart). Also "
    "temporal flicker (VBench's formula), dynamic degree (optical flow), first-frame PSNR and the jump after the "
    "start image (i2v_jump) for lines with one, and a 128-frame continuation's seam score. Writes report.json and a "
    "confusion-matrix PNG per label to --out (default out/eval-<model>/). Without --prompts: the shipped synthetic "
    "prompt set (70 prompts)."
)


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema eval`."""
    parser = add_command(
        subparsers, "eval", run=run_eval, check=check_eval,
        help="score a model: generate a video per prompt and check its colour, shape and motion",
        description=DESCRIPTION,
        epilog=example(f"kinema eval --model {DEFAULT_MODEL} --json",
                       "kinema eval --model models/my-v3 --prompts my_prompts.jsonl --steps 20 --limit 10 "
                       "--out out/eval-mine --save-videos"),
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a bundled model's name or a model folder (default {DEFAULT_MODEL})")
    parser.add_argument("--motion-module", metavar="PATH",
                        help="an AnimateDiff motion module to score on the SD1.5 model (--model), such as one you "
                             "trained (default: the model's own)")
    parser.add_argument("--lora", type=parse_lora, action="append", default=[], metavar="PATH[:W]",
                        help="a motion LoRA or SD1.5 image LoRA at weight W (default 1.0) on the model; repeat for "
                             "several")
    parser.add_argument("--prompts", metavar="FILE.jsonl",
                        help="prompt set, one JSON object per line (default: the shipped synthetic set)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    parser.add_argument("--out", metavar="DIR", help="folder for report.json, the confusion matrices and the videos "
                                                     "(default out/eval-<model>/)")
    parser.add_argument("--steps", type=positive_int,
                        help="sampling steps per video (default: the model's kinema.json defaults, else 25)")
    parser.add_argument("--frames", type=positive_int,
                        help="frames per video (default: the model's kinema.json defaults, else 16)")
    parser.add_argument("--guidance", type=_guidance,
                        help="classifier-free guidance scale, >= 1 (default: the model's kinema.json defaults, "
                             "else 7.5)")
    parser.add_argument("--speed", choices=SPEEDS,
                        help="score under a speed preset, as kinema generate --speed makes videos (default: the "
                             "model's own settings)")
    add_device_option(parser)
    parser.add_argument("--seed", type=seed_number, default=0,
                        help="added to every prompt's seed: another draw of the same set (default 0)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="score only the first N prompts")
    parser.add_argument("--no-continuation", action="store_true",
                        help="skip the 128-frame continuation (and its seam score)")
    parser.add_argument("--continuations", type=positive_int, metavar="N",
                        help="continue the videos of the first N text-to-video lines (not held out) to 128 frames "
                             "and report their mean seam score: one video's joins can be far from another's "
                             "(default 1; each takes about as long as 10 of the eval's videos)")
    parser.add_argument("--save-videos", action="store_true", help="also write every video to DIR/videos/")
    parser.add_argument("--reconstructions", type=positive_int, metavar="N",
                        help="instead: score the model's VAE alone, the detectors on its reconstructions of N "
                             "unseen synthetic clips (what any video through that decoder can score at most); "
                             "prints one JSON object")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier eval output at DIR (never files kinema did not write)")


_guidance = checked_number(float, "a number", lambda value: 1 <= value < float("inf"), "a finite number >= 1")


def check_eval(args: argparse.Namespace) -> None:
    """Bad usage of `kinema eval`, refused before any heavy import: the model (a path or a bundled name), the
    prompt file (every line) and DIR."""
    from kinema.bundled import resolve_model
    from kinema.eval.prompts import DEFAULT_PROMPTS, read_prompts
    from kinema.eval.run import CONTINUATION_FRAMES, EVAL_KIND, check_eval_inputs, default_out_dir
    from kinema.fileio import check_output

    if args.continuations is not None and args.no_continuation:
        raise KinemaError("--continuations N and --no-continuation contradict each other: give one")
    if args.reconstructions is not None:
        unused = [option for option, given in (
            ("--prompts", args.prompts is not None), ("--out", args.out is not None), ("--steps", args.steps),
            ("--frames", args.frames), ("--guidance", args.guidance), ("--speed", args.speed), ("--seed", args.seed),
            ("--limit", args.limit), ("--no-continuation", args.no_continuation),
            ("--continuations", args.continuations), ("--save-videos", args.save_videos),
            ("--overwrite", args.overwrite), ("--motion-module", args.motion_module), ("--lora", args.lora)) if given]
        if unused:
            raise KinemaError(f"--reconstructions scores the VAE alone on its own clips, generates nothing and writes "
                              f"nothing, so {', '.join(unused)} would do nothing; drop them, or drop "
                              "--reconstructions")
        resolve_model(args.model)
        return
    args.prompts = Path(args.prompts) if args.prompts is not None else DEFAULT_PROMPTS
    entries = read_prompts(args.prompts)
    resolve_model(args.model)
    check_eval_inputs(args.model, entries[:args.limit], args.prompts, seed=args.seed, frames=args.frames,
                      motion_module=args.motion_module, loras=args.lora,
                      continuation=None if args.no_continuation else CONTINUATION_FRAMES)
    args.out = Path(args.out) if args.out is not None else default_out_dir(args.model, args.motion_module)
    check_output(args.out, EVAL_KIND, folder=True, overwrite=args.overwrite,
                 inputs=(args.prompts, *(entry.image for entry in entries[:args.limit] if entry.image is not None)))


def run_eval(args: argparse.Namespace) -> None:
    """Evaluate and print the report: a table, or with --json one JSON object on the last line."""
    import json

    from kinema.devices import resolve_device
    from kinema.eval.run import evaluate, format_report

    device = resolve_device(args.device)  # a device this machine lacks: one line before the output folder is made
    if args.reconstructions is not None:
        from kinema.eval.reconstruct import score_reconstructions
        from kinema.pipelines.load import load_family

        scores = score_reconstructions(args.model, count=args.reconstructions,
                                       family=load_family(args.model, device=device))
        scores["psnr"] = round(scores["psnr"], 2)
        scores["settings"]["device"] = str(device)
        print(json.dumps({key: value for key, value in scores.items() if key != "per_clip"}))
        return
    report = evaluate(args.model, args.prompts, seed=args.seed, frames=args.frames, steps=args.steps,
                      guidance=args.guidance,
                      progress=not args.quiet, out_dir=args.out, limit=args.limit,
                      continuation=not args.no_continuation, continuations=args.continuations or 1,
                      save_videos=args.save_videos, overwrite=args.overwrite,
                      speed=args.speed, device=device, motion_module=args.motion_module, loras=args.lora)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(format_report(report))
