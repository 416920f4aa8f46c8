"""A training run's settings: one YAML file read into `TrainConfig`, every key checked before anything loads.

The file holds only what it changes; everything else takes the defaults below. An unknown key, a wrong type or a value
out of range is one KinemaError line naming the key (with the nearest known key for a typo), as nanoGPT's
configurator refuses unknown keys. The sections:

    mode: motion            # motion | image | lora | full | vae (what trains: MODES)
    output: runs/my-run     # the run folder: checkpoints, logs, validation videos, the exported weights
    seed: 0
    model: {path: ..., motion_module: ..., motion_version: v3}
    data: {root: ..., frames: 16, size: [64, 64], ...}
    train: {steps: 1000, batch_size: 1, learning_rate: 1e-4, ...}
    lora: {rank: 4, alpha: 4, targets: motion}
    inpaint: {clip_probability: 0.5}
    vae: {kl_weight: 1e-6, reconstruction: l1}
    checkpoint: {every: 100, keep: 3}
    log: {every: 10, tensorboard: true}
    validation: {every: 0, prompts: [...]}

`resume_identity` is the part of a config that must not change when a run resumes (all but the step count and what
only observes the run).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kinema.data.synth_limits import MAX_FRAMES
from kinema.errors import KinemaError
from kinema.pipelines.request import MAX_SEED

logger = logging.getLogger(__name__)
# The longest side a clip is read at: past it a typo (100000) made the reader allocate hundreds of GB before the
# memory check could say so. 4096 is four times SD1.5's training size and twice SDXL's.
MAX_TRAIN_SIZE = 4096

# mode -> what trains in it
MODES: dict[str, str] = {
    "motion": "the motion modules only; the base model stays frozen (AnimateDiff's motion stage, or a V3 DiT's "
              "motion modules)",
    "image": "the image UNet on single frames, motion modules frozen (AnimateDiff's image stage)",
    "lora": "LoRA layers on the motion and/or spatial layers (peft); nothing else",
    "full": "the whole EasyAnimate V3 transformer but the text/time/CLIP projections, on joint image and video "
            "batches with inpaint masks",
    "vae": "the Slice VAE: reconstruction + KL",
}
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("no", "bf16", "fp16")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


@dataclass
class ModelConfig:
    path: str = ""  # SD1.5 folder or single file (AnimateDiff), or an EasyAnimate V3 folder
    motion_module: str | None = None  # AnimateDiff: motion weights to start from (none: fresh, identity modules)
    motion_version: str = "v3"  # AnimateDiff: the layout of fresh motion modules (v1, v2, v3, ...)
    tokenizer: str | None = None  # SD single files only


@dataclass
class DataConfig:
    root: str = ""  # the folder holding the metadata file (as `kinema data synth` writes it)
    metadata: str = "metadata.json"
    frames: int = 16  # pixel frames per clip
    stride: int = 1
    size: list[int] = field(default_factory=lambda: [64, 64])  # [height, width]
    image_frames: int = 1  # frames an image becomes (AnimateDiff image stage: 1)
    text_dropout: float = 0.1  # captions dropped to "" so the model learns the unconditional prediction (CFG)
    flip: bool = False
    random_crop: bool = False
    max_missing_fraction: float = 0.05  # more files listed but missing than this stops the run before step 1
    image_ratio: float | None = None  # fraction of image batches (none: as the data has them)
    buckets: list[list[int]] | None = None  # [[height, width, frames], ...]
    decode_timeout: float | None = 30.0  # seconds per file before it is skipped
    num_workers: int = 0
    cache: str | None = None  # a folder for cached latents and text embeddings (keyed by the encoders' weights)


@dataclass
class OptimConfig:
    steps: int = 1000  # optimiser steps
    batch_size: int = 1  # clips per process per micro-step
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant_with_warmup"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = None  # none: no EMA
    timesteps: str | None = None  # uniform | logit_normal (none: the family's recipe)
    # logit_normal draws t = sigmoid(N(logit_mean, logit_std)) * steps (SD3's names); a negative mean trains the
    # low-noise steps, where detail is drawn, more often
    logit_mean: float = 0.0
    logit_std: float = 1.0
    snr_gamma: float | None = None  # Min-SNR-gamma loss weights (Hang et al. 2023; 5 in the paper); none: plain MSE
    # full: the transformer's submodules to train (none: V3's set); motion: parts of the base model's parameter
    # names that train with the motion modules (AnimateDiff's trainable_modules; "attn2." the spatial cross-attention)
    trainable_modules: list[str] | None = None
    deterministic: bool = True  # torch deterministic algorithms: a resumed run equals an uninterrupted one


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0
    targets: str = "motion"  # motion | spatial | all


@dataclass
class InpaintConfig:
    clip_probability: float = 0.5  # samples that get CLIP image tokens (EasyAnimate V3)


@dataclass
class VAEConfig:
    kl_weight: float = 1e-6
    reconstruction: str = "l1"
    adversarial_weight: float = 0.0  # > 0: a 3D patch discriminator trains alongside (hinge loss)
    adversarial_start: int = 0  # the step from which the adversarial terms count
    trains: str = "all"  # all | decoder (the encoder, and so the latent space a diffusion model learned, stays)
    temporal_weight: float = 0.0  # > 0: also match the frame-to-frame changes (kinema.training.vae_objective)


@dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 3


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True


@dataclass
class ValidationConfig:
    every: int = 0  # 0: no validation videos
    prompts: list[str] = field(default_factory=list)
    frames: int | None = None  # none: data.frames
    steps: int = 20
    guidance: float | None = None  # none: the model's kinema.json default, else 7.5
    seed: int = 0


@dataclass
class TrainConfig:
    mode: str = ""
    output: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what the run folder records)."""
        return dataclasses.asdict(self)

    @property
    def global_batch(self) -> int:
        """Clips per optimiser step on one process."""
        return self.train.batch_size * self.train.gradient_accumulation


# Settings a resumed run may change: how long it runs and what only watches it.
RESUMABLE = {"train": ("steps",), "checkpoint": ("every", "keep"), "log": ("every", "tensorboard"),
             "validation": ("every", "prompts", "frames", "steps", "guidance", "seed"),
             "data": ("num_workers", "cache", "decode_timeout")}


# Schedules whose LR at a step does not depend on the run's length: only with these may `train.steps` change.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def resume_identity(config: TrainConfig) -> dict[str, Any]:
    """The settings that define a run's trajectory: a resume with any of them changed is refused. `train.steps` may
    change (to extend a run) only under a constant schedule: a decaying one is stretched by it."""
    identity = config.to_dict()
    for section, keys in RESUMABLE.items():
        for key in keys:
            if not (section == "train" and key == "steps" and config.train.lr_schedule not in LENGTH_FREE_SCHEDULES):
                identity[section].pop(key)
    identity.pop("output")
    return identity


def with_new_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A run's stored identity (`resume_identity` of its config) with the settings it lacks, added to kinema after
    the run started, at their defaults: an older run then resumes unless its config really differs."""
    defaults = resume_identity(TrainConfig(mode="motion", output="-"))
    upgraded = {name: dict(value) if isinstance(value, dict) else value for name, value in stored.items()}
    for name, section in defaults.items():
        if name not in upgraded:
            upgraded[name] = section
        elif isinstance(section, dict) and isinstance(upgraded[name], dict):
            upgraded[name] = {**section, **upgraded[name]}
    return upgraded


# ---------------------------------------------------------------- reading


def _type_name(kind: Any) -> str:
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        return " or ".join(_type_name(a) for a in options) + " (or null)"
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(typing.get_args(kind)[0]).removeprefix('a ')}s"
    return names.get(kind, getattr(kind, "__name__", str(kind)))


class _NotFinite(KinemaError):
    """A number that is infinite or NaN: the right type, so no other type of a union may take it instead."""


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """`value` as `kind` (a field annotation), or one KinemaError naming `key` and the type it needs."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        for option in typing.get_args(kind):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except _NotFinite:
                raise
            except KinemaError:
                continue
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(item, typing.get_args(kind)[0], f"{key}[{i}]") for i, item in enumerate(value)]
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # .inf passes every lower bound the checks below set, and NaN turns a loss into NaN at step 1.
            if not math.isfinite(number):
                raise _NotFinite(f"config key {key} must be a finite number, got {value!r}")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    raise KinemaError(f"config key {key} must be {_type_name(kind)}, got {value!r}")


def _read_section(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise KinemaError(f"config key {prefix.rstrip('.') or 'the file'} must be a mapping of settings "
                          f"(key: value lines), got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known keys here: {', '.join(known)}"
            raise KinemaError(f"unknown config key {name}{hint}")
        kind = hints[key]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            kwargs[key] = _read_section(kind, value, f"{name}.")
        else:
            kwargs[key] = _coerce(value, kind, name)
    return cls(**kwargs)


def _check_range(ok: bool, message: str) -> None:
    if not ok:
        raise KinemaError(message)


def check_config(config: TrainConfig) -> None:
    """Values each setting allows, one KinemaError line for the first out of range (files are checked later, by
    the parts that read them)."""
    if config.mode not in MODES:
        what = f"unknown mode {config.mode!r}" if config.mode else "no mode given"
        raise KinemaError(f"{what}; choose one of: " + "; ".join(f"{name} ({text})" for name, text in MODES.items()))
    _check_range(bool(config.output), "no output folder: set output: to a new folder for the run")
    _check_range(bool(config.model.path), "no model: set model.path to the model to train (an SD1.5 folder or file, "
                 "or an EasyAnimate V3 folder)")
    _check_range(bool(config.data.root), "no data: set data.root to a folder with a metadata.json (make one with "
                 "`kinema data synth`)")
    # The run's seed also seeds NumPy's global generator, which takes 0 .. 2**32 - 1.
    _check_range(0 <= config.seed < 2**32, f"config key seed must be from 0 to 2**32 - 1 ({2**32 - 1}), got "
                 f"{config.seed}")
    _check_range(0 <= config.validation.seed <= MAX_SEED, f"config key validation.seed must be from 0 to 2**64 - 1, "
                 f"got {config.validation.seed}")
    data, train = config.data, config.train
    for key, value in (("data.frames", data.frames), ("data.stride", data.stride), ("data.image_frames",
                       data.image_frames), ("train.steps", train.steps), ("train.batch_size", train.batch_size),
                       ("train.gradient_accumulation", train.gradient_accumulation),
                       ("checkpoint.every", config.checkpoint.every), ("checkpoint.keep", config.checkpoint.keep),
                       ("log.every", config.log.every), ("lora.rank", config.lora.rank)):
        _check_range(value >= 1, f"config key {key} must be at least 1, got {value}")
    _check_range(len(data.size) == 2 and 8 <= min(data.size) and max(data.size) <= MAX_TRAIN_SIZE
                 and all(s % 8 == 0 for s in data.size),
                 f"data.size must be [height, width], multiples of 8 (the VAE's downscale) up to {MAX_TRAIN_SIZE}, "
                 f"got {data.size}")
    for key, fraction in (("data.text_dropout", data.text_dropout), ("data.max_missing_fraction",
                          data.max_missing_fraction), ("inpaint.clip_probability", config.inpaint.clip_probability)):
        _check_range(0.0 <= fraction <= 1.0, f"config key {key} is a fraction in [0, 1], got {fraction}")
    if data.image_ratio is not None:
        _check_range(0.0 <= data.image_ratio <= 1.0, f"data.image_ratio is a fraction in [0, 1], got "
                     f"{data.image_ratio}")
    if data.buckets is not None:
        _check_range(bool(data.buckets), "data.buckets is empty; list [height, width, frames] buckets, or leave it "
                     "out (null) to read every clip at data.size and data.frames")
        for bucket in data.buckets:
            _check_range(len(bucket) == 3 and min(bucket) >= 1 and bucket[0] % 8 == 0 and bucket[1] % 8 == 0
                         and max(bucket[:2]) <= MAX_TRAIN_SIZE,
                         f"each of data.buckets is [height, width, frames], height and width multiples of 8 (the "
                         f"VAE's downscale) up to {MAX_TRAIN_SIZE}, got {bucket}")
    if data.decode_timeout is not None:
        _check_range(data.decode_timeout > 0, f"data.decode_timeout is the seconds a file may take to decode, above "
                     f"0 (or null for no limit), got {data.decode_timeout}")
    _check_range(train.learning_rate > 0, f"train.learning_rate must be > 0, got {train.learning_rate}")
    _check_range(train.lr_schedule in LR_SCHEDULES, f"unknown train.lr_schedule {train.lr_schedule!r}; choose one of "
                 f"{', '.join(LR_SCHEDULES)}")
    _check_range(train.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {train.warmup_steps}")
    _check_range(len(train.adam_betas) == 2 and all(0 <= b < 1 for b in train.adam_betas),
                 f"train.adam_betas must be two numbers in [0, 1), got {train.adam_betas}")
    _check_range(train.mixed_precision in PRECISIONS, f"unknown train.mixed_precision {train.mixed_precision!r}; "
                 f"choose one of {', '.join(PRECISIONS)}")
    if train.max_grad_norm is not None:
        _check_range(train.max_grad_norm > 0, f"train.max_grad_norm must be > 0 (or null for no clipping), got "
                     f"{train.max_grad_norm}")
    if train.ema_decay is not None:
        _check_range(0 < train.ema_decay < 1, f"train.ema_decay must be in (0, 1) (or null for no EMA), got "
                     f"{train.ema_decay}")
    if train.timesteps is not None:
        _check_range(train.timesteps in TIMESTEP_SAMPLING, f"unknown train.timesteps {train.timesteps!r}; choose "
                     f"one of {', '.join(TIMESTEP_SAMPLING)}")
    if (train.logit_mean, train.logit_std) != (0.0, 1.0):
        _check_range(math.isfinite(train.logit_mean) and math.isfinite(train.logit_std) and train.logit_std > 0,
                     f"train.logit_mean must be a number and train.logit_std a positive one, got {train.logit_mean} "
                     f"and {train.logit_std}")
        # Unset train.timesteps is the family's recipe, known once the model is read: DiffusionTask checks it.
        if config.mode == "vae" or train.timesteps == "uniform":
            raise KinemaError("train.logit_mean and train.logit_std shape the logit-normal timestep draw; add "
                              "train.timesteps: logit_normal (or remove them)")
    if train.snr_gamma is not None:
        _check_range(math.isfinite(train.snr_gamma) and train.snr_gamma > 0, f"train.snr_gamma must be a positive "
                     f"number (5 in the Min-SNR paper; null for plain MSE), got {train.snr_gamma}")
        if config.mode == "vae":
            raise KinemaError(f"train.snr_gamma weights the denoising loss; mode {config.mode} trains a VAE: remove it")
    if train.trainable_modules is not None and config.mode not in ("full", "motion"):
        raise KinemaError(f"train.trainable_modules is for modes full and motion; mode {config.mode} trains "
                          f"{MODES[config.mode].split(';')[0]}: remove it")
    if train.trainable_modules == []:  # a warning, not a refusal: runs started with it resume with their own config
        logger.warning("train.trainable_modules is an empty list, read as null: the default set trains; list the "
                       "parts to train with the motion modules (mode motion) or of the transformer (mode full), or "
                       "write null")
    if train.trainable_modules is not None and not all(isinstance(n, str) and n for n in train.trainable_modules):
        raise KinemaError(f"train.trainable_modules must be a list of non-empty names, got "
                          f"{train.trainable_modules!r}")
    _check_range(config.lora.alpha > 0, f"lora.alpha must be > 0, got {config.lora.alpha}")
    _check_range(config.lora.targets in ("motion", "spatial", "all"), f"unknown lora.targets "
                 f"{config.lora.targets!r}; choose motion, spatial or all")
    _check_range(config.vae.kl_weight >= 0, f"vae.kl_weight must be >= 0, got {config.vae.kl_weight}")
    _check_range(config.vae.temporal_weight >= 0, f"vae.temporal_weight must be >= 0 (0 turns it off), got "
                 f"{config.vae.temporal_weight}")
    _check_range(config.vae.adversarial_weight >= 0 and config.vae.adversarial_start >= 0,
                 f"vae.adversarial_weight and vae.adversarial_start must be >= 0, got {config.vae.adversarial_weight} "
                 f"and {config.vae.adversarial_start}")
    _check_range(config.vae.trains in ("all", "decoder"), f"unknown vae.trains {config.vae.trains!r}; choose all "
                 "or decoder")
    _check_range(config.vae.reconstruction in ("l1", "mse"), f"unknown vae.reconstruction "
                 f"{config.vae.reconstruction!r}; choose l1 or mse")
    # Said, not refused: a config kept while trying modes carries the others' sections.
    for section, takes in (("lora", "lora"), ("vae", "vae")):
        given, default = getattr(config, section), type(getattr(config, section))()
        if config.mode != takes and given != default:
            key = next(name for name in vars(default) if getattr(given, name) != getattr(default, name))
            logger.warning("%s.%s is a setting of mode %s, and mode %s does not read it", section, key, takes,
                           config.mode)
    if train.warmup_steps and train.lr_schedule == "constant":
        logger.warning("train.warmup_steps warms up a schedule with a warm-up, and train.lr_schedule constant has "
                       "none: it changes nothing (constant_with_warmup has one)")
    elif train.warmup_steps >= train.steps:
        logger.warning("train.warmup_steps (%d) is not below train.steps (%d): the learning rate never reaches "
                       "train.learning_rate; lower the warm-up or raise the steps", train.warmup_steps, train.steps)
    if config.mode == "vae" and train.gradient_checkpointing:
        raise KinemaError("mode vae: the Slice VAE has no gradient checkpointing; set train.gradient_checkpointing: "
                          "false and lower data.frames or data.size to save memory")
    if config.mode == "vae" and config.validation.every:
        raise KinemaError("mode vae makes no validation videos (they are sampled from a diffusion model); set "
                          "validation.every: 0")
    _check_range(config.validation.every >= 0, f"validation.every must be >= 0, got {config.validation.every}")
    if config.validation.every and not config.validation.prompts:
        raise KinemaError("validation.every is set but validation.prompts is empty: list the prompts to render")
    if config.validation.prompts and not config.validation.every and config.mode != "vae":
        logger.warning("validation.prompts are listed but validation.every is 0, so no validation videos are made; "
                       "set validation.every to render them every that many steps")
    validation = config.validation
    _check_range(validation.steps >= 1, f"config key validation.steps must be at least 1, got {validation.steps}")
    _check_range(validation.frames is None or 1 <= validation.frames <= MAX_FRAMES, f"config key validation.frames "
                 f"must be from 1 to {MAX_FRAMES} (or null for data.frames), got {validation.frames}")
    _check_range(validation.guidance is None or validation.guidance >= 1, f"config key validation.guidance must be "
                 f"at least 1 (1 turns classifier-free guidance off), or null for the model's default; got "
                 f"{validation.guidance}")
    if validation.every:  # the videos' own limits (steps, guidance, frames, size), refused at the first validation
        for prompt in validation.prompts:
            try:
                validation_request(config, prompt).check()
            except KinemaError as err:
                raise KinemaError(f"validation: {err}; fix the validation section (or data.frames / data.size, "
                                  "which it takes by default)") from None
    # Values torch's AdamW and DataLoader would refuse only once the model has loaded.
    _check_range(train.adam_eps > 0, f"config key train.adam_eps must be > 0, got {train.adam_eps}")
    _check_range(train.weight_decay >= 0, f"config key train.weight_decay must be >= 0, got {train.weight_decay}")
    _check_range(data.num_workers >= 0, f"config key data.num_workers must be >= 0 (0 loads in the main process), "
                 f"got {data.num_workers}")


def config_from_dict(values: Any, where: str = "the config") -> TrainConfig:
    """A checked `TrainConfig` from plain data (a parsed YAML file)."""
    if not isinstance(values, dict):
        raise KinemaError(f"{where} must be a mapping of settings (key: value lines), got {type(values).__name__}")
    config = _read_section(TrainConfig, values, "")
    check_config(config)
    return config


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read and check a training config YAML file; `overrides` (dotted keys, e.g. `{"train.steps": 10}`) replace
    values from the file. Relative paths are taken from the current folder (as every kinema command takes them) and
    recorded absolute, so a resumed run finds the same files from anywhere."""
    from kinema.fileio import load_config_file

    path = Path(path)
    try:
        values = load_config_file(path)  # a key given twice is refused: YAML keeps the last, dropping a section
    except OSError as err:
        raise KinemaError(f"cannot read {path}: {err}") from None
    if values is None:
        raise KinemaError(f"{path} is empty: write the run's settings in it (mode, model.path, data.root, output; "
                          "configs/train/ holds examples, docs/training.md every key)")
    if not isinstance(values, dict):
        raise KinemaError(f"{path} must be a mapping of settings (key: value lines), got {type(values).__name__}")
    for dotted, value in (overrides or {}).items():
        section = values
        *parents, last = dotted.split(".")
        for depth, parent in enumerate(parents):
            if section.get(parent) is None:  # absent, or an empty `data:` in the file
                section[parent] = {}
            section = section[parent]
            if not isinstance(section, dict):
                where = ".".join(parents[:depth + 1])
                raise KinemaError(f"--set {dotted}: config key {where} is {section!r}, not a mapping of settings, so "
                                  f"it holds no {'.'.join([*parents[depth + 1:], last])}; check the key")
        section[last] = value
    config = config_from_dict(values, str(path))
    from kinema.bundled import is_bundled_name, resolve_model

    if is_bundled_name(config.model.path):  # a bundled model's name means its folder here, as for every command
        config.model.path = str(resolve_model(config.model.path))
    for holder, key in ((config, "output"), (config.model, "path"), (config.model, "motion_module"),
                        (config.model, "tokenizer"), (config.data, "root"), (config.data, "cache")):
        value = getattr(holder, key)
        if value:
            setattr(holder, key, os.path.abspath(os.path.expanduser(value)))
    return config


def validation_request(config: TrainConfig, prompt: str) -> Any:
    """The GenerationRequest of one validation video: `prompt` at the run's clip size, `validation.frames` (or
    `data.frames`), its steps, guidance (None: the model's default) and seed."""
    from kinema.pipelines.request import GenerationRequest

    settings = config.validation
    return GenerationRequest(prompt=prompt, frames=settings.frames or config.data.frames,
                             height=config.data.size[0], width=config.data.size[1], steps=settings.steps,
                             guidance=settings.guidance, seeds=(settings.seed,))
