"""kinema.jsonl: the JSON Lines reader of `kinema batch`'s jobs and `kinema eval`'s prompts, line by line, with one
error line naming the file, the line and the fix for what a user's file gets wrong."""

from __future__ import annotations

import pytest

import kinema.jsonl as jsonl
from kinema.errors import KinemaError
from kinema.jsonl import read_json_lines


def read(path):
    return read_json_lines(path, what="job", example='{"prompt": "a cat"}')


def test_lines_are_read_with_their_numbers_past_blank_lines_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a cat"}\r\n\n  \n{"prompt": "a caf\xc3\xa9 \\ud83d\\ude00"}\n')
    assert read(path) == [(f"{path} line 1", 1, {"prompt": "a cat"}),
                          (f"{path} line 4", 4, {"prompt": "a caf\u00e9 \U0001F600"})]  # a surrogate pair is one char


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "a"}\n{"prompt": "b\xff"}\n', r"line 2: not UTF-8 text \(byte 0xff at column 14\); save the job file "
                                                r"as UTF-8"),
    (b'{"prompt": "a", "seed": 1, "prompt": "b"}\n', r"line 1: the key 'prompt' appears twice; give each key once"),
    (b'{"prompt": "a", "loras": [{"path": "x", "path": "y"}]}\n', r"line 1: the key 'path' appears twice"),
    (b'{"prompt": "a \\ud800 cat"}\n', r"line 1: the text 'a \\ud800 cat' holds a lone surrogate \(a"),
    (b'{"prompt": "a", "extra": {"\\udfff": 1}}\n', r"line 1: the text '\\udfff' holds a lone surrogate \(a"),
    (b"\x00\x01binary", r"is not a text file, so it cannot be a job file"),
    (b"\n\n", r"holds no jobs; write one JSON object per line"),
])
def test_bad_files_get_one_line_naming_the_line_and_the_fix(tmp_path, content, message):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(content)
    with pytest.raises(KinemaError, match=message):
        read(path)


def test_a_file_far_too_large_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_JSON_LINES_BYTES", 64)
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "a cat"}\n' * 4)  # 80 bytes
    with pytest.raises(KinemaError, match=r"jobs.jsonl is over 0 MiB, far more than a job file"):
        read(path)
    path.write_text('{"prompt": "a cat"}\n' * 3)
    assert len(read(path)) == 3
    with pytest.raises(KinemaError, match=r"is over 0 MiB"):  # a device that never ends
        read("/dev/zero")
