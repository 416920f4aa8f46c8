"""`kinema convert`: rewrite a weights file or folder in another layout without changing a weight.

What the input is comes from `kinema inspect`'s describers; each kind has one converter and the layouts it writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kinema.errors import KinemaError
from kinema.fileio import check_output
from kinema.loaders.animatediff import convert_motion_module
from kinema.loaders.checkpoint_io import read_state_dict, write_state_dict
from kinema.loaders.easyanimate import convert_easyanimate_transformer
from kinema.loaders.inspect import describe
from kinema.loaders.motion_lora import convert_motion_lora

Converter = Callable[[str | os.PathLike, str | os.PathLike, str], tuple[Path, list[str]]]


def convert_motion_lora_file(
    source: str | os.PathLike, target: str | os.PathLike, to: str, *, overwrite: bool = False
) -> tuple[Path, list[str]]:
    """Rename a motion LoRA file's keys into layout `to`; tensors are copied as they are."""
    converted = convert_motion_lora(read_state_dict(source), to)
    return write_state_dict(converted, target, kind="motion_lora", overwrite=overwrite, inputs=(source,)), []


# kind reported by `describe` -> (converter, layouts it writes)
CONVERTERS: dict[str, tuple[Converter, tuple[str, ...]]] = {
    "motion_module": (convert_motion_module, ("original", "diffusers", "kinema")),
    "motion_lora": (convert_motion_lora_file, ("original", "diffusers", "diffusers_peft", "kinema")),
    "easyanimate_transformer": (convert_easyanimate_transformer, ("original", "kinema")),
}
LAYOUTS = tuple(dict.fromkeys(layout for _, layouts in CONVERTERS.values() for layout in layouts))


# kind reported by `describe` -> the output written for layout: a folder, or a file
_FOLDER_OUTPUTS = {("motion_module", "diffusers"), ("easyanimate_transformer", "original"),
                   ("easyanimate_transformer", "kinema")}


def convert(
    source: str | os.PathLike, target: str | os.PathLike, to: str, *, overwrite: bool = False
) -> tuple[Path, list[str]]:
    """Convert whatever `source` is into layout `to` at `target`; returns the written path and notes for the user.
    `target` follows kinema's output policy (kinema.fileio): a new path, or with `overwrite` an earlier kinema
    output of the same kind; never a file or folder kinema did not write, never the input or a folder holding it."""
    # The policy is checked before reading (a V3 transformer is GBs) and again once the kind is known.
    check_output(target, None, folder=None, overwrite=overwrite, inputs=(source,))
    report = describe(source)
    kind = report["kind"]
    if kind not in CONVERTERS:
        raise KinemaError(f"{source} is {kind}; kinema converts {sorted(CONVERTERS)}")
    converter, layouts = CONVERTERS[kind]
    if to not in layouts:
        raise KinemaError(f"a {kind} converts to {list(layouts)}, not {to!r}")
    check_output(target, kind, folder=(kind, to) in _FOLDER_OUTPUTS, overwrite=overwrite, inputs=(source,))
    return converter(source, target, to, overwrite=overwrite)
