"""Caches of what frozen encoders give, so that training runs the VAE encoder and the text encoder once per input.

An entry is found by two strings: the cache's `namespace`, which names the encoder exactly (its `module_fingerprint`:
class, weights and the settings that change its output), and the entry's `key`, which names the input exactly
(`tensor_key` of the pixels or token ids, or of whatever fixes them: file, frames, crop). A changed VAE, text
encoder, tokenizer length or input therefore gives another namespace or key, and a miss, never a stale entry. Typical
use:

    latents = EmbeddingCache(module_fingerprint(vae, settings={"scaling_factor": 0.18215, "sample": "mean"}), folder)
    keys = [tensor_key(clip) for clip in video]           # video (B, 3, F, H, W)
    out = latents.get_many(keys, lambda missing: {"latents": encode(video[missing])})
    out["latents"]                                        # (B, 4, F', H/8, W/8), on the CPU

The fingerprint covers the modules' state dicts, not their configs: whatever else changes the output (a config
value such as the VAE's slice length or tiling, the tokenizer's max length, how latents are drawn) belongs in
`settings`.

On disk, entries live at `folder/NAMESPACE[:16]/KEY[:2]/KEY.safetensors`; each carries its full namespace, key and a
digest of its tensors, so a truncated or damaged file, or one of another namespace sharing the prefix, is never
served. The folder is kinema's: it holds kinema's manifest (`kinema.fileio.MANIFEST`, kind "embedding_cache"), and
a non-empty folder without it is refused, so that the cache never writes into a user's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from kinema.errors import KinemaError, os_error_message
from kinema.fileio import MANIFEST, MARK_KEY, check_output, clean_stale, output_kind

logger = logging.getLogger(__name__)

CACHE_KIND = "embedding_cache"  # the kind in the cache folder's manifest
ENTRY_FORMAT = "1"  # in each entry's metadata; an entry of another format is a miss
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # namespaces and keys become file names
_MAX_KEY = 200  # an entry's name and its temporary's decoration stay under the 255-byte file-name limit


# ---------------------------------------------------------------- hashing


def _frame(digest: Any, tag: bytes, payload: bytes | memoryview) -> None:
    """Feed one tagged, length-prefixed field, so that no two different sequences of fields hash alike (("ab", "c")
    and ("a", "bc"), or the string "1" and the int 1)."""
    digest.update(tag + len(payload).to_bytes(8, "little"))
    digest.update(payload)


def _tensor_bytes(tensor: torch.Tensor, what: str) -> bytes | memoryview:
    """The raw bytes of `tensor` in row-major order, on the CPU: any dtype, bfloat16 and float8 included (read as
    bytes, since numpy has no such dtypes)."""
    if tensor.device.type == "meta":
        raise KinemaError(f"{what} is on the meta device (its weights were never loaded); load the weights before "
                          "fingerprinting or keying it")
    if tensor.layout != torch.strided:
        raise KinemaError(f"{what} is a {tensor.layout} tensor; pass a dense tensor (.to_dense())")
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    try:
        return flat.view(torch.uint8).numpy().data  # the array's buffer, not a copy
    except (RuntimeError, TypeError) as err:
        raise KinemaError(f"{what} ({tensor.dtype}) cannot be read as bytes: {err}; pass a plain tensor") from None


def _frame_tensor(digest: Any, tensor: torch.Tensor, what: str) -> None:
    header = json.dumps({"dtype": str(tensor.dtype), "shape": list(tensor.shape)}, separators=(",", ":"))
    _frame(digest, b"T", header.encode())
    _frame(digest, b"D", _tensor_bytes(tensor, what))


def _json_setting(value: Any) -> Any:
    """JSON for the few non-JSON values that settings naturally hold; anything else is refused, because a repr with
    a memory address would make every run miss."""
    if isinstance(value, (torch.dtype, torch.device, os.PathLike)):
        return str(value)
    raise KinemaError(f"module_fingerprint settings hold a {type(value).__name__} ({value!r:.60}), which has no "
                      "stable text form; pass numbers, strings, booleans, lists or dicts instead")


def module_fingerprint(*modules: torch.nn.Module, settings: Mapping[str, Any] | None = None) -> str:
    """A sha256 hex digest that names `modules` exactly: each one's class (module and qualified name), then every
    state-dict entry's name, dtype, shape and bytes (as stored: bfloat16 stays bfloat16), plus the JSON of
    `settings` (keys sorted; torch dtypes, devices and paths as text). One changed bit in any weight or buffer, a
    changed dtype or a changed setting gives another fingerprint; reloading the same weights gives the same one.

    Configs are not read (they hold load paths and library versions that change on a reload of the same weights):
    put every config value that changes the output into `settings`.

    Cost: one pass over the weights at about 1.5 GB/s, float32 and bfloat16 alike (sha256 with SHA-NI on one core,
    measured on the 2-core x86 CPU this was written on): about 0.55 s for SD1.5's VAE and CLIP text encoder (0.83 GB
    in float32). Weights on a GPU are first copied to the CPU, one tensor at a time.
    """
    if not modules:
        raise KinemaError("module_fingerprint needs at least one module (the encoder whose outputs are cached)")
    digest = hashlib.sha256()
    _frame(digest, b"V", b"kinema-module-fingerprint-1")
    for index, module in enumerate(modules):
        if not isinstance(module, torch.nn.Module):
            raise KinemaError(f"module_fingerprint: argument {index + 1} is a {type(module).__name__}, not a torch "
                              "module; pass the encoder modules themselves")
        cls = type(module)
        _frame(digest, b"C", f"{cls.__module__}.{cls.__qualname__}".encode())
        state = module.state_dict()
        _frame(digest, b"N", str(len(state)).encode())
        for name, value in state.items():
            _frame(digest, b"K", name.encode())
            if isinstance(value, torch.Tensor):
                _frame_tensor(digest, value, f"{cls.__name__} weight {name}")
            else:  # extra state (get_extra_state) that a module chose to save
                _frame(digest, b"X", json.dumps(value, sort_keys=True, default=repr).encode())
    try:
        text = json.dumps(dict(settings or {}), sort_keys=True, separators=(",", ":"), default=_json_setting)
    except TypeError as err:  # keys that are not strings or numbers, or a mix of key types
        raise KinemaError(f"module_fingerprint settings cannot be written as JSON ({err}); use string keys") from None
    _frame(digest, b"S", text.encode())
    return digest.hexdigest()


def tensor_key(*parts: torch.Tensor | str | int | float) -> str:
    """A sha256 hex digest of `parts` in order: tensors by dtype, shape and bytes (a view hashes as its contiguous
    copy, a GPU tensor as its CPU copy), strings as UTF-8, ints and floats exactly (1, 1.0, True and "1" all
    differ). For an entry's key: the input pixels `(F, 3, H, W)` or token ids `(L,)`, or what fixes them."""
    if not parts:
        raise KinemaError("tensor_key needs at least one part (the input tensor, or what names it)")
    digest = hashlib.sha256()
    _frame(digest, b"V", b"kinema-tensor-key-1")
    for index, part in enumerate(parts):
        if isinstance(part, torch.Tensor):
            _frame_tensor(digest, part, f"tensor_key part {index + 1}")
        elif isinstance(part, str):
            _frame(digest, b"s", part.encode("utf-8", "surrogatepass"))
        elif isinstance(part, bool):  # before int: True is an int too
            _frame(digest, b"b", b"1" if part else b"0")
        elif isinstance(part, int):
            _frame(digest, b"i", str(part).encode())
        elif isinstance(part, float):
            _frame(digest, b"f", part.hex().encode())
        else:
            raise KinemaError(f"tensor_key part {index + 1} is a {type(part).__name__}; pass tensors, strings, ints "
                              "or floats")
    return digest.hexdigest()


def _rows_digest(row: Mapping[str, torch.Tensor]) -> str:
    parts: list[torch.Tensor | str] = []
    for name in sorted(row):
        parts += [name, row[name]]
    return tensor_key(*parts)


# ---------------------------------------------------------------- the cache folder


def _open_folder(folder: str | os.PathLike) -> Path:
    """The real path of the cache folder: an existing cache folder as it is, a new or empty folder once marked as
    kinema's. Anything else (a file, a user's folder, another kinema output) raises one KinemaError."""
    given = Path(folder)
    try:
        occupied = given.is_dir() and any(given.iterdir())
    except OSError as err:
        raise KinemaError(os_error_message(err, given, "read the cache folder")) from None
    if occupied:
        found = output_kind(given)
        if found == CACHE_KIND:
            return Path(os.path.realpath(given))
        what = f"an earlier kinema output of another kind ({found})" if found else "a folder kinema did not write"
        raise KinemaError(f"the cache folder {given} is {what} and not empty; kinema writes its cache only into a "
                          "new or empty folder (or one it made before): choose another folder")
    real = check_output(given, CACHE_KIND, folder=True)
    manifest = {MARK_KEY: CACHE_KIND, "kinema": _kinema_version(), "files": {},
                "layout": "NAMESPACE[:16]/KEY[:2]/KEY.safetensors"}
    temp = real / f".{MANIFEST}.kinema-part-{os.getpid()}"
    try:
        real.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(temp, real / MANIFEST)  # whole or not at all: a half-written manifest would lock the folder
    except OSError as err:
        _remove_quietly(temp)
        raise KinemaError(os_error_message(err, given, "create the cache folder")) from None
    return real


def _remove_quietly(path: Path) -> None:
    """Remove a file kinema wrote if it is there; a failure to (a read-only disk) only leaves it behind."""
    try:
        path.unlink()
    except OSError:
        pass


def _kinema_version() -> str:
    from kinema import __version__

    return __version__


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (a u64 header length, then a JSON header)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(data[8:8 + size])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("no metadata")
    return metadata


# ---------------------------------------------------------------- the cache


class EmbeddingCache:
    """Rows of encoder outputs by key: the most recent `memory_items` in memory (least recently used dropped
    first), and with `folder` all of them on disk, where a later run (a new instance) finds them.

    Not for concurrent use from threads of one process; processes may share a folder (each entry is written to a
    temporary of its own and renamed into place, so a reader sees a whole entry or none).

    Args:
        namespace: what the entries were computed by, e.g. `module_fingerprint(vae, settings=...)`; letters,
            digits, `.`, `_`, `-`. Its first 16 characters name its sub-folder.
        folder: the cache folder (created and marked as kinema's if new or empty), or None for memory only.
        memory_items: rows kept in memory; 0 keeps none (every lookup reads the disk).
    """

    def __init__(self, namespace: str, folder: str | os.PathLike | None = None, memory_items: int = 4096) -> None:
        if not isinstance(namespace, str) or not _NAME.fullmatch(namespace):
            raise KinemaError(f"cache namespace {namespace!r} must be a non-empty name of letters, digits, '.', '_' "
                              "and '-' starting with a letter or digit, e.g. a module_fingerprint")
        if isinstance(memory_items, bool) or not isinstance(memory_items, int) or memory_items < 0:
            raise KinemaError(f"memory_items must be a whole number >= 0; got {memory_items!r}")
        self.namespace = namespace
        self.memory_items = memory_items
        self.folder = None if folder is None else _open_folder(folder) / namespace[:16]
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._disk_writable = self.folder is not None

    def entry_path(self, key: str) -> Path | None:
        """Where the entry for `key` lives on disk (None without a folder)."""
        return None if self.folder is None else self.folder / key[:2] / f"{key}.safetensors"

    def get_many(self, keys: Sequence[str],
                 compute: Callable[[list[int]], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The outputs for a batch of inputs named by `keys`: each name's rows stacked along dim 0 in `keys` order,
        `(B, ...)`, on the CPU in the dtype `compute` gave.

        `compute(missing)` is called once, and only when some keys miss, with the positions in `keys` of the misses
        (a key repeated in the batch is computed once, at its first position); it returns every name's tensor
        batched along dim 0 for just those positions, `(len(missing), ...)`. Each of those rows is stored
        (memory, and the folder) before the batch is returned. `hits` and `misses` count positions served and
        computed.
        """
        keys = list(keys)
        for key in keys:
            if not isinstance(key, str) or len(key) < 2 or len(key) > _MAX_KEY or not _NAME.fullmatch(key):
                raise KinemaError(f"cache key {key!r:.80} must be 2 to {_MAX_KEY} letters, digits, '.', '_' or '-' "
                                  "starting with a letter or digit; make keys with tensor_key")
        rows: list[dict[str, torch.Tensor] | None] = [None] * len(keys)
        first: dict[str, int] = {}
        missing: list[int] = []
        for position, key in enumerate(keys):
            if key in first:
                continue
            first[key] = position
            rows[position] = self._lookup(key)
            if rows[position] is None:
                missing.append(position)
        found = [row for row in rows if row is not None]
        if missing:
            computed = self._split(compute(list(missing)), len(missing), found[0] if found else None)
            for position, row in zip(missing, computed, strict=True):
                rows[position] = row
                self._store(keys[position], row)
        for position, key in enumerate(keys):
            rows[position] = rows[first[key]]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if not keys:
            return {}
        complete = [row for row in rows if row is not None]
        shapes = {", ".join(f"{name} {t.dtype} {tuple(t.shape)}" for name, t in sorted(row.items()))
                  for row in complete}
        if len(shapes) > 1:  # rows cached from inputs of different sizes cannot form one batch
            raise KinemaError(f"the cached rows of this batch differ in names, dtypes or shapes "
                              f"({' vs '.join(sorted(shapes)[:2])}); batch inputs of one size, or pad them to one "
                              "size before encoding")
        return {name: torch.stack([row[name] for row in complete]) for name in complete[0]}

    # ------------------------------------------------------------ lookups

    def _lookup(self, key: str) -> dict[str, torch.Tensor] | None:
        row = self._memory.get(key)
        if row is not None:
            self._memory.move_to_end(key)
            return row
        row = self._read(key)
        if row is not None:
            self._remember(key, row)
        return row

    def _read(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry on disk, or None when absent, of another namespace (sharing the folder prefix) or format, or
        damaged (then removed, with a warning, so that the recomputed row replaces it)."""
        path = self.entry_path(key)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            logger.warning("%s; recomputing it", os_error_message(err, path, "read the cache entry"))
            return None
        try:
            metadata = _header_metadata(data)
            if (metadata.get("format"), metadata.get("namespace"), metadata.get("key")) != (
                    ENTRY_FORMAT, self.namespace, key):
                return None
            row = safetensors.torch.load(data)
            if _rows_digest(row) != metadata.get("digest"):
                raise ValueError("its tensors do not match the digest written with them")
        except (ValueError, SafetensorError) as err:
            logger.warning("cache entry %s is damaged (%s); removing it and recomputing", path, err)
            _remove_quietly(path)
            return None
        return row

    # ------------------------------------------------------------ storing

    def _split(self, output: Mapping[str, torch.Tensor], count: int,
               cached: dict[str, torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:
        """`compute`'s batched output as `count` rows of CPU tensors with their own storage (a row must not keep
        the whole batch alive in memory), after checking that it fits the batch and the rows already cached."""
        if not isinstance(output, Mapping) or not output:
            raise KinemaError(f"the cache's compute function returned {type(output).__name__}; it must return a "
                              "non-empty dict of name -> tensor batched along dim 0")
        for name, tensor in output.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor) or tensor.ndim == 0:
                raise KinemaError(f"the cache's compute function returned {name!r}: {type(tensor).__name__}; it "
                                  "must return name -> tensor batched along dim 0")
            if tensor.shape[0] != count:
                raise KinemaError(f"the cache's compute function returned {name} with {tensor.shape[0]} rows for "
                                  f"{count} missing positions; return one row per position it is given")
        if cached is not None:
            expected = {name: (t.dtype, tuple(t.shape)) for name, t in cached.items()}
            given = {name: (t.dtype, tuple(t.shape[1:])) for name, t in output.items()}
            if given != expected:
                raise KinemaError(f"the cache's compute function returned rows {given} but the cached rows of this "
                                  f"batch are {expected}; put what changed into the namespace (module_fingerprint "
                                  "settings), or pad to one shape")
        return [{name: tensor[i].detach().to("cpu", copy=True).contiguous() for name, tensor in output.items()}
                for i in range(count)]

    def _remember(self, key: str, row: dict[str, torch.Tensor]) -> None:
        if self.memory_items == 0:
            return
        self._memory[key] = row
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def _store(self, key: str, row: dict[str, torch.Tensor]) -> None:
        self._remember(key, row)
        path = self.entry_path(key)
        if path is None or not self._disk_writable:
            return
        metadata = {"format": ENTRY_FORMAT, "namespace": self.namespace, "key": key, "digest": _rows_digest(row)}
        data = safetensors.torch.save(row, metadata=metadata)
        # The name fileio gives temporaries, so that clean_stale removes one a killed run left for this entry.
        temp = path.with_name(f".{path.name}.kinema-part-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(path)
            temp.write_bytes(data)
            os.replace(temp, path)
        except BaseException as err:
            _remove_quietly(temp)
            if not isinstance(err, OSError):
                raise
            # Training goes on without the disk (a full disk must not end a run hours in); the rows stay in memory.
            self._disk_writable = False
            logger.warning("%s; caching in memory only from now on", os_error_message(err, path, "write the cache "
                                                                                                  "entry"))
