"""`kinema batch`: generate every job of a JSON Lines file into one folder, here in turn or over a Ray cluster, and
resume after a crash (kinema.pipelines.batch).

`check` reads and checks every line of the jobs file (and the output folder, and that Ray is installed when --ray
asks for it) before any heavy import, so a bad line exits 2 with its line number before any model loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kinema.cli.args import add_command, add_device_option, example, positive_int

DESCRIPTION = (
    "Run one generation job per line of JOBS.jsonl (a JSON object per line: prompt, model, motion_module, loras, "
    "seed or seeds (-1: random), frames, height, width, steps, guidance, scheduler, image, video, ...; unset sizes "
    "and steps take the model's defaults, as in `kinema generate`). Each job writes DIR/jobs/ID/ (its videos, their "
    "settings and job.json) whole or not at all, and a record to DIR/manifest.jsonl. Running the same command again "
    "skips the jobs already done, so a run stopped by a crash resumes; an edited line is a new job. Without --ray "
    "the jobs run here in turn, grouped by model, each model loaded once. With --ray they fan out over Ray worker "
    "actors, each loading a model once for all the jobs it serves (Ray: pip install \"kinema[batch]\"); on a cluster "
    "of several machines, DIR and every file the jobs name must be on storage all of them see."
)


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema batch`."""
    parser = add_command(
        subparsers, "batch", run=run_batch, check=check_batch,
        help="generate every job of a JSON Lines file, here or on a Ray cluster, resuming after a crash",
        description=DESCRIPTION,
        epilog=example("kinema batch jobs.jsonl --out out/batch",
                       "kinema batch jobs.jsonl --out out/batch --ray local --workers 2",
                       "kinema batch jobs.jsonl --out /shared/batch --ray auto"),
    )
    parser.add_argument("jobs_file", metavar="JOBS.jsonl", help="the jobs, one JSON object per line")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the batch folder: new, empty, or an earlier run's (which this run resumes)")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="run on Ray: a cluster's address (auto, HEAD:6379, ray://HEAD:10001), or local to start "
                             "a cluster on this machine for the run")
    parser.add_argument("--workers", type=positive_int, metavar="N",
                        help="with --ray: how many worker actors (default: one per CPU of the cluster; with local, "
                             "the cluster gets N CPUs)")
    parser.add_argument("--models-dir", metavar="DIR",
                        help="a folder where model, motion module and LoRA names of the jobs are also looked up")
    add_device_option(parser)


def check_batch(args: argparse.Namespace) -> None:
    """Bad usage of `kinema batch`, refused before any heavy import: --workers without --ray, Ray missing, the
    output folder, and every line of the jobs file."""
    from kinema.errors import KinemaError
    from kinema.pipelines.batch import (
        LOCAL_RAY,
        RAY_MISSING,
        check_batch_output,
        ray_available,
        ray_host_port,
        read_jobs,
    )

    if args.workers is not None and args.ray is None:
        raise KinemaError("--workers sets the number of Ray worker actors; give --ray local (or a cluster's "
                          "address) too, or leave --workers out to run the jobs here in turn")
    if args.ray is not None and (args.device.startswith("cuda:") or args.device == "mps"):
        raise KinemaError(f"--device {args.device} names a device of one machine, and on Ray each worker runs on "
                          "its own: give --device cuda (a GPU per worker), cpu or auto")
    if args.ray is not None:
        ray_host_port(args.ray)
    if args.ray is not None and not ray_available():
        raise KinemaError(RAY_MISSING)
    if args.models_dir is not None and not Path(args.models_dir).is_dir():
        raise KinemaError(f"no models folder {args.models_dir}; give an existing folder with --models-dir")
    check_batch_output(args.out)
    # On a Ray cluster the workers' machines decide their device, not this one: presets and memory are theirs to
    # judge (a local cluster's workers run here).
    elsewhere = args.ray is not None and args.ray != LOCAL_RAY
    args.jobs = read_jobs(Path(args.jobs_file), models_dir=args.models_dir, device=None if elsewhere else args.device)


def run_batch(args: argparse.Namespace) -> None:
    """Run the jobs not done yet; print what was done, skipped and failed, and each worker's model loads. Failed
    jobs make the command fail (exit 1) after the others ran; running it again retries them."""
    from kinema.errors import KinemaError
    from kinema.pipelines.batch import run_batch as run

    def show(record: dict[str, Any], finished: int, total: int) -> None:
        if record["status"] == "done":
            print(f"[{finished}/{total}] line {record['line']} ({record['job']}): done in {record['seconds']:.1f} s "
                  f"on {record['worker']}", flush=True)

    if args.ray is None:  # here: a device this machine lacks is one line before the batch folder is touched
        from kinema.devices import resolve_device

        resolve_device(args.device)
    summary = run(args.jobs, args.out, ray=args.ray, workers=args.workers, jobs_file=args.jobs_file,
                  on_record=None if args.quiet else show, device=args.device)
    loads = ", ".join(f"{worker} {count}" for worker, count in summary.loads.items()) or "none"
    print(f"batch {summary.out}: {summary.done} job(s) done, {summary.skipped} already done, "
          f"{len(summary.failed)} failed; model loads per worker: {loads}; manifest {summary.manifest}")
    if summary.failed:
        first = min(summary.failed, key=lambda record: record["line"])  # jobs run grouped by model, not by line
        raise KinemaError(f"{len(summary.failed)} job(s) failed (first: line {first['line']}: {first['error']}); "
                          f"see {summary.manifest}, fix them and run the same command again to retry them")
