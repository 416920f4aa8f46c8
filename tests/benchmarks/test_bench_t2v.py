"""benchmarks/bench_t2v.py --quick: the tiny config's four cases run, kinema's frames equal diffusers' and the JSON
last line carries the figures the benchmark promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_t2v.py"
CASES = ["tiny.kinema.float32", "tiny.diffusers.float32", "tiny.kinema.bfloat16", "tiny.diffusers.bfloat16"]
PER_CONFIG = ["kinema_s_per_step", "diffusers_s_per_step", "speedup", "max_abs_diff", "kinema_bf16_s_per_step",
              "diffusers_bf16_s_per_step", "speedup_bf16", "max_abs_diff_bf16", "diffusers_autocast_max_abs_diff"]


@pytest.mark.slow  # four model-building subprocesses; bfloat16 takes slow kernels on CPUs without native support
def test_quick_run_prints_every_figure_and_the_frames_match():
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == CASES  # one line per case, then the JSON
    result = json.loads(lines[-1])
    assert (result["benchmark"], result["quick"]) == ("t2v", True)
    assert set(result["cases"]) == set(CASES) and list(result["configs"]) == ["tiny"]
    tiny = result["configs"]["tiny"]
    assert set(PER_CONFIG) <= set(tiny)
    for key in ("kinema_s_per_step", "diffusers_s_per_step", "kinema_bf16_s_per_step", "diffusers_bf16_s_per_step"):
        assert tiny[key] > 0
    assert tiny["speedup"] == pytest.approx(tiny["diffusers_s_per_step"] / tiny["kinema_s_per_step"], rel=1e-3)
    assert tiny["speedup_bf16"] == pytest.approx(tiny["diffusers_bf16_s_per_step"] / tiny["kinema_bf16_s_per_step"],
                                                 rel=1e-3)
    # Parity on identical weights, noise and scheduler; the bfloat16 runs really ran in bfloat16 (further off).
    assert tiny["max_abs_diff"] <= 1e-3
    assert tiny["max_abs_diff"] < tiny["max_abs_diff_bf16"] <= 0.1
    assert tiny["settings"]["kinema_dtypes"] == ["float32", "bfloat16"]
    for case in CASES:
        figures = result["cases"][case]
        assert figures["peak_rss"] > 0 and figures["max_rss"] >= figures["peak_rss"]
        assert len(figures["step_seconds"]) == 4 * figures["runs"]


@pytest.mark.slow  # two model-building subprocesses
def test_quick_run_with_a_controlnet_matches_diffusers_controlnet_pipeline():
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--controlnet", "--precisions", "float32"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    tiny = result["configs"]["tiny"]
    assert set(result["cases"]) == {"tiny.kinema.float32", "tiny.diffusers.float32"}
    assert tiny["settings"]["controlnet"] is True
    assert tiny["kinema_s_per_step"] > 0 and tiny["diffusers_s_per_step"] > 0
    assert tiny["max_abs_diff"] <= 1e-3  # kinema's VideoControlNet and diffusers' pipeline make the same frames
