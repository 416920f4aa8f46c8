"""The training loop: one flat loop for every mode, on accelerate (one process, or data parallel over many).

A step is a pure function of the weights, the optimiser state and the step number: its batches come from
`BatchOrder` (a function of the seed and the micro-step) and every random draw of the loss (timesteps, noise, masks)
from a generator seeded with `(seed, micro-step, rank)`. A checkpoint therefore only needs the weights, the
optimiser, the LR schedule, the EMA and the step; a run killed anywhere and resumed from its last checkpoint ends
with the same weights, bit for bit, as one never interrupted (CPU, deterministic algorithms). Stopped by Ctrl-C,
SIGTERM or SIGHUP in one process, it finishes the step under way and saves a checkpoint there, so no finished step
is lost.

The run folder (`output:`) holds `kinema-run.json` (the config and its fingerprint), `checkpoints/step-N/` (each
written whole or not at all; the newest `checkpoint.keep` kept), `logs.csv`, `tensorboard/`, `validation/step-N/`
and, at the end, `final/` with the trained weights in the formats other tools load.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.interrupt import ignore_stop_signals, stop_if_requested, stop_requested, stops_deferred
from kinema.training.config import TrainConfig, resume_identity, validation_request, with_new_defaults

logger = logging.getLogger(__name__)

_clock = time.monotonic  # the time limit's clock (a seam for tests)
LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "seconds", "clips_per_second")


@dataclass
class TrainResult:
    """What a run did: the steps run in this call, the last loss, where things are."""

    run_folder: Path | None
    start_step: int
    end_step: int
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    final: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    task: Any = None  # the TrainingTask, with the trained model in memory
    is_main: bool = True  # whether this process is the main one (the one that writes)
    time_limited: bool = False  # the time limit ended the run before train.steps


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """The seed of micro-step `micro_step` on process `rank`: independent streams for every step and process
    (micro-step -1: the process's global generator)."""
    return int(np.random.SeedSequence((seed, micro_step + 1, rank)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _dataset(config: TrainConfig) -> Any:
    from kinema.data.dataset import VideoTextDataset

    data = config.data
    size = (int(data.size[0]), int(data.size[1]))
    buckets = [(b[0], b[1], b[2]) for b in data.buckets] if data.buckets else None
    return VideoTextDataset(data.root, data.metadata, frames=data.frames, stride=data.stride, size=size,
                            image_frames=data.image_frames, text_dropout=data.text_dropout, flip=data.flip,
                            max_missing_fraction=data.max_missing_fraction, seed=config.seed,
                            random_crop=data.random_crop, decode_timeout=data.decode_timeout, buckets=buckets)


def _batch_order(config: TrainConfig, dataset: Any, world_size: int) -> Any:
    from kinema.data.sampler import BatchOrder

    groups = dataset.groups()
    image_groups = {g for g in groups if g[0] == "image"}
    return BatchOrder(groups, config.train.batch_size, config.seed, world_size=world_size,
                      image_ratio=config.data.image_ratio, image_groups=image_groups)


def _batches(config: TrainConfig, dataset: Any, order: Any, rank: int, start_micro_step: int) -> Iterator[dict]:
    from torch.utils.data import DataLoader

    from kinema.data.dataset import TrainBatches

    source = TrainBatches(dataset, order, rank=rank, start=start_micro_step)
    workers = config.data.num_workers
    # Its own generator: the loader draws its workers' base seed when it starts, and that draw must not move the
    # global generator a resumed run has just put back.
    loader = DataLoader(source, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False,
                        prefetch_factor=2 if workers else None, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(step_seed(config.seed, start_micro_step, rank)))
    return iter(loader)


def _data_report(dataset: Any) -> dict[str, Any]:
    types = [entry["type"] for entry in dataset.entries]
    return {"clips": len(types), "videos": types.count("video"), "images": types.count("image"),
            "root": str(dataset.root)}


def _optimizer_and_schedule(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> tuple[Any, Any]:
    from diffusers.optimization import get_scheduler

    train = config.train
    optimizer = torch.optim.AdamW(parameters, lr=train.learning_rate, betas=(train.adam_betas[0], train.adam_betas[1]),
                                  eps=train.adam_eps, weight_decay=train.weight_decay)
    schedule = get_scheduler(train.lr_schedule, optimizer, num_warmup_steps=train.warmup_steps,
                             num_training_steps=train.steps)
    return optimizer, schedule


class _Ema:
    """Exponential moving average of the trainable weights (diffusers' EMAModel), kept by name for checkpoints."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float):
        from diffusers.training_utils import EMAModel

        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        self.ema = EMAModel(self.parameters, decay=decay)

    def step(self) -> None:
        self.ema.step(self.parameters)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.ema.shadow_params, strict=True))

    def counters(self) -> dict[str, int]:
        return {"optimization_step": int(self.ema.optimization_step)}

    def load(self, tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> None:
        for name, shadow in zip(self.names, self.ema.shadow_params, strict=True):
            shadow.copy_(tensors[name])
        self.ema.optimization_step = counters["optimization_step"]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the block (validation, export), the trained ones back afterwards."""
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)


# ---------------------------------------------------------------- logs


class _Logs:
    """logs.csv (one row per logged step) and TensorBoard, both cut back to the resumed step on resume."""

    def __init__(self, folder: Path, start_step: int, tensorboard: bool):
        self.path = folder / "logs.csv"
        rows: list[dict[str, str]] = []
        if self.path.exists():
            with self.path.open(newline="") as file:
                for row in csv.DictReader(file):
                    # A killed run may have logged past its last checkpoint, or died mid-line.
                    if None not in row.values() and row.get("step", "").isdigit() and int(row["step"]) <= start_step:
                        rows.append(row)
        # Rewritten beside and renamed over, so a kill now cannot lose the rows up to the resumed step.
        fresh = self.path.with_name(f".{self.path.name}.kinema-part-{os.getpid()}")
        with fresh.open("w", newline="") as file:
            writer = csv.DictWriter(file, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(fresh, self.path)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                logger.warning("TensorBoard logs need the tensorboard package (pip install 'kinema[train]'); "
                               "writing logs.csv only")

    def write(self, values: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as file:
            csv.DictWriter(file, LOG_FIELDS).writerow({k: values.get(k, "") for k in LOG_FIELDS})
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "clips_per_second"):
                if values.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", values[key], int(values["step"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------- checks before step 1


# The key of the data's fingerprint in a run's record; runs started before it recorded "data.root", every file
# under the folder, which a README or a clip staged for another run changed too (those resume unchecked).
DATA_FINGERPRINT = "data.root's metadata and the files it lists"


def _input_fingerprints(config: TrainConfig) -> dict[str, str]:
    """What the run reads, fingerprinted so that a resume on a replaced model or dataset is refused: the model and
    motion module by their files' names, sizes and first and last MiB (kinema.fileio.files_fingerprint), the data
    by its metadata's entries and the sizes of the files they list (a dataset made again differs in its clips'
    sizes); other files in the data folder, and the metadata file's layout, are not the data."""
    from kinema.bundled import resolve_model
    from kinema.fileio import files_fingerprint

    found = {"model.path": files_fingerprint(resolve_model(config.model.path), 2**20),
             DATA_FINGERPRINT: _data_fingerprint(Path(config.data.root), config.data.metadata)}
    if config.model.motion_module:
        found["model.motion_module"] = files_fingerprint(config.model.motion_module, 2**20)
    return found


def _data_fingerprint(root: Path, metadata: str) -> str:
    """A SHA-256 over the metadata's entries (as JSON reads them) and the size of each file they list (-1: missing)."""
    import hashlib

    from kinema.data.dataset import read_metadata_entries

    digest = hashlib.sha256()
    for entry in read_metadata_entries(root, metadata):
        path = root / entry["file_path"]
        size = path.stat().st_size if path.is_file() else -1
        digest.update(json.dumps(entry, sort_keys=True).encode() + f"\0{size}\0".encode())
    return digest.hexdigest()


def _check_frame_counts(config: TrainConfig, task: Any) -> None:
    """Every frame count the run feeds its model (clips, images made clips, validation videos), checked before
    step 1 and said with the setting that gives it: a count the VAE cannot take failed at the first batch of its
    kind, images or validation many steps in."""
    counts = {"data.frames": config.data.frames}
    for index, (_, _, frames) in enumerate(config.data.buckets or ()):  # clips of a bucket are read at its count
        counts[f"data.buckets[{index}]'s frame count"] = frames
    if config.data.image_ratio != 0:
        counts["data.image_frames"] = config.data.image_frames
    if config.validation.every and task.family is not None:
        counts["validation.frames"] = config.validation.frames or config.data.frames
    for key, frames in counts.items():
        try:
            task.check_frames(frames, at_once=key != "validation.frames")
        except KinemaError as err:
            raise KinemaError(f"{key} is {frames}, which this model cannot take: {err}") from None


def _check_memory(config: TrainConfig, task: Any, dataset: Any, order: Any, device: Any) -> Any:
    """Estimate the memory of a step from one probe clip of the run's largest shape and refuse, before step 1, a
    batch that cannot fit."""
    from kinema.training.estimate import check_memory, estimate_training_memory

    group, indices = _largest_group(dataset, order)
    probe = _probe_batch(dataset, group, indices)
    generator = torch.Generator().manual_seed(config.seed)

    def forward() -> torch.Tensor:
        return task.module(**task.inputs(probe, generator))

    estimate = estimate_training_memory(task.module, forward, config.train.batch_size, probe_batch=1,
                                        mixed_precision=config.train.mixed_precision,
                                        gradient_checkpointing=config.train.gradient_checkpointing)
    (height, width), frames = dataset.bucket_shape(group)
    check_memory(estimate, device, f"a batch of {config.train.batch_size} x {frames} frames at {height}x{width}")
    return estimate


def _drawn_members(dataset: Any, order: Any) -> dict[Any, list[int]]:
    """The entries of each group `order` draws batches from (image_ratio 1: images only, 0: videos only), in order:
    what the probes before step 1 read, never a group the run does not."""
    drawn = set(order.drawn_groups)
    members: dict[Any, list[int]] = {}
    for index, group in enumerate(dataset.groups()):
        if group in drawn:
            members.setdefault(group, []).append(index)
    return members


def _probe_each_kind(dataset: Any, order: Any) -> None:
    """One entry of each type (video, image) the batches are drawn from read now, at its group's shape: a set none
    of whose clips of a type can be used (all too short, all corrupt) is refused before the model loads, where a
    usable one costs a decode."""
    first: dict[Any, int] = {}
    for group, indices in _drawn_members(dataset, order).items():
        first[group[0]] = min(indices[0], first.get(group[0], indices[0]))
    for index in first.values():
        dataset.load_item(index, 0)


def _largest_group(dataset: Any, order: Any) -> tuple[Any, list[int]]:
    """Of the groups `order` draws batches from, the one read at the run's largest shape (height x width x frames:
    videos rather than images made clips, the largest bucket) and its entries: a step's memory and time are judged
    on it, not on the first batch, which may be of images or a small bucket (8 times less memory, measured)."""
    members = _drawn_members(dataset, order)

    def volume(group: Any) -> int:
        (height, width), frames = dataset.bucket_shape(group)
        return height * width * frames

    largest = max(members, key=volume)
    return largest, members[largest]


def _probe_batch(dataset: Any, group: Any, indices: list[int], clips: int = 1) -> dict[str, Any]:
    """`clips` clips of `group` (its entries `indices`: the first ones, again from the first where it has fewer),
    collated as the loader gives them; one clip for the memory probe (a whole batch may be too big to read, which
    is what the probe is for)."""
    from kinema.data.dataset import collate

    size, frames = dataset.bucket_shape(group)
    return collate([dataset.load_item(indices[i % len(indices)], 0, size=size, frames=frames) for i in range(clips)])


@contextlib.contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    """torch's deterministic algorithms for the run (what makes a resumed run equal an uninterrupted one on
    accelerators too); the process's setting is put back afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


# ---------------------------------------------------------------- the run


def _save_checkpoint(run: Any, step: int, task: Any, optimizer: Any, schedule: Any, ema: _Ema | None) -> Path:
    from kinema.training.checkpoint import rng_state

    tensors = {"model": {k: v.contiguous() for k, v in task.trainable_state().items()}}
    state: dict[str, Any] = {"step": step, "optimizer": optimizer.state_dict(), "lr_schedule": schedule.state_dict(),
                             "rng": rng_state()}
    if ema is not None:
        tensors["ema"] = {k: v.contiguous() for k, v in ema.tensors().items()}
        state["ema"] = ema.counters()
    return run.save(step, tensors, state)


def _restore(checkpoint: Any, task: Any, optimizer: Any, schedule: Any, ema: _Ema | None) -> int:
    from kinema.training.checkpoint import set_rng_state

    task.load_trainable_state(checkpoint.tensors["model"])
    optimizer.load_state_dict(checkpoint.state["optimizer"])
    schedule.load_state_dict(checkpoint.state["lr_schedule"])
    if ema is not None:
        if "ema" not in checkpoint.tensors:
            raise KinemaError("the checkpoint has no EMA weights but this run keeps an EMA: resume with the run's "
                              "own config")
        ema.load(checkpoint.tensors["ema"], checkpoint.state["ema"])
    set_rng_state(checkpoint.state["rng"])
    return int(checkpoint.step)


def _validate(config: TrainConfig, task: Any, run_folder: Path, step: int, ema: _Ema | None) -> None:
    """Render the validation prompts with the current (EMA, when kept) weights into validation/step-N/."""
    from kinema.pipelines.generation import generate
    from kinema.pipelines.outputs import write_result

    if task.family is None:
        return
    task.model.eval()
    scope = ema.applied() if ema is not None else contextlib.nullcontext()

    def stop_asked(*_: Any) -> None:  # a stop signal ends the videos at the next sampling step, not after them all
        if stop_requested():
            raise _ValidationStopped

    try:
        with scope, torch.no_grad():
            for index, prompt in enumerate(config.validation.prompts):
                result = generate(task.family, validation_request(config, prompt), progress=False,
                                  callback=stop_asked)
                out = run_folder / "validation" / f"step-{step:08d}" / f"{index:02d}.mp4"
                write_result(result, out, fps=8, overwrite=True)
    except _ValidationStopped:
        logger.warning("stopping: the validation videos of step %d are left unfinished", step)
    finally:
        task.model.train()


def _diverged(config: TrainConfig, loss: float, step: int) -> KinemaError:
    """The refusal of a loss that is no longer finite: the run's checkpoints hold the weights that led to it, and a
    resume keeps the learning rate, so the fix is a new run with settings it does not have yet."""
    fixes = ["a lower train.learning_rate"]
    if config.train.max_grad_norm is None:
        fixes.append("train.max_grad_norm set (e.g. 1.0)")
    if config.train.mixed_precision != "no":
        fixes.append("train.mixed_precision: no")
    return KinemaError(f"the loss became {loss} at step {step}; its checkpoints hold the weights that led there, and "
                       f"a resume keeps its learning rate: start a new run (another output) with {' or '.join(fixes)}")


class _ValidationStopped(Exception):
    """Raised from a validation video's sampling step once a stop signal has come (kinema.interrupt)."""


EXPORT_RECORD = "export.json"  # in final/: the step its weights were trained to


def _export(run_folder: Path, task: Any, config: TrainConfig, ema: _Ema | None, step: int) -> Path:
    import yaml

    from kinema.fileio import atomic_folder

    target = run_folder / "final"
    scope = ema.applied() if ema is not None else contextlib.nullcontext()
    with scope, atomic_folder(target, "training_export", overwrite=True) as folder:
        task.export(folder)
        (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        (folder / EXPORT_RECORD).write_text(json.dumps({"step": step, "steps": config.train.steps,
                                                        "ema": ema is not None}) + "\n")
    return target


def _exported_step(run_folder: Path) -> int | None:
    """The step the weights in `run_folder`/final/ were trained to, or None (no export, or one without a record)."""
    try:
        step = json.loads((run_folder / "final" / EXPORT_RECORD).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _accelerator(config: TrainConfig) -> Any:
    """accelerate's process and precision state for this run: on a machine without CUDA every process runs on the
    CPU and several of them talk over gloo. A launcher that asked for several processes but gave this one no process
    group (e.g. `accelerate launch --cpu --num_processes 2`, which starts one) is refused rather than trained alone."""

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one precision per Python process; a second run in the same process (the Python API, tests)
    # with another precision needs the state built again (the process group, if any, stays).
    AcceleratorState._reset_state()
    handlers = []
    if config.mode == "vae" and config.vae.adversarial_weight > 0:  # the discriminator sits out until its start step
        from accelerate.utils import DistributedDataParallelKwargs

        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=handlers)
    asked = int(os.environ.get("WORLD_SIZE", "1"))
    if asked != accelerator.num_processes:
        raise KinemaError(f"the launcher asked for {asked} processes but this one joined "
                          f"{accelerator.num_processes}; on CPUs launch with `torchrun --nproc-per-node N -m kinema "
                          "train CONFIG` or `accelerate launch --multi_gpu --num_processes N -m kinema train CONFIG`")
    return accelerator


def train(config: TrainConfig, *, resume: str | None = None, dry_run: bool = False,
          progress: bool = True, time_limit: float | None = None) -> TrainResult:
    """Run (or continue) the training run `config` describes.

    Args:
        config: a checked config (`kinema.training.config.load_config`).
        resume: None for a new run; "latest" or a checkpoint folder to continue the run in `config.output`
            (refused when the run's config differs in anything but steps and what only observes the run).
        dry_run: check everything, load the model, time one step on the first batch without changing a weight,
            and return the report (trainable parameters, data found, memory estimate, step time); nothing is
            written.
        progress: show a progress bar with the loss and the time left.
        time_limit: seconds of wall time from this call on (loading included); the first step that ends past it is
            the last: it is checkpointed and the weights exported to final/ as at the end of the run, and
            `resume="latest"` later trains on to `train.steps`. For a machine lent for a fixed time.
    Raises one KinemaError line, before step 1, for bad data, a missing model, a mode that does not apply, an
    unknown trainable module, a resume from another config, or a batch that does not fit the machine's memory.
    """
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise KinemaError(f"the time limit must be a positive number of seconds; got {time_limit}")
    deadline = None if time_limit is None else _clock() + time_limit
    with _deterministic(config.train.deterministic):
        return _train(config, resume, dry_run, progress, deadline)


def _past(deadline: float | None, accelerator: Any) -> bool:
    """Whether the run's deadline has passed, as every process agrees (the slowest one's clock decides, so that
    no process waits for a step the others will not take)."""
    if deadline is None:
        return False
    past = _clock() >= deadline
    if accelerator.num_processes == 1:
        return past
    return bool(accelerator.reduce(torch.tensor(float(past), device=accelerator.device), "max") > 0)


def _train(config: TrainConfig, resume: str | None, dry_run: bool, progress: bool,
           deadline: float | None = None) -> TrainResult:
    from tqdm.auto import tqdm

    from kinema.training.checkpoint import RunFolder
    from kinema.training.tasks import make_task

    accelerator = _accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    # The global generators (model dropout, if any) start from the run's seed; a resume puts back their saved state.
    torch.manual_seed(step_seed(config.seed, -1, rank))
    random.seed(config.seed)
    np.random.seed(config.seed)
    main = accelerator.is_main_process

    dataset = _dataset(config)  # metadata, missing files and captions are checked here, before any model loads
    if config.mode == "motion" and (config.data.image_ratio == 1 or _data_report(dataset)["videos"] == 0):
        why, fix = (("data.image_ratio is 1", "lower data.image_ratio") if config.data.image_ratio == 1 else
                    (f"{config.data.root} holds no videos", "give it a dataset of clips"))
        raise KinemaError(f"mode motion learns how frames follow each other, and {why}, so it would see stills "
                          f"alone, which teach a motion module nothing; {fix}")
    order = _batch_order(config, dataset, world)
    _probe_each_kind(dataset, order)
    identity = resume_identity(config)
    inputs = _input_fingerprints(config) if not dry_run and main else None
    from kinema.bundled import resolve_model
    from kinema.fileio import is_within

    output, cache = Path(config.output).resolve(), config.data.cache
    if cache and is_within(Path(cache).resolve(), output):
        raise KinemaError(f"data.cache ({cache}) is inside the run folder ({config.output}), which holds only the "
                          "run; give the cache a folder of its own, such as runs/cache")
    for key, read in (("model.path", resolve_model(config.model.path)), ("data.root", config.data.root)):
        if is_within(output, Path(read).resolve()):  # it would change what it reads, and their owner's
            raise KinemaError(f"the run folder {config.output} is inside {key} ({read}), which the run reads; give "
                              "the run a folder of its own, such as runs/NAME")
    # Refuse a foreign folder, a started run or another run's config before the model loads: the main process only,
    # as the others could otherwise find the run it has just started.
    if not dry_run and main:
        checked = RunFolder.open(config.output, identity, resume=resume, keep=config.checkpoint.keep, create=False,
                                 upgrade=with_new_defaults, inputs=inputs)
        if resume is not None and not (resume == "latest" and not checked.checkpoints()):
            checked.resolve(resume)
        if (checked.path / "final").exists():  # the export replaces it at the end: refused now, not after training
            from kinema.fileio import check_output

            check_output(checked.path / "final", "training_export", folder=True, overwrite=True)
    task = make_task(config)
    _check_frame_counts(config, task)
    task.to(accelerator.device)
    estimate = _check_memory(config, task, dataset, order, accelerator.device)
    task.model.zero_grad(set_to_none=True)
    named = task.trainable_parameters()
    report: dict[str, Any] = {"mode": config.mode, "model": config.model.path, **task.describe(),
                              "data": _data_report(dataset), "processes": world,
                              "memory_estimate": estimate.describe()}
    if dry_run:
        report["seconds_per_step"] = _time_one_step(config, task, dataset, order)
        return TrainResult(None, 0, 0, report=report, task=task, is_main=main)

    if main:
        run = RunFolder.open(config.output, identity, resume=resume, keep=config.checkpoint.keep,
                             upgrade=with_new_defaults, inputs=inputs)
    accelerator.wait_for_everyone()
    if not main:  # the folder the main process has just checked or made; these processes only read from it
        run = RunFolder.open(config.output, identity, resume=resume or "latest", keep=config.checkpoint.keep,
                             upgrade=with_new_defaults)
    optimizer, schedule = _optimizer_and_schedule(config, [p for _, p in named])
    ema = _Ema(named, config.train.ema_decay) if config.train.ema_decay else None
    start = 0
    if resume == "latest" and not run.checkpoints():  # stopped before its first checkpoint: nothing to lose
        logger.warning("%s has no checkpoint yet; starting it from step 0", run.path)
    elif resume is not None:
        start = _restore(run.load(run.resolve(resume)), task, optimizer, schedule, ema)
        logger.info("resumed %s at step %d", run.path, start)
        if start >= config.train.steps:
            logger.warning("%s is at step %d, and train.steps is %d: nothing is trained, and final/ holds the weights "
                           "of step %d; set train.steps above %d to train on", run.path, start, config.train.steps,
                           start, start)
    module, optimizer = accelerator.prepare(task.module, optimizer)
    logs = _Logs(run.path, start, config.log.tensorboard) if main else None
    accumulation = config.train.gradient_accumulation
    batches = _batches(config, dataset, order, rank, start * accumulation)
    parameters = [p for _, p in named]
    result = TrainResult(run.path, start, start, report=report, task=task, is_main=main)
    bar = tqdm(total=config.train.steps, initial=start, disable=not (progress and main), unit="step",
               desc=f"train {config.mode}")
    try:
        # One process: a stop signal waits for the end of the step under way and its checkpoint, and a checkpoint
        # is saved there, so no finished step is lost; the deferral spans the whole loop, so a signal landing
        # between two steps waits for the next one too. Several: each gets the signal at its own point in the step,
        # so they stop where they are, as without this.
        with stops_deferred() if world == 1 else contextlib.nullcontext():
            for step in range(start, config.train.steps):
                began = time.perf_counter()
                total_loss = torch.zeros((), device=accelerator.device)
                for micro in range(accumulation):
                    stop_if_requested()
                    micro_step = step * accumulation + micro
                    generator = torch.Generator().manual_seed(step_seed(config.seed, micro_step, rank))
                    inputs = task.inputs(next(batches), generator, step)
                    sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(module)
                    with sync, accelerator.autocast():
                        loss = module(**inputs) / accumulation
                        accelerator.backward(loss)
                    total_loss += loss.detach()
                grad_norm = None
                if config.train.max_grad_norm is not None:
                    grad_norm = float(accelerator.clip_grad_norm_(parameters, config.train.max_grad_norm))
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step()
                mean_loss = float(accelerator.reduce(total_loss, "mean"))
                if not math.isfinite(mean_loss):
                    raise _diverged(config, mean_loss, step + 1)
                done = step + 1
                result.end_step, result.last_loss = done, mean_loss
                result.losses.append(mean_loss)
                seconds = time.perf_counter() - began
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
                if logs is not None and (done % config.log.every == 0 or done == config.train.steps):
                    logs.write({"step": done, "loss": mean_loss, "lr": schedule.get_last_lr()[0],
                                "grad_norm": grad_norm, "seconds": round(seconds, 4),
                                "clips_per_second": round(config.global_batch * world / seconds, 3)})
                due = done % config.checkpoint.every == 0 or done == config.train.steps
                if due:
                    if main:
                        _save_checkpoint(run, done, task, optimizer, schedule, ema)
                    accelerator.wait_for_everyone()
                out_of_time = _past(deadline, accelerator)
                timed_out = out_of_time and done < config.train.steps
                # A run asked to stop, or out of time, renders no validation videos first: with real models they
                # take minutes, past a scheduler's grace period (or its time limit) before its SIGKILL.
                if main and config.validation.every and done % config.validation.every == 0 and not (
                        stop_requested() or out_of_time):
                    _validate(config, task, run.path, done, ema)
                if stop_requested():
                    if main and not due:
                        _save_checkpoint(run, done, task, optimizer, schedule, ema)
                    exported = _exported_step(run.path) if main else None
                    stale = (f"; final/ still holds the weights of step {exported}, exported before"
                             if exported is not None and exported != done else "")
                    print(f"kinema train: stopped after step {done}; `--resume latest` continues from its checkpoint"
                          f"{stale}", file=sys.stderr, flush=True)
                    break
                if timed_out:
                    if main and not due:
                        _save_checkpoint(run, done, task, optimizer, schedule, ema)
                    accelerator.wait_for_everyone()
                    result.time_limited = True
                    if main:
                        print(f"kinema train: the time limit ended the run after step {done} of "
                              f"{config.train.steps}; its weights are exported as they are, and `--resume latest` "
                              "trains on", file=sys.stderr, flush=True)
                    break
        stop_if_requested()  # a stop the loop ended on, raised once the deferral is over: nothing is exported
        if main:
            result.final = _export(run.path, task, config, ema, result.end_step)
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        if logs is not None:
            logs.close()
    return result


def _time_one_step(config: TrainConfig, task: Any, dataset: Any, order: Any) -> float:
    """Seconds of one forward and backward pass on a batch of the run's largest shape (`_largest_group`); gradients
    are dropped, no weight changes."""
    batch = _probe_batch(dataset, *_largest_group(dataset, order), clips=config.train.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    began = time.perf_counter()
    for _ in range(config.train.gradient_accumulation):
        loss = task.module(**task.inputs(batch, generator))
        loss.backward()
    seconds = time.perf_counter() - began
    task.model.zero_grad(set_to_none=True)
    return round(seconds, 3)
