"""A training run killed with SIGKILL three times and resumed with `--resume latest` ends bit-identical to one never
interrupted, and no kill ever leaves a checkpoint that looks complete but is not.

Every run is a `python -m kinema train` subprocess with the same environment (one OpenMP thread, deterministic
mode), the uninterrupted reference included, so that both see equal conditions. The kills land at steps drawn from
a seeded generator, each after the run has logged a drawn step: two after a random part of a step's time (landing in
the save of that step, the next step's maths or its log row), one while a checkpoint is being written (the child is
frozen with SIGSTOP the moment a save's hidden temporary appears, and killed only if the save is still unfinished).

Four interpreter starts (~15-20 s each on a loaded 2-core machine: torch, diffusers, accelerate) make this ~100 s,
so it is marked slow: run it with `pytest -m slow tests/training/test_kill_resume.py`.

The file also checks, in the default suite, that SIGTERM or Ctrl-C sent to the whole process group (as a terminal
does) still lets a run with DataLoader workers finish its step and save it.
"""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kinema.fileio import output_kind
from kinema.training.checkpoint import CHECKPOINT_KIND, CHECKPOINTS, RunFolder

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
EVERY = 2
KEEP = 2
KILLS = 3
KILL_SEED = 20240607
RUN_TIMEOUT = 400.0  # seconds one run may take before the test gives up on it

CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
PART_NAME = re.compile(r"^\.step-(\d{8})\.kinema-part-(\d+)$")  # fileio's temporary of a save or a prune


def run_config(folder: Path, sd_model: dict[str, Path], data_root: Path) -> Path:
    """A motion run where every piece of resumable state matters: EMA, accumulation, warm-up then cosine decay,
    clipping, weight decay, caption dropout and flips."""
    values = {
        "mode": "motion", "output": str(folder / "run"), "seed": 3,
        "model": {"path": str(sd_model["path"]), "motion_module": str(sd_model["motion_module"])},
        "data": {"root": str(data_root), "frames": 4, "size": [16, 16], "text_dropout": 0.5, "flip": True},
        "train": {"steps": STEPS, "batch_size": 2, "gradient_accumulation": 2, "learning_rate": 2e-3,
                  "lr_schedule": "cosine", "warmup_steps": 3, "ema_decay": 0.9, "max_grad_norm": 0.5,
                  "deterministic": True},
        "checkpoint": {"every": EVERY, "keep": KEEP},
        "log": {"every": 1, "tensorboard": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def start(config: Path, resume: bool) -> subprocess.Popen:
    """`kinema train CONFIG [--resume latest]` in its own process, output kept beside the config."""
    args = [sys.executable, "-m", "kinema", "train", str(config), "--no-progress"]
    if resume:
        args += ["--resume", "latest"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    index = len(list(config.parent.glob("stdout-*.txt")))
    stdout = (config.parent / f"stdout-{index}.txt").open("w")
    stderr = (config.parent / f"stderr-{index}.txt").open("w")
    try:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
    finally:  # the child holds its own copies
        stdout.close()
        stderr.close()


def failure(config: Path, what: str) -> str:
    """`what`, with the stderr tail of the newest process of the run, for a failed assertion."""
    logs = sorted(config.parent.glob("stderr-*.txt"), key=lambda p: int(p.stem.split("-")[1]))
    tail = logs[-1].read_text()[-3000:] if logs else ""
    return f"{what}\n--- stderr of the last process ---\n{tail}"


def complete_steps(run: Path) -> list[int]:
    """Steps of the checkpoints kinema finished writing (their manifest says so), ascending."""
    return [step for step, _ in RunFolder(run, "", KEEP).checkpoints()]


def save_in_progress(checkpoints: Path, pid: int) -> bool:
    """Whether process `pid` is writing a checkpoint now: its hidden temporary exists for a step that has no
    complete folder yet (a prune's temporary names a step whose folder has just been renamed away: that counts
    too), or a visible step folder lacks its manifest."""
    try:
        names = os.listdir(checkpoints)
    except FileNotFoundError:
        return False
    for name in names:
        part = PART_NAME.match(name)
        if part and int(part[2]) == pid:
            return True
        if CHECKPOINT_NAME.match(name) and output_kind(checkpoints / name) != CHECKPOINT_KIND:
            return True
    return False


def wait_for(process: subprocess.Popen, condition, config: Path, what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not condition():
        assert process.poll() is None, failure(config, f"the run exited (code {process.returncode}) before {what}")
        assert time.monotonic() < deadline, failure(config, f"no {what} after {RUN_TIMEOUT} s")
        time.sleep(0.001)


def logged_steps(run: Path) -> list[int]:
    """The steps logs.csv has whole rows for (a killed run may leave half a line)."""
    try:
        with (run / "logs.csv").open(newline="") as file:
            return [int(row["step"]) for row in csv.DictReader(file) if None not in row.values()]
    except FileNotFoundError:
        return []


def step_seconds(run: Path) -> float:
    """The median time of a step so far, from logs.csv (the first step includes warm-up)."""
    with (run / "logs.csv").open(newline="") as file:
        seconds = sorted(float(row["seconds"]) for row in csv.DictReader(file) if None not in row.values())
    return seconds[len(seconds) // 2]


def kill_mid_save(process: subprocess.Popen, run: Path, config: Path) -> None:
    """Kill the run while a checkpoint save (or the prune after it) is unfinished. The child is frozen with SIGSTOP
    as soon as one shows and killed only if it is still unfinished once frozen; otherwise it goes on to the next."""
    checkpoints = run / CHECKPOINTS
    while True:
        wait_for(process, lambda: save_in_progress(checkpoints, process.pid), config, "a checkpoint save")
        process.send_signal(signal.SIGSTOP)
        time.sleep(0.05)  # the stop is delivered asynchronously
        if save_in_progress(checkpoints, process.pid):
            process.send_signal(signal.SIGKILL)
            return
        process.send_signal(signal.SIGCONT)


def check_after_kill(run: Path, killed: list[int]) -> int:
    """Everything under checkpoints/ is a complete, loadable checkpoint or a hidden temporary of a killed process;
    returns the newest complete step."""
    names = sorted(os.listdir(run / CHECKPOINTS)) if (run / CHECKPOINTS).is_dir() else []
    folder = RunFolder(run, "", KEEP)
    steps = []
    for name in names:
        part = PART_NAME.match(name)
        if part:
            assert int(part[2]) in killed, f"{name} is a temporary of a process that was not killed"
            continue
        match = CHECKPOINT_NAME.match(name)
        assert match, f"unexpected entry {name} in {run / CHECKPOINTS}"
        assert output_kind(run / CHECKPOINTS / name) == CHECKPOINT_KIND, f"{name} was left half-written"
        loaded = folder.load(run / CHECKPOINTS / name)
        assert loaded.step == int(match[1]) == loaded.state["step"]
        assert sorted(loaded.tensors) == ["ema", "model"] and loaded.tensors["model"].keys() == \
            loaded.tensors["ema"].keys()
        steps.append(loaded.step)
    assert steps == complete_steps(run)
    # a kill between a save and the prune after it leaves one checkpoint more than `keep`
    assert len(steps) <= KEEP + 1, steps
    assert set(os.listdir(run)) <= {"kinema-run.json", "logs.csv", CHECKPOINTS}, sorted(os.listdir(run))
    return max(steps, default=0)


def log_rows(run: Path) -> list[dict[str, str]]:
    with (run / "logs.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def trained_state(run: Path) -> dict[str, object]:
    """The last checkpoint's weights, EMA and state, and the exported motion module's bytes."""
    last = run / CHECKPOINTS / f"step-{STEPS:08d}"
    return {"model": load_file(last / "model.safetensors"), "ema": load_file(last / "ema.safetensors"),
            "state": torch.load(last / "state.pt", map_location="cpu", weights_only=True),
            "export": (run / "final" / "motion_module.safetensors").read_bytes()}


def assert_equal(expected: object, got: object, where: str) -> None:
    """Bit-identical nested state: tensors by torch.equal (dtype and shape included), everything else by ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and expected.dtype == got.dtype and torch.equal(expected, got), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and expected.keys() == got.keys(), where
        for key in expected:
            assert_equal(expected[key], got[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_equal(a, b, f"{where}[{index}]")
    else:
        assert expected == got, f"{where}: {expected!r} != {got!r}"


@pytest.mark.slow
def test_three_sigkills_and_resumes_end_bit_identical_to_an_uninterrupted_run(tmp_path, sd_model, synth_videos):
    draw = random.Random(KILL_SEED)
    # Each kill comes after the run logs step `after` (and past whatever an earlier killed process logged, so that
    # its stale rows cannot trigger it); a kill overshoots by at most ~2 steps, so drawing from 1..6 leaves steps
    # to run after the third.
    kill_after = sorted(draw.sample(range(1, STEPS - 5), KILLS))
    mid_save = draw.randrange(KILLS)  # the kill aimed at an unfinished checkpoint save
    # the others wait up to one step: the save of the logged step (when it has one), the next step, its log row
    fractions = [draw.uniform(0.0, 1.0) for _ in range(KILLS)]

    reference_config = run_config(tmp_path / "reference", sd_model, synth_videos)
    killed_config = run_config(tmp_path / "killed", sd_model, synth_videos)
    reference_run, killed_run = reference_config.parent / "run", killed_config.parent / "run"
    # The reference runs beside the killed one: the results depend on neither timing nor load.
    reference = start(reference_config, resume=False)
    processes = [reference]
    killed_pids: list[int] = []
    latest = 0
    try:
        for index in range(KILLS):
            stale = max(logged_steps(killed_run), default=0)
            process = start(killed_config, resume=index > 0)
            processes.append(process)
            after = max(kill_after[index], stale + 1)
            wait_for(process, lambda step=after: step in logged_steps(killed_run), killed_config, f"step {after}")
            if index == mid_save:
                kill_mid_save(process, killed_run, killed_config)
            else:
                time.sleep(fractions[index] * step_seconds(killed_run))
                process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL, failure(killed_config, "the run ended before its kill")
            killed_pids.append(process.pid)
            latest = check_after_kill(killed_run, killed_pids)
            if index == mid_save:
                leftovers = [name for name in os.listdir(killed_run / CHECKPOINTS)
                             if (m := PART_NAME.match(name)) and int(m[2]) == process.pid]
                assert leftovers, "the kill aimed at a save left no unfinished save behind"
        last = start(killed_config, resume=True)
        processes.append(last)
        assert last.wait(timeout=RUN_TIMEOUT) == 0, failure(killed_config, "the last resume failed")
        assert reference.wait(timeout=RUN_TIMEOUT) == 0, failure(reference_config, "the reference run failed")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    printed = (killed_config.parent / f"stdout-{KILLS}.txt").read_text()
    assert f"trained steps {latest}..{STEPS}," in printed, printed

    # One log row per step, in order, each equal to the uninterrupted run's (the timings aside).
    compared = ("step", "loss", "lr", "grad_norm")
    expected_rows, rows = log_rows(reference_run), log_rows(killed_run)
    assert [row["step"] for row in rows] == [str(step) for step in range(1, STEPS + 1)]
    assert [[row[k] for k in compared] for row in rows] == [[row[k] for k in compared] for row in expected_rows]

    # The trained weights, their EMA, the optimiser and LR schedule states, and the export: bit-identical.
    expected, got = trained_state(reference_run), trained_state(killed_run)
    assert expected["export"] == got["export"]
    assert_equal(expected["model"], got["model"], "model")
    assert_equal(expected["ema"], got["ema"], "ema")
    # The global RNG states too (what model dropout would draw from): the run seeds them, a resume puts them back,
    # and nothing after that draws from them but the steps.
    assert expected["state"].keys() == got["state"].keys() == {"step", "optimizer", "lr_schedule", "rng", "ema"}
    assert_equal(expected["state"], got["state"], "state.pt")
    # the next saves removed the killed processes' temporaries and pruned to the newest `keep`
    kept = [f"step-{step:08d}" for step in range(STEPS - (KEEP - 1) * EVERY, STEPS + 1, EVERY)]
    assert sorted(os.listdir(killed_run / CHECKPOINTS)) == kept
    # the comparison is not vacuous: training moved the weights between the two kept checkpoints
    before = load_file(reference_run / CHECKPOINTS / kept[0] / "model.safetensors")
    assert any(not torch.equal(before[k], expected["model"][k]) for k in before)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_sent_to_the_process_group_with_dataloader_workers_still_saves_the_step(
        tmp_path, sd_model, synth_videos, signum, code):
    # A terminal's Ctrl-C, or `kill -- -PGID`, reaches the DataLoader workers too; a worker that died of it used to
    # fail the main process mid-step ("DataLoader worker exited unexpectedly") before its deferred save.
    config = run_config(tmp_path, sd_model, synth_videos)
    values = yaml.safe_load(config.read_text())
    values["data"]["num_workers"] = 2
    values["train"].update(steps=400, gradient_accumulation=1)
    values["checkpoint"] = {"every": 1000, "keep": 1}  # the stop's own save is the only one
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    logs = tmp_path / "run" / "logs.csv"
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "kinema", "train", str(config), "--no-progress"], cwd=REPO,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                 stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (logs.is_file() and len(logs.read_text().splitlines()) > 3):
            assert child.poll() is None, stderr_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "the run logged no steps"
            time.sleep(0.05)
        os.killpg(child.pid, signum)  # the main process and its workers, as a terminal does
        returncode = child.wait(timeout=RUN_TIMEOUT)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    err = stderr_path.read_text()
    assert returncode == code, err[-2000:]
    assert "exited unexpectedly" not in err and "Traceback" not in err, err[-2000:]
    logged = len(logs.read_text().splitlines()) - 1
    # The step the signal fell in finished and was saved: the last logged step has its checkpoint.
    assert sorted(path.name for path in (tmp_path / "run" / CHECKPOINTS).iterdir()) == [f"step-{logged:08d}"]
