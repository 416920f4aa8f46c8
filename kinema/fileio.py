"""Atomic writes: an output appears whole or not at all.

Everything kinema saves (videos, datasets, converted checkpoints) is written under a temporary name beside its
target and renamed into place at the end, so an interrupted run leaves the old output (or nothing) and no half.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError, os_error_message


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


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """Parse the JSON file `path`; a missing, unreadable or malformed file raises one KinemaError naming the file
    (and `what` it should be, e.g. "the transformer's config") with the line and column of a syntax error."""
    path = Path(path)
    label = f"{path} ({what})" if what else str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows add a byte-order mark
    except UnicodeDecodeError:
        raise KinemaError(f"{label} is not a text file, so it cannot be JSON (binary data in it)") from None
    except OSError as err:
        raise KinemaError(os_error_message(err, label, "read")) from None
    if text.lstrip().startswith("version https://git-lfs"):
        raise KinemaError(f"{label} is a Git LFS pointer, not the file itself (run `git lfs pull` in its repository)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise KinemaError(f"{label} is not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
