"""The harness every benchmark runs on.

A benchmark is a few named cases, one of them the reference, and a `measure(case, options)` function that returns
the case's figures as a dict of JSON values. `run_benchmark`:
- runs each case in a fresh subprocess of the benchmark's own script, so the peak memory it reports (`max_rss`, the
  child's own `ru_maxrss`, in bytes) is that case's alone, and no case warms a cache for the next;
- times the `measure` call (`seconds`), unless `measure` reports `seconds` itself (e.g. to leave out building a
  model);
- divides every number of each case by the reference case's, measured in the same run (`ratios`);
- takes `--quick`, the benchmark's small setting (seconds, not minutes; what CI and a first look use);
- prints one line per case, then every figure as ONE JSON object on the last line of stdout.

Usage from a benchmark script in this folder (run as `python benchmarks/bench_NAME.py`, so this folder is on
sys.path):

    from common import run_benchmark

    def measure(case: str, options: argparse.Namespace) -> dict: ...

    if __name__ == "__main__":
        run_benchmark("name", __doc__, cases=["small", "large"], reference="small", measure=measure)

Benchmarks of the `kinema` command as a user runs it (bench_generate, bench_extend) start it with
`run_command(kinema_command() + [...])`: a fresh process, its wall time and its own peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Figures = dict[str, Any]
Measure = Callable[[str, argparse.Namespace], Mapping[str, Any]]

# The hidden option that makes the script measure one case in this process, as the harness's subprocess.
CASE_OPTION = "--case"


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark so far, in bytes: getrusage's, or the kernel's VmHWM where
    that is higher. The kernel updates the two at different moments (a CI run read VmHWM 56 KiB above
    ru_maxrss), and a case's own peak, measured with kinema.memory's VmHWM, must not exceed the whole process's.
    VmHWM is read only where the case imported kinema.memory: importing it here would import torch and raise the
    high-water mark being read."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux
    memory = sys.modules.get("kinema.memory")
    return max(peak, memory.peak_memory_bytes()) if memory is not None else peak


def ratios_to(reference: Mapping[str, Any], figures: Mapping[str, Any]) -> dict[str, float]:
    """`figures[key] / reference[key]` for every number both have (a zero reference has no ratio)."""

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    return {key: round(value / reference[key], 4) for key, value in figures.items()
            if number(value) and number(reference.get(key)) and reference[key] != 0}


def _measure_here(measure: Measure, case: str, options: argparse.Namespace) -> None:
    start = time.perf_counter()
    figures = dict(measure(case, options))
    seconds = time.perf_counter() - start
    figures.setdefault("seconds", round(seconds, 4))
    figures["max_rss"] = peak_rss_bytes()
    print(json.dumps(figures))


def _measure_in_subprocess(script: str, argv: Sequence[str], case: str) -> Figures:
    done = subprocess.run([sys.executable, script, *argv, CASE_OPTION, case], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed (exit code {done.returncode}):\n{done.stderr.strip()}")
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"case {case} printed no JSON line last; its output was:\n{done.stdout}") from None


def _case_line(case: str, figures: Mapping[str, Any]) -> str:
    return f"{case}: {figures['seconds']:.3f} s, peak RSS {figures['max_rss'] / 2**20:.1f} MiB"


def run_benchmark(
    name: str,
    description: str | None,
    *,
    cases: Sequence[str],
    reference: str,
    measure: Measure,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    summarize: Callable[[dict[str, Figures], argparse.Namespace], Mapping[str, Any]] | None = None,
    case_line: Callable[[str, Mapping[str, Any]], str] = _case_line,
    argv: Sequence[str] | None = None,
    script: str | None = None,
) -> Figures | None:
    """Measure every case of benchmark `name`, each in its own subprocess, and print the figures.

    `add_arguments` adds the benchmark's own options (they reach every case, as `options`); `summarize(cases,
    options)` adds top-level keys to the JSON (e.g. a headline ratio); `case_line` is the line printed per case.
    Returns the printed JSON object as a dict (None in a case's subprocess). `script` is the benchmark's file
    (default: the script Python runs) and `argv` its arguments (default: the command line).
    """
    if reference not in cases:
        raise ValueError(f"the reference case {reference!r} is not one of the cases {list(cases)}")
    parser = argparse.ArgumentParser(description=(description or name).strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small setting: seconds, not minutes")
    parser.add_argument(CASE_OPTION, choices=list(cases), help=argparse.SUPPRESS)
    if add_arguments is not None:
        add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parser.parse_args(argv)
    if options.case is not None:
        _measure_here(measure, options.case, options)
        return None

    script = script or sys.argv[0]
    figures: dict[str, Figures] = {}
    for case in cases:
        figures[case] = _measure_in_subprocess(script, argv, case)
        print(case_line(case, figures[case]), flush=True)
    result: Figures = {
        "benchmark": name,
        "quick": options.quick,
        "reference": reference,
        "cases": figures,
        "ratios": {case: ratios_to(figures[reference], figures[case]) for case in cases if case != reference},
    }
    if summarize is not None:
        result.update(summarize(figures, options))
    print(json.dumps(result))
    return result


def byte_tokenizer(folder: Path) -> Any:
    """A CLIP tokenizer over the 256 byte symbols (and their end-of-word forms) with no merges, 77 tokens long: real
    tokenization (padding, truncation, start and end tokens) without a downloaded vocabulary."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocabulary = symbols + [symbol + "</w>" for symbol in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocabulary)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = 77
    return tokenizer


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """`build()` right after seeding torch's global generator, in eval mode: the same weights in every process."""
    import torch

    torch.manual_seed(seed)
    return build().eval()



# ---------------------------------------------------------------- commands as a user runs them


@dataclass(frozen=True)
class CommandRun:
    """One finished command: its wall time, its own peak resident memory and what it printed."""

    seconds: float
    max_rss: int  # bytes: the command's resident-memory high-water mark (its process and children it waited for)
    returncode: int
    stdout: str
    stderr: str


def kinema_command() -> list[str]:
    """The `kinema` console script of this Python's environment, as a user runs it; `python -m kinema` where the
    script is not installed beside the interpreter."""
    script = Path(sys.executable).with_name("kinema")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kinema"]


def run_command(command: Sequence[str], *, cwd: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None) -> CommandRun:
    """Run `command` to the end in a fresh process and return its wall seconds and its own peak memory.

    The peak is the child's `ru_maxrss` from `wait4`: that command's alone, not the highest of every child so far.
    Linux counts the calling process's own peak in the child until it execs, so the figure is really
    max(caller's peak, command's peak): call this from a small process, as a benchmark case's is (~20 MiB) and not
    from one holding models. Output goes through temporary files (a pipe could fill and stall the child while
    nothing reads it).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(list(command), stdout=out, stderr=err, cwd=cwd,
                                   env=None if env is None else dict(env))
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        out.seek(0)
        err.seek(0)
        peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
        return CommandRun(seconds=seconds, max_rss=peak, returncode=process.returncode,
                          stdout=out.read().decode(errors="replace"), stderr=err.read().decode(errors="replace"))


def quick_parser(add_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """A benchmark's options that decide which cases run: `--quick` plus its own (the harness parses the full
    command line again)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--quick", action="store_true")
    add_arguments(parser)
    return parser


def check_model_option(model: str | None, benchmark: str) -> None:
    """Refuse a `--model` that is neither a bundled name nor a folder before any case runs (one line, SystemExit)."""
    from kinema.bundled import DEFAULT_MODEL, resolve_model
    from kinema.errors import KinemaError

    try:
        resolve_model(model or DEFAULT_MODEL)
    except KinemaError as err:
        raise SystemExit(f"{benchmark}: {err}") from None


# A small SD1.5-shaped UNet (diffusers UNet2DConditionModel keyword arguments): SD1.5's block layout at a tenth of
# its widths, shared by the benchmarks that need an AnimateDiff-family model of realistic shape but laptop size.
SMALL_SD_WIDTHS = (32, 64, 128, 128)  # SD1.5's (320, 640, 1280, 1280) / 10
SMALL_SD_TEXT_WIDTH = 64
SMALL_SD_UNET: dict[str, Any] = dict(
    in_channels=4, out_channels=4, block_out_channels=SMALL_SD_WIDTHS, layers_per_block=2,
    cross_attention_dim=SMALL_SD_TEXT_WIDTH, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, attention_head_dim=8)


def mix_motion_modules(model: Any, generator: Any, scale: float = 0.02) -> None:
    """Add seeded noise (`scale` x unit Gaussian) to every motion-module weight of a kinema video model, in place:
    fresh motion modules are identities (zeroed outputs), and a benchmark of them must mix frames."""
    import torch

    with torch.no_grad():
        for _, module in model.motion_modules():
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
