"""Atomic writes: an output appears whole or not at all.

Everything kinema saves (videos, datasets, converted checkpoints) is written under a temporary name beside its
target and renamed into place at the end, so an interrupted run leaves the old output (or nothing) and no half.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def replace_folder(temp: Path, path: Path) -> None:
    """Move the finished folder `temp` to `path`, swapping out an old `path` only once `temp` is complete."""
    if not path.exists():
        os.replace(temp, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    os.replace(path, old / "old")
    os.replace(temp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without error it replaces `path`
    whole, and on any error (or Ctrl-C) it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part"))
    try:
        yield temp
        replace_folder(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
