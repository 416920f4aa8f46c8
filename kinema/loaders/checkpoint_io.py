"""Read and write checkpoint files without ever running code from them.

`.safetensors` files are plain data. Torch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) are read with
`torch.load(weights_only=True)`, whose unpickler only rebuilds tensors and plain containers: a file that needs
any other class is refused before anything in it runs. Readers get the tensors only; non-tensor entries (training
counters, AnimateDiff v3's `animatediff_config`) are dropped and listed in `Checkpoint.dropped`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kinema.errors import KinemaError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

# What a download gone wrong leaves behind instead of weights, recognised by the file's first bytes.
_NOT_WEIGHTS: dict[bytes, str] = {
    b"version https://git-lfs": "a Git LFS pointer, not the weights (run `git lfs pull` or download the file itself)",
    b"<!doctype html": "an HTML page, not weights (the download saved a web page; fetch the file's direct link)",
    b"<html": "an HTML page, not weights (the download saved a web page; fetch the file's direct link)",
}


@dataclass
class Checkpoint:
    """The tensors of one file, its safetensors metadata, and what was left out."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # entry name -> what it was


def _supported() -> str:
    return ", ".join(SUPPORTED_SUFFIXES)


def _check_not_weights(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(64).lstrip().lower()
    for prefix, what in _NOT_WEIGHTS.items():
        if head.startswith(prefix):
            raise KinemaError(f"{path} is {what}")


def _check_readable(path: Path) -> None:
    """Refuse, with the reason, a path that is no weights file: a folder, missing, another extension, empty, or a
    Git LFS pointer / web page saved in place of the weights."""
    if path.is_dir():
        raise KinemaError(f"{path} is a folder; give a weights file ({_supported()})")
    if not path.is_file():
        raise KinemaError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise KinemaError(f"{path}: unknown checkpoint extension {suffix!r}; supported: {_supported()}")
    if path.stat().st_size == 0:
        raise KinemaError(f"{path} is empty (0 bytes); the download or save did not finish")
    _check_not_weights(path)


def _describe_value(value: object) -> str:
    if isinstance(value, dict):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        return f"dict with {len(value)} entries ({tensors} tensors)"
    return type(value).__name__


def _read_safetensors(path: Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise KinemaError(f"{path} is not a readable .safetensors file (corrupt or truncated?): {err}") from None
    return Checkpoint(path, tensors, metadata)


def _refusal(path: Path, err: Exception) -> KinemaError:
    found = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(err))
    needs = f" (it needs {found.group(1)})" if found else ""
    hint = ""
    if found and found.group(1).startswith("omegaconf"):
        hint = (" This is the December 2023 upload of AnimateDiff v3, whose `animatediff_config` entry is an "
                "OmegaConf object; the authors re-uploaded the file without it, so download it again.")
    return KinemaError(
        f"refused to run code from the pickle in {path}{needs}: kinema only reads tensors from .ckpt/.pt/.pth/.bin "
        f"files.{hint} If you trust the file, load it once in a trusted environment and re-save its tensors as "
        "safetensors (safetensors.torch.save_file), then use that file; `kinema convert` turns safe files into "
        "other layouts")


def _read_pickle(path: Path) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower() or "unsupported global" in str(err).lower():
            raise _refusal(path, err) from None
        raise KinemaError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): {err}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise KinemaError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): "
                          f"{type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(obj, dict):
        raise KinemaError(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    dropped: dict[str, str] = {}
    # Training scripts (AnimateDiff's train.py among them) wrap the weights as {"state_dict": ..., "epoch": ...}.
    if isinstance(obj.get("state_dict"), dict):
        dropped.update({f"top-level {k}": _describe_value(v) for k, v in obj.items() if k != "state_dict"})
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped.update({str(k): _describe_value(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)})
    return Checkpoint(path, tensors, {}, dropped)


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype name) from a safetensors file's header, without reading tensor data."""
    with safe_open(str(path), framework="pt") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}
        return {name: (tuple(part.get_shape()), part.get_dtype()) for name, part in slices.items()}


def tensor_names(path: str | os.PathLike) -> list[str] | None:
    """Tensor names of a `.safetensors` file read from its header alone (no tensor data); None for other formats,
    whose names cannot be known without unpickling the whole file."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise KinemaError(f"{path} is not a readable .safetensors file (corrupt or truncated?): {err}") from None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a weights file (`.safetensors`, or a torch pickle read with `weights_only=True`) onto the CPU."""
    path = Path(path)
    _check_readable(path)
    return _read_safetensors(path) if path.suffix.lower() in SAFETENSORS_SUFFIXES else _read_pickle(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file by name, any `state_dict` wrapper removed and non-tensor entries dropped."""
    return read_checkpoint(path).tensors


def write_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors to `.safetensors` (with string `metadata`) or, for `.ckpt`/`.pt`/`.pth`/`.bin`, a tensors-only
    torch file. The file appears whole or not at all: it is written beside the target and renamed over it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise KinemaError(f"cannot write {path}: unknown extension {suffix!r}; supported: {_supported()}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise KinemaError(f"cannot write {path}: entries are not tensors: {bad[:3]}")
    if metadata and suffix not in SAFETENSORS_SUFFIXES:
        raise KinemaError(f"cannot write {path}: metadata can only be stored in .safetensors files")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise KinemaError("safetensors metadata must map strings to strings")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        if suffix in SAFETENSORS_SUFFIXES:
            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
