"""benchmarks/bench_vae_decode.py: its cases, the figures it derives (against hand-computed numbers), and a `--quick`
run in subprocesses (marked slow: six cases, each a fresh process importing torch and diffusers)."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_vae_decode  # noqa: E402

QUICK_CASES = ["16.easyanimate", "16.kinema", "16.kinema_bf16", "48.easyanimate", "48.kinema", "48.kinema_bf16"]


def test_cases_per_setting():
    assert bench_vae_decode.cases(quick=True, bf16=True) == QUICK_CASES
    assert bench_vae_decode.cases(quick=False, bf16=True) == [c.replace("48.", "144.") for c in QUICK_CASES]
    assert bench_vae_decode.cases(quick=True, bf16=False) == [c for c in QUICK_CASES if "bf16" not in c]


def test_summary_equals_hand_computed_numbers():
    def case(seconds, cpu, peak, diff=None):
        return {"seconds": seconds, "cpu_seconds": cpu, "peak": peak} | ({} if diff is None else {"max_abs_diff": diff})

    runs = {"16.easyanimate": case(3.0, 2.0, 100), "16.kinema": case(2.0, 1.0, 80, 1e-6),
            "16.kinema_bf16": case(1.0, 0.5, 50, 1e-2), "144.easyanimate": case(30.0, 20.0, 200),
            "144.kinema": case(15.0, 8.0, 100, 2e-6), "144.kinema_bf16": case(6.0, 4.0, 60, 2e-2)}
    options = Namespace(quick=False, size=None, config="v3", layout="contiguous")
    summary = bench_vae_decode.summarize(runs, options)
    assert summary["speedup_by_frames"] == {"16": 1.5, "144": 2.0}
    assert summary["vae_decode_speedup_vs_easyanimate_design"] == 1.5  # the smaller of the two
    assert summary["cpu_speedup_by_frames"] == {"16": 2.0, "144": 2.5}
    assert summary["bf16_speedup_by_frames"] == {"16": 3.0, "144": 5.0}
    assert summary["max_abs_diff"] == {"16": 1e-6, "144": 2e-6}
    assert summary["bf16_max_abs_diff"] == {"16": 1e-2, "144": 2e-2}
    assert summary["peak_ratio_by_frames"] == {"16": 0.8, "144": 0.5}
    assert summary["settings"]["size"] == 64 and summary["settings"]["frames"] == [16, 144]
    assert summary["bf16_note"] is None
    without_bf16 = bench_vae_decode.summarize({k: v for k, v in runs.items() if "bf16" not in k}, options)
    assert without_bf16["bf16_speedup_by_frames"] is None and "bfloat16" in without_bf16["bf16_note"]
    assert without_bf16["speedup_by_frames"] == summary["speedup_by_frames"]


@pytest.mark.slow
def test_quick_run_decodes_equal_output_and_prints_every_figure():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_vae_decode.py"), "--quick"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    bf16 = result["bf16_note"] is None  # left out on CPUs without native bfloat16 convolutions
    assert [line.split()[0] for line in lines[:-1]] == [c for c in QUICK_CASES if bf16 or "bf16" not in c]
    assert (result["benchmark"], result["quick"]) == ("vae_decode", True)
    assert result["vae_decode_speedup_vs_easyanimate_design"] > 0
    for frames in ("16", "48"):
        # Equal output in float32 (a few ulps of outputs of size ~1); bfloat16 really ran in bfloat16.
        scale = result["cases"][f"{frames}.kinema"]["reference_abs_max"]
        assert result["max_abs_diff"][frames] <= 2e-5 * max(scale, 1.0)
        if bf16:
            assert result["max_abs_diff"][frames] < result["bf16_max_abs_diff"][frames]
        for side in bench_vae_decode.SIDES[:3 if bf16 else 2]:
            assert result["cases"][f"{frames}.{side}"]["peak"] > 0
