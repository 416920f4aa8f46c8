"""`kinema inspect`: say what a weights file or model folder is, and check it is whole.

Describers take a `Source` (the path, with its tensor names and tensors read at most once, on first use) and return
a summary dict, or None when the path is not their kind. They are tried in the order of DESCRIBERS and the first
answer wins. A describer that recognises its kind checks every tensor name and shape against the layout it detected
and raises KinemaError when the file is broken or unsupported, so a damaged motion module is reported as such rather
than as "unknown", and `kinema convert` (which describes first) writes nothing from it.

Names and shapes come from a .safetensors header, never from tensor data, so checking a file of GBs is quick. This
module imports no model code: each describer imports what it needs, after `describe` has found the path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kinema.errors import KinemaError
from kinema.fileio import read_json_object
from kinema.loaders.checkpoint_io import (
    SUPPORTED_SUFFIXES,
    Checkpoint,
    read_checkpoint,
    tensor_names,
)
from kinema.sniff import sniff

# safetensors dtype codes -> torch dtypes, for shape-only (meta) tensors made from a header.
_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class Source:
    """A path being described. Several describers look at the same file; it is read once, and only as far as
    needed: a .safetensors header answers `names` and `layout` without reading tensor data."""

    path: Path

    @cached_property
    def is_weights_file(self) -> bool:
        """A file named as weights (so a broken one gets its sniffed diagnosis) or holding weights by content."""
        return self.path.is_file() and (self.path.suffix.lower() in SUPPORTED_SUFFIXES or sniff(self.path).is_weights)

    @cached_property
    def _header_names(self) -> list[str] | None:
        return tensor_names(self.path)  # None for a torch checkpoint, whatever the extension says

    @cached_property
    def is_safetensors(self) -> bool:
        """Whether the content is safetensors (a header to read names and shapes from), not the extension."""
        return self._header_names is not None

    @cached_property
    def checkpoint(self) -> Checkpoint:
        return read_checkpoint(self.path)

    @cached_property
    def names(self) -> list[str]:
        return self._header_names if self.is_safetensors else list(self.checkpoint.tensors)

    @cached_property
    def layout(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors as far as names, shapes and dtypes go, and the safetensors metadata. From a .safetensors
        header these are meta tensors (no data); a torch pickle has no header, so it is read."""
        if not self.is_safetensors:  # a broken file (Git LFS pointer, empty, web page) is refused in there
            return self.checkpoint.tensors, self.checkpoint.metadata
        with safe_open(str(self.path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            header = {name: f.get_slice(name) for name in f.keys()}
            tensors = {name: self._meta(name, part.get_shape(), part.get_dtype()) for name, part in header.items()}
        return tensors, metadata

    def _meta(self, name: str, shape: list[int], code: str) -> torch.Tensor:
        if code not in _TORCH_DTYPES:
            raise KinemaError(f"{self.path}: tensor {name} has the safetensors dtype {code}, which kinema does not "
                              f"read (it reads {', '.join(_TORCH_DTYPES)})")
        return torch.empty(shape, dtype=_TORCH_DTYPES[code], device="meta")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors `names` with their data; from a .safetensors file, only those are read."""
        if not self.is_safetensors:
            return {name: self.checkpoint.tensors[name] for name in names}
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in names}

    @property
    def dropped(self) -> dict[str, str]:
        """Non-tensor entries a torch pickle held (a .safetensors file holds tensors only)."""
        return {} if self.is_safetensors else self.checkpoint.dropped


def _named(path: Path, err: KinemaError) -> KinemaError:
    """`err` with `path` in front, unless its message names the path already."""
    message = str(err)
    return KinemaError(message if str(path) in message else f"{path}: {message}")


def _motion_report(info, dropped: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "motion_module", "format": info.format, "version": info.version, "keys": info.num_keys,
        "parameters": info.num_params, "max_frames": info.max_frames, "max_frames_source": info.max_frames_source,
        "dtype": info.dtype, "mid_block": info.mid_block, "channels": list(info.channels),
        "num_attention_heads": info.num_attention_heads, "norm_num_groups": info.norm_num_groups,
        "norm_mode": info.norm_mode, "resnet_norm_mode": info.resnet_norm_mode, "dropped": dropped,
    }


def _check_motion_module(weights: Source, config: dict | None, shown: Path) -> dict[str, Any]:
    from kinema.loaders.animatediff import check_frame_tables, detect_motion_module
    from kinema.loaders.animatediff_keys import is_pe_key

    tensors, metadata = weights.layout
    try:
        # Every name and shape is checked from the header; then only the small frame tables are read, for values.
        info = detect_motion_module(tensors, metadata if config is None else None, config)
        check_frame_tables(weights.read(name for name in tensors if is_pe_key(name)))
    except KinemaError as err:
        raise _named(shown, err) from None
    return _motion_report(info, weights.dropped)


def describe_motion_module(source: Source) -> dict[str, Any] | None:
    """An AnimateDiff motion module: original or kinema file, or a diffusers MotionAdapter folder."""
    path = source.path
    if path.is_dir():
        if not (path / "config.json").is_file():
            return None
        from kinema.loaders.animatediff import adapter_files

        if read_json_object(path / "config.json", "a model config").get("_class_name") != "MotionAdapter":
            return None
        config, weights = adapter_files(path)
        return _check_motion_module(Source(weights), config, path)
    if not source.is_weights_file:
        return None
    # Decided from the names, which a header gives: an EasyAnimate transformer is GBs, and not ours to load.
    temporal = any(".motion_modules." in k or "temporal_attentions." in k for k in source.names)
    if not temporal or any("lora" in k.lower() for k in source.names):  # motion LoRAs have their own describer
        return None
    return _check_motion_module(source, None, path)


def describe_motion_lora_file(source: Source) -> dict[str, Any] | None:
    """A motion LoRA file (kinema.loaders.motion_lora_keys); its names and shapes come from the header, and only
    the alpha scalars are read."""
    from kinema.loaders.motion_lora_keys import describe_motion_lora

    if not source.is_weights_file or not any("lora" in name.lower() for name in source.names):
        return None
    tensors, _ = source.layout
    try:
        return describe_motion_lora({**tensors, **source.read(k for k in tensors if k.endswith(".alpha"))})
    except KinemaError as err:
        raise _named(source.path, err) from None


def describe_easyanimate_path(source: Source) -> dict[str, Any] | None:
    """An EasyAnimate V3 folder or transformer file (kinema.loaders.easyanimate)."""
    from kinema.loaders.easyanimate import describe_easyanimate

    return describe_easyanimate(source.path)


def describe_slice_vae_path(source: Source) -> dict[str, Any] | None:
    """An EasyAnimate V3 Slice VAE folder (kinema.loaders.easyanimate_vae)."""
    from kinema.loaders.easyanimate_vae import describe_slice_vae

    return describe_slice_vae(source.path) if source.path.is_dir() else None


DESCRIBERS: list[tuple[str, Callable[[Source], dict[str, Any] | None]]] = [
    ("AnimateDiff motion module (file or diffusers MotionAdapter folder)", describe_motion_module),
    ("motion LoRA", describe_motion_lora_file),
    ("EasyAnimate V3 folder or transformer", describe_easyanimate_path),
    ("EasyAnimate V3 Slice VAE folder", describe_slice_vae_path),
]


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What `path` holds, as plain data (`{"kind" or "format": ..., ...}`), once every tensor name and shape has been
    checked against the layout detected; KinemaError when kinema knows no such format (naming what was looked for
    and what the file looks like) or when the file does not match its layout (naming the keys and shapes)."""
    path = Path(path)
    if not path.exists():
        raise KinemaError(f"no such file or folder: {path}")
    source = Source(path)
    for _, describer in DESCRIBERS:
        report = describer(source)
        if report is not None:
            return {"path": str(path), **report}
    hint = ""
    if source.is_weights_file:
        from kinema.loaders.animatediff import guess_kind

        hint = f"; {guess_kind(source.names)}"
    elif path.is_file():
        hint = f"; weights files kinema reads end in {', '.join(SUPPORTED_SUFFIXES)}"
    looked = "; ".join(name for name, _ in DESCRIBERS)
    raise KinemaError(f"{path}: not a format kinema knows: looked for {looked}{hint}")
