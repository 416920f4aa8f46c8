"""Reading a user's JSON Lines file (one JSON object per line): `kinema batch`'s jobs, `kinema eval`'s prompts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError, os_error_message
from kinema.fileio import json_kind


def read_json_lines(path: str | os.PathLike, *, what: str, example: str) -> list[tuple[str, int, dict[str, Any]]]:
    """`(where, line number, object)` for each non-blank line of `path`, where is `"PATH line N"` for messages.

    `what` names one line's object ("job", "prompt") and `example` shows one, for the messages: a missing or binary
    file, a line that is not JSON or not an object, and a file without any line each raise one KinemaError naming
    the file, the line and the fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise KinemaError(f"no such {what} file: {path} (JSON Lines: one {what} object per line)") from None
    except UnicodeDecodeError:
        raise KinemaError(f"{path} is not a text file, so it cannot be a {what} file (JSON Lines)") from None
    except OSError as err:
        raise KinemaError(os_error_message(err, path, f"read the {what} file")) from None
    lines = []
    # JSON Lines ends lines with \n (and \r\n) only: U+2028 and the like are text inside a JSON string.
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            raise KinemaError(f"{where}: not valid JSON at column {err.colno}: {err.msg}; each line holds one {what} "
                              f"as a JSON object such as {example}") from None
        except RecursionError:  # the parser recurses once per nesting level
            raise KinemaError(f"{where}: JSON nested too deeply to read; each line holds one {what} as a JSON "
                              f"object such as {example}") from None
        if not isinstance(value, dict):
            raise KinemaError(f"{where} holds {json_kind(value)}, not a {what} object such as {example}")
        lines.append((where, number, value))
    if not lines:
        raise KinemaError(f"{path} holds no {what}s; write one JSON object per line, such as {example}")
    return lines
