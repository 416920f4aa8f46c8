"""The one error type kinema raises for bad input, and the funnel that turns OS and library errors into it.

A `KinemaError` carries a message written for the person at the keyboard: what is wrong and how to fix it.
The CLI prints it as one line and exits 1; library users catch it like any `ValueError`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


class KinemaError(ValueError):
    """Bad input (file, size, frame count, config or checkpoint), with a message that names the problem and the fix."""


def value_words(value: Any) -> str:
    """How a refusal names a value it got: `null`, `float 8.5`, `str '6'` (its type, then its repr, shortened)."""
    return "null" if value is None else f"{type(value).__name__} {shorten(repr(value), 60)}"


def count_words(n: int, noun: str) -> str:
    """`1 frame`, `16 frames`: how messages count (nouns whose plural takes an `s`)."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def shorten(text: str, limit: int = 300) -> str:
    """`text` on one line, cut at a word boundary to at most about `limit` characters (never mid-word), with `…`."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + " …"


# errno -> what it means to the user, and what to do
_OS_CAUSES: dict[int, str] = {
    errno.ENOSPC: "the disk is full; free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write somewhere else",
    errno.EACCES: "permission denied; check the folder's permissions or write somewhere else",
    errno.EPERM: "operation not permitted; check the permissions or write somewhere else",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOTEMPTY: "the folder is not empty",
    errno.EEXIST: "it already exists",
    errno.EBUSY: "it is in use (the current folder or a mount point?)",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EXDEV: "it is on another file system",
    errno.EMFILE: "too many open files",
    errno.EIO: "an input/output error from the disk",
}

# Hidden names kinema gives its temporary files and folders (see kinema.fileio); never shown to the user.
_TEMP_NAME = re.compile(r"/?\.[^/\s]*\.kinema-(?:part|old)-\d+[^/\s]*")
_TEMP_IN_PATH = re.compile(r"(^|/)\.([^/\s]+)\.kinema-(?:part|old)-\d+(?=/|$|\s|:|,)")


def with_article(words: str) -> str:
    """`words` after "a" or "an", as a message says them: "an easyanimate transformer", "a motion module"."""
    return f"{'an' if words[:1].lower() in tuple('aeiou') else 'a'} {words}"


def lone_surrogate(value: Any) -> str | None:
    """The first string in `value` (a string, or the keys and values of lists, tuples and dicts within) holding a
    lone UTF-16 surrogate, which JSON's \\ud800 escapes and non-UTF-8 bytes on a command line make and no text encoder
    or file name takes; None when there is none."""
    if isinstance(value, str):
        return value if any(0xD800 <= ord(char) <= 0xDFFF for char in value) else None
    if isinstance(value, Mapping):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        for item in value:
            found = lone_surrogate(item)
            if found is not None:
                return found
    return None


def lone_surrogate_error(text: str) -> KinemaError:
    """The refusal of `text`, which holds a lone surrogate (`lone_surrogate`)."""
    return KinemaError(f"the text '{text.encode('utf-8', 'backslashreplace').decode()}' holds a lone surrogate (a "
                       "\\ud800-\\udfff escape in JSON, or bytes that are not UTF-8 on a command line), which is no "
                       "character; write the character itself, or both halves of its pair")


def without_temporaries(text: str) -> str:
    """`text` with each path through a temporary kinema writes under put as the user's own path (see kinema.fileio:
    `dir/.out.kinema-part-7/x` -> `dir/out/x`)."""
    return _TEMP_IN_PATH.sub(r"\1\2", text)


def os_error_message(err: OSError, path: str | os.PathLike | None = None, action: str = "") -> str:
    """One line for an OS error: `cannot ACTION PATH: cause`, naming the user's `path` rather than a temp path."""
    shown = path if path is not None else err.filename
    if shown is not None:
        shown = without_temporaries(str(shown))
    cause = _OS_CAUSES.get(err.errno or -1) or shorten(err.strerror or str(err))
    if shown is None and not action:  # nothing to name but the cause (callers prefix "error:" themselves)
        return cause
    subject = f"cannot {action} {shown}" if action else f"{shown}"
    if shown is None:
        subject = f"cannot {action}"
    return f"{subject}: {cause}"


# How libraries that do their own I/O (torch's zip writer, safetensors' Rust writer) report a full disk.
# torch's zip writer on a full disk fails "at inline_container" with "unexpected pos" or "file write failed"; its
# reader fails there too on a damaged file ("file in archive is not in a subdirectory"), which is no full disk.
_DISK_FULL = re.compile(r"No space left on device|os error 28|file write failed|"
                        r"enforce fail at inline_container.*unexpected pos")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, from the OS or from a library's own writer, means the disk ran out of space."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return bool(_DISK_FULL.search(str(err)))


def library_error_message(err: BaseException) -> str:
    """One line for an unexpected library error: its type and message, temp names removed, cut at a word."""
    if is_disk_full(err):
        return "writing the file failed (the disk is probably full); free some space or write somewhere else"
    text = _TORCH_ASKS.sub("", _TEMP_NAME.sub("", str(err)))
    return shorten(f"{type(err).__name__}: {text}")


# torch ends some errors by asking for bug reports ("If you are a Facebook employee ...", "Could this error message be
# improved? ..."): words for its developers, not for a user.
_TORCH_ASKS = re.compile(r"\s*(\(Could this error message be improved\?.*?\)|If you are a Facebook employee.*)",
                         re.DOTALL)


def naming(path: str | os.PathLike, err: KinemaError) -> KinemaError:
    """`err` with `path` in front, unless its message names the path already: errors about a file say which."""
    message = str(err)
    return KinemaError(message if str(path) in message else f"{path}: {message}")


@contextmanager
def without_library_notices(notices: Mapping[str, tuple[str, ...]]) -> Iterator[None]:
    """Within this block, library loggers (`notices`' keys) drop the records whose message holds one of the texts
    given for them: notices that tell a kinema user nothing (kinema says what matters itself)."""
    def keep(record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in notices.get(record.name, ()))

    noisy = [logging.getLogger(name) for name in notices]
    for library_logger in noisy:
        library_logger.addFilter(keep)
    try:
        yield
    finally:
        for library_logger in noisy:
            library_logger.removeFilter(keep)
