"""`kinema inspect`: say what a weights file or model folder is, and check it is whole.

Describers take a `Source` (the path, with its tensor names and tensors read at most once, on first use) and return
a summary dict, or None when the path is not their kind. They are tried in the order of the format registry
(kinema.loaders.formats.FORMATS) and the first answer wins. A describer that recognises its kind checks every
tensor name and shape against the layout it detected and raises KinemaError when the file is broken or unsupported,
so a damaged motion module is reported as such rather than as "unknown", and `kinema convert` (which describes
first) writes nothing from it.

Names and shapes come from a .safetensors header, never from tensor data, so checking a file of GBs is quick. This
module imports no model code: each describer imports what it needs, after `describe` has found the path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kinema.errors import KinemaError
from kinema.loaders.checkpoint_io import (
    SAFETENSORS_DTYPES,
    SUPPORTED_SUFFIXES,
    Checkpoint,
    check_weight_values,
    read_checkpoint,
    tensor_names,
)
from kinema.loaders.formats import FORMATS
from kinema.sniff import sniff

# safetensors dtype codes -> torch dtypes, for shape-only (meta) tensors made from a header.
_TORCH_DTYPES = {code: getattr(torch, name) for code, name in SAFETENSORS_DTYPES.items()}


# The down and up matrix names of one LoRA layer: kohya/civitai, peft/diffusers, and AnimateDiff's
# attention-processor form (motion LoRAs and AnimateDiff v3's domain adapter).
LORA_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
              (".down.weight", ".up.weight"))
IMAGE_LORA_DOWN = tuple(down for down, _ in LORA_PAIRS)
# What every motion-module tensor name holds, in every layout (motion LoRAs included).
MOTION_MODULE_NAME = ".motion_modules."


@dataclass
class Source:
    """A path being described. Several describers look at the same file; it is read once, and only as far as
    needed: a .safetensors header answers `names` and `layout` without reading tensor data. `options` are the
    options of the load it is described for, for a describer whose check depends on them (a Stable Diffusion
    single file is checked against the component configs of `config=`)."""

    path: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    _files_inside: dict[Path, Source] = field(default_factory=dict, init=False, repr=False, compare=False)

    def file_inside(self, path: Path) -> Source:
        """The `Source` of a file in this folder (e.g. a MotionAdapter's weights), made on first use and kept, so
        that a describer and the loader after it share its reads: a torch pickle there is unpickled once too."""
        if path not in self._files_inside:
            self._files_inside[path] = Source(path, self.options)
        return self._files_inside[path]

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
        header_names = self._header_names
        return header_names if header_names is not None else list(self.checkpoint.tensors)

    @property
    def holds_image_lora(self) -> bool:
        """A weights file with LoRA matrices outside motion modules, by their names: what `load_spatial_lora`
        fuses (a file may hold a motion LoRA beside them)."""
        return self.is_weights_file and any(name.endswith(IMAGE_LORA_DOWN) and MOTION_MODULE_NAME not in name
                                            for name in self.names)

    @property
    def holds_motion_weights(self) -> bool:
        """A weights file with tensors of motion modules, by their names."""
        return self.is_weights_file and any(MOTION_MODULE_NAME in name for name in self.names)

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


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What `path` holds, as plain data (`{"kind" or "format": ..., ...}`), once every tensor name and shape has been
    checked against the layout detected; KinemaError when kinema knows no such format (naming what was looked for
    and what the file looks like) or when the file does not match its layout (naming the keys and shapes)."""
    return describe_source(Source(Path(path)))


# Kinds whose files hold weights only (an SD single file also holds integer buffers such as position_ids).
_WEIGHTS_ONLY_KINDS = ("motion_module", "motion_lora")
# kinema's own outputs that hold no weights, and what takes each: `kinema inspect` given one says so.
_NOT_WEIGHTS = {"latents": ": `kinema decode` makes its video",
                "video": ": `kinema extend` and `kinema v2v` take it; its settings are in its sidecar",
                "video_settings": ": the settings of the video beside it",
                "synth_dataset": ": `kinema train` takes it as data.root",
                "training_export": ": the weights are inside it: model/ a model folder (--model), "
                                   "motion_module.safetensors a motion module (--motion-module, with the model it "
                                   "trained on), lora.safetensors a LoRA (--lora)", "eval": "", "eval_prompts": "",
                "embedding_cache": "", "prompt_config": "", "job": "",
                "training_run": ": its final/ holds the trained weights, and `kinema train CONFIG --resume latest` "
                                "continues it",
                "training_checkpoint": ": `kinema train CONFIG --resume PATH` continues from it, and the run's "
                                       "final/ holds the exported weights"}


def describe_source(source: Source) -> dict[str, Any]:
    """`describe` of a `Source` whose reads the caller keeps (e.g. `convert`, which then converts from it)."""
    path = source.path
    if not path.exists():
        raise KinemaError(f"no such file or folder: {path}")
    if path.is_dir() and not any(path.iterdir()):
        raise KinemaError(f"{path} is an empty folder, not weights or a model folder")  # callers add their fix
    for entry in FORMATS:
        report = entry.function("describe")(source)
        if report is not None:
            if report.get("kind") in _WEIGHTS_ONLY_KINDS and source.is_weights_file:
                check_weight_values(source.layout[0], f"{path} (a {report['kind'].replace('_', ' ')})")
            return {"path": str(path), **report}
    from kinema.fileio import RUN_FILE, RUN_KIND, kind_words, output_kind

    hint = ""
    own = output_kind(path)
    if own is None and path.name == RUN_FILE:
        own = RUN_KIND
    if own in _NOT_WEIGHTS:
        hint = f"; it is kinema's own {kind_words(own)} output, not weights{_NOT_WEIGHTS[own]}"
    elif source.is_weights_file:
        from kinema.loaders.animatediff.structure import guess_kind  # names what else the file looks like

        hint = f"; {guess_kind(source.names)}"
    elif path.is_file():
        hint = f"; weights files kinema reads end in {', '.join(SUPPORTED_SUFFIXES)}"
    elif (path / "config.json").is_file() and any((path.parent / name).is_file()
                                                  for name in ("model_index.json", "kinema.json")):
        hint = f"; it is the {path.name}/ part of the model folder {path.parent}: give that folder"
    elif path.is_dir() and not (path / "config.json").is_file() and any(
            child.is_file() and child.suffix in SUPPORTED_SUFFIXES for child in path.iterdir()):
        # A diffusers folder (MotionAdapter, AutoencoderKL, ControlNet, UNet) is built from its config.json.
        weights = sorted(child.name for child in path.iterdir() if child.suffix in SUPPORTED_SUFFIXES)
        hint = (f"; it holds {weights[0]} but no config.json, which a diffusers folder is built from: download the "
                "whole folder (a partial download?)")
    looked = "; ".join(entry.label for entry in FORMATS)
    raise KinemaError(f"{path}: not a format kinema knows: looked for {looked}{hint}")
