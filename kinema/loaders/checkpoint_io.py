"""Read and write checkpoint files without ever running code from them.

A file is read by what its content is (`kinema.sniff`), not by its extension. Files get renamed (a safetensors file
saved as `.ckpt`, `v3_sd15_mm.ckpt?download=true`), and both readers are safe on any input, so the name is no reason
to refuse a file or to pick a reader: safetensors content is plain data and is read as such whatever the suffix;
torch checkpoints (zip or legacy pickle) are read with `torch.load(weights_only=True)`, whose unpickler only rebuilds
tensors and plain containers, so a file that needs any other class is refused before anything in it runs. Anything
else (an HTML or XML error page, a Git LFS pointer, text, a truncated download, another format) is refused with the
one line `sniff` gives for it. Writing goes by the extension, which picks the format.

Readers get the tensors only; non-tensor entries (training counters, AnimateDiff v3's `animatediff_config`) are
dropped and listed in `Checkpoint.dropped`.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kinema.errors import KinemaError, library_error_message, shorten
from kinema.fileio import MARK_KEY, atomic_file, mark_weights_file, read_json_object
from kinema.sniff import FileKind, Kind, pickle_globals, sniff

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


@dataclass
class Checkpoint:
    """The tensors of one file, its safetensors metadata, and what was left out."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # entry name -> what it was


def _supported() -> str:
    return ", ".join(SUPPORTED_SUFFIXES)


def check_weights_file(path: str | os.PathLike) -> FileKind:
    """What the weights file `path` holds (safetensors or a torch checkpoint), from its first bytes; one KinemaError
    naming the path and the fix for anything else (a folder, a missing or empty file, a download gone wrong).
    Cheap: call it before long work that ends in reading the file."""
    path = Path(path)
    if path.is_dir():
        raise KinemaError(f"{path} is a folder; give a weights file ({_supported()})")
    if not path.is_file():
        raise KinemaError(f"no such file: {path}")
    kind = sniff(path)
    if not kind.is_weights:
        raise KinemaError(kind.diagnosis)
    return kind


def _check_safetensors(path: Path) -> None:
    """Refuse a file that is not safetensors, for the readers that take safetensors only (header reads, streaming)."""
    kind = check_weights_file(path)
    if kind.kind is not Kind.SAFETENSORS:
        raise KinemaError(f"{path} is {kind.what}, but this is read from safetensors files only; save its tensors as "
                          "safetensors (safetensors.torch.save_file(kinema.loaders.checkpoint_io.read_state_dict("
                          "path), new_path)) and use that file")


@contextmanager
def _named_errors(path: Path) -> Iterator[None]:
    """Turn a safetensors library error inside the block into one line naming `path` (the block only reads)."""
    try:
        yield
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise KinemaError(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                          f"{library_error_message(err)}") from None


def _describe_value(value: object) -> str:
    if isinstance(value, dict):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        return f"dict with {len(value)} entries ({tensors} tensors)"
    return type(value).__name__


def iter_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of a safetensors file, read one at a time onto `device` (so a caller can cast
    or drop each before the next is read). Refuses other content, and names the file on any read error."""
    path = Path(path)
    _check_safetensors(path)
    with _named_errors(path), safe_open(str(path), framework="pt", device=str(device)) as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _read_safetensors(path: Path) -> Checkpoint:
    with _named_errors(path), safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return Checkpoint(path, tensors, metadata)


# torch's weights-only unpickler errors that mean the pickle asks for code (a class or function to import or call);
# its other errors (an unknown opcode, a bad storage id) mean the file is damaged.
_NEEDS_CODE = re.compile(r"GLOBAL|reduce for unrecognized function|Can only (?:create new object|build)")


def _refusal(path: Path, needs: str | None) -> KinemaError:
    hint = ""
    if needs and needs.startswith("omegaconf"):
        hint = (" This is the December 2023 upload of AnimateDiff v3, whose `animatediff_config` entry is an "
                "OmegaConf object; the authors re-uploaded the file without it, so download it again.")
    return KinemaError(
        f"refused to run code from the pickle in {path}{f' (it needs {needs})' if needs else ''}: kinema only reads "
        f"tensors from .ckpt/.pt/.pth/.bin files.{hint} If you trust the file, load it once in a trusted environment "
        "and re-save its tensors as safetensors (safetensors.torch.save_file), then use that file; `kinema convert` "
        "turns safe files into other layouts")


def _protocol4_imports(path: Path) -> list[str]:
    """What a raw pickle of protocol 4 or later would import ("module.name"), read with pickletools' disassembler,
    which decodes opcodes and runs nothing (`kinema.sniff.pickle_globals`). torch's weights-only unpickler stops at
    such a pickle's FRAME opcode before it reaches any import, so it cannot tell code from damage; for older
    protocols it can, and this is []."""
    imports: list[str] = []
    try:
        with open(path, "rb") as f:
            opcodes = pickletools.genops(f)
            opcode, arg, _ = next(opcodes)
            if not (opcode.name == "PROTO" and isinstance(arg, int) and arg >= 4):
                return []
            for found, _before in pickle_globals(opcodes):
                imports.append(found.replace(" ", ".") if found is not None else "a class or function")
    except (ValueError, EOFError, OSError, StopIteration):
        pass  # damaged after the imports found so far
    return imports


def _read_pickle(path: Path) -> Checkpoint:
    unreadable = f"{path} is not a readable torch checkpoint (corrupt or truncated?)"
    try:
        # An open file, not the path: torch.load reads any path ending in .safetensors as safetensors.
        with open(path, "rb") as f, warnings.catch_warnings():
            # Protocol 4+ pickles are reported below in one line; torch would also print a paragraph about them.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _NEEDS_CODE.search(str(err)):
            needs = re.search(r"GLOBAL ([\w.]+)", str(err))
            raise _refusal(path, needs.group(1) if needs else None) from None
        imports = _protocol4_imports(path)
        if imports:
            raise _refusal(path, imports[0]) from None
        # torch wraps the cause in paragraphs of advice about weights_only=False; keep the cause alone.
        cause = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(err), re.DOTALL)
        raise KinemaError(f"{unreadable}: {shorten(cause.group(1)) if cause else library_error_message(err)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as err:
        if "failed finding central directory" in str(err):  # torch follows it with a paragraph of advice
            raise KinemaError(f"{path} is a torch checkpoint (zip) without its end, which a whole file has: a "
                              "truncated download or copy; download it again") from None
        raise KinemaError(f"{unreadable}: {library_error_message(err)}") from None
    if not isinstance(obj, dict):
        raise KinemaError(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    dropped: dict[str, str] = {}
    # Training scripts (AnimateDiff's train.py among them) wrap the weights as {"state_dict": ..., "epoch": ...}.
    if isinstance(obj.get("state_dict"), dict):
        dropped.update({f"top-level {k}": _describe_value(v) for k, v in obj.items() if k != "state_dict"})
        obj = obj["state_dict"]
    # AnimateDiff's SparseCtrl checkpoints may wrap theirs as {"controlnet": ...} (its animate.py unwraps them so).
    if isinstance(obj.get("controlnet"), dict):
        dropped.update({f"top-level {k}": _describe_value(v) for k, v in obj.items() if k != "controlnet"})
        obj = obj["controlnet"]
    if set(obj) == {"image_proj", "ip_adapter"} and all(isinstance(part, dict) for part in obj.values()):
        # h94/IP-Adapter's .bin files nest their two parts; named as its .safetensors files name them.
        obj = {f"{part}.{name}": tensor for part, tensors in obj.items() for name, tensor in tensors.items()}
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped.update({str(k): _describe_value(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)})
    _check_pickled_tensors(path, obj, tensors)
    return Checkpoint(path, tensors, {}, dropped)


def _check_pickled_tensors(path: Path, obj: dict, tensors: dict) -> None:
    """One line for what a pickle may hold that no state dict does: a tensor named by no text, a sparse tensor, or
    the tensors one level down under a key kinema does not unwrap."""
    unnamed = next((key for key in tensors if not isinstance(key, str)), None)
    if unnamed is not None:
        raise KinemaError(f"{path} holds a tensor under {unnamed!r}, which is no name: a state dict names its tensors "
                          "with text; save it with text names")
    sparse = next((key for key, tensor in tensors.items() if tensor.layout != torch.strided), None)
    if sparse is not None:
        raise KinemaError(f"{path} holds a sparse tensor ({sparse}), and weights are dense: save it with the "
                          "tensors' .to_dense()")
    if not tensors:
        for key, value in obj.items():
            # Weights by name, not a random generator's state or an optimizer's (tensors among other entries).
            if isinstance(value, dict) and len(value) > 1 and all(
                    isinstance(name, str) and isinstance(item, torch.Tensor) for name, item in value.items()):
                raise KinemaError(f"{path} holds no tensors at its top level, but its entry {key!r} is a dict of "
                                  f"{len(value)} tensors: save that dict alone (torch.save(checkpoint[{key!r}], ...))")


# safetensors dtype codes -> torch dtype names (`getattr(torch, name)`), every code kinema reads.
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
}


def check_weight_values(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """One KinemaError line when a file whose every tensor is a weight (a motion module, a LoRA) holds integer,
    boolean or float8 tensors (cast to int8, say, it would load as a model of garbage without a word) or NaN or infinity
    (which would surface only as a video of NaN after every sampling step). Meta tensors (a safetensors header read
    without data) are checked for their dtype only."""
    # float8 is floating point too, but torch cannot compute with it (a library error at the first NaN check).
    readable = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    odd = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.dtype not in readable})
    if odd:
        example = next(name for name, t in tensors.items() if t.dtype not in readable)
        raise KinemaError(f"{what} holds {', '.join(odd)} tensors (e.g. {example}); kinema reads float16, bfloat16 "
                          "and float32 weights: use the original file, not a quantised or converted copy")
    for name, tensor in tensors.items():
        if not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise KinemaError(f"{what} holds NaN or infinite values ({bad} in {name}); the file is damaged or was "
                              "saved from a training run that diverged: use a good copy")


def dtype_report(dtypes: Iterable[str]) -> str:
    """How `kinema inspect` names the dtypes of a file's tensors: `float16`, or `mixed: float16, float32`."""
    names = sorted(set(dtypes))
    return names[0] if len(names) == 1 else "mixed: " + ", ".join(names)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype name) from a safetensors file's header, without reading tensor data. Refuses
    other content with the sniffed diagnosis, and names the file on any read error."""
    path = Path(path)
    _check_safetensors(path)
    with _named_errors(path), safe_open(str(path), framework="pt") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}
        return {name: (tuple(part.get_shape()), part.get_dtype()) for name, part in slices.items()}


def tensor_names(path: str | os.PathLike) -> list[str] | None:
    """Tensor names of a safetensors file (whatever its extension) read from its header alone (no tensor data); None
    for a torch checkpoint, whose names cannot be known without unpickling the whole file. Other content is refused
    with the sniffed diagnosis."""
    path = Path(path)
    if check_weights_file(path).kind is not Kind.SAFETENSORS:
        return None
    with _named_errors(path), safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a weights file onto the CPU: safetensors, or a torch checkpoint read with `weights_only=True`, whichever
    the content is (the extension does not matter). Anything else raises the sniffed one-line diagnosis."""
    path = Path(path)
    kind = check_weights_file(path)
    return _read_safetensors(path) if kind.kind is Kind.SAFETENSORS else _read_pickle(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file by name, any `state_dict` wrapper removed and non-tensor entries dropped."""
    return read_checkpoint(path).tensors


def write_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None, *,
    kind: str = "weights", overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write tensors to `.safetensors` (with string `metadata`) or, for `.ckpt`/`.pt`/`.pth`/`.bin`, a tensors-only
    torch file, under kinema's output policy (`kinema.fileio`): a new path is written, an existing one only with
    `overwrite` when it is an earlier kinema output of this `kind`, never one of `inputs`. The file is marked as
    kinema's `kind` (safetensors metadata or a zip record) and appears whole or not at all."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise KinemaError(f"cannot write {path}: unknown extension {suffix!r}; supported: {_supported()}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise KinemaError(f"cannot write {path}: entries are not tensors: {bad[:3]}")
    if metadata and suffix not in SAFETENSORS_SUFFIXES:
        raise KinemaError(f"cannot write {path}: metadata can only be stored in .safetensors files")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise KinemaError("safetensors metadata must map strings to strings")
    with atomic_file(path, kind, overwrite=overwrite, inputs=inputs) as temp:
        tensors = _unshared({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})
        if suffix in SAFETENSORS_SUFFIXES:
            save_file(tensors, str(temp), metadata={**(metadata or {}), MARK_KEY: kind})
            _sort_metadata(temp)
        else:
            torch.save(tensors, temp)
            mark_weights_file(temp, kind)
    return path


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each one that shares memory with an earlier one copied: safetensors refuses shared memory,
    and a torch file (one alpha object for every layer, tied weights) loads with it."""
    seen: set[tuple[int, int]] = set()
    unshared = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        place = (storage.data_ptr(), storage.nbytes())
        unshared[name] = tensor.clone() if place in seen and storage.nbytes() else tensor
        seen.add(place)
    return unshared


def _sort_metadata(path: Path) -> None:
    """Put the metadata of the safetensors file `path` in sorted order, in place. safetensors writes it in a hash
    map's order, which differs from process to process, so the same weights and settings made other bytes (another
    SHA-256) on each run; sorted, they make the same file."""
    with path.open("r+b") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
        metadata = header.pop("__metadata__", None)
        if not metadata or len(metadata) < 2:
            return
        # The header as safetensors writes it (compact, metadata first), padded with spaces to its own length.
        text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) <= size:
            file.seek(8)
            file.write(text.ljust(size))


@dataclass(frozen=True)
class WeightFiles:
    """The weights of a model folder: one file, or the shards its index names."""

    folder: Path
    files: tuple[Path, ...]
    index: Path | None = None  # the sharded checkpoint's index, if it is one
    variant: str | None = None  # "fp16" when only that variant is there (V3's T5); None for plain files

    def header(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """`{name: (shape, dtype name)}` over every file: from a safetensors header (no tensor data); a torch
        pickle, which has no header, is read."""
        found: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in self.files:
            if check_weights_file(file).kind is Kind.SAFETENSORS:
                found |= {name: (shape, SAFETENSORS_DTYPES.get(code, code))
                          for name, (shape, code) in read_safetensors_header(file).items()}
            else:
                found |= {name: (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
                          for name, tensor in read_state_dict(file).items()}
        return found

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """`{name: shape}` over every file, as `header` reads them."""
        return {name: shape for name, (shape, _) in self.header().items()}


def folder_config_class(folder: str | os.PathLike) -> str | None:
    """The `_class_name` a diffusers model folder's `config.json` names (e.g. "ControlNetModel"); None for anything
    else, a broken config included (the describer of the kind it claims to be, or the last one, names that)."""
    from kinema.fileio import read_json_object

    config = Path(folder) / "config.json"
    if not (config.parent.is_dir() and config.is_file()):
        return None
    try:
        name = read_json_object(config, "a model config").get("_class_name")
    except KinemaError:
        return None
    return name if isinstance(name, str) else None


@overload
def find_weights(folder: str | os.PathLike, stems: tuple[str, ...] = ..., suffixes: tuple[str, ...] = ...,
                 variants: tuple[str | None, ...] = ..., *, missing_ok: Literal[False] = ...) -> WeightFiles: ...
@overload
def find_weights(folder: str | os.PathLike, stems: tuple[str, ...] = ..., suffixes: tuple[str, ...] = ...,
                 variants: tuple[str | None, ...] = ..., *, missing_ok: bool) -> WeightFiles | None: ...


def find_weights(
    folder: str | os.PathLike, stems: tuple[str, ...] = ("diffusion_pytorch_model",),
    suffixes: tuple[str, ...] = (".safetensors", ".bin"), variants: tuple[str | None, ...] = (None,), *,
    missing_ok: bool = False,
) -> WeightFiles | None:
    """Find a diffusers/transformers model folder's weights: `{stem}[.{variant}]{suffix}`, or a sharded checkpoint
    through its index `{stem}{suffix}.index[.{variant}].json` (shards checked present). Tried in order of
    `variants`, `stems`, `suffixes`, so the first of each is preferred. KinemaError naming what was looked for and
    what the folder holds when there is none (None instead with `missing_ok`, for a caller listing everything a
    folder lacks), and always when an index is broken or names missing shards."""
    folder = Path(folder)
    for variant in variants:
        infix = f".{variant}" if variant else ""
        for stem in stems:
            for suffix in suffixes:
                single = folder / f"{stem}{infix}{suffix}"
                if single.is_file():
                    return WeightFiles(folder, (single,), None, variant)
                index = folder / f"{stem}{suffix}.index{infix}.json"
                if index.is_file():
                    return WeightFiles(folder, _shards(index), index, variant)
    if missing_ok:
        return None
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    wanted = [f"{stem}{suffix}" for stem in stems for suffix in suffixes]
    raise KinemaError(f"{folder} has no weights file: looked for {wanted} (or a sharded index of them); it holds "
                      f"{held[:8]}")


def _shards(index: Path) -> tuple[Path, ...]:
    weight_map = read_json_object(index, "the sharded weights' index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise KinemaError(f'{index} has no "weight_map" object (tensor name -> shard file), so the shards cannot be '
                          "found; it is not a diffusers weights index: restore it from the download")
    missing = sorted({file for file in weight_map.values() if not (index.parent / file).is_file()})
    if missing:
        raise KinemaError(f"{index} lists shard(s) {missing[:3]} that are not in {index.parent}; download them")
    return tuple(index.parent / file for file in dict.fromkeys(weight_map.values()))


def load_pretrained(cls: Any, folder: str | os.PathLike, what: str, *, unused: tuple[str, ...] = (),
                    **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder, **kwargs)` for a transformers encoder folder (T5, CLIP), held to kinema's rules:
    a folder without config.json (which transformers would fill with a default config) and weights that do not fit
    the config are each one KinemaError line naming `what` and the folder, not transformers' table; a pickle that
    needs code is refused with kinema's own line (its weights-only read), not torch's advice to load it unsafely.
    Weights under the prefixes `unused` (parts kinema never runs) may be missing."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise KinemaError(f"the {what} folder {folder} has no config.json (a partial download?); download the whole "
                          "folder")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report, a table, would come before kinema's line
    try:
        model, info = cls.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except pickle.UnpicklingError:
        for weights in sorted(folder.glob("*.bin")):
            read_checkpoint(weights)  # kinema's refusal of the file that needs code
        raise
    finally:
        transformers.logging.set_verbosity(verbosity)
    from kinema.state_dicts import check_loading_info

    info = {**info, "missing_keys": [key for key in info.get("missing_keys", ()) if not key.startswith(unused)]}
    check_loading_info(info, f"the {what} weights in {folder}",
                       advice="its config.json and weights come from different models; download the folder again")
    return model

