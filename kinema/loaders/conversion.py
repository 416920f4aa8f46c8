"""`kinema convert`: rewrite a weights file or folder in another layout without changing a weight.

What the input is comes from `describe`; the format registry (kinema.loaders.formats) gives each kind's converter
and the layouts it writes. The converter gets the described source, so nothing describe read is read again.
"""

from __future__ import annotations

import os
from pathlib import Path

from kinema.errors import KinemaError, with_article
from kinema.fileio import check_output
from kinema.loaders.formats import Format, convertible_words, format_of
from kinema.loaders.source import Source, describe_source


def convert(
    source: str | os.PathLike, target: str | os.PathLike, to: str, *, overwrite: bool = False
) -> tuple[Path, list[str]]:
    """Convert whatever `source` is into layout `to` at `target`; returns the written path and notes for the user.
    `target` follows kinema's output policy (kinema.fileio): a new path, or with `overwrite` an earlier kinema
    output of the same kind; never a file or folder kinema did not write, never the input or a folder holding it."""
    from kinema.errors import value_words

    for name, value in (("source", source), ("target", target)):
        if not isinstance(value, str | os.PathLike):
            raise KinemaError(f"convert's {name} is a path, got {value_words(value)}")
        if not os.fspath(value).strip():  # pathlib reads "" as the current folder
            raise KinemaError(f"convert's {name} is empty; give a path")
    if not isinstance(overwrite, bool):
        raise KinemaError(f"overwrite must be True or False, got {value_words(overwrite)}")
    # The policy is checked before reading (a V3 transformer is GBs) and again once the kind is known.
    check_output(target, None, folder=None, overwrite=overwrite, inputs=(source,))
    described = Source(Path(source))
    kind = describe_source(described)["kind"]
    entry = format_of(kind)
    if entry.convert is None:
        raise KinemaError(f"kinema converts {convertible_words()}; {source} is none of these ({entry.name})")
    if to not in entry.layouts:
        raise KinemaError(f"{with_article(entry.name)} converts to {list(entry.layouts)}, not {to!r}")
    check_output(target, kind, folder=to in entry.folder_layouts, overwrite=overwrite, inputs=(source,))
    _check_target_form(Path(target), entry, to, os.fspath(target).endswith(("/", os.sep)))
    return entry.function("convert")(described, Path(target), to, overwrite=overwrite)


def _check_target_form(target: Path, entry: Format, to: str, as_folder: bool) -> None:
    """The target path has the form layout `to` is written in (a folder, or a file of a weights suffix), checked
    before the weights are read; `as_folder`: it was given with a trailing slash."""
    from kinema.loaders.checkpoint_io import SAFETENSORS_SUFFIXES, SUPPORTED_SUFFIXES

    if to in entry.folder_layouts:
        if target.suffix:
            raise KinemaError(f"the {to} layout of {with_article(entry.name)} is a folder; give a folder path "
                              f"without an extension, got {target}")
        return
    suffixes = SAFETENSORS_SUFFIXES if to in entry.safetensors_layouts else SUPPORTED_SUFFIXES
    if as_folder:
        raise KinemaError(f"the {to} layout of {with_article(entry.name)} is one {' or '.join(suffixes)} file, "
                          f"but {target}/ ends with a slash, as a folder does; give the file's name without it")
    if target.suffix.lower() not in suffixes:
        raise KinemaError(f"the {to} layout of {with_article(entry.name)} is a {' or '.join(suffixes)} file, "
                          f"got {target}")
