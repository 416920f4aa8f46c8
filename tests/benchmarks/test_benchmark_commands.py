"""benchmarks/common.py's `run_command` and `kinema_command`: a command's wall time, its own peak memory (not the
highest of every child so far) and what it printed."""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from common import kinema_command, run_command  # noqa: E402

MIB = 2**20

# Run from a fresh, small Python: Linux counts the caller's peak in a child until it execs, and pytest's process
# (torch imported) is bigger than these children. A big command first, then a small one.
CALLER = f"""
import json, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
from common import run_command

big = run_command([sys.executable, "-c", "import sys; held = b'x' * (96 * 2**20); print('out'); "
                   "print('err', file=sys.stderr); sys.exit(3)"])
small = run_command([sys.executable, "-c", "import os; print(os.getcwd())"], cwd=sys.argv[1])
print(json.dumps([big.__dict__, small.__dict__]))
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_each_command_reports_its_own_peak_and_what_it_printed(tmp_path):
    done = run_command([*python(CALLER), str(tmp_path)])
    assert done.returncode == 0, done.stderr
    big, small = json.loads(done.stdout)
    assert (big["returncode"], big["stdout"], big["stderr"]) == (3, "out\n", "err\n")
    assert big["max_rss"] >= 96 * MIB  # the bytes it touched, whatever the interpreter adds
    # The small command's peak is its own, not the high-water mark of every child so far.
    assert small["returncode"] == 0 and small["stdout"].strip() == str(tmp_path)
    assert small["max_rss"] < big["max_rss"] - 80 * MIB


def test_wall_seconds_and_environment():
    done = run_command(python("import os, time; time.sleep(0.3); print(os.environ['BENCH_PROBE'])"),
                       env={"BENCH_PROBE": "seen"})
    assert done.stdout == "seen\n" and 0.3 <= done.seconds < 30


def test_kinema_command_runs_this_environments_kinema():
    command = kinema_command()
    assert Path(command[0]).is_file()
    done = run_command([*command, "--version"])
    assert done.returncode == 0 and done.stdout.startswith("kinema ")
