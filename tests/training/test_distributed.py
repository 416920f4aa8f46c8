"""Data-parallel training in two CPU processes (accelerate, gloo): both ranks end with identical weights, equal to a
one-process computation of what data parallelism means (each rank's half of the global batch, gradients averaged,
then clipping and AdamW), and only rank 0 writes the run folder.

The processes come from `accelerate launch --multi_gpu --num_processes 2`; on a machine without CUDA the trainer puts
them on the CPU, where accelerate joins them over gloo. (With accelerate 1.15, `accelerate launch --cpu
--num_processes 2` starts a single process: its several-CPU-processes path is mpirun's, from an `accelerate config`
hostfile.)

Each launch starts two interpreters (torch, diffusers, accelerate: ~25 s on a loaded 2-core machine).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kinema.training.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("distributed_run.py")
STEPS = 3
PROCESSES = 2
LAUNCH_TIMEOUT = 180.0  # seconds


def write_run_config(folder: Path, sd_model: dict[str, Path], data_root: Path) -> Path:
    """A motion run of STEPS steps, one clip per process per step, a checkpoint after every step."""
    values = {
        "mode": "motion", "output": str(folder / "run"), "seed": 0,
        "model": {"path": str(sd_model["path"]), "motion_module": str(sd_model["motion_module"])},
        "data": {"root": str(data_root), "frames": 4, "size": [16, 16], "text_dropout": 0.0},
        "train": {"steps": STEPS, "batch_size": 1, "learning_rate": 1e-3, "lr_schedule": "constant",
                  "max_grad_norm": 1.0},
        "checkpoint": {"every": 1, "keep": 2},
        "log": {"every": 1, "tensorboard": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(config: Path, prefix: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of distributed_run.py in PROCESSES CPU processes."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate)] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    command += ["launch", "--multi_gpu", "--num_processes", str(PROCESSES), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                str(SCRIPT), str(config), str(prefix)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def rank_outputs(prefix: Path) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    return [(json.loads(Path(f"{prefix}-rank{rank}.json").read_text()), load_file(f"{prefix}-rank{rank}.safetensors"))
            for rank in range(PROCESSES)]


def data_parallel_reference(config) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """(start weights, weights after STEPS steps, mean loss per step) of PROCESSES-way data parallelism computed in
    this one process: each step, rank r's micro-batch and noise, per-rank gradients averaged, clipped, AdamW."""
    from kinema.data.dataset import TrainBatches
    from kinema.training.tasks import make_task
    from kinema.training.trainer import _batch_order, _dataset, step_seed

    task = make_task(config)
    named = task.trainable_parameters()
    parameters = [p for _, p in named]
    start = {name: p.detach().clone() for name, p in named}
    dataset = _dataset(config)
    order = _batch_order(config, dataset, PROCESSES)
    train = config.train
    optimizer = torch.optim.AdamW(parameters, lr=train.learning_rate, betas=tuple(train.adam_betas),
                                  eps=train.adam_eps, weight_decay=train.weight_decay)
    losses = []
    for step in range(STEPS):
        gradients, rank_losses = [], []
        for rank in range(PROCESSES):
            batch = TrainBatches(dataset, order, rank=rank, start=step)[0]
            generator = torch.Generator().manual_seed(step_seed(config.seed, step, rank))
            loss = task.module(**task.inputs(batch, generator))
            gradients.append(torch.autograd.grad(loss, parameters))
            rank_losses.append(float(loss.detach()))
        for index, parameter in enumerate(parameters):
            parameter.grad = sum(g[index] for g in gradients) / PROCESSES
        torch.nn.utils.clip_grad_norm_(parameters, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(sum(rank_losses) / PROCESSES)
    return start, {name: p.detach().clone() for name, p in named}, losses


def test_two_processes_end_with_identical_weights_equal_to_averaged_gradients(tmp_path, sd_model, synth_videos):
    config_path = write_run_config(tmp_path, sd_model, synth_videos)
    prefix = tmp_path / "weights"
    done = launch(config_path, prefix)
    assert done.returncode == 0, done.stderr[-4000:]
    (record0, weights0), (record1, weights1) = rank_outputs(prefix)

    assert [record0["rank"], record1["rank"]] == [0, 1] and record0["world"] == record1["world"] == PROCESSES
    assert record0["is_main"] and not record1["is_main"]
    assert weights0.keys() == weights1.keys() and len(weights0) > 10
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0), "the ranks' weights differ"
    # The reduced loss each rank reports is the same number.
    assert record0["losses"] == record1["losses"] and len(record0["losses"]) == STEPS

    start, expected, expected_losses = data_parallel_reference(load_config(config_path))
    assert expected.keys() == weights0.keys()
    changed = [k for k in start if not torch.equal(start[k], weights0[k])]
    assert len(changed) > len(start) // 2, f"only {len(changed)} of {len(start)} weights changed"
    worst = max(float((weights0[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, f"the ranks' weights are {worst} from the averaged-gradient reference"
    assert record0["losses"] == pytest.approx(expected_losses, rel=1e-5)

    # Only rank 0 wrote: a checkpoint per step (the newest two kept), one export, one log row per step.
    assert record0["checkpoints"] == [1, 2, 3] and len(record0["exports"]) == 1
    assert record1["checkpoints"] == [] and record1["exports"] == []
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert (run / "final" / "motion_module.safetensors").is_file()
    with (run / "logs.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows] == ["1", "2", "3"]
    assert [float(row["loss"]) for row in rows] == pytest.approx(record0["losses"], rel=1e-6)
    checkpointed = load_file(run / "checkpoints" / "step-00000003" / "model.safetensors")
    assert all(torch.equal(checkpointed[k], weights0[k]) for k in weights0)


@pytest.mark.slow
def test_the_weight_comparison_catches_processes_that_do_not_average(tmp_path, sd_model, synth_videos):
    # The same run with accelerate's prepare handing the module back unwrapped (no DDP): each rank steps on its own
    # half of the batch, so the weights must part.
    config_path = write_run_config(tmp_path, sd_model, synth_videos)
    prefix = tmp_path / "weights"
    done = launch(config_path, prefix, {"KINEMA_TEST_UNWRAPPED": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    (_, weights0), (_, weights1) = rank_outputs(prefix)
    assert any(not torch.equal(weights0[k], weights1[k]) for k in weights0)
