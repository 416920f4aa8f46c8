"""What the web app's pickers offer: the bundled models and what a models folder holds, told apart by kinema's format
registry (`kinema.describe`, from headers) rather than by file names.

A folder kinema recognises (an SD1.5 diffusers folder, an EasyAnimate V3 folder, a MotionAdapter folder) is one
entry; any other folder is searched inside, down to `MAX_DEPTH` levels (A1111-style trees keep models in
`Stable-diffusion/`, `Lora/`, ...). Files and folders kinema cannot use are listed as skipped, with the reason.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from kinema.bundled import available_models
from kinema.errors import KinemaError, shorten

MAX_DEPTH = 3
MAX_ENTRIES = 2000  # a models folder pointed at a home directory must not hang the page
MODEL_KINDS = ("stable_diffusion", "easyanimate_transformer")
MOTION_MODULE_KINDS = ("motion_module",)
MOTION_LORA_KINDS = ("motion_lora",)
CONTROLNET_KINDS = ("controlnet", "sparsectrl")
WEIGHTS_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class ModelChoices:
    """What the pickers offer, each entry `(label, value)`: the label is what a person reads (a path relative to the
    models folder, or a bundled name), the value what `job_from_mapping` takes (an absolute path, or the name)."""

    models: list[tuple[str, str]] = field(default_factory=list)
    motion_modules: list[tuple[str, str]] = field(default_factory=list)
    loras: list[tuple[str, str]] = field(default_factory=list)
    controlnets: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (label, why)


# describe() reads a torch pickle whole to learn its names, so a refresh reuses what an unchanged file gave.
_kinds: dict[tuple[str, int, int], str | None] = {}
_kinds_lock = threading.Lock()


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def kind_of(path: Path) -> str | None:
    """The kind kinema's format registry gives `path` ("stable_diffusion", "motion_module", "image_lora", ...), or
    None for a folder kinema cannot use. KinemaError (one line) for a file kinema cannot use, or of a known kind
    that is broken."""
    from kinema.loaders.source import Source, describe_source

    key = _stamp(path)
    with _kinds_lock:
        if key in _kinds:
            return _kinds[key]
    source = Source(path)
    try:
        kind: str | None = describe_source(source)["kind"]
    except KinemaError:
        if path.is_file():
            raise
        kind = None
    if path.is_file():  # a folder's own time stamp does not change when a file inside it does
        with _kinds_lock:
            _kinds[key] = kind
    return kind


def scan_models(models_dir: str | os.PathLike | None) -> ModelChoices:
    """The bundled models, then what `models_dir` holds (sorted by path): models, motion modules and LoRAs (motion
    and image LoRAs), and the weights files it could not use with the reason. A missing folder gives the bundled
    models alone."""
    choices = ModelChoices(models=[(f"{name} (bundled)", name) for name in available_models()])
    if models_dir is None or not Path(models_dir).is_dir():
        return choices
    root = Path(models_dir).resolve()
    seen = 0
    visited: set[Path] = set()  # folders by their real path: a link to a folder above would list it again

    def visit(folder: Path, depth: int) -> None:
        nonlocal seen
        if folder.resolve() in visited:
            return
        visited.add(folder.resolve())
        try:
            entries = sorted(folder.iterdir())
        except OSError as err:
            choices.skipped.append((_label(folder, root), f"cannot list it ({err.strerror})"))
            return
        for path in entries:
            seen += 1
            if seen > MAX_ENTRIES or path.name.startswith("."):
                continue
            if path.is_file() and path.suffix.lower() not in WEIGHTS_SUFFIXES:
                continue
            label = _label(path, root)
            try:
                kind = kind_of(path)
            except (KinemaError, OSError) as err:
                choices.skipped.append((label, shorten(str(err), 200)))
                continue
            if kind in MODEL_KINDS:
                choices.models.append((label, str(path)))
            elif kind in MOTION_MODULE_KINDS:
                choices.motion_modules.append((label, str(path)))
            elif kind in MOTION_LORA_KINDS or kind == "image_lora":
                choices.loras.append((label, str(path)))
            elif kind in CONTROLNET_KINDS:
                choices.controlnets.append((label, str(path)))
            elif path.is_dir() and kind is None and depth < MAX_DEPTH:
                visit(path, depth + 1)
            elif path.is_file():
                choices.skipped.append((label, f"a {kind} is not a model, motion module, LoRA or ControlNet"))

    visit(root, 1)
    return choices


def _label(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() + ("/" if path.is_dir() else "")
