"""Reading a user's JSON Lines file (one JSON object per line): `kinema batch`'s jobs, `kinema eval`'s prompts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError, lone_surrogate, lone_surrogate_error, os_error_message
from kinema.fileio import json_kind

# A JSON Lines file larger than this is refused before it is read whole: a job or prompt line is short, so a file
# this size is a wrong path (a video, a device such as /dev/zero), not a list of lines.
MAX_JSON_LINES_BYTES = 64 * 1024 * 1024


class _Duplicate(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object hook: an object naming one key twice is refused (json keeps the last, silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


def loads_once_each(text: str | bytes) -> Any:
    """json.loads, refusing an object that names a key twice (json keeps the last, silently) with one KinemaError;
    json's own errors (ValueError, RecursionError) pass through."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _Duplicate as err:
        raise KinemaError(f"the key {str(err)!r} appears twice; give each key once") from None


def read_json_lines(path: str | os.PathLike, *, what: str, example: str) -> list[tuple[str, int, dict[str, Any]]]:
    """`(where, line number, object)` for each non-blank line of `path`, where is `"PATH line N"` for messages.

    `what` names one line's object ("job", "prompt") and `example` shows one, for the messages: a missing, binary or
    oversized file, a line that is not UTF-8 or not JSON or not an object, an object naming a key twice, text with a
    lone surrogate escape, and a file without any line each raise one KinemaError naming the file, the line and the
    fix."""
    path = Path(path)
    try:
        with path.open("rb") as f:  # a pipe too (`<(...)`); reading stops past the cap, so /dev/zero ends
            data = f.read(MAX_JSON_LINES_BYTES + 1)
    except FileNotFoundError:
        raise KinemaError(f"no such {what} file: {path} (JSON Lines: one {what} object per line)") from None
    except OSError as err:
        raise KinemaError(os_error_message(err, path, f"read the {what} file")) from None
    if len(data) > MAX_JSON_LINES_BYTES:
        raise KinemaError(f"{path} is over {MAX_JSON_LINES_BYTES // 2**20} MiB, far more than a {what} file (JSON "
                          f"Lines) holds; check the path, or split the file")
    if b"\0" in data[:8192]:
        raise KinemaError(f"{path} is not a text file, so it cannot be a {what} file (JSON Lines)")
    lines = []
    # JSON Lines ends lines with \n (and \r\n) only: U+2028 and the like are text inside a JSON string.
    for number, raw_bytes in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        where = f"{path} line {number}"
        try:
            raw = raw_bytes.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as err:
            raise KinemaError(f"{where}: not UTF-8 text (byte 0x{raw_bytes[err.start]:02x} at column {err.start + 1}); "
                              f"save the {what} file as UTF-8") from None
        if not raw.strip():
            continue
        try:
            value = loads_once_each(raw)
        except KinemaError as err:
            raise KinemaError(f"{where}: {err}") from None
        except json.JSONDecodeError as err:
            raise KinemaError(f"{where}: not valid JSON at column {err.colno}: {err.msg}; each line holds one {what} "
                              f"as a JSON object such as {example}") from None
        except RecursionError:  # the parser recurses once per nesting level
            raise KinemaError(f"{where}: JSON nested too deeply to read; each line holds one {what} as a JSON "
                              f"object such as {example}") from None
        if not isinstance(value, dict):
            raise KinemaError(f"{where} holds {json_kind(value)}, not a {what} object such as {example}")
        surrogate = lone_surrogate(value)
        if surrogate is not None:
            raise KinemaError(f"{where}: {lone_surrogate_error(surrogate)}")
        lines.append((where, number, value))
    if not lines:
        raise KinemaError(f"{path} holds no {what}s; write one JSON object per line, such as {example}")
    return lines
