"""benchmarks/common.py: each case in its own subprocess, ratios to the reference, one JSON object printed last."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

# A tiny benchmark: case N holds N MiB of touched memory, so each case's peak RSS differs by what it allocated.
FAKE = f"""
import sys
sys.path.insert(0, {str(BENCHMARKS)!r})
from common import run_benchmark

def measure(case, options):
    held = b"x" * (int(case) * 2**20)
    return {{"mib": int(case), "quick": options.quick, "label": "fake", "held": len(held)}}

if __name__ == "__main__":
    run_benchmark("fake", "A fake benchmark.", cases=["1", "64"], reference="1", measure=measure)
"""


def test_prints_one_json_object_last_with_each_cases_own_peak(tmp_path):
    script = tmp_path / "bench_fake.py"
    script.write_text(FAKE)
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["1", "64"]  # one human line per case, then the JSON
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    assert (result["benchmark"], result["quick"], result["reference"]) == ("fake", True, "1")
    assert [result["cases"][case]["mib"] for case in ("1", "64")] == [1, 64]
    assert result["cases"]["64"]["quick"] is True  # options reach the subprocess
    assert result["ratios"]["64"]["mib"] == 64.0 and "label" not in result["ratios"]["64"]
    assert "quick" not in result["ratios"]["64"]  # booleans are not numbers to divide
    assert set(result["ratios"]) == {"64"}
    for figures in result["cases"].values():
        assert figures["seconds"] >= 0 and figures["max_rss"] > 0
    # A subprocess per case: the 64 MiB case's peak is its own, not the high-water mark of the whole run.
    assert result["cases"]["64"]["max_rss"] - result["cases"]["1"]["max_rss"] > 48 * 2**20


def test_a_failing_case_stops_the_run_with_its_error(tmp_path):
    script = tmp_path / "bench_broken.py"
    script.write_text(FAKE.replace('held = b"x"', 'raise RuntimeError("no such model"); held = b"x"'))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "case 1 failed" in done.stderr and "RuntimeError: no such model" in done.stderr
    assert done.stdout == ""
