"""`kinema generate "a red circle moving right"` with the defaults, as a user runs it: wall seconds and peak memory.

Usage: python benchmarks/bench_generate.py [--model NAME_OR_PATH] [--quick] [--runs N] [--steps N]

What is timed: the command a fresh install's README starts with, `kinema generate "a red circle moving right"`, each
run a fresh `kinema` process (the console script beside this Python) started in an empty temporary folder, so its
video lands in that folder's `out/` and interpreter start, imports, model loading (the text encoder included),
sampling, decoding and writing all count, as they do for a user. Nothing is warmed up. Without `--model` no
`--model` flag is given: the bundled default model (kinema-tiny) runs with its kinema.json defaults (16 frames at
64x64); `--model` passes a bundled name or a model folder instead. Cases (benchmarks/common.py):
- `cli.1` ... `cli.N`: one `kinema generate` process each (`--runs`, default 3; 1 with `--quick`). `seconds` is the
  process's wall time, `peak_rss` its own resident-memory high-water mark (`wait4`'s `ru_maxrss`, whole process:
  libraries, weights and working memory), `frames` / `height` / `width` / `steps` what its settings sidecar records.
- `library` (the reference): the same generation in one fresh process through the calls the command makes
  (`build_parser` + the command's check, `load_family`, `generate`, `write_result`), each stage timed:
  `breakdown_s` = `import` (kinema's CLI and pipelines with torch, diffusers and transformers), `parse` (arguments,
  model defaults, output checks), `load_family` (transformer, VAE and text encoder from disk), `text_encode` (the
  prompt and the negative prompt: time inside the family's `encode_text`), `sampling` (the rest of `generate`: noise
  and the denoising loop), `vae_decode` (inside the family's `decode`), `write` (the latents file and the mp4 with
  its sidecar) and `total`. Its ratios say what a `kinema` process costs beyond these calls.

Reference: there is no other implementation of this model to compare with (kinema-tiny exists only in kinema, and
the goal is an absolute one: the issue's 15 s), so the reference case is kinema's own library path, measured in the
same run.

`--quick` runs the command once instead of three times; the model's defaults stay (the goal is about them).
`--steps` overrides the sampling steps (then `at_defaults` is false and the goal is not judged). Threads are torch's
default, as for a user; the load average and the CPU count are recorded, since another job on the machine lengthens
every figure.

The last printed line is one JSON object: the harness's figures per case, and `wall_s_median`, `wall_s_runs`,
`within_15s` (median <= 15 s), `frames`, `height`, `width`, `steps`, `breakdown_s`, `peak_rss_mb` (the highest
`kinema` process peak, MiB), `at_defaults`, `meets_goal` (within 15 s, at the defaults, >= 16 frames, >= 64x64),
`goal`, `model`, `prompt`, `cpu_count` and `load_average`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common import check_model_option, kinema_command, peak_rss_bytes, quick_parser, run_benchmark, run_command

PROMPT = "a red circle moving right"
GOAL_SECONDS = 15.0
GOAL_MIN_FRAMES, GOAL_MIN_SIDE = 16, 64
DEFAULT_RUNS, QUICK_RUNS = 3, 1
LIBRARY_CASE = "library"
STAGES = ("import", "parse", "load_family", "text_encode", "sampling", "vae_decode", "write", "total")


def run_count(options: argparse.Namespace) -> int:
    """How many `kinema generate` processes: `--runs`, else 1 with `--quick` and 3 otherwise."""
    return options.runs or (QUICK_RUNS if options.quick else DEFAULT_RUNS)


def cli_case(run: int) -> str:
    return f"cli.{run}"


def cases_for(argv: list[str]) -> list[str]:
    """Every case of a run with these arguments, in the order they run: the commands, then the library's stages."""
    options = parser_for_cases().parse_known_args(argv)[0]
    return [cli_case(run) for run in range(1, run_count(options) + 1)] + [LIBRARY_CASE]


def model_arguments(options: argparse.Namespace) -> list[str]:
    """`--model M` as the command takes it (an existing path made absolute, since each run starts in its own
    folder), or nothing for the bundled default."""
    if options.model is None:
        return []
    path = Path(options.model)
    return ["--model", str(path.resolve()) if path.exists() else options.model]


def generate_arguments(options: argparse.Namespace) -> list[str]:
    """`kinema generate`'s arguments after the program: the prompt, the model and `--steps` when given."""
    steps = [] if options.steps is None else ["--steps", str(options.steps)]
    return ["generate", PROMPT, *model_arguments(options), *steps]


# ---------------------------------------------------------------- the command


def _sidecar(folder: Path) -> dict[str, Any]:
    """The settings sidecar of the one video the command wrote under `folder`/out."""
    videos = sorted((folder / "out").glob("*.mp4"))
    if len(videos) != 1:
        raise RuntimeError(f"expected one video in {folder / 'out'}, found {[video.name for video in videos]}")
    return json.loads(videos[0].with_name(videos[0].name + ".json").read_text())


def measure_command(options: argparse.Namespace) -> dict[str, Any]:
    """One fresh `kinema generate` process in an empty folder: its wall seconds, peak memory and what it made."""
    command = [*kinema_command(), *generate_arguments(options)]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kinema-bench-generate-") as folder:
        run = run_command(command, cwd=folder)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise RuntimeError(f"`{' '.join(command)}` exited with {run.returncode}: {last}")
        settings = _sidecar(Path(folder))
    return {"seconds": round(run.seconds, 3), "peak_rss": run.max_rss, "frames": settings["frames"],
            "height": settings["height"], "width": settings["width"], "steps": settings["steps"],
            "generate_seconds": settings.get("report", {}).get("seconds"),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


# ---------------------------------------------------------------- the library, stage by stage


def _timed(function: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    """`function`, adding the seconds of each call to `spent[0]`."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    return timed


def measure_library(options: argparse.Namespace) -> dict[str, Any]:
    """The command's calls in this (fresh) process, each stage timed (see the module docstring)."""
    began = time.perf_counter()
    import torch

    from kinema.cli import build_parser
    from kinema.pipelines.generation import generate
    from kinema.pipelines.load import load_family
    from kinema.pipelines.outputs import latents_path, save_latents, write_result

    stages: dict[str, float] = {"import": time.perf_counter() - began}
    with tempfile.TemporaryDirectory(prefix="kinema-bench-generate-") as folder:
        start = time.perf_counter()
        args = build_parser().parse_args([*generate_arguments(options), "-o", str(Path(folder) / "video.mp4")])
        args.check(args)
        stages["parse"] = time.perf_counter() - start

        start = time.perf_counter()
        family = load_family(args.model, motion_module=args.motion_module, loras=args.lora,
                             dtype=args.dtype or "float32", tokenizer=args.tokenizer)
        stages["load_family"] = time.perf_counter() - start

        # The family's own methods, timed where generate() calls them, so the stages are those of the real call.
        text, decode, save = [0.0], [0.0], [0.0]
        family.encode_text = _timed(family.encode_text, text)  # type: ignore[method-assign]
        family.decode = _timed(family.decode, decode)  # type: ignore[method-assign]
        keep = _timed(lambda final, settings: save_latents(final, settings, latents_path(args.output)), save)
        start = time.perf_counter()
        result = generate(family, args.request, progress=False, on_latents=keep)
        generate_seconds = time.perf_counter() - start

        start = time.perf_counter()
        write_result(result, args.output, fps=args.request.fps)
        stages["write"] = time.perf_counter() - start + save[0]
    stages.update(text_encode=text[0], vae_decode=decode[0],
                  sampling=generate_seconds - text[0] - decode[0] - save[0], total=time.perf_counter() - began)
    frames = result.frames
    return {"seconds": round(stages["total"], 3), "peak_rss": peak_rss_bytes(),
            "breakdown_s": {stage: round(stages[stage], 3) for stage in STAGES},
            "frames": int(frames.shape[1]), "height": int(frames.shape[-2]), "width": int(frames.shape[-1]),
            "steps": args.request.steps, "torch_threads": torch.get_num_threads()}


def measure(case: str, options: argparse.Namespace) -> dict[str, Any]:
    """Measure one case: a `kinema generate` process (`cli.N`) or the library's stages (`library`)."""
    return measure_library(options) if case == LIBRARY_CASE else measure_command(options)


# ---------------------------------------------------------------- the figures


def summarize(cases: Mapping[str, Mapping[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    """The headline figures: the commands' median wall time against the goal, what they made, the library's stages
    and the highest peak memory of a `kinema` process."""
    runs = [cases[cli_case(run)] for run in range(1, run_count(options) + 1)]
    walls = [run["seconds"] for run in runs]
    median = round(statistics.median(walls), 3)
    made = {key: runs[0][key] for key in ("frames", "height", "width", "steps")}
    at_defaults = options.steps is None
    within = median <= GOAL_SECONDS
    big_enough = made["frames"] >= GOAL_MIN_FRAMES and min(made["height"], made["width"]) >= GOAL_MIN_SIDE
    return {
        "wall_s_median": median,
        "wall_s_runs": walls,
        "within_15s": within,
        **made,
        "breakdown_s": cases[LIBRARY_CASE]["breakdown_s"],
        "peak_rss_mb": round(max(run["peak_rss"] for run in runs) / 2**20, 1),
        "at_defaults": at_defaults,
        "meets_goal": within and at_defaults and big_enough,
        "goal": {"wall_s": GOAL_SECONDS, "min_frames": GOAL_MIN_FRAMES, "min_side": GOAL_MIN_SIDE},
        "model": options.model or "(bundled default)",
        "prompt": PROMPT,
        "command": ["kinema", *generate_arguments(options)],
        "cpu_count": os.cpu_count(),
        "load_average": [run["load_average"][0] for run in runs],
    }


def case_line(case: str, figures: Mapping[str, Any]) -> str:
    if case == LIBRARY_CASE:
        stages = ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in figures["breakdown_s"].items())
        return f"{case}: {stages} s; peak RSS {figures['peak_rss'] / 2**20:.0f} MiB"
    return (f"{case}: {figures['seconds']:.2f} s wall, peak RSS {figures['peak_rss'] / 2**20:.0f} MiB, "
            f"{figures['frames']} frames {figures['width']}x{figures['height']}, {figures['steps']} steps, "
            f"load {figures['load_average'][0]:.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a bundled model's name or a model folder (default: no --model flag, the "
                                        "bundled default)")
    parser.add_argument("--runs", type=int, help="kinema processes to time (default 3, 1 with --quick)")
    parser.add_argument("--steps", type=int, help="override the model's sampling steps (the goal is then not judged)")


def parser_for_cases() -> argparse.ArgumentParser:
    """The options that decide which cases run."""
    return quick_parser(add_arguments)


def check_options(options: argparse.Namespace) -> None:
    """Refuse bad options before any case runs (one line, via SystemExit)."""
    if (options.runs is not None and options.runs < 1) or (options.steps is not None and options.steps < 1):
        raise SystemExit("--runs and --steps must be at least 1")
    check_model_option(options.model, "bench_generate")


def main(argv: list[str]) -> None:
    options = parser_for_cases().parse_known_args(argv)[0]
    if "--case" not in argv:  # the parent checks once; each case's process trusts it
        check_options(options)
    run_benchmark("generate", __doc__, cases=cases_for(argv), reference=LIBRARY_CASE, measure=measure,
                  add_arguments=add_arguments, summarize=summarize, case_line=case_line, argv=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
