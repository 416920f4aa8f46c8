"""Everything kinema writes goes through one output policy and appears whole or not at all.

The policy (`check_output`), for every command that writes (convert, data synth, and all that come later):
- a new path, or an empty folder: write;
- an existing file or non-empty folder: refuse in one line, unless `overwrite=True` and it is an earlier output of
  the same kind that kinema recognises by the mark it wrote *inside* it (a manifest in a folder, safetensors
  metadata or a zip record in a weights file, the settings in a video), and it holds nothing kinema did not write
  and none of the inputs;
- a symbolic link is written through (the link stays, what it points to gets the output); a dangling one is refused
  (and a video output that is a link, by `probe.check_video_not_a_link`: its sidecar goes beside its name);
- files get `0666 & ~umask`, folders `0777 & ~umask` (a setgid parent's group bit is kept by the kernel); a replaced
  output keeps its mode.

Writes go to a hidden temporary `.NAME.kinema-part-PID` beside the target and are renamed into place at the end;
on any error, Ctrl-C, SIGTERM or SIGHUP (the CLI turns those into exceptions) the temporary is removed. A SIGKILL
leaves it behind; the next write to the same target removes it (and puts back an output that was being replaced).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from kinema.errors import KinemaError, is_disk_full, library_error_message, os_error_message, without_temporaries
from kinema.interrupt import stop_if_requested
from kinema.sniff import Kind, sniff

MANIFEST = "kinema-output.json"  # inside every folder kinema writes: its kind and the files it wrote
MARK_KEY = "kinema_output"  # safetensors metadata key / zip record name that marks a weights file kinema wrote
# A training run's folder is marked by its record instead (kinema.training.checkpoint): it grows while the run goes.
RUN_FILE = "kinema-run.json"
RUN_KIND = "training_run"
_TEMP = re.compile(r"^\.(?P<name>.+)\.kinema-(?P<role>part|old)-(?P<pid>\d+)(?:\.[^/]*)?$")


# ---------------------------------------------------------------- recognising kinema's own outputs


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~_umask()


def _folder_files(folder: Path) -> list[str]:
    """Relative paths of every file (and symlink) under `folder`, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


# Files up to this size are listed with their SHA-256 too, so an edit that keeps the size (a caption corrected in
# metadata.json, a setting in a config) is known; larger ones (weights, videos) by the SHA-256 of a sample of their
# bytes (`sampled_sha256`), to keep saves fast.
_HASHED_BYTES = 16 * 2**20
_SAMPLED_EDGE = 2**20  # bytes read at each end of a large file
_SAMPLED_BLOCKS, _SAMPLED_BLOCK = 32, 2**16  # and this many blocks of this size spread between them


def sha256_of(path: Path) -> str:
    """The SHA-256 of the file `path`, in hex (read in 1 MiB blocks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """The SHA-256 of a large file's size, its first and last MiB and 32 blocks of 64 KiB spread evenly between them
    (about 4 MiB read): weights edited in place or saved anew at their size (fine-tuning rewrites nearly every byte)
    change it, and a copy of the file (new inode and times) does not."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    step = max((size - 2 * _SAMPLED_EDGE) // (_SAMPLED_BLOCKS + 1), 1)
    offsets = [0, *(_SAMPLED_EDGE + step * (i + 1) for i in range(_SAMPLED_BLOCKS)), max(size - _SAMPLED_EDGE, 0)]
    with open(path, "rb") as f:
        for offset, length in zip(offsets, [_SAMPLED_EDGE, *[_SAMPLED_BLOCK] * _SAMPLED_BLOCKS, _SAMPLED_EDGE],
                                  strict=True):
            f.seek(offset)
            digest.update(f.read(length))
    return digest.hexdigest()


def files_fingerprint(path: str | os.PathLike, edge_bytes: int = 0) -> str:
    """A SHA-256 over the files at `path` (a file, or every file under a folder but hidden ones): each one's name
    and size and, with `edge_bytes`, its first and last `edge_bytes` bytes. Cheap on a folder of thousands of clips
    or GBs of weights, it changes when a file is added, removed, resized or rewritten (other weights differ from
    the first bytes of a file's data on); a missing path gives the fingerprint of no files."""
    import hashlib

    root = Path(path)
    if root.is_file():
        files = {root.name: root}
    elif root.is_dir():
        files = {file.relative_to(root).as_posix(): file for file in root.rglob("*")
                 if file.is_file() and not any(part.startswith(".") for part in file.relative_to(root).parts)}
    else:
        files = {}
    digest = hashlib.sha256()
    for name in sorted(files):
        try:
            size = files[name].stat().st_size
            digest.update(f"{name}\0{size}\0".encode())
            if edge_bytes:
                with open(files[name], "rb") as f:
                    digest.update(f.read(edge_bytes))
                    f.seek(max(size - edge_bytes, 0))
                    digest.update(f.read(edge_bytes))
        except FileNotFoundError:  # removed while this ran: as if it were not there
            continue
    return digest.hexdigest()


def _hashed(folder: Path, name: str, size: int) -> bool:
    return size <= _HASHED_BYTES and not os.path.islink(folder / name)


def write_manifest(folder: Path, kind: str) -> None:
    """Mark `folder` as a kinema output of `kind`, listing every file in it with its size (and the SHA-256 of the
    small ones), so that files added or edited later are known as the user's."""
    from kinema import __version__

    files = {name: os.lstat(folder / name).st_size for name in _folder_files(folder) if name != MANIFEST}
    hashes = {name: sha256_of(folder / name) for name, size in files.items() if _hashed(folder, name, size)}
    sampled = {name: sampled_sha256(folder / name) for name in files
               if name not in hashes and not os.path.islink(folder / name)}
    (folder / MANIFEST).write_text(json.dumps({MARK_KEY: kind, "kinema": __version__, "files": files,
                                               "sha256": hashes, "sampled_sha256": sampled}, indent=1) + "\n")


def _manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get(MARK_KEY), str) or not isinstance(data.get("files"), dict):
        return None
    return data


def _zip_mark(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/{MARK_KEY}.json")), None)
            if name is None:
                return None
            mark = json.loads(archive.read(name)).get(MARK_KEY)
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError):
        return None
    return mark if isinstance(mark, str) else None


def mark_weights_file(path: Path, kind: str) -> None:
    """Add kinema's mark to a torch zip checkpoint just written at `path` (safetensors files carry it in their
    metadata instead). torch.load ignores records it does not know."""
    with zipfile.ZipFile(path, "a") as archive:
        prefix = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{prefix}/{MARK_KEY}.json", json.dumps({MARK_KEY: kind}))


def _sidecar_settings(path: Path) -> dict | None:
    """The settings in a sidecar as kinema writes them: a JSON object stamped with the kinema version."""
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) and "kinema" in settings else None


def _carries(video: Path, settings: dict) -> bool:
    """Whether the video file `video` holds `settings` inside it, as every video kinema writes holds its sidecar's
    (kinema.data.video_io): a user's video put in place of kinema's, or a sidecar edited by hand, breaks the pair."""
    from kinema.data.probe import read_embedded_settings

    try:
        return read_embedded_settings(video) == settings
    except KinemaError:
        return False


def _settings_mark(path: Path) -> str | None:
    """A settings sidecar kinema wrote: kinema's settings, which its video (where one is left) holds too."""
    settings = _sidecar_settings(path)
    if settings is None:
        return None
    video = path.with_name(path.name.removesuffix(".json"))
    return "video_settings" if not video.is_file() or _carries(video, settings) else None


def _video_mark(path: Path) -> str | None:
    settings = _sidecar_settings(path.with_name(path.name + ".json"))
    return "video" if settings is not None and _carries(path, settings) else None


def _run_record(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("kind") == RUN_KIND


def slug(text: str, limit: int = 48, fallback: str = "video") -> str:
    """A file name from `text`: its lower-case ASCII letters and digits, words joined by '-', at most `limit`
    characters (`fallback` when nothing is left)."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or fallback


def kind_words(kind: str) -> str:
    """An output kind as messages name it: "synth_dataset" -> "synth dataset"."""
    return kind.replace("_", " ")


def _damaged_weights(path: Path) -> str | None:
    """What a cut-short or damaged safetensors file at `path` is, in a few words (sniff's); None for anything else."""
    from kinema.sniff import Kind, sniff

    try:
        found = sniff(path)
    except KinemaError:
        return None
    return found.what if found.kind in (Kind.SAFETENSORS_TRUNCATED, Kind.SAFETENSORS_DAMAGED) else None


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of kinema output at `path` (from the mark kinema wrote inside it), or None when kinema did not
    write it. A folder's kind needs its manifest (or a training run's record); a file's needs its metadata, zip
    record or video sidecar."""
    path = Path(path)
    if path.is_dir():
        manifest = _manifest(path)
        if manifest:
            return manifest[MARK_KEY]
        return RUN_KIND if _run_record(path / RUN_FILE) else None
    if not path.is_file():
        return None
    try:
        found = sniff(path)
    except KinemaError:  # unreadable: not something kinema can know as its own
        return None
    if found.kind is Kind.SAFETENSORS:
        mark = found.metadata.get(MARK_KEY)
        return mark if isinstance(mark, str) else None
    if found.kind is Kind.TORCH_ZIP:
        return _zip_mark(path)
    if path.suffix.lower() == ".json":
        return _settings_mark(path)
    return _video_mark(path)


def change_since_written(folder: Path, name: str, manifest: dict) -> str | None:
    """How the file `name` in `folder` differs from what `manifest` recorded when kinema wrote it: "unlisted" (added
    since), "size" or "contents" (edited since: its size, the SHA-256 of a file up to 16 MiB, or of a larger one's
    sample of bytes, `sampled_sha256`; manifests from before kinema listed them give sizes only), or None when it
    is as written."""
    written, hashes, sampled = manifest.get("files") or {}, manifest.get("sha256"), manifest.get("sampled_sha256")
    if name not in written:
        return "unlisted"
    if written[name] != os.lstat(folder / name).st_size:
        return "size"
    if isinstance(hashes, dict) and name in hashes and hashes[name] != sha256_of(folder / name):
        return "contents"
    if isinstance(sampled, dict) and name in sampled and sampled[name] != sampled_sha256(folder / name):
        return "contents"
    return None


def _foreign_files(folder: Path) -> list[str]:
    """Files in a kinema output folder that are not as its manifest recorded them (`change_since_written`): the
    user's work, which kinema never deletes."""
    manifest = _manifest(folder) or {"files": {}}
    return [name for name in _folder_files(folder)
            if name != MANIFEST and change_since_written(folder, name, manifest) is not None]


# ---------------------------------------------------------------- the policy


# Files whose names kinema makes from the output's (clip.mp4 -> clip.mp4.json, clip.mp4.latents.safetensors).
_BESIDE_KINDS = ("video_settings", "latents")


def is_within(path: Path, folder: Path) -> bool:
    """Whether the resolved path `path` is `folder` or inside it (both resolved: links followed)."""
    return path == folder or folder in path.parents


def check_output(
    path: str | os.PathLike, kind: str | None, *, folder: bool | None, overwrite: bool = False, inputs: Iterable = ()
) -> Path:
    """Apply the output policy to `path` for an output of `kind` (a folder if `folder`) and return the real path to
    write (symlinks resolved). Raises one KinemaError naming the path, the problem and the fix: also when the folder
    it goes in cannot be written (read-only, no permission), which would otherwise show only once the work is done.
    `kind` or `folder` None (not known yet) checks everything else, for an early refusal before long work."""
    real = _allowed(Path(path), kind, folder=folder, overwrite=overwrite, inputs=inputs)
    _check_writable(real, Path(path))
    return real


def _check_writable(real: Path, given: Path) -> None:
    """Create and remove a temporary (named as a write's, so a kill in between leaves what `clean_stale` removes)
    in the nearest existing folder `real` would be written in."""
    place = next(parent for parent in real.parents if parent.exists())
    probe = place / f".{_temp_stem(real)}.kinema-part-{os.getpid()}.probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return  # this process is writing there now
    except OSError as err:
        raise KinemaError(os_error_message(err, given, "write")) from None
    os.unlink(probe)


def _allowed(given: Path, kind: str | None, *, folder: bool | None, overwrite: bool, inputs: Iterable) -> Path:
    if given.is_symlink() and not given.exists():
        raise KinemaError(f"{given} is a symbolic link to {os.readlink(given)}, which does not exist; "
                          "fix the link or give another path")
    real = Path(os.path.realpath(given))
    for parent in real.parents:
        if parent.exists() and not parent.is_dir():
            raise KinemaError(f"cannot write {given}: {parent} is a file, not a folder")
    clean_stale(real)  # first, so that an output a killed run was replacing is back in place to be judged
    for source in inputs:
        source_real = Path(os.path.realpath(source))
        # Nor inside an input folder: a file written there changes the input (a model folder's weights, a frame
        # folder's frames), even one kinema wrote there earlier.
        if is_within(source_real, real) or (source_real.is_dir() and is_within(real, source_real)):
            what = "is" if source_real == real else "holds" if is_within(source_real, real) else "is inside"
            raise KinemaError(f"the output {given} {what} the input {source}; write the result somewhere else")
    if not real.exists():
        return real
    if not (real.is_file() or real.is_dir()):  # opening a FIFO to judge it would wait for a writer forever
        raise KinemaError(f"{given} is a FIFO, socket or device, not a file or folder kinema writes; give another "
                          "path")
    noun = "folder" if real.is_dir() else "file"
    if folder is True and not real.is_dir():
        raise KinemaError(f"{given} is a file; give a folder path for the {kind_words(kind or 'output')}")
    if folder is False and real.is_dir():
        if kind in _BESIDE_KINDS:
            raise KinemaError(f"{given} is a folder, where kinema writes the {kind_words(kind)} beside the output; "
                              "move the folder or give the output another name")
        inside = f"a file name such as {given / ('output' + given.suffix)}" if given.suffix else \
            "the path of a file inside it, with its extension"
        raise KinemaError(f"{given} is a folder; give {inside}")
    if real.is_dir() and not any(real.iterdir()):
        return real
    if is_within(Path.cwd().resolve(), real):  # replacing it would leave this process (and the shell) nowhere
        raise KinemaError(f"{given} is the folder you are working in (or holds it); run kinema from outside it "
                          "or give another path")
    found = output_kind(real)
    if found is None:
        hint = ""
        if real.is_dir():
            hint = f" (it holds {', '.join(sorted(p.name for p in real.iterdir())[:3])})"
        elif (damaged := _damaged_weights(real)) is not None:
            # kinema's mark is in the part that is gone: whose it was cannot be told, so it stays.
            raise KinemaError(f"{given} already exists and is {damaged}, so kinema cannot tell whether it wrote it, "
                              f"and never replaces what it may not have written: delete it yourself if it is an "
                              f"output of yours, or choose a new {noun}")
        elif _sidecar_settings(real.with_name(real.name + ".json")) is not None:  # kinema's while the two agree
            hint = f" (or it and its settings {real.name}.json no longer agree: one was edited)"
        instead = "a new folder or an empty one" if noun == "folder" else "a new file"
        raise KinemaError(f"{given} already exists and kinema did not write it{hint}; kinema never replaces what it "
                          f"did not write: choose {instead}")
    if kind is not None and found != kind:
        raise KinemaError(f"{given} is an earlier kinema output of another kind ({found}, not {kind}); choose "
                          f"another path")
    if real.is_dir():
        foreign = _foreign_files(real)
        if foreign:
            raise KinemaError(f"{given} is an earlier kinema output but now also holds files kinema did not write "
                              f"or that were edited since ({', '.join(foreign[:3])}); kinema never deletes them: move "
                              "them out or choose another folder")
    if not overwrite:
        raise KinemaError(f"{given} already exists (an earlier kinema {kind_words(found)}); pass --overwrite "
                          "to replace it, or choose another path")
    return real


# ---------------------------------------------------------------- temporary names and stale leftovers


_STEM_BYTES = 150  # a name near the 255-byte limit still leaves room for the temporary's decoration (~35 bytes)


def _temp_stem(target: Path) -> str:
    """`target`'s name, or for a long one its first bytes and a digest of the whole: NAME and NAME.json (a video and
    its sidecar, written one inside the other) must never share a temporary."""
    name = target.name
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= _STEM_BYTES:
        return name
    import hashlib

    head = raw[:_STEM_BYTES - 17].decode("utf-8", "ignore")  # never half a character
    return f"{head}-{hashlib.sha256(raw).hexdigest()[:16]}"


def _temp_path(target: Path, role: str) -> Path:
    return target.with_name(f".{_temp_stem(target)}.kinema-{role}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if not os.path.lexists(path):  # unlink of a missing name fails with EROFS, not ENOENT, on a read-only disk
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_own(path: Path, kind: str) -> bool:
    """Remove the output of `kind` that kinema wrote at `path` (a file or folder); anything else there, or nothing,
    is left as it is. Whether it removed something."""
    if output_kind(path) != kind:
        return False
    _remove(path)
    return True


def clean_stale(target: Path) -> None:
    """Remove temporaries of earlier writes to `target` whose process is gone (killed with SIGKILL); an output
    that was being replaced when the process died is put back first."""
    # Names only, filtered by prefix before any regex or Path: a dataset writer calls this for each of thousands of
    # files in one folder, and a per-entry Path and regex made writing quadratic (minutes at 8,000 clips).
    stems = {_temp_stem(target), target.name[:200]}  # the second: how kinema before 2026-11-30 cut a long name
    prefixes = tuple(f".{stem}.kinema-" for stem in stems)
    try:
        names = [name for name in os.listdir(target.parent) if name.startswith(prefixes)]
    except OSError:
        return
    for name in names:
        entry = target.parent / name
        match = _TEMP.match(name)
        if not match or match["name"] not in stems or _alive(int(match["pid"])):
            continue
        if match["role"] == "old" and not os.path.lexists(target):
            os.replace(entry, target)
        else:
            _remove(entry)


def _make_parents(folder: Path) -> Path | None:
    """Create `folder` and missing parents; return the topmost folder created (to remove again on failure)."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KinemaError(os_error_message(err, folder, "create the folder")) from None
    return missing[-1] if missing else None


def _remove_empty_parents(top: Path | None, folder: Path) -> None:
    if top is None:
        return
    for path in [folder, *folder.parents]:
        try:
            path.rmdir()
        except OSError:
            return
        if path == top:
            return


def _chmod_tree(folder: Path, top_mode: int | None) -> None:
    """Give everything written under `folder` the modes the umask asks for (mkstemp/mkdtemp and some writers
    use 0600/0700); the folder itself gets `top_mode` when it replaces an existing one."""
    file_mode, folder_mode = _file_mode(), 0o777 & ~_umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)
        for name in dirs:
            os.chmod(os.path.join(root, name), folder_mode | (os.stat(os.path.join(root, name)).st_mode & 0o2000))
    if top_mode is not None:
        os.chmod(folder, top_mode)


@contextmanager
def _cleanup_on_failure(temp: Path, created: Path | None, parent: Path, shown: Path) -> Iterator[None]:
    """Remove the temporary (and parents this write created) on any exception or signal; an OS error, or torch's
    "file write failed" on a full disk, becomes one line naming the user's path `shown`, never the temporary."""
    try:
        yield
    except BaseException as err:
        _remove(temp)
        _remove_empty_parents(created, parent)
        if isinstance(err, KinemaError) and without_temporaries(str(err)) != str(err):
            raise KinemaError(without_temporaries(str(err))) from err
        if isinstance(err, OSError):
            raise KinemaError(os_error_message(err, shown, "write")) from err
        if isinstance(err, Exception) and is_disk_full(err):
            raise KinemaError(f"cannot write {shown}: {library_error_message(err)}") from err
        raise


@contextmanager
def _temporary(
    path: str | os.PathLike, kind: str, folder: bool, overwrite: bool, inputs: Iterable
) -> Iterator[tuple[Path, Path]]:
    """The policy check, then `(target, temp)`: a fresh hidden temporary folder beside the real target, removed with
    any parents this write created if the block fails or is interrupted."""
    target = check_output(path, kind, folder=folder, overwrite=overwrite, inputs=inputs)
    created = _make_parents(target.parent)
    temp = _temp_path(target, "part")
    with _cleanup_on_failure(temp, created, target.parent, Path(path)):
        _remove(temp)
        os.mkdir(temp)
        yield target, temp


def _state(target: Path) -> tuple[Any, ...] | None:
    """What `target` is now, to tell whether it changed while a write ran: None when absent; a file's inode, size
    and modification time; a folder's files by path with theirs."""
    if not target.exists():
        return None
    if not target.is_dir():
        stat = target.stat()
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return tuple(sorted((str(path.relative_to(target)), path.stat().st_size, path.stat().st_mtime_ns)
                        for path in target.rglob("*") if path.is_file()))


def _check_unchanged(target: Path, before: tuple[Any, ...] | None, given: Path, kind: str, folder: bool,
                     overwrite: bool, inputs: Iterable) -> None:
    """At the swap, the policy again for a target that changed since the write began (another run's output, the
    user's files put there meanwhile), which the first check never saw. An unchanged target is not checked again:
    what the writer itself did beside it (a video's new sidecar) must not count against it."""
    if _state(target) != before:
        _allowed(given, kind, folder=folder, overwrite=overwrite, inputs=inputs)


@contextmanager
def atomic_folder(
    path: str | os.PathLike, kind: str, *, overwrite: bool = False, inputs: Iterable = ()
) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` (after `check_output`); when the block ends without error it
    gets kinema's manifest and replaces `path` whole; on any error or signal it is removed and `path` is left as it
    was."""
    inputs = tuple(inputs)
    with _temporary(path, kind, True, overwrite, inputs) as (target, temp):
        before = _state(target)
        yield temp
        stop_if_requested()  # a stop a library swallowed (raised in a __del__, say) writes nothing
        write_manifest(temp, kind)
        _chmod_tree(temp, target.stat().st_mode & 0o7777 if target.is_dir() else None)
        _check_unchanged(target, before, Path(path), kind, True, overwrite, inputs)
        _swap_in(temp, target)


@contextmanager
def atomic_file(
    path: str | os.PathLike, kind: str, *, overwrite: bool = False, inputs: Iterable = ()
) -> Iterator[Path]:
    """Yield a temporary file name (after `check_output`) for the caller to write; when the block ends without
    error it replaces `path` (keeping an old file's mode); on any error or signal it is removed. The caller marks
    the file as kinema's (see `output_kind`).

    The name lies inside a hidden temporary folder beside `path`, because writers may make temporaries of their own
    next to the name they are given (safetensors writes `.tmpXXXXXX` and renames it): those stay under kinema's
    recognisable name too, and go with it."""
    inputs = tuple(inputs)
    with _temporary(path, kind, False, overwrite, inputs) as (target, temp):
        before = _state(target)
        written = temp / target.name
        yield written
        stop_if_requested()
        os.chmod(written, target.stat().st_mode & 0o7777 if target.is_file() else _file_mode())
        _check_unchanged(target, before, Path(path), kind, False, overwrite, inputs)
        os.replace(written, target)
        os.rmdir(temp)


def _fill_empty_folder(temp: Path, target: Path) -> None:
    """Move the finished contents of `temp` into the existing empty folder `target`, which keeps its inode, mode and
    owner (it may be the current folder, a mount point or a shared setgid folder); the manifest moves last, so the
    folder counts as kinema's only when whole, and an interruption takes back what was moved."""
    names = sorted((p.name for p in temp.iterdir()), key=lambda name: name == MANIFEST)
    moved = []
    try:
        for name in names:
            os.rename(temp / name, target / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            _remove(target / name)
        raise
    os.rmdir(temp)


def _swap_in(temp: Path, target: Path) -> None:
    """Rename the finished `temp` to `target`. An old non-empty `target` is first renamed aside (so a crash in
    between leaves it recoverable by `clean_stale`) and removed once the new one is in place."""
    if not target.exists():
        os.replace(temp, target)
        return
    if target.is_dir() and not any(target.iterdir()):
        _fill_empty_folder(temp, target)
        return
    old = _temp_path(target, "old")
    os.replace(target, old)
    os.replace(temp, target)
    _remove(old)


def exclusive_lock(path: Path, busy: str) -> IO[str]:
    """Hold an exclusive lock on the file `path` (created), released when the returned file is closed or the process
    dies (the kernel's flock, so a killed holder frees it); one KinemaError line `busy` when another process holds
    it. The file records the holder's pid."""
    import fcntl

    file = open(path, "a+")  # noqa: SIM115 - the open file is the lock, held until the caller closes it
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise KinemaError(busy) from None
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file


# ---------------------------------------------------------------- reading


# JSON value kinds by Python type, for saying what a file holds instead of an object.
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def json_kind(value: Any) -> str:
    """What a parsed JSON `value` is, for messages: "an array", "a string", "a number", "true/false", "null"."""
    return _JSON_KINDS.get(type(value), "a JSON value")


def read_json_object(path: str | os.PathLike, what: str = "") -> dict[str, Any]:
    """`read_json` for files that must hold an object of named fields (configs, indexes, settings); any other JSON
    value raises one KinemaError naming the file and what it holds instead."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        label = f"{path} ({what})" if what else str(path)
        raise KinemaError(f"{label} holds {json_kind(value)}, not an object of named "
                          "fields ({...}); restore it from the original download or re-save it")
    return value


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
    except RecursionError:  # the parser recurses once per nesting level
        raise KinemaError(f"{label} is JSON nested too deeply to read") from None


def load_config_file(path: str | os.PathLike) -> Any:
    """The parsed YAML or JSON of `path` (YAML reads JSON too; prompt configs, training configs); one KinemaError
    line for a missing file, a syntax error (with its line and column) or a key given twice in one mapping."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise KinemaError(f"{path} is a folder; give the config file in it (a .yaml or .json file)")
    if not path.is_file():
        raise KinemaError(f"no such config file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise KinemaError(f"{path} is not a text file, so it cannot be a YAML or JSON config") from None
    try:
        return yaml.load(text, Loader=_unique_keys_loader())  # a SafeLoader: plain data, never objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = err.problem or err.context or "malformed"
        raise KinemaError(f"{path} is not valid YAML ({problem}{where}); fix the file there") from None
    except yaml.YAMLError as err:
        raise KinemaError(f"{path} is not valid YAML ({' '.join(str(err).split())})") from None


def _unique_keys_loader() -> Any:
    """yaml's SafeLoader, refusing a key given twice in one mapping (safe_load keeps the last one silently, so a
    second `seed:` line would quietly win)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged by SafeLoader, overridable
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    given_twice = key in seen
                except TypeError:  # a list or mapping as a key (`? [a, b]`)
                    raise yaml.constructor.ConstructorError(
                        None, None, "a key must be text or a number, not a list or mapping", key_node.start_mark
                    ) from None
                if given_twice:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice; give each key once", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader
