"""Reading and writing videos, animations, frame folders and stills, with the generation settings kept beside them.

Frames travel as a float tensor `(F, C, H, W)` in [-1, 1] (C = 3; the writers also take C = 1 and uint8 numpy
`(F, H, W, C)`). Readers always return RGB, C = 3: alpha is dropped and grey is expanded.

Formats, chosen by the path's extension (a path with no extension is a folder of PNG frames `00000.png`, ...):

| format | write | read | settings embedded in the file |
|---|---|---|---|
| .mp4  | H.264 (libx264) yuv420p, `crf` | PyAV | `comment` metadata (JSON) |
| .webm | VP9 (libvpx-vp9) yuv420p, `crf` | PyAV | `comment` metadata (JSON) |
| .gif  | Pillow, palettised (256 colours), frame time in 10 ms steps | Pillow | GIF comment (JSON) |
| .webp | Pillow, animated, lossy quality 90 | Pillow | XMP packet, `kinema:settings` (JSON) |
| .png  | one frame only | Pillow | `kinema` text chunk (JSON) |
| folder | one PNG per frame | Pillow | `kinema` text chunk in every frame |

.mov/.mkv/.avi and .jpg/.jpeg are read only.

Every write also leaves a sidecar `<output name>.json` beside the output (`clip.mp4` -> `clip.mp4.json`, frame
folder `frames/` -> `frames.json`) holding the settings, so two formats of the same clip never share one sidecar.
The settings inside a video file equal its sidecar's: that pair is how kinema knows a video file as its own
(kinema.fileio), so a user's video put in its place, or a sidecar edited by hand, is not replaced.
Writes are atomic: everything goes to a temporary name in the destination folder and is renamed into place at the
end, so a failed or interrupted write leaves the old file (or nothing) and no partial output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation
from PIL import Image, PngImagePlugin

from kinema import __version__
from kinema.data.probe import (
    FORMAT_ENCODERS,
    PIL_FORMATS,
    READ_SUFFIXES,
    SETTINGS_KEY,
    animation_frames,
    check_video_not_a_link,
    folder_frames,
    frame_ms,
    from_yuv,
    read_sidecar,
    rgb8,
    sidecar_path,
)
from kinema.errors import KinemaError
from kinema.fileio import atomic_file, atomic_folder, check_output
from kinema.pipelines.request import DEFAULT_FPS, check_fps

DEFAULT_CRF = 18
# swscale's default RGB -> yuv420p path subsamples chroma crudely; averaging it on the way in (and interpolating it on
# the way out, probe.from_yuv) gains 1.5-3 dB PSNR on clips with saturated colour edges.
_TO_YUV = Interpolation.AREA | Interpolation.FULL_CHR_H_INP | Interpolation.ACCURATE_RND
_FROM_YUV = from_yuv()


# ---------------------------------------------------------------- settings


def generation_settings(
    prompt: str,
    negative_prompt: str = "",
    seed: int | None = None,
    model: str | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    frames: int | None = None,
    fps: float | None = None,
    **extra: object,
) -> dict:
    """The settings a result was made with, as one JSON-ready dict stamped with the kinema version.

    `extra` holds anything else worth recording (LoRA scales, strength, ...); it must be JSON-serialisable.
    """
    settings = {
        "kinema": __version__, "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "model": model,
        "steps": steps, "scheduler": scheduler, "guidance": guidance, "width": width, "height": height,
        "frames": frames, "fps": fps, **extra,
    }
    for key, value in settings.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise KinemaError(f"generation setting {key!r} = {value!r} cannot be stored as JSON; "
                              "pass numbers, strings, lists or dicts") from None
    return settings


def _complete_settings(settings: dict | None, frames: np.ndarray, fps: float) -> dict:
    """The caller's settings, with the version and the written clip's size filled in where they are missing."""
    count, height, width = frames.shape[:3]
    base = {"kinema": __version__, "width": width, "height": height, "frames": count, "fps": fps}
    base.update({k: v for k, v in (settings or {}).items() if v is not None})
    return base


# ---------------------------------------------------------------- frame conversion


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """`(F, C, H, W)` float tensor in [-1, 1], or uint8 numpy `(F, H, W, C)`, -> uint8 numpy `(F, H, W, 3)`."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4:
            raise KinemaError(f"expected frames shaped (F, C, H, W), got a tensor of shape {tuple(frames.shape)}")
        if frames.shape[1] not in (1, 3):
            raise KinemaError(f"expected 1 or 3 channels in (F, C, H, W), got C = {frames.shape[1]} "
                              f"(shape {tuple(frames.shape)}); is the tensor (F, H, W, C) or a latent?")
        if not frames.is_floating_point():
            raise KinemaError(f"expected float frames in [-1, 1], got dtype {frames.dtype}")
        if not torch.isfinite(frames).all():
            raise KinemaError("frames contain NaN or infinity; the model output is broken, not the file")
        as_bytes = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        array = as_bytes.permute(0, 2, 3, 1).cpu().numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] not in (1, 3):
            raise KinemaError(f"expected a uint8 numpy array shaped (F, H, W, 3), got {frames.dtype} "
                              f"of shape {frames.shape}")
        array = frames
    else:
        raise KinemaError(f"expected a torch tensor (F, C, H, W) or numpy array (F, H, W, C), got {type(frames)}")
    if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise KinemaError(f"nothing to write: frames have shape {array.shape} (zero frames or zero size)")
    if array.shape[3] == 1:
        array = np.repeat(array, 3, axis=3)
    return np.ascontiguousarray(array)


def to_float_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 numpy `(F, H, W, 3)` -> float tensor `(F, 3, H, W)` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------- writers


def _fps_fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def _write_av(frames: np.ndarray, path: Path, fps: float, crf: int, comment: str, fmt: str, codec: str,
              options: dict[str, str]) -> None:
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise KinemaError(f"{fmt} (yuv420p) needs an even width and height, got {width}x{height}; "
                          "crop or resize by one pixel, or write .png frames / .gif instead")
    with av.open(str(path), mode="w", format=fmt) as container:
        container.metadata["comment"] = comment
        stream = container.add_stream(codec, rate=_fps_fraction(fps), options={"crf": str(crf), **options})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for array in frames:
            frame = av.VideoFrame.from_ndarray(array, format="rgb24").reformat(format="yuv420p",
                                                                                 interpolation=_TO_YUV)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _write_mp4(frames: np.ndarray, path: Path, fps: float, crf: int, comment: str) -> None:
    # x264's macroblock-tree lookahead encodes the same frames differently from one process to the next at some
    # sizes (64x64 and 96x96 measured; 80, 112, 128 not), so one seed's videos differed by up to 13/255 after decoding;
    # without it a seed gives one file's frames, at about 1.4 dB more PSNR for a larger file.
    _write_av(frames, path, fps, crf, comment, "mp4", FORMAT_ENCODERS[".mp4"], {"x264-params": "no-mbtree=1"})


def _write_webm(frames: np.ndarray, path: Path, fps: float, crf: int, comment: str) -> None:
    # VP9 needs b:v 0 for crf to mean constant quality rather than a bitrate cap.
    _write_av(frames, path, fps, crf, comment, "webm", FORMAT_ENCODERS[".webm"], {"b:v": "0"})


def _write_gif(frames: np.ndarray, path: Path, fps: float, crf: int, comment: str) -> None:
    images = [Image.fromarray(array) for array in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms(fps), loop=0,
                   comment=comment)


def _write_webp(frames: np.ndarray, path: Path, fps: float, crf: int, comment: str) -> None:
    images = [Image.fromarray(array) for array in frames]
    images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], duration=frame_ms(fps), loop=0,
                   quality=90, xmp=_xmp_packet(comment))


# WebP keeps no comment; its XMP packet holds the settings as one attribute of a namespace of kinema's own.
_XMP_NAMESPACE = "urn:kinema:settings:1"


def _xmp_packet(comment: str) -> bytes:
    value = xml_escape(comment, {'"': "&quot;"})
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:kinema="{_XMP_NAMESPACE}" kinema:settings="{value}"/>'
            '</rdf:RDF></x:xmpmeta>').encode()


def _png_info(comment: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(SETTINGS_KEY, comment)
    return info


def _write_png(frames: np.ndarray, path: Path, fps: float, crf: int, comment: str) -> None:
    if frames.shape[0] != 1:
        raise KinemaError(f"a .png file holds one frame, got {frames.shape[0]}; "
                          "give a folder path (no extension) to write one PNG per frame")
    Image.fromarray(frames[0]).save(path, format="PNG", pnginfo=_png_info(comment))


def _write_png_folder(frames: np.ndarray, path: Path, fps: float, crf: int, comment: str) -> None:
    info = _png_info(comment)
    for index, array in enumerate(frames):
        Image.fromarray(array).save(path / f"{index:05d}.png", format="PNG", pnginfo=info)


_Writer = Callable[[np.ndarray, Path, float, int, str], None]
# Key "" is a path without an extension: a folder of frames.
_WRITERS: dict[str, _Writer] = {
    ".mp4": _write_mp4, ".webm": _write_webm, ".gif": _write_gif, ".webp": _write_webp, ".png": _write_png,
    "": _write_png_folder,
}


def write_video(frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: float = DEFAULT_FPS,
                crf: int = DEFAULT_CRF, settings: dict | None = None, *, overwrite: bool = False) -> Path:
    """Write frames `(F, C, H, W)` in [-1, 1] (or uint8 `(F, H, W, C)`) to `path` in the format its extension names.

    `crf` is the constant rate factor of mp4 (H.264) and webm (VP9), lower is better, 18 is visually lossless;
    the other formats have none. `settings` (see `generation_settings`) go into the sidecar `<path>.json` and,
    where the format allows, into the file. `path` follows kinema's output policy (kinema.fileio): an existing
    output is replaced only with `overwrite` and only when kinema wrote it. Returns the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITERS:
        supported = ", ".join(s for s in _WRITERS if s) + ", or a folder path with no extension (PNG frames)"
        raise KinemaError(f"cannot write {path.name}: unsupported extension {suffix!r}; supported: {supported}")
    check_fps(fps)
    if not 0 <= crf <= 63:
        raise KinemaError(f"crf must be between 0 and 63 (lower is better quality), got {crf}")
    array = to_uint8_frames(frames)
    is_folder = suffix == ""
    side = sidecar_path(path)
    check_video_not_a_link(path)
    check_output(path, "video", folder=is_folder, overwrite=overwrite)
    check_output(side, "video_settings", folder=False, overwrite=overwrite)  # before encoding
    full = _complete_settings(settings, array, fps)
    comment = json.dumps(full)
    atomic = atomic_folder if is_folder else atomic_file
    with atomic(path, "video", overwrite=overwrite) as temp:
        _WRITERS[suffix](array, temp, fps, crf, comment)
        with atomic_file(side, "video_settings", overwrite=overwrite) as side_temp:
            side_temp.write_text(json.dumps(full, indent=2) + "\n")
    return path


# ---------------------------------------------------------------- readers


@dataclass
class VideoClip:
    """A decoded clip: `frames` `(F, 3, H, W)` float in [-1, 1], its frame rate, and where it came from."""

    frames: torch.Tensor
    fps: float
    path: Path
    start: int
    stride: int


def _indices(total: int, start: int, stride: int, max_frames: int | None) -> range:
    stop = total if max_frames is None else min(total, start + stride * max_frames)
    return range(start, stop, stride)


def _read_av(path: Path, start: int, stride: int, max_frames: int | None) -> tuple[np.ndarray, float, int]:
    wanted: list[np.ndarray] = []
    count = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise KinemaError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        for count, frame in enumerate(container.decode(stream), start=1):
            index = count - 1
            if index >= start and (index - start) % stride == 0:
                wanted.append(frame.to_ndarray(format="rgb24", interpolation=_FROM_YUV))
                if max_frames is not None and len(wanted) == max_frames:
                    break
    return np.stack(wanted) if wanted else np.zeros((0, 1, 1, 3), np.uint8), float(rate or DEFAULT_FPS), count


def _read_pillow(path: Path, start: int, stride: int, max_frames: int | None) -> tuple[np.ndarray, float, int]:
    with Image.open(path, formats=PIL_FORMATS) as image:
        shown, rate = animation_frames(image)
        total = len(shown)
        wanted = []
        for index in _indices(total, start, stride, max_frames):
            image.seek(shown[index])
            wanted.append(np.asarray(rgb8(image, upright=True)))
    fps = rate or _sidecar_fps(path)
    return np.stack(wanted) if wanted else np.zeros((0, 1, 1, 3), np.uint8), fps, total


def _read_folder(path: Path, start: int, stride: int, max_frames: int | None) -> tuple[np.ndarray, float, int]:
    files = folder_frames(path)
    wanted = []
    for index in _indices(len(files), start, stride, max_frames):
        with Image.open(files[index], formats=PIL_FORMATS) as image:
            wanted.append(np.asarray(rgb8(image, upright=True)))
    if len({w.shape for w in wanted}) > 1:
        raise KinemaError(f"frames in {path} differ in size; every frame of a clip must have the same size (as a "
                          "generation input, --resize (resize=True) fits each frame)")
    return np.stack(wanted) if wanted else np.zeros((0, 1, 1, 3), np.uint8), _sidecar_fps(path), len(files)


def _sidecar_fps(path: Path) -> float:
    settings = read_sidecar(path)
    fps = settings.get("fps") if settings else None
    return float(fps) if fps else DEFAULT_FPS


# A reader returns (frames uint8 (F, H, W, 3), fps, frames seen in the source).
_Reader = Callable[[Path, int, int, int | None], tuple[np.ndarray, float, int]]
_READERS: dict[str, _Reader] = {
    ".mp4": _read_av, ".webm": _read_av, ".mov": _read_av, ".mkv": _read_av, ".avi": _read_av,
    ".gif": _read_pillow, ".webp": _read_pillow, ".png": _read_pillow, ".jpg": _read_pillow, ".jpeg": _read_pillow,
}
if set(_READERS) != set(READ_SUFFIXES):  # the torch-free checks (kinema.data.probe) refuse what no reader takes
    raise AssertionError(f"kinema.data.probe.READ_SUFFIXES {READ_SUFFIXES} differ from the readers' {tuple(_READERS)}")
# The files Pillow reads (stills and animations), not PyAV.
PILLOW_SUFFIXES = tuple(suffix for suffix, reader in _READERS.items() if reader is _read_pillow)


@contextmanager
def read_errors_named(path: Path) -> Iterator[None]:
    """Reading `path` in the block, a decoder's error becomes one KinemaError line naming the file and the cause."""
    try:
        yield
    except (OSError, av.FFmpegError, Image.DecompressionBombError, EOFError, SyntaxError) as err:
        # Pillow reports some truncated files as SyntaxError; PyAV's errors subclass OSError or FFmpegError.
        raise KinemaError(f"cannot read {path}: it is corrupt, truncated or not a {path.suffix.lower() or 'frame'} "
                          f"file ({type(err).__name__}: {err})") from None


def read_video(path: str | os.PathLike, start: int = 0, stride: int = 1, max_frames: int | None = None) -> VideoClip:
    """Read frames `start, start + stride, ...` (at most `max_frames`) of a video, animation, image or frame folder.

    Returns a `VideoClip` whose `frames` are `(F, 3, H, W)` float in [-1, 1]. `fps` is the source's rate, not
    divided by `stride`; stills and frame folders report the fps in their sidecar, else `DEFAULT_FPS`.
    """
    path = Path(path)
    if start < 0 or stride < 1 or (max_frames is not None and max_frames < 1):
        raise KinemaError(f"need start >= 0, stride >= 1 and max_frames >= 1, got start={start}, stride={stride}, "
                          f"max_frames={max_frames}")
    if not path.exists():
        raise KinemaError(f"no such file or folder: {path}")
    suffix = path.suffix.lower()
    reader: _Reader
    if path.is_dir():
        reader = _read_folder
    elif suffix in _READERS:
        reader = _READERS[suffix]
    else:
        raise KinemaError(f"cannot read {path.name}: unsupported extension {suffix!r}; supported: "
                          f"{', '.join(_READERS)}, or a folder of frames")
    with read_errors_named(path):
        array, fps, total = reader(path, start, stride, max_frames)
    if array.shape[0] == 0:
        if total == 0:
            raise KinemaError(f"{path} holds no frames")
        raise KinemaError(f"start {start} is past the end of {path}, which has {total} frames")
    return VideoClip(frames=to_float_frames(array), fps=fps, path=path, start=start, stride=stride)
