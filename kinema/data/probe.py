"""What a video file or frame folder holds, read from its container without decoding and without torch, so the API,
batch checks and `kinema extend` can refuse a bad input before any model loads, and the training dataset can count
frames cheaply."""

from __future__ import annotations

import html
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError, shorten
from kinema.fileio import read_json

# Still images: the frames a frame folder may hold, and (by extension) a metadata entry without a type.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Every file kinema reads frames from (kinema.data.video_io's readers, which check they are these).
READ_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", *IMAGE_SUFFIXES)
# The formats kinema lets PIL open, whatever a file's name says: never EPS (PIL hands it to Ghostscript) nor the
# dozens of others PIL would try on a disguised upload.
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
STILL_IMAGE_KINDS = "PNG, JPEG, WebP or GIF"  # what an image option takes (a GIF: its first frame), for messages
_DIGIT_RUNS = re.compile(r"([0-9]+)")
# The FFmpeg encoders kinema.data.video_io writes these formats with (the others are written by Pillow), which a PyAV
# built against another FFmpeg may lack (PyPI's wheels bundle both).
FORMAT_ENCODERS = {".mp4": "libx264", ".webm": "libvpx-vp9"}


def missing_encoder(suffix: str) -> str | None:
    """The FFmpeg encoder that writing a `suffix` video (".mp4", ...) needs and this PyAV lacks; None when it has it
    or the format needs none."""
    import av

    encoder = FORMAT_ENCODERS.get(suffix.lower())
    return encoder if encoder is not None and encoder not in av.codecs_available else None


def folder_frames(path: str | os.PathLike) -> list[Path]:
    """The frame images of a folder in frame order: names compared with their numbers as numbers, so that
    `frame2.png` comes before `frame10.png` (ffmpeg's `%d.png` writes such names) as well as `0002.png` before
    `0010.png`."""
    def key(file: Path) -> list[Any]:
        return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in _DIGIT_RUNS.split(file.name)]

    # Regular files only: opening a FIFO named 0001.png would wait for a writer forever.
    return sorted((p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=key)


def frame_count(path: str | os.PathLike, what: str = "video") -> int:
    """Frames of the video, animation or frame folder `path`, from its container (or its packets) without decoding;
    one KinemaError line naming `what` when it is not one kinema reads."""
    path = Path(path)
    if path.is_dir():
        frames = len(folder_frames(path))
        if frames < 1:
            raise KinemaError(f"the {what} {path} is a folder without PNG, JPEG or WebP frames")
        return frames
    if not path.exists():
        raise KinemaError(f"the {what} {path} does not exist")
    check_read_suffix(path, what)
    return video_kind_and_frames(lambda: os.fspath(path), f"{what} {path}")[1]


def check_read_suffix(path: Path, what: str) -> None:
    """One KinemaError line for a file whose extension no reader of kinema's takes (a BMP, a TIFF), which PyAV would
    still open here, before the reader refused it after the model had loaded."""
    if path.is_file() and path.suffix.lower() not in READ_SUFFIXES:
        raise KinemaError(f"cannot read the {what} {path}: unsupported extension {path.suffix.lower()!r}; supported: "
                          f"{', '.join(READ_SUFFIXES)}, or a folder of frames")


def video_size(path: str | os.PathLike, what: str = "video") -> tuple[int, int]:
    """`(height, width)` of a video, animation or frame folder, from its first frame's header or the container."""
    from PIL import Image

    path = Path(path)
    check_read_suffix(path, what)
    frames = folder_frames(path) if path.is_dir() else [path]
    if not frames:
        raise KinemaError(f"the {what} {path} is a folder without PNG, JPEG or WebP frames")
    first = frames[0]
    try:
        if first.suffix.lower() in IMAGE_SUFFIXES + (".gif",):
            with Image.open(first, formats=PIL_FORMATS) as image:
                width, height = oriented_size(image)
                return height, width
        import av

        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            return stream.codec_context.height, stream.codec_context.width
    except (OSError, IndexError, ValueError) as err:
        raise KinemaError(f"cannot read the {what} {path}: {shorten(str(err), 120)}") from None


def video_fps(path: str | os.PathLike) -> float | None:
    """The frames per second a video plays at: the fps kinema stored with it (a frames folder's too), unless its
    container says another (a GIF's or WebP's first frame delay, a video stream's average rate; more than 5 % off:
    re-encoded since); None for a folder or still image without stored settings, or a rate outside what kinema
    writes (MIN_FPS .. MAX_FPS), so the caller keeps its default."""
    from PIL import Image

    from kinema.pipelines.request import MAX_FPS, MIN_FPS

    path = Path(path)
    try:
        stored = stored_settings(path).get("fps") if path.exists() else None
    except KinemaError:  # an unreadable file: its reader says so in its own words
        stored = None
    stored = stored if isinstance(stored, int | float) and not isinstance(stored, bool) else None
    rate: Any = None
    if path.is_file():
        try:
            if path.suffix.lower() in (".gif", ".webp"):
                with Image.open(path, formats=PIL_FORMATS) as image:
                    rate = animation_frames(image)[1]
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                import av

                with av.open(os.fspath(path)) as container:
                    stream = container.streams.video[0]
                    average = stream.average_rate or stream.guessed_rate
                    rate = float(average) if average else None
        except (OSError, IndexError, ValueError, ZeroDivisionError):
            rate = None  # unreadable: the readers say so in their own words
    # The stored rate is exact, and a GIF's rounds to hundredths of a second; but a video re-encoded at another
    # rate keeps the old settings in its metadata (ffmpeg copies them), so the container wins past 5 %.
    if stored is not None and (rate is None or abs(rate - stored) <= 0.05 * stored):
        rate = stored
    return round(float(rate), 6) if rate is not None and MIN_FPS <= rate <= MAX_FPS else None


def frame_ms(fps: float) -> int:
    """The whole milliseconds kinema shows each frame of a GIF or WebP for (their delays are whole ms; a GIF stores
    tens of them)."""
    return max(1, round(1000 / fps))


def animation_frames(image: Any) -> tuple[list[int], float | None]:
    """The stored frame each frame of the opened GIF or WebP animation `image` shows, and its frame rate. PIL's GIF
    writer and libwebp merge a run of identical frames into one frame shown that much longer, so in a clip kinema
    wrote (its settings, stored inside, say its `frames` and `fps`) each stored frame stands for its delay over the
    frame time kinema wrote (`frame_ms`) frames, which gives its frame count back exactly, at its fps; any other
    animation is one frame per stored frame, at its first frame's delay (None without one)."""
    count = int(getattr(image, "n_frames", 1))
    image.load()  # a WebP frame's delay is known once it is decoded
    delay = image.info.get("duration")
    rate = 1000 / delay if count > 1 and delay else None
    settings = image_settings(image) or {}
    fps, frames = settings.get("fps"), settings.get("frames")
    if not (isinstance(frames, int) and frames >= count and isinstance(fps, int | float) and 0 < fps < math.inf):
        return list(range(count)), rate
    if frames == count:  # nothing merged: its frame rate is the one kinema stored (a GIF's delay is rounded)
        return list(range(count)), float(fps)
    # A GIF keeps a delay in whole tens of ms, cut down: the run's real length lies up to 10 ms above it.
    cut = 5 if image.format == "GIF" else 0
    repeats = []
    for index in range(count):  # decodes the frames (GIF seeks are sequential): only for a merged clip of kinema's
        image.seek(index)
        image.load()
        repeats.append(max(1, round(((image.info.get("duration") or 0) + cut) / frame_ms(fps))))
    image.seek(0)
    if sum(repeats) != frames:
        return list(range(count)), rate
    return [index for index, times in enumerate(repeats) for _ in range(times)], float(fps)


_EXIF_ORIENTATION = 0x0112  # 1: as stored; 5 to 8 turn the picture a quarter turn


def _orientation(image: Any) -> int:
    """The EXIF orientation of a PIL image (1: as stored); 1 too when its EXIF block is broken, which PIL decodes
    past but `getexif` raises on."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (SyntaxError, ValueError, TypeError, OSError, struct.error):
        return 1


def oriented_size(image: Any) -> tuple[int, int]:
    """`(width, height)` of an image file kinema opened, as it is shown: a phone photo stored sideways with an EXIF
    orientation of 5 to 8 is shown (and read by `rgb8(image, upright=True)`) a quarter turn round."""
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def rgb8(image: Any, upright: bool = False) -> Any:
    """A PIL image as 8-bit RGB: a 16-bit grayscale PNG (depth maps are saved so) scaled to 0-255, where PIL's own
    convert("RGB") clips every value past 255 to white. `upright` (for files kinema opens) applies the EXIF
    orientation, as browsers and gradio show a phone photo; a PIL image handed in is taken as it is, as PIL and
    diffusers take one (diffusers' load_image turns it when it opens the file)."""
    if upright and _orientation(image) != 1:
        from PIL import ImageOps

        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        top = 65535 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 255
        image = image.convert("I").point(lambda value: value * (255 / top) + 0.5).convert("L")  # rounded
    return image.convert("RGB")


def rgb_frames(path: str | os.PathLike) -> Iterator[Any]:
    """The frames of a video, animation, still image or frame folder as uint8 `(H, W, 3)` arrays, decoded one at a
    time (no torch), as kinema.data.video_io's readers decode them."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        for file in folder_frames(path):
            with Image.open(file, formats=PIL_FORMATS) as image:
                yield np.asarray(rgb8(image, upright=True))
    elif path.suffix.lower() in IMAGE_SUFFIXES + (".gif",):
        with Image.open(path, formats=PIL_FORMATS) as image:
            shown = animation_frames(image)[0]
            for position, index in enumerate(shown):
                if position == 0 or index != shown[position - 1]:
                    image.seek(index)
                    frame = np.asarray(rgb8(image, upright=True))
                yield frame
    else:
        import av

        with av.open(os.fspath(path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24", interpolation=from_yuv())


def from_yuv() -> Any:
    """How kinema converts decoded YUV frames to RGB: swscale's default subsamples chroma crudely; interpolating it
    gains 1.5-3 dB PSNR on clips with saturated colour edges."""
    from av.video.reformatter import Interpolation

    return Interpolation.BICUBIC | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND


def is_blank_mask(path: str | os.PathLike) -> bool:
    """Whether the mask at `path` (an image, a video or a frame folder) marks no pixel to remake: in no frame a pixel
    whose channels average over half bright, as generate() reads a mask. Stops at the first marked pixel; False for
    what cannot be read (said by the reader, with its own words)."""
    import av
    import numpy as np
    from PIL import Image

    read = False
    try:
        for frame in rgb_frames(path):
            read = True
            if (frame.sum(axis=2, dtype=np.uint16) > 3 * 127.5).any():
                return False
    except (OSError, ValueError, EOFError, av.FFmpegError, Image.DecompressionBombError):
        return False
    return read


def video_kind_and_frames(opener: Any, what: str) -> tuple[str, int]:
    """`(suffix, frames)` of the video opened by `opener()` (a path or a file object): the suffix kinema reads it by,
    from its content rather than its name, and its frame count from the container or its non-empty packets."""
    from PIL import Image, UnidentifiedImageError

    still = None
    try:  # GIF and WebP animations, and PNG and JPEG stills, are read by PIL, as kinema's reader does
        with Image.open(opener(), formats=PIL_FORMATS) as image:
            if image.format in ("GIF", "WEBP"):
                return f".{image.format.lower()}", len(animation_frames(image)[0])
            if image.format in ("PNG", "JPEG"):  # one image for every frame (a mask, a control image)
                still = ".png" if image.format == "PNG" else ".jpg"
                image.load()
                return still, 1
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        if still is not None:
            raise KinemaError(f"the {what} is a corrupt or truncated {still[1:].upper()} image ({type(err).__name__}: "
                              f"{shorten(str(err), 80)}); give a whole image or a video") from None
    import av

    frames, names = 0, set()
    try:
        with av.open(opener()) as container:
            names = set(container.format.name.split(","))
            if container.streams.video:
                stream = container.streams.video[0]
                frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except (OSError, av.FFmpegError, ValueError) as err:
        raise unreadable_video(what, err) from None
    if "image2" in names:  # PyAV's demuxer chosen by an image's name: PIL could not open what the name promised
        raise KinemaError(f"the {what} is not a {STILL_IMAGE_KINDS} image kinema can read (damaged, or another "
                          "format under that name); give a whole image, or a video")
    pipes = sorted(name for name in names if name.endswith("_pipe"))
    if pipes:  # an image PIL was not let open above (a BMP, a TIFF): no reader of kinema's takes it
        raise KinemaError(f"the {what} is a still image of a kind kinema does not read ({pipes[0]}); give a "
                          f"{STILL_IMAGE_KINDS} image, or a video")
    if frames < 1:
        raise KinemaError(f"the {what} has no video frames (sound only?); give an MP4, WebM, MKV, MOV, GIF or WebP "
                          "video")
    suffix = ".webm" if names & {"webm", "matroska"} else ".avi" if "avi" in names else ".mp4"
    return suffix, frames


# ---------------------------------------------------------------- settings stored with a video

SETTINGS_KEY = "kinema"  # PNG text-chunk key
_XMP_SETTINGS = re.compile(rb'kinema:settings="([^"]*)"')


def check_video_not_a_link(path: str | os.PathLike) -> None:
    """One KinemaError line when the video output `path` is a symbolic link: a video's settings and latents go
    beside its name, where the file it points to would go without them (and its own would go on describing the
    video it had before)."""
    path = Path(path)
    if path.is_symlink():
        raise KinemaError(f"{path} is a symbolic link to {os.readlink(path)}; a video's settings and latents go beside "
                          f"the name it is written to: give the path it points to ({os.path.realpath(path)}), or "
                          "another one")


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the settings of `path` are stored: the full name plus `.json` (`clip.mp4` -> `clip.mp4.json`)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | os.PathLike) -> dict | None:
    """The settings in the sidecar of `path`, or None when there is none."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        settings = read_json(side, what=f"the settings of {Path(path).name}")
    except KinemaError as err:
        raise KinemaError(f"{err}; delete or fix it") from None
    if not isinstance(settings, dict):
        raise KinemaError(f"{side} (the settings of {Path(path).name}) is JSON but not an object of settings "
                          "({...}); delete or fix it")
    return settings


def stored_settings(path: str | os.PathLike) -> dict:
    """The settings kinema stored with the video at `path`, in its sidecar or else inside the file (a frames
    folder: inside its first frame, as kinema writes every frame's PNG with them); {} for none."""
    side = read_sidecar(path)
    if side and _describes(side, path):
        return side
    embedded = None
    if os.path.isfile(path):
        embedded = read_embedded_settings(path)
    elif os.path.isdir(path):
        frames = folder_frames(path)
        embedded = read_embedded_settings(frames[0]) if frames else None
    return embedded or {}


def _describes(settings: dict, path: str | os.PathLike) -> bool:
    """Whether sidecar `settings` can be those of the video at `path`: its frame count and size, where they record
    them; else it is warned about (another video's, left beside a file since replaced) and not used."""
    import logging

    recorded = tuple(settings.get(key) for key in ("frames", "width", "height"))
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in recorded):
        return True
    try:
        height, width = video_size(path)
        # A GIF or WebP may hold runs of equal frames as one (Pillow merges them), so its count is no evidence.
        merges = Path(path).suffix.lower() in (".gif", ".webp")
        actual = (recorded[0] if merges else frame_count(path), width, height)
        changed = os.stat(path).st_mtime_ns
    except (KinemaError, OSError):
        return True  # the caller names what is wrong with the video itself
    if actual == recorded:
        return True
    import time

    said, now = (os.path.abspath(path), changed), time.monotonic()
    # The reads of one input by one command (its fps, its prompt) say it once; a server's later job again.
    if now - _STALE_SAID.get(said, -60.0) > 30:
        _STALE_SAID[said] = now
        logging.getLogger(__name__).warning(
            "the settings beside %s describe another video (%d frames at %dx%d; it has %d at %dx%d), left from a file "
            "since replaced: they are not used", path, *recorded, *actual)
    return False


_STALE_SAID: dict[tuple[str, int], float] = {}


def unreadable_video(what: str, err: BaseException) -> KinemaError:
    """The one refusal of a video file PyAV cannot open (`what`: "video PATH", ...)."""
    return KinemaError(f"the {what} is corrupt, truncated or not a video kinema can read ({type(err).__name__}: "
                       f"{shorten(str(err), 80)}); give an MP4, WebM, MKV, MOV, GIF or WebP video")


def read_embedded_settings(path: str | os.PathLike) -> dict | None:
    """The settings stored inside the file itself (mp4/webm comment, GIF comment, PNG text), or None: also when the
    comment is not a JSON object, since other tools write comments of their own there."""
    import av
    from PIL import Image

    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".mp4", ".webm", ".mov", ".mkv"):
            with av.open(str(path)) as container:
                # Matroska/WebM upper-cases tag names on write.
                tags = {key.lower(): value for key, value in container.metadata.items()}
                text = tags.get("comment")
        elif suffix in (".png", ".gif", ".webp"):
            with Image.open(path, formats=PIL_FORMATS) as image:
                return image_settings(image)
        else:
            return None
    except (OSError, av.FFmpegError) as err:
        if suffix in (".png", ".gif", ".webp"):
            raise KinemaError(f"cannot read {path}: {shorten(str(err))}") from None
        raise unreadable_video(f"video {path}", err) from None
    return _settings_object(text)


def image_settings(image: Any) -> dict | None:
    """The settings kinema stored inside the opened PIL image `image` (a PNG's text chunk, a GIF's comment, a WebP's
    XMP packet), or None."""
    if image.format == "WEBP":
        text = _xmp_settings(image.info.get("xmp") or b"")
    else:
        text = image.info.get(SETTINGS_KEY) if image.format == "PNG" else image.info.get("comment")
    return _settings_object(text)


def _settings_object(text: Any) -> dict | None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        settings = json.loads(text) if text else None
    except ValueError:
        return None
    return settings if isinstance(settings, dict) else None


def _xmp_settings(packet: bytes) -> str | None:
    found = _XMP_SETTINGS.search(packet)
    return html.unescape(found[1].decode("utf-8", "replace")) if found else None
