"""benchmarks/bench_step_cache.py: which cases run, its summary against hand-computed numbers, its refusal of bad
options, and (slow: ten subprocesses importing torch and diffusers) a `--quick` run."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_step_cache  # noqa: E402

QUICK_MODES = ["off", "cache2", "cache3", "cfg0.6", "half_steps"]
QUICK_CASES = [f"{model}.{mode}" for model in ("tiny", "sd") for mode in QUICK_MODES]


def test_quick_leaves_out_the_combined_mode():
    assert bench_step_cache.cases_for(["--quick"]) == QUICK_CASES
    full = bench_step_cache.cases_for([])
    assert full == [f"{model}.{mode}" for model in ("tiny", "sd")
                    for mode in ("off", "cache2", "cache3", "cfg0.6", "cache2+cfg0.6", "half_steps")]
    options = Namespace(quick=False, steps=None)
    assert [bench_step_cache.sampling_steps(model, options) for model in ("tiny", "sd")] == [10, 25]
    assert bench_step_cache.sampling_steps("sd", Namespace(quick=True, steps=None)) == 10
    assert bench_step_cache.sampling_steps("sd", Namespace(quick=False, steps=4)) == 4


def test_summary_speedups_and_distances_equal_hand_computed_numbers(tmp_path):
    reference = torch.ones(1, 4, 2, 2, 2)  # norm 4
    latents = {"off": reference, "cache2": reference + 0.1, "half_steps": reference * 1.5}
    seconds = {"off": 10.0, "cache2": 8.0, "half_steps": 5.0}
    cases = {}
    for model in ("tiny", "sd"):
        for mode, value in latents.items():
            save_file({"latents": value}, str(tmp_path / f"{model}.{mode}.safetensors"))
            cases[f"{model}.{mode}"] = {"seconds": seconds[mode], "steps": 10}
    options = Namespace(latents_dir=str(tmp_path), threads=1, quick=True)
    summary = bench_step_cache.summarize(cases, options)
    for model in ("tiny", "sd"):
        figures = summary["models"][model]
        assert figures["speedup"] == {"cache2": 1.25, "half_steps": 2.0}
        # ||0.1 * ones(16)|| / ||ones(16)|| = 0.1; ||0.5 * ones(16)|| / 4 = 0.5
        assert figures["relative_l2"] == pytest.approx({"cache2": 0.1, "half_steps": 0.5}, abs=1e-5)
        assert figures["steps"] == 10
    assert summary["settings"]["threads"] == 1 and summary["settings"]["scheduler"] == "ddim"


@pytest.mark.parametrize("argument, message", [(["--steps", "1"], "--steps must be at least 2"),
                                               (["--threads", "0"], "--threads must be at least 1")])
def test_bad_options_stop_before_any_case(argument, message):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_step_cache.py"), "--quick", *argument],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stdout == ""  # no case ran
    assert done.stderr.strip().splitlines() == [f"bench_step_cache: {message}, got {argument[1]}"]


@pytest.mark.slow
def test_quick_run_prints_every_figure():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_step_cache.py"), "--quick", "--steps", "4"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == QUICK_CASES
    result = json.loads(lines[-1])
    assert (result["benchmark"], result["quick"], result["reference"]) == ("step_cache", True, "tiny.off")
    cases = result["cases"]
    for name, case in cases.items():
        mode = name.split(".", 1)[1]
        assert case["steps"] == (2 if mode == "half_steps" else 4) == case["model_calls"]
        # 4 steps at interval 2: full at 0 and 2; at interval 3: full at 0 and 3.
        assert case["model_calls_reused"] == {"cache2": 2, "cache3": 2}.get(mode, 0)
    for model in ("tiny", "sd"):
        figures = result["models"][model]
        assert set(figures["speedup"]) == set(figures["relative_l2"]) == set(QUICK_MODES) - {"off"}
        assert figures["speedup"]["cache2"] == round(cases[f"{model}.off"]["seconds"]
                                                     / cases[f"{model}.cache2"]["seconds"], 4)
        # Truncated guidance moves the result least; caching less than halving the steps does.
        distance = figures["relative_l2"]
        assert 0 < distance["cfg0.6"] < distance["cache2"] < distance["half_steps"]
