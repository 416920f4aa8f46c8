"""benchmarks/bench_long.py: which cases run, the figures it derives (against hand-computed numbers), its refusal of
bad options, and a `--quick` run at its smallest setting in a subprocess (marked slow: nine cases, each a fresh
process importing torch, diffusers and transformers, take minutes on a 2-core machine)."""

import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_long  # noqa: E402

QUICK_CASES = ["context.16", "context.64", "context.144", "continuation.16", "continuation.64", "continuation.144",
               "diffusers.16", "diffusers.64", "diffusers.144"]


def test_quick_stops_at_144_frames_and_diffusers_skips_512_unless_asked():
    assert bench_long.cases_for(["--quick"]) == QUICK_CASES
    full = bench_long.cases_for([])
    assert full == ["context.16", "context.64", "context.144", "context.512", "continuation.16", "continuation.64",
                    "continuation.144", "continuation.512", "diffusers.16", "diffusers.64", "diffusers.144"]
    assert bench_long.cases_for(["--diffusers-512"])[-1] == "diffusers.512"
    assert bench_long.cases_for(["--quick", "--diffusers-512"]) == QUICK_CASES  # 512 is past --quick's counts


def figures(seconds: float, peak: int, frames: int) -> dict:
    return {"seconds": seconds, "seconds_per_frame": round(seconds / frames, 5), "peak": peak, "peak_rss": peak + 100,
            "frames": frames}


def test_summary_ratios_equal_hand_computed_numbers():
    runs = {
        "context.16": figures(2.0, 200, 16), "context.64": figures(8.0, 210, 64),
        "context.144": figures(18.0, 230, 144), "context.512": figures(64.0, 300, 512),
        "continuation.16": figures(2.0, 200, 16), "continuation.64": figures(10.0, 220, 64),
        "continuation.144": figures(25.0, 240, 144), "continuation.512": figures(90.0, 400, 512),
        "diffusers.16": figures(4.0, 250, 16), "diffusers.64": figures(16.0, 300, 64),
        "diffusers.144": figures(36.0, 400, 144),
    }
    options = Namespace(quick=False, size=None, steps=None, threads=1, diffusers_512=False)
    summary = bench_long.summarize(runs, options)
    assert summary["peak_ratio_144_16"] == 1.15  # 230 / 200
    assert summary["continuation_peak_ratio_144_16"] == 1.2  # 240 / 200
    assert summary["diffusers_peak_ratio_144_16"] == 1.6  # 400 / 250
    assert summary["meets_goal"] is True
    assert summary["peak_ratios_to_16"]["context"] == {"16": 1.0, "64": 1.05, "144": 1.15, "512": 1.5}
    assert summary["peak_ratios_to_16"]["continuation"]["512"] == 2.0
    assert summary["rss_peak_ratios_to_16"]["diffusers"]["144"] == round(500 / 350, 4)
    assert summary["time_ratio_to_diffusers"] == {"16": {"context": 0.5, "continuation": 0.5},
                                                  "64": {"context": 0.5, "continuation": 0.625},
                                                  "144": {"context": 0.5, "continuation": round(25 / 36, 4)}}
    assert summary["peak_ratio_to_diffusers"]["144"] == {"context": 0.575, "continuation": 0.6}
    assert set(summary["diffusers_skipped"]) == {"512"}
    assert summary["settings"]["size"] == 128 and summary["settings"]["steps"] == 1
    runs["context.144"] = figures(18.0, 251, 144)  # 251 / 200 = 1.255: past the goal
    assert bench_long.summarize(runs, options)["meets_goal"] is False


@pytest.mark.parametrize("argument", [["--size", "12"], ["--steps", "0"], ["--threads", "0"]])
def test_bad_options_stop_before_any_case(argument):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_long.py"), "--quick", *argument],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stdout == ""  # no case ran
    assert len(done.stderr.strip().splitlines()) == 1 and "must be" in done.stderr


@pytest.mark.slow
def test_quick_run_at_the_smallest_setting():
    size, overlap, window = 8, bench_long.OVERLAP, bench_long.WINDOW
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_long.py"), "--quick", "--size", str(size),
                           "--steps", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == QUICK_CASES  # one human line per case, then the JSON
    result = json.loads(lines[-1])
    cases = result["cases"]
    assert list(cases) == QUICK_CASES and result["reference"] == "context.16" and result["quick"] is True
    for name, case in cases.items():
        frames = int(name.split(".")[1])
        assert case["frames"] == frames
        assert case["seconds_per_frame"] == round(case["seconds"] / frames, 5)
        assert case["peak"] == case["peak_rss"] - case["library_rss"]
        assert case["peak"] >= case["model_rss"] > 0 and case["working_peak"] >= 0
    # Windows of 16 frames moving on by 16 - 4 (the last one aligned to the end), and segments: the first 16 frames,
    # then 16 - 4 new frames per segment.
    for frames in (16, 64, 144):
        assert cases[f"context.{frames}"]["windows"] == max(1, math.ceil((frames - overlap) / (window - overlap)))
        assert cases[f"continuation.{frames}"]["segments"] == 1 + math.ceil((frames - window) / (window - overlap))
    peak = {name: case["peak"] for name, case in cases.items()}
    assert result["peak_ratio_144_16"] == round(peak["context.144"] / peak["context.16"], 4)
    assert result["peak_ratio_144_16"] == result["ratios"]["context.144"]["peak"]
    assert result["continuation_peak_ratio_144_16"] == round(peak["continuation.144"] / peak["continuation.16"], 4)
    assert result["diffusers_peak_ratio_144_16"] == round(peak["diffusers.144"] / peak["diffusers.16"], 4)
    assert result["meets_goal"] == (result["peak_ratio_144_16"] <= 1.25)
    for frames in ("16", "64", "144"):
        seconds = {way: cases[f"{way}.{frames}"]["seconds"] for way in ("context", "continuation", "diffusers")}
        assert result["time_ratio_to_diffusers"][frames] == {
            "context": round(seconds["context"] / seconds["diffusers"], 4),
            "continuation": round(seconds["continuation"] / seconds["diffusers"], 4)}
    assert result["diffusers_skipped"] == {}
    assert (result["settings"]["size"], result["settings"]["steps"]) == (size, 1)
