"""Say what a file is from its first bytes, so a file that should hold weights gets the right one-line diagnosis.

Downloads go wrong in a few typical ways: the server sends an HTML page or an XML error instead of the file, a git
clone without git-lfs leaves pointer text files, a download stops half way, or the file is renamed (a safetensors
file saved as `.ckpt`). The extension says nothing about which; the content does. `sniff` reads the first 4 KiB
(plus, for a safetensors file, its whole header, to check the file is as long as the header says; for a zip, its
directory) and returns a `FileKind`: what the file is, whether kinema can read weights from it, and the line to
print when it cannot.
"""

from __future__ import annotations

import codecs
import json
import os
import pickletools
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError, os_error_message, shorten

HEAD_BYTES = 4096
# The safetensors format caps its JSON header at 100 MB; a larger length is not a safetensors file.
SAFETENSORS_MAX_HEADER = 100_000_000
# torch.save's legacy (pre-1.6, non-zip) format starts with this number, pickled with protocol 2.
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_DOWNLOAD_AGAIN = "download the file again"


class Kind(Enum):
    """What a file is. SAFETENSORS, TORCH_ZIP and PICKLE hold weights kinema can read (see `FileKind.is_weights`)."""

    EMPTY = "empty"
    SAFETENSORS = "safetensors"
    SAFETENSORS_TRUNCATED = "truncated safetensors"
    SAFETENSORS_DAMAGED = "damaged safetensors"
    TORCH_ZIP = "torch zip checkpoint"
    PICKLE = "pickle"
    ARCHIVE = "archive"  # a zip that is no torch checkpoint, gzip, tar, ...
    OTHER_FORMAT = "other format"  # GGUF, HDF5, NumPy, images: known formats that are not weights kinema reads
    LFS_POINTER = "Git LFS pointer"
    HTML = "HTML page"
    XML = "XML document"
    JSON = "JSON"
    TEXT = "text"
    BINARY = "unknown binary"


WEIGHTS_KINDS = frozenset({Kind.SAFETENSORS, Kind.TORCH_ZIP, Kind.PICKLE})


@dataclass(frozen=True)
class FileKind:
    """The sniffed kind of `path` and `what` it is in a few words ("an HTML page (title: '404 Not Found')");
    `diagnosis` is the one line to print when the file was expected to hold weights."""

    path: Path
    kind: Kind
    what: str
    advice: str = ""  # how to get the real file; empty for the kinds that hold weights
    metadata: dict[str, str] = field(default_factory=dict, hash=False)  # a safetensors file's `__metadata__`
    names: tuple[str, ...] = field(default=(), hash=False)  # a safetensors file's tensor names, from its header
    shapes: tuple[tuple[int, ...], ...] = field(default=(), hash=False)  # ... and their shapes, in the same order

    @property
    def is_weights(self) -> bool:
        """True for safetensors and torch checkpoints (zip or pickle): the content kinema's readers take."""
        return self.kind in WEIGHTS_KINDS

    @property
    def diagnosis(self) -> str:
        """`PATH is WHAT[; ADVICE]`, e.g. "w.ckpt is a text file, not weights; check the path; ..."."""
        return f"{self.path} is {self.what}" + (f"; {self.advice}" if self.advice else "")


_UNPACK = "unpack it and point at the weights inside"
# (offset, magic bytes, kind, what, advice) of formats that are cheap to recognise and are not weights kinema reads.
_MAGIC: list[tuple[int, bytes, Kind, str, str]] = [
    *((0, magic, Kind.ARCHIVE, f"a {name}-compressed file, not weights", f"decompress it ({tool}) and use the file")
      for magic, name, tool in ((b"\x1f\x8b", "gzip", "gunzip"), (b"BZh", "bzip2", "bunzip2"),
                                (b"\xfd7zXZ\x00", "xz", "unxz"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"))),
    (0, b"7z\xbc\xaf\x27\x1c", Kind.ARCHIVE, "a 7-Zip archive, not weights", _UNPACK),
    (0, b"Rar!\x1a\x07", Kind.ARCHIVE, "a RAR archive, not weights", _UNPACK),
    (257, b"ustar", Kind.ARCHIVE, "a tar archive, not weights", _UNPACK),
    (0, b"GGUF", Kind.OTHER_FORMAT, "a GGUF file (quantised weights for llama.cpp / ComfyUI-GGUF), which kinema does "
     "not read", "use the model's .safetensors release"),
    (0, b"\x89HDF\r\n\x1a\n", Kind.OTHER_FORMAT, "an HDF5 file (Keras / TensorFlow .h5 weights), which kinema "
     "does not read", "use the model's PyTorch .safetensors release"),
    (0, b"\x93NUMPY", Kind.OTHER_FORMAT, "a NumPy .npy array, not a weights file", "give a .safetensors or torch file"),
    (0, b"\x89PNG\r\n\x1a\n", Kind.OTHER_FORMAT, "a PNG image, not weights", "check the path"),
    (0, b"\xff\xd8\xff", Kind.OTHER_FORMAT, "a JPEG image, not weights", "check the path"),
    (0, b"%PDF-", Kind.OTHER_FORMAT, "a PDF document, not weights", "check the path"),
    # Videos and animations, e.g. a model's sample clip saved in place of its weights.
    *((offset, magic, Kind.OTHER_FORMAT, f"{what}, not weights",
       "check the path (`kinema extend` and `kinema v2v` take videos)")
      for offset, magic, what in ((4, b"ftyp", "an MP4 / MOV video"), (0, b"\x1aE\xdf\xa3", "a WebM / Matroska video"),
                                  (0, b"GIF8", "a GIF image or animation"), (8, b"WEBP", "a WebP image or animation"),
                                  (8, b"AVI ", "an AVI video"))),
]

# Byte-order marks, longest first (UTF-32's begin with UTF-16's).
_BOMS: list[tuple[bytes, str, str]] = [
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8 with a byte-order mark"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
]


def _safetensors(path: Path, f, head: bytes, size: int) -> FileKind | None:
    """A safetensors file: 8-byte little-endian header length N, then N bytes of JSON starting with `{`, then the
    tensor data, which must end exactly where the header's last data offset says."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if length > SAFETENSORS_MAX_HEADER:  # the JSON is there, so the length before it was damaged
        return FileKind(path, Kind.SAFETENSORS_DAMAGED, f"a safetensors file with a damaged header (its length field "
                        f"says {length} bytes, over the format's cap of {SAFETENSORS_MAX_HEADER})", _DOWNLOAD_AGAIN)
    if length < 2:
        return None
    if 8 + length > size:
        return FileKind(path, Kind.SAFETENSORS_TRUNCATED, f"a safetensors file whose header says it is at least "
                        f"{8 + length} bytes but the file has {size}: truncated download", _DOWNLOAD_AGAIN)
    f.seek(8)
    try:
        header = json.loads(f.read(length))
        offsets = [entry["data_offsets"] for name, entry in header.items() if name != "__metadata__"]
        end = max((int(stop) for _, stop in offsets), default=0)
        shapes = tuple(tuple(int(size) for size in entry["shape"]) for name, entry in header.items()
                       if name != "__metadata__")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):  # nested too deeply for json
        return FileKind(path, Kind.SAFETENSORS_DAMAGED, "a safetensors file with a damaged header (not the JSON "
                        "table of tensors the format needs)", _DOWNLOAD_AGAIN)
    expected = 8 + length + end
    if expected > size:
        return FileKind(path, Kind.SAFETENSORS_TRUNCATED, f"a safetensors file whose header says {expected} bytes "
                        f"but the file has {size}: truncated download", _DOWNLOAD_AGAIN)
    if expected < size:
        return FileKind(path, Kind.SAFETENSORS_DAMAGED, f"a safetensors file whose header says {expected} bytes "
                        f"but the file has {size}: something was written after its end", _DOWNLOAD_AGAIN)
    metadata = header.get("__metadata__")
    return FileKind(path, Kind.SAFETENSORS, "a safetensors file",
                    metadata=metadata if isinstance(metadata, dict) else {},
                    names=tuple(name for name in header if name != "__metadata__"), shapes=shapes)


def _zip(path: Path, head: bytes) -> FileKind:
    """torch.save's zip checkpoint (`ARCHIVE/data.pkl` first, then the tensor records) or some other zip."""
    name_length = int.from_bytes(head[26:28], "little")
    if head[30:30 + name_length].decode("utf-8", "replace").endswith("data.pkl"):
        return FileKind(path, Kind.TORCH_ZIP, "a torch checkpoint (zip format)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return FileKind(path, Kind.ARCHIVE, "a zip archive whose end is missing, not weights", _DOWNLOAD_AGAIN)
    if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return FileKind(path, Kind.TORCH_ZIP, "a torch checkpoint (zip format)")
    listed = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
    return FileKind(path, Kind.ARCHIVE, f"a zip archive, not a torch checkpoint (it holds {len(names)} files: "
                    f"{listed})", _UNPACK)


def _decode_text(head: bytes, whole: bool) -> tuple[str, str] | None:
    """(text, encoding note) when `head` reads as text, else None. A head cut inside a character is still text."""
    for bom, encoding, note in _BOMS:
        if head.startswith(bom):
            try:
                return codecs.getincrementaldecoder(encoding)().decode(head[len(bom):], final=whole), note
            except UnicodeDecodeError:
                return None
    if b"\x00" in head:
        return None
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError:
        # Text in a legacy 8-bit encoding: mostly printable ASCII, no NUL.
        if sum(b < 0x20 and b not in b"\t\n\r\f\v" or b >= 0x7F for b in head) > len(head) // 20:
            return None
        text = head.decode("latin-1")
    controls = sum(ch < " " and ch not in "\t\n\r\f\v\x1b" for ch in text)
    return (text, "") if controls <= len(text) // 100 else None


def _text_kind(path: Path, text: str, encoding: str) -> FileKind:
    """Classify text: a Git LFS pointer, an HTML page, an XML (error) document, JSON, or plain text."""
    stripped = text.lstrip()
    lower = stripped[:512].lower()
    note = f" ({encoding})" if encoding else ""
    if stripped.startswith("version https://git-lfs"):
        size = re.search(r"^size (\d+)", stripped, re.MULTILINE)
        real = f" (the real file is {int(size.group(1)) / 1e9:.3g} GB)" if size else ""
        return FileKind(path, Kind.LFS_POINTER, f"a Git LFS pointer, not the weights{real}",
                        "run `git lfs install` and `git lfs pull` in the repository it was cloned from, "
                        "or download the file itself")
    if lower.startswith("<!doctype html") or "<html" in lower:
        title = re.search(r"<title[^>]*>(.*?)</title>", stripped, re.IGNORECASE | re.DOTALL)
        titled = f" (title: {shorten(title.group(1), 80)!r})" if title and title.group(1).strip() else ""
        return FileKind(path, Kind.HTML, f"an HTML page{titled}, not weights",
                        "the download saved a web page (a login, error or 'confirm download' page); fetch the file's "
                        "direct download link")
    if stripped.startswith("<?xml") or re.match(r"<[A-Za-z]", stripped):
        code = re.search(r"<Code>\s*([^<]*?)\s*</Code>", stripped)
        message = re.search(r"<Message>\s*([^<]*?)\s*</Message>", stripped)
        if code or "<error" in lower:
            said = ": ".join(shorten(m.group(1), 120) for m in (code, message) if m and m.group(1))
            return FileKind(path, Kind.XML, f"an XML error page from the download server{f' ({said})' if said else ''}"
                            ", not weights", "download the file again (an expired, private or mistyped link gives "
                            "this)")
        return FileKind(path, Kind.XML, f"an XML document{note}, not weights", "check the path")
    if stripped.startswith(("{", "[")):
        error = re.match(r'\{\s*"error"\s*:\s*"((?:[^"\\]|\\.)*)"', stripped)
        if error:
            return FileKind(path, Kind.JSON, f"a JSON error from the download server ({shorten(error.group(1), 120)})"
                            ", not weights", _DOWNLOAD_AGAIN)
        if '"weight_map"' in stripped:
            return FileKind(path, Kind.JSON, f"the index of a sharded checkpoint{note} (a JSON list of shard files), "
                            "not weights", "point at the folder holding it and its shards")
        return FileKind(path, Kind.JSON, f"a JSON file{note}, not weights",
                        "a config.json goes beside the weights; give the weights file or the model folder")
    # Its text is not quoted: a server (the API, the web app) says this of any path a client names.
    empty = "" if stripped.strip() else " (only blank space)"
    return FileKind(path, Kind.TEXT, f"a text file{note}, not weights{empty}",
                    "check the path; a weights file is binary (.safetensors, .ckpt, .pt, .pth, .bin)")


# A state dict's pickle is names and storage references, a few hundred KB for SD-sized checkpoints (disassembling it
# takes milliseconds); a larger one is left to the loader rather than read here for seconds.
PICKLE_STRINGS_MAX_BYTES = 4_000_000


_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")
_MEMO_GETS = ("GET", "BINGET", "LONG_BINGET")


def pickled_tensor_names(path: str | os.PathLike) -> frozenset[str] | None:
    """The tensor names of a torch zip checkpoint's state dict (however nested in dicts), read by disassembling its
    pickle with pickletools, which never imports or calls anything: each string key that torch.save follows with a
    tensor's rebuild (`torch._utils _rebuild_...`, named or fetched from the memo). None when `path` is no readable
    torch zip checkpoint."""
    try:
        with zipfile.ZipFile(path) as archive:
            entry = next((info for info in archive.infolist()
                          if info.filename == "data.pkl" or info.filename.endswith("/data.pkl")), None)
            if entry is None or entry.file_size > PICKLE_STRINGS_MAX_BYTES:
                return None
            data = archive.read(entry)
        return frozenset(_keys_of_tensors(pickletools.genops(data)))
    # A zip that is encrypted, compressed some other way or damaged, or a pickle that does not disassemble: the loader
    # reads it and names the problem.
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zlib.error):
        return None


def _keys_of_tensors(opcodes: Iterable[tuple[Any, Any, Any]]) -> Iterator[str]:
    for found, before in pickle_globals(opcodes):
        if found is not None and found.startswith("torch._utils _rebuild_") and before is not None:
            yield before  # the key pushed just before the tensor's rebuild


def pickle_globals(opcodes: Iterable[tuple[Any, Any, Any]]) -> Iterator[tuple[str | None, str | None]]:
    """Each global a pickle's opcodes (`pickletools.genops`) refer to, in order, read without running anything:
    `("module name", the string pushed just before it)`. The name is None where a protocol 4+ STACK_GLOBAL's operands
    are not plain strings, and the string None where something else came just before. A global fetched again from
    the memo is reported again."""
    memo: dict[int, tuple[str, str | None]] = {}  # memo index -> ("string" | "global" | "other", value)
    pushed: list[tuple[str, str | None]] = []  # what was pushed since the last other opcode, in order
    memo_size = 0
    for opcode, arg, _ in opcodes:
        name = opcode.name
        if name == "FRAME":  # protocol 4+ framing: no object
            continue
        if name in _MEMO_PUTS:  # stores the top of the stack; it pushes nothing
            index = memo_size if name == "MEMOIZE" else int(arg)
            memo_size = max(memo_size, index + 1)
            if pushed:
                memo[index] = pushed[-1]
            continue
        if name in ("GLOBAL", "INST") and isinstance(arg, str):
            item: tuple[str, str | None] = ("global", arg)
        elif name == "STACK_GLOBAL":  # protocol 4+: module and name were pushed as strings
            operands = pushed[-2:]
            known = len(operands) == 2 and all(kind == "string" for kind, _ in operands)
            item = ("global", f"{operands[0][1]} {operands[1][1]}" if known else None)
            pushed = pushed[:-2]
        elif name in _MEMO_GETS and isinstance(arg, int):
            item = memo.get(arg, ("other", None))
            if item[0] != "global":
                pushed.append(item)
                continue
        elif isinstance(arg, str):
            pushed.append(("string", arg))
            continue
        else:
            pushed = []
            continue
        yield item[1], pushed[-1][1] if pushed and pushed[-1][0] == "string" else None
        pushed = [item]


def sniff(path: str | os.PathLike) -> FileKind:
    """What the file at `path` is, from its first bytes; raises KinemaError (one line) when it cannot be read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            if size == 0:
                return FileKind(path, Kind.EMPTY, "empty (0 bytes)", "the download or save did not finish")
            found = _safetensors(path, f, head, size)
    except OSError as err:
        raise KinemaError(os_error_message(err, path, "read")) from None
    if found is not None:
        return found
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = "a torch checkpoint (legacy format)" if head.startswith(TORCH_LEGACY_MAGIC) else "a Python pickle"
        return FileKind(path, Kind.PICKLE, what)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip(path, head)
    for offset, magic, kind, what, advice in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return FileKind(path, kind, what, advice)
    whole = size <= len(head)
    decoded = _decode_text(head, whole)
    if decoded is not None:
        return _text_kind(path, *decoded)
    shown = " ".join(f"{b:02x}" for b in head[:8])
    if path.suffix.lower() == ".safetensors" and (size < 9 or head[8:9] == b"{"):
        return FileKind(path, Kind.SAFETENSORS_DAMAGED, f"a .safetensors file cut short or with a damaged header "
                        f"({size} bytes, starting {shown})", _DOWNLOAD_AGAIN)
    return FileKind(path, Kind.BINARY, f"not a weights file kinema reads: neither safetensors nor a torch "
                    f"checkpoint (it starts with the bytes {shown})",
                    "give a .safetensors, .ckpt, .pt, .pth or .bin file")
