"""The run folder of `kinema train`: what marks it as a training run, its checkpoints, and resuming from them.

A run folder holds `kinema-run.json` (the config it was started with and that config's fingerprint) and
`checkpoints/step-00000123/` folders. kinema starts a run only in a new or empty folder, and continues one only with
the same config (up to keys the caller names as free to change, such as the number of steps). Each checkpoint is
written whole or not at all (`kinema.fileio.atomic_folder`): one `{group}.safetensors` per group of tensors (the
trained weights, their EMA), `state.pt` (optimizer and scheduler state dicts, RNG states, counters: plain values and
tensors only, read back with `torch.load(weights_only=True)`, which runs no code) and `checkpoint.json`. Only the
newest `keep` checkpoints stay; older ones are removed only when they hold nothing but what kinema wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kinema.errors import KinemaError, library_error_message, os_error_message, shorten
from kinema.fileio import (
    MANIFEST,
    RUN_FILE,
    RUN_KIND,
    atomic_file,
    atomic_folder,
    change_since_written,
    check_output,
    clean_stale,
    output_kind,
    read_json_object,
)

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "training_checkpoint"  # kind in the fileio manifest of each checkpoint folder
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
INFO_FILE = "checkpoint.json"

_CHECKPOINT_NAME = re.compile(r"^step-(\d{8,})$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.kinema-(?:part|old)-\d+(?:\.[^/]*)?$")  # kinema.fileio's temporaries
_NEEDS_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_MAX_SHOWN = 3

# The exact types torch.load(weights_only=True) rebuilds (checked against torch 2.13); a subclass such as numpy's
# float64 (a float) is pickled by its own class and refused on reading, so types are matched exactly.
_PLAIN_TYPES: tuple[type, ...] = (int, float, bool, complex, str, bytes, bytearray, type(None), torch.Size,
                                  torch.dtype, torch.device)
_CONTAINER_TYPES: tuple[type, ...] = (dict, OrderedDict, list, tuple, set)
_TENSOR_TYPES: tuple[type, ...] = (torch.Tensor, torch.nn.Parameter)


# ---------------------------------------------------------------- config fingerprints


def _without(config: dict, ignore: Iterable[str]) -> dict:
    if not isinstance(config, dict):
        raise KinemaError(f"a training config must be a mapping of named settings, not {type(config).__name__}")
    ignored = set(ignore)
    return {key: value for key, value in config.items() if key not in ignored}


def fingerprint(config: dict, ignore: Iterable[str] = ()) -> str:
    """sha256 hex digest of `config` as canonical JSON (keys sorted), without the top-level keys in `ignore`: two
    configs that train the same run have the same fingerprint. Values must be plain JSON (as read from YAML)."""
    kept = _without(config, ignore)
    try:
        text = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise KinemaError(f"the training config holds a value that is not plain JSON data ({err}); use strings, "
                          "numbers, true/false, lists and mappings") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _shown(value: Any) -> str:
    return shorten(json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr), 60)


_ABSENT = object()


def _differences(old: Any, new: Any, prefix: str, found: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in set(old) | set(new):
            _differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}.{key}" if prefix else str(key),
                         found)
        return
    # JSON equality: 1 and 1.0 differ in the fingerprint's text, so they differ here too
    if old is not _ABSENT and new is not _ABSENT and json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True):
        return
    before = "(absent)" if old is _ABSENT else _shown(old)
    after = "(absent)" if new is _ABSENT else _shown(new)
    found.append(f"{prefix}: {before} -> {after}")


def config_differences(old: dict, new: dict, ignore: Iterable[str] = ()) -> list[str]:
    """The settings that differ between two configs as `"data.frames: 16 -> 8"` (dotted keys into nested mappings,
    values as JSON, `(absent)` for a missing key), sorted; top-level keys in `ignore` are left out."""
    found: list[str] = []
    _differences(_without(old, ignore), _without(new, ignore), "", found)
    return sorted(found)


# ---------------------------------------------------------------- checkpoints on disk


@dataclass
class Checkpoint:
    """One checkpoint read back: its step, its tensor groups (`{"model": {name: tensor}, ...}`) and its state."""

    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]


def _check_state(value: Any, where: str) -> None:
    """Refuse a state value that torch.load(weights_only=True) could not read back, naming where it is."""
    kind = type(value)
    if kind in _TENSOR_TYPES or kind in _PLAIN_TYPES:
        return
    if kind in _CONTAINER_TYPES:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, dict) and type(key) not in _PLAIN_TYPES:
                raise KinemaError(f"cannot save the checkpoint: a key in {where} is a {type(key).__name__}; use "
                                  "strings or numbers as keys")
            _check_state(item, f"{where}[{key!r}]")
        return
    raise KinemaError(f"cannot save the checkpoint: {where} is a {kind.__module__}.{kind.__qualname__}, which "
                      "torch.load(weights_only=True) cannot read back; store tensors, numbers, strings, lists, tuples "
                      "or dicts (a state_dict(), not the object)")


def _check_tensors(tensors: Any) -> None:
    if not isinstance(tensors, dict):
        raise KinemaError(f"cannot save the checkpoint: tensors must map group names to dicts of tensors, not "
                          f"{type(tensors).__name__}")
    for group, named in tensors.items():
        if not isinstance(group, str) or not _GROUP_NAME.match(group):
            raise KinemaError(f"cannot save the checkpoint: tensor group name {group!r} must be letters, digits, "
                              "_ or - (it names a file)")
        if not isinstance(named, dict):
            raise KinemaError(f"cannot save the checkpoint: tensors[{group!r}] is a {type(named).__name__}, not a "
                              "dict of tensors")
        bad = [key for key, value in named.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
        if bad:
            raise KinemaError(f"cannot save the checkpoint: tensors[{group!r}] has entries that are not named "
                              f"tensors: {bad[:_MAX_SHOWN]}")


def _savable(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; a tensor whose storage an earlier one shares (tied or sliced weights) is
    copied, because safetensors refuses to write shared storage."""
    seen: set[int] = set()
    out = {}
    for name, tensor in named.items():
        plain = tensor.detach().cpu().contiguous()
        pointer = plain.untyped_storage().data_ptr()
        if pointer in seen and plain.numel():
            plain = plain.clone()
        seen.add(plain.untyped_storage().data_ptr())
        out[name] = plain
    return out


def _checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _damaged(path: Path, why: str, others: list[Path]) -> KinemaError:
    if others:
        fix = "resume from another checkpoint with --resume PATH, one of: " + ", ".join(map(str, others))
    else:
        fix = "this run has no other checkpoint; start a new run in another output folder"
    return KinemaError(f"{path} {why}; {fix}")


# ---------------------------------------------------------------- the run folder


class RunFolder:
    """A training run's folder: `kinema-run.json` and `checkpoints/step-NNNNNNNN/`. Made with `RunFolder.open`."""

    def __init__(self, path: Path, run_fingerprint: str, keep: int):
        self.path = path
        self.fingerprint = run_fingerprint
        self.keep = keep
        self._warned: set[Path] = set()  # checkpoints kept for holding the user's files, warned about once each

    @property
    def checkpoints_folder(self) -> Path:
        return self.path / CHECKPOINTS

    @classmethod
    def open(cls, path: str | os.PathLike, config: dict, *, resume: str | None, keep: int,
             ignore: Iterable[str] = (), create: bool = True,
             upgrade: Callable[[dict], dict] | None = None, inputs: dict[str, str] | None = None) -> RunFolder:
        """Start a run in `path` (`resume` None: a new or empty folder) or continue the run there (`resume` "latest"
        or a checkpoint folder of that run), refusing in one line anything else: a folder kinema did not make, a run
        started without --resume, or a config that differs from the run's (up to keys in `ignore`).
        Cheap: call it before loading models. The checkpoint `resume` names is found by `resolve` (call it early
        too, to refuse a missing checkpoint before long work); `open` only checks the run. Keeps the newest `keep`
        checkpoints. `create` False checks a new run's folder without making it (a refusal before long work; the
        real start comes after it). `upgrade` turns a run's stored config into this version's form before they are
        compared (settings a later version added, at their defaults), so older runs still resume. `inputs`
        (`{what: fingerprint}` of the files the run reads, such as its model and data) are recorded at the start and
        a resume is refused where one differs (a run that recorded none is not checked)."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise KinemaError(f"the number of checkpoints to keep must be a whole number of at least 1, got {keep!r}")
        ignore = tuple(ignore)
        wanted = fingerprint(config, ignore)
        given = Path(path)
        run_file = given / RUN_FILE
        if resume is None:
            return cls._start(given, config, wanted, keep, create, inputs)
        if not given.is_dir():
            raise KinemaError(f"cannot resume: {given} is not a folder; --resume continues a training run in its "
                              "output folder (run without --resume to start one)")
        if not run_file.is_file():
            raise KinemaError(f"cannot resume: {given} holds no training run (no {RUN_FILE}); run without --resume "
                              "to start one in a new or empty folder")
        stored = read_json_object(run_file, "the training run's record")
        if (stored.get("kind") != RUN_KIND or not isinstance(stored.get("fingerprint"), str)
                or not isinstance(stored.get("config"), dict)):
            raise KinemaError(f"{run_file} is not a kinema training run record (no kind, fingerprint and config); "
                              "start a new run in another output folder")
        stored_config = upgrade(stored["config"]) if upgrade is not None else stored["config"]
        if fingerprint(stored_config, ignore) != wanted:
            differences = config_differences(stored_config, config, ignore)
            if len(differences) > 1:
                # train.steps joins the identity only under a decaying schedule (config.resume_identity): with the
                # schedule changed, its appearing or going is the schedule's change, not another one.
                differences = [d for d in differences if not (d.startswith("train.steps: ") and "(absent)" in d)]
            if differences:
                listed = "; ".join(differences[:_MAX_SHOWN])
                more = len(differences) - _MAX_SHOWN
                what = f"this config differs from the run's: {listed}" + (f"; and {more} more" if more > 0 else "")
            else:
                what = f"this config's fingerprint differs from the one in {RUN_FILE}, which was edited or written " \
                       "by another kinema version"
            raise KinemaError(f"cannot resume {given}: {what}; resume with the run's own config ({run_file} holds "
                              "it, under \"config\"), or start a new run in another output folder")
        recorded = stored.get("inputs")
        if inputs is not None and isinstance(recorded, dict):
            changed = [what for what, value in inputs.items() if what in recorded and recorded[what] != value]
            if changed:
                raise KinemaError(f"cannot resume {given}: {' and '.join(changed)} changed since the run started "
                                  "(other files, or files rewritten), so the rest of it would train on another model "
                                  "or data than its first steps; resume with the files it started with, or start a "
                                  "new run in another output folder")
        return cls(given, wanted, keep)

    @classmethod
    def _start(cls, given: Path, config: dict, wanted: str, keep: int, create: bool,
               inputs: dict[str, str] | None) -> RunFolder:
        if (given / RUN_FILE).exists():
            if not cls(given, wanted, keep).checkpoints():  # the trainer's --resume latest then starts at step 0
                raise KinemaError(f"{given} already holds a training run that saved no checkpoint yet; pass --resume "
                                  "latest to start it again from step 0, or choose another output folder")
            raise KinemaError(f"{given} already holds a training run; pass --resume latest to continue it, or choose "
                              "another output folder")
        if given.is_dir() and any(given.iterdir()):
            held = ", ".join(sorted(p.name for p in given.iterdir())[:_MAX_SHOWN])
            raise KinemaError(f"{given} is not empty and holds no training run (it holds {held}); kinema starts a run "
                              "only in a new or empty folder: choose another output folder")
        # A file, a dangling link, a file in the way of the parents, a folder that cannot be written: before the
        # model loads rather than at the first write.
        check_output(given, RUN_KIND, folder=True)
        if not create:
            return cls(given, wanted, keep)
        record = {"kind": RUN_KIND, "fingerprint": wanted, "config": config, "kinema_version": _version(),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  **({"inputs": inputs} if inputs is not None else {})}
        with atomic_file(given / RUN_FILE, RUN_KIND) as temp:
            temp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        return cls(given, wanted, keep)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """`(step, folder)` of every complete checkpoint (a folder kinema finished writing: its manifest says
        CHECKPOINT_KIND), sorted by step; the hidden temporaries of a save that was killed are not listed."""
        folder = self.checkpoints_folder
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match and entry.is_dir() and output_kind(entry) == CHECKPOINT_KIND:
                found.append((int(match[1]), entry))
        return sorted(found)

    def _others(self, checkpoint: Path) -> list[Path]:
        """Up to 3 other complete checkpoints, newest first, to suggest when `checkpoint` cannot be used."""
        real = Path(os.path.realpath(checkpoint))
        others = [path for _, path in reversed(self.checkpoints()) if Path(os.path.realpath(path)) != real]
        return others[:_MAX_SHOWN]

    def resolve(self, resume: str) -> Path:
        """The checkpoint folder `resume` names: "latest" is the newest; a path must be a complete checkpoint folder
        of this run. One KinemaError line otherwise."""
        found = self.checkpoints()
        if resume == "latest":
            if not found:
                raise KinemaError(f"no checkpoint in {self.path} yet (the run stopped before its first save), so there "
                                  "is nothing to resume; remove the folder and run without --resume, or start a new "
                                  "run in another output folder")
            newest = found[-1][0]
            stray = sorted(entry for entry in self.checkpoints_folder.iterdir() if entry.is_dir()
                           and (match := _CHECKPOINT_NAME.match(entry.name)) and int(match[1]) > newest)
            if stray:  # resuming behind it would retrain its steps, then stop at saving over it
                raise KinemaError(f"{stray[-1]} is newer than the last complete checkpoint (step {newest}) but not one "
                                  f"kinema can read (its {MANIFEST} is missing or damaged); move it out of "
                                  f"{self.checkpoints_folder} to resume from step {newest}")
            return found[-1][1]
        given = Path(resume)
        real = Path(os.path.realpath(given))
        for step, path in found:
            if Path(os.path.realpath(path)) == real:
                for _, later in (entry for entry in found if entry[0] > step):
                    # The run saves over them as it passes their steps: one a user added files to is refused now,
                    # not after retraining up to it.
                    check_output(later, CHECKPOINT_KIND, folder=True, overwrite=True)
                return path
        if not found:
            fix = "it has none yet; run without --resume in a new output folder"
        else:
            fix = "give one of " + ", ".join(str(p) for _, p in reversed(found[-_MAX_SHOWN:])) + ", or --resume latest"
        run_of = real.parent.parent if real.parent.name == CHECKPOINTS and (real.parent.parent / RUN_FILE).is_file() \
            else None
        if not os.path.lexists(given):
            why = "does not exist"
        elif output_kind(given) != CHECKPOINT_KIND:
            why = f"is not a complete checkpoint of the run in {self.path}"
        elif run_of is None or run_of == Path(os.path.realpath(self.path)):
            why = (f"is a checkpoint, but not one the run in {self.path} keeps (its own are "
                   f"{CHECKPOINTS}/step-NNNNNNNN)")
        else:
            why = f"is a checkpoint of another run ({run_of}), not of the run in {self.path}"
        raise KinemaError(f"cannot resume from {given}: it {why}; {fix}")

    def save(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> Path:
        """Write `checkpoints/step-{step:08d}/` whole or not at all: `{group}.safetensors` for each group of
        `tensors` (`{"model": {name: tensor}, "ema": {...}}`, any shapes, moved to the CPU), `state.pt` =
        torch.save(`state`) (plain values and tensors only, checked first) and `checkpoint.json`. A checkpoint of
        the same step is replaced. Then removes older checkpoints beyond the newest `keep`, but never one that holds
        a file kinema did not write or that was edited (it stays, with a warning). Returns the folder."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise KinemaError(f"a checkpoint's step must be a whole number >= 0, got {step!r}")
        _check_tensors(tensors)
        if not isinstance(state, dict):
            raise KinemaError(f"cannot save the checkpoint: state must be a dict, not {type(state).__name__}")
        _check_state(state, "state")
        self._clean_stale()
        target = self.checkpoints_folder / _checkpoint_name(step)
        groups = sorted(tensors)
        with atomic_folder(target, CHECKPOINT_KIND, overwrite=True) as temp:
            for group in groups:
                save_file(_savable(tensors[group]), str(temp / f"{group}.safetensors"), metadata={"step": str(step)})
            torch.save(state, temp / STATE_FILE)
            info = {"step": step, "fingerprint": self.fingerprint, "groups": groups}
            (temp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        self._prune(keep_also=target)
        return target

    def _clean_stale(self) -> None:
        """Remove what saves and prunes killed with SIGKILL left behind (fileio puts back a replaced checkpoint)."""
        folder = self.checkpoints_folder
        if not folder.is_dir():
            return
        for entry in list(folder.iterdir()):
            match = _TEMP_NAME.match(entry.name)
            if match:
                clean_stale(folder / match["name"])

    def _prune(self, keep_also: Path) -> None:
        found = self.checkpoints()
        for _, folder in found[:-self.keep]:
            if folder == keep_also:
                continue
            try:
                # with overwrite, the policy passes exactly the folders that are kinema's checkpoints and hold
                # nothing else, unedited: those kinema may remove
                check_output(folder, CHECKPOINT_KIND, folder=True, overwrite=True)
            except KinemaError as err:
                if folder not in self._warned:
                    self._warned.add(folder)
                    logger.warning("keeping the old checkpoint %s: %s", folder, err)
                continue
            # renamed to a hidden temporary first, so that a kill during the removal leaves no checkpoint that
            # looks complete but lacks files; the next save removes the rest ("part": fileio's clean_stale
            # removes it, where an "old" one would be put back)
            doomed = folder.with_name(f".{folder.name}.kinema-part-{os.getpid()}")
            try:
                os.replace(folder, doomed)
            except OSError as err:  # a failed clean-up must not stop the training that just saved
                logger.warning("keeping the old checkpoint %s: %s", folder, os_error_message(err, folder, "remove"))
                continue
            shutil.rmtree(doomed, ignore_errors=True)

    def load(self, checkpoint: Path) -> Checkpoint:
        """Read the checkpoint folder `checkpoint` (from `resolve`): its tensor groups with safetensors (on the CPU)
        and `state.pt` with torch.load(weights_only=True), which refuses any pickle that asks for code. A missing,
        truncated, edited or corrupt file raises one KinemaError naming it and the other checkpoints to resume from."""
        checkpoint = Path(checkpoint)
        others = self._others(checkpoint)
        if output_kind(checkpoint) != CHECKPOINT_KIND:
            raise _damaged(checkpoint, "is not a complete kinema training checkpoint (no manifest of one)", others)
        manifest = read_json_object(checkpoint / MANIFEST, "the checkpoint's manifest")
        info_path = checkpoint / INFO_FILE
        self._check_saved(info_path, manifest, others)
        info = read_json_object(info_path, "the checkpoint's record")
        step, groups = info.get("step"), info.get("groups")
        if (isinstance(step, bool) or not isinstance(step, int) or not isinstance(groups, list)
                or not all(isinstance(g, str) and _GROUP_NAME.match(g) for g in groups)):
            raise _damaged(info_path, "lacks a whole-number step or a list of tensor groups", others)
        tensors = {}
        for group in groups:
            path = checkpoint / f"{group}.safetensors"
            self._check_saved(path, manifest, others)
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    tensors[group] = {name: f.get_tensor(name) for name in f.keys()}
            except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                raise _damaged(path, f"cannot be read (corrupt?): {library_error_message(err)}", others) from None
        state_path = checkpoint / STATE_FILE
        self._check_saved(state_path, manifest, others)
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            needs = _NEEDS_GLOBAL.search(str(err))
            why = "cannot be read (corrupt?): weights-only unpickling failed"
            if needs:
                why = (f"asks to run code ({needs[1]}), which kinema never does: it reads only tensors and plain "
                       "values from a checkpoint's state")
            raise _damaged(state_path, why, others) from None
        except Exception as err:  # torch's zip reader raises RuntimeError, EOFError and others on damaged files
            raise _damaged(state_path, f"cannot be read (corrupt or truncated?): {library_error_message(err)}",
                           others) from None
        if not isinstance(state, dict):
            raise _damaged(state_path, f"holds a {type(state).__name__}, not the dict kinema saves", others)
        return Checkpoint(step, tensors, state)

    @staticmethod
    def _check_saved(path: Path, manifest: dict, others: list[Path]) -> None:
        """Compare a file with what the manifest recorded when kinema wrote it: its size (truncation, replacement)
        and its SHA-256 (of a sample of its bytes over 16 MiB: an edit or damage that keeps the size), before a
        reader trips on it or trains on from it."""
        if not path.is_file():
            raise _damaged(path, "is missing", others)
        change = change_since_written(path.parent, path.name, manifest)
        if change in ("unlisted", "size"):
            raise _damaged(path, f"was truncated or changed since it was saved ({path.stat().st_size} bytes, saved as "
                                 f"{(manifest.get('files') or {}).get(path.name)})", others)
        if change == "contents":
            raise _damaged(path, "was changed since it was saved (same size, other contents)", others)


def _version() -> str:
    from kinema import __version__

    return __version__


# ---------------------------------------------------------------- random number generators


def rng_state() -> dict[str, Any]:
    """The state of every random stream training draws from, as values torch.load(weights_only=True) reads back:
    `{"torch": (N,) uint8 tensor, "cuda": [one uint8 tensor per CUDA device] ([] without CUDA), "python":
    random.getstate() (a tuple of ints and a float or None), "numpy": numpy's global MT19937 state with its 624
    keys as an int64 tensor}`."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"algorithm": str(algorithm), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the streams `rng_state()` recorded, so that every later draw repeats. CUDA states are restored on as
    many devices as both runs have (a warning if the counts differ); a CUDA-less machine skips them."""
    missing = [key for key in ("torch", "cuda", "python", "numpy") if not isinstance(state, dict) or key not in state]
    if missing:
        raise KinemaError(f"the checkpoint's random state lacks {', '.join(missing)}; resume from a checkpoint "
                          "kinema train saved")
    torch.set_rng_state(state["torch"])
    saved_cuda = list(state["cuda"])
    if saved_cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count != len(saved_cuda):
            logger.warning("the checkpoint holds random states for %d CUDA devices and this machine has %d; "
                           "restoring the first %d", len(saved_cuda), count, min(count, len(saved_cuda)))
        for device, device_state in enumerate(saved_cuda[:count]):
            torch.cuda.set_rng_state(device_state, device)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    np.random.set_state((numpy["algorithm"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
