"""`kinema extend` from a 16-frame clip to 256 frames: peak memory as the video grows, and the object at the end.

Usage: python benchmarks/bench_extend.py [--model NAME_OR_PATH] [--quick] [--frames N] [--steps N]
                                         [--segment-frames N]

What runs, each step a fresh `kinema` process (the console script beside this Python) as a user runs it, in one
temporary folder:
- `generate.16`: `kinema generate "a red circle moving right"` makes the 16-frame clip (the model's defaults: 64x64
  for kinema-tiny); its last-16-frame detections are `head_detect`.
- `extend.N` for N = F/4, F/2 and F (`--frames` F, default 256: 64, 128 and 256 frames; counts not above the clip's
  16 are left out): `kinema extend CLIP --frames N-16 --segment-frames 16`, the prompt read back from the clip's
  settings, segments of 16 frames each conditioned on (and cross-faded over) the last 4 frames of what exists
  (kinema.pipelines.generation's extend mode). 16 frames is the clip's length, what the bundled models were trained
  on and what `kinema eval`'s continuation uses; without `--segment-frames`, kinema extends by the model's window,
  which for kinema-tiny is 256 frames (its motion modules' 64-frame tables times the VAE's 4x in time): one segment
  far longer than anything it saw in training (this benchmark's `--segment-frames` changes it). Each length is its
  own process, so each `peak_rss` (the process's resident-memory high-water mark, `wait4`'s `ru_maxrss`: libraries,
  weights and working memory) is that length's alone. `generate_peak` is the peak kinema itself reports for the
  generate call (VmHWM reset at its start), `segments` how many segments it appended.
- On the F-frame video the detectors of `kinema eval` (`kinema.eval.detectors.detect`: colour, shape and motion of
  the one object) read the last 16 frames (`tail_detect`), compared with the prompt's labels (`prompt_labels`).

Memory is `flat` when the peak at F frames is within 10% plus 32 MiB of the peak at the smallest count: extend keeps
the whole video it builds (F frames of float32 pixels: 12 MiB at 256 frames of 64x64) and writes it at the end, so a
few MiB grow with the length by design; anything per segment that piled up (activations, latents, text states)
would break the rule within a few segments. Every `kinema` process runs with glibc's mmap threshold fixed at 128
KiB (`MALLOC_MMAP_THRESHOLD_`, unless set already), as in bench_long: with glibc's moving threshold, peaks of
identical runs drift by tens of percent, enough to hide or fake growth.

Reference: there is no other implementation of this model to compare with; the reference case is `extend.N` at the
smallest count, so the ratios say how each longer run's figures compare with it.

`--quick` stops at 128 frames (32, 64 and 128) and samples 2 steps per segment instead of the model's default
(a segment's peak does not depend on the step count, so the memory figures hold; the detections are of a rougher
video); `--frames` and `--steps` set either for any run. On a 2-core machine the full run takes minutes: 34 segments
of 16 frames, each sampled and decoded. Threads are torch's default, as for a user.

The last printed line is one JSON object: the harness's figures per case, and `peak_rss_mb_by_frames`, `flat`,
`tail_detect`, `prompt_labels`, `tail_matches`, `keeps_colour_and_shape` (the tail's colour and shape are the
prompt's), `wall_s` (seconds of each `kinema extend` process, by frame count), `wall_s_total` (every process,
the clip's included), `head_detect`, `generate_peak_mb_by_frames`, `segments_by_frames`, `peak_growth_mb`,
`peak_ratio` and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import check_model_option, kinema_command, quick_parser, run_benchmark, run_command

PROMPT = "a red circle moving right"
PROMPT_LABELS = {"color": "red", "shape": "circle", "motion": "right"}
CLIP_FRAMES = 16   # the clip `kinema generate` makes with kinema-tiny's defaults, and the frames each detection reads
CLIP_NAME = "clip.mp4"
DEFAULT_FRAMES, QUICK_FRAMES = 256, 128
QUICK_STEPS = 2
FLAT_RATIO, FLAT_SLACK_MIB = 1.10, 32
GENERATE_CASE = "generate.16"
MMAP_THRESHOLD = str(128 * 1024)


def overlap_frames(options: argparse.Namespace) -> int:
    """kinema extend's overlap for the model: its kinema.json default, else the library's."""
    from kinema.bundled import DEFAULT_MODEL
    from kinema.pipelines.jobs import model_defaults_for
    from kinema.pipelines.request import LIBRARY_DEFAULTS

    _, defaults = model_defaults_for(options.model or DEFAULT_MODEL, ["overlap_frames"])
    return defaults.get("overlap_frames", LIBRARY_DEFAULTS["overlap_frames"])


def final_frames(options: argparse.Namespace) -> int:
    """The final length: `--frames`, else 128 with `--quick` and 256 otherwise."""
    if options.frames is not None:
        return options.frames
    return QUICK_FRAMES if options.quick else DEFAULT_FRAMES


def frame_counts(frames: int) -> list[int]:
    """The lengths extended to: `frames` / 4, / 2 and `frames`, those above the clip's 16 frames."""
    return sorted({count for count in (frames // 4, frames // 2, frames) if count > CLIP_FRAMES})


def extend_case(frames: int) -> str:
    return f"extend.{frames}"


def cases_for(argv: list[str]) -> list[str]:
    """Every case of a run with these arguments, in the order they run: the clip, then each length."""
    options = parser_for_cases().parse_known_args(argv)[0]
    return [GENERATE_CASE] + [extend_case(count) for count in frame_counts(final_frames(options))]


def sampling_steps(options: argparse.Namespace) -> int | None:
    """`--steps`, else 2 with `--quick`, else None (the model's kinema.json default)."""
    return options.steps or (QUICK_STEPS if options.quick else None)


def common_arguments(options: argparse.Namespace) -> list[str]:
    """`--model` (an existing path made absolute) and `--steps`, when set."""
    arguments: list[str] = []
    if options.model is not None:
        path = Path(options.model)
        arguments += ["--model", str(path.resolve()) if path.exists() else options.model]
    steps = sampling_steps(options)
    return arguments + ([] if steps is None else ["--steps", str(steps)])


def _run_kinema(arguments: list[str], folder: Path) -> Any:
    command = [*kinema_command(), *arguments]
    # Read by glibc as the process starts: freed large blocks go back to the system at once, so a peak is the memory
    # live at that moment and not what glibc's moving threshold happened to keep (tens of percent between runs).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)}
    run = run_command(command, cwd=folder, env=env)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise RuntimeError(f"`{' '.join(command)}` exited with {run.returncode}: {last}")
    return run


def _report(video: Path) -> dict[str, Any]:
    """The run report kinema stored in the video's settings sidecar."""
    return json.loads(video.with_name(video.name + ".json").read_text())["report"]


def detect_last(video: Path, total: int) -> dict[str, Any]:
    """`kinema.eval.detectors.detect` on the last 16 frames of a `total`-frame video."""
    from kinema.data.video_io import read_video
    from kinema.eval.detectors import detect

    tail = read_video(video, start=max(0, total - CLIP_FRAMES)).frames  # (F, 3, H, W) in [-1, 1]
    if tail.shape[0] != min(CLIP_FRAMES, total):
        raise RuntimeError(f"{video} should have {total} frames but its last {CLIP_FRAMES} read as {tail.shape[0]}")
    return detect((tail + 1) / 2)


def measure(case: str, options: argparse.Namespace) -> dict[str, Any]:
    """Run one `kinema` process of the benchmark (see the module docstring) and return its figures."""
    work = Path(options.work)
    clip = work / CLIP_NAME
    if case == GENERATE_CASE:
        run = _run_kinema(["generate", PROMPT, *common_arguments(options), "-o", str(clip)], work)
        report = _report(clip)
        return {"seconds": round(run.seconds, 3), "peak_rss": run.max_rss, "frames": report["frames"],
                "generate_peak": report["peak_memory_bytes"], "detect": detect_last(clip, report["frames"])}
    frames = int(case.split(".")[1])
    out = work / f"extended-{frames}.mp4"
    run = _run_kinema(["extend", str(clip), "--frames", str(frames - CLIP_FRAMES), "--segment-frames",
                       str(options.segment_frames), *common_arguments(options), "-o", str(out)], work)
    report = _report(out)
    if report["frames"] != frames:
        raise RuntimeError(f"kinema extend made {report['frames']} frames, not {frames}")
    figures = {"seconds": round(run.seconds, 3), "peak_rss": run.max_rss, "frames": frames,
               "generate_peak": report["peak_memory_bytes"], "segments": report["segments"]}
    if frames == max(frame_counts(final_frames(options))):
        figures["detect"] = detect_last(out, frames)
    return figures


# ---------------------------------------------------------------- the figures


def is_flat(peak_small: float, peak_large: float) -> bool:
    """Whether the larger count's peak is within 10% plus 32 MiB of the smaller count's (bytes)."""
    return peak_large <= FLAT_RATIO * peak_small + FLAT_SLACK_MIB * 2**20


def summarize(cases: Mapping[str, Mapping[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    """Peaks by frame count and the flatness rule, the tail's detections against the prompt, the wall times."""
    counts = frame_counts(final_frames(options))
    extends = {str(count): cases[extend_case(count)] for count in counts}
    small, large = extends[str(counts[0])], extends[str(counts[-1])]
    tail = large["detect"]
    matches = {label: tail.get(label) == expected for label, expected in PROMPT_LABELS.items()}

    def mib(value: float) -> float:
        return round(value / 2**20, 1)

    return {
        "peak_rss_mb_by_frames": {count: mib(figures["peak_rss"]) for count, figures in extends.items()},
        "flat": is_flat(small["peak_rss"], large["peak_rss"]),
        "tail_detect": tail,
        "prompt_labels": dict(PROMPT_LABELS),
        "tail_matches": matches,
        "keeps_colour_and_shape": matches["color"] and matches["shape"],
        "wall_s": {count: figures["seconds"] for count, figures in extends.items()},
        "wall_s_total": round(sum(figures["seconds"] for figures in cases.values()), 3),
        "head_detect": cases[GENERATE_CASE]["detect"],
        "generate_peak_mb_by_frames": {count: mib(figures["generate_peak"]) for count, figures in extends.items()},
        "segments_by_frames": {count: figures["segments"] for count, figures in extends.items()},
        "peak_growth_mb": mib(large["peak_rss"] - small["peak_rss"]),
        "peak_ratio": round(large["peak_rss"] / small["peak_rss"], 4),
        "flat_rule": f"peak at {counts[-1]} <= {FLAT_RATIO} x peak at {counts[0]} + {FLAT_SLACK_MIB} MiB",
        "settings": {"model": options.model or "(bundled default)", "prompt": PROMPT, "clip_frames": CLIP_FRAMES,
                     "frames": final_frames(options), "frame_counts": counts,
                     "segment_frames": options.segment_frames, "overlap_frames": overlap_frames(options),
                     "steps": sampling_steps(options) or "the model's default", "cpu_count": os.cpu_count(),
                     "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)},
    }


def case_line(case: str, figures: Mapping[str, Any]) -> str:
    segments = f", {figures['segments']} segments" if figures.get("segments") else ""
    found = f", last 16 frames: {figures['detect']}" if "detect" in figures else ""
    return (f"{case:13s} {figures['seconds']:7.2f} s, peak RSS {figures['peak_rss'] / 2**20:7.1f} MiB, "
            f"{figures['frames']} frames{segments}{found}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a bundled model's name or a model folder (default: no --model flag, the "
                                        "bundled default)")
    parser.add_argument("--frames", type=int,
                        help=f"the final length (default {DEFAULT_FRAMES}, {QUICK_FRAMES} with --quick); peaks are "
                             "also taken at a quarter and a half of it")
    parser.add_argument("--steps", type=int, help="sampling steps of every run (default: the model's, 2 with --quick)")
    parser.add_argument("--segment-frames", type=int, default=CLIP_FRAMES,
                        help=f"frames per appended segment, overlap included (default {CLIP_FRAMES}: the clip's)")
    parser.add_argument("--work", help=argparse.SUPPRESS)  # the shared folder, set by main() for every case


def parser_for_cases() -> argparse.ArgumentParser:
    """The options that decide which cases run."""
    return quick_parser(add_arguments)


def check_options(options: argparse.Namespace) -> None:
    """Refuse bad options before any case runs (one line, via SystemExit)."""
    if len(frame_counts(final_frames(options))) < 2:
        raise SystemExit(f"--frames must be at least {2 * (CLIP_FRAMES + 1)}: peaks are compared at a half (or a "
                         f"quarter) of it and at it, each above the clip's {CLIP_FRAMES} frames")
    check_model_option(options.model, "bench_extend")
    overlap = overlap_frames(options)
    if (options.steps is not None and options.steps < 1) or options.segment_frames <= overlap:
        raise SystemExit(f"--steps must be at least 1 and --segment-frames above the model's {overlap} overlap "
                         "frames")


def main(argv: list[str]) -> None:
    options = parser_for_cases().parse_known_args(argv)[0]
    if "--case" in argv:  # a case's process: the parent checked the options and made the folder
        run_benchmark("extend", __doc__, cases=cases_for(argv), reference=cases_for(argv)[1], measure=measure,
                      add_arguments=add_arguments, summarize=summarize, case_line=case_line, argv=argv)
        return
    check_options(options)
    with tempfile.TemporaryDirectory(prefix="kinema-bench-extend-") as work:
        argv = [*argv, "--work", work]
        run_benchmark("extend", __doc__, cases=cases_for(argv), reference=cases_for(argv)[1], measure=measure,
                      add_arguments=add_arguments, summarize=summarize, case_line=case_line, argv=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
