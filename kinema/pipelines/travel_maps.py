"""animatediff-cli-prompt-travel's `controlnet_map`, `ip_adapter_map` and `img2img_map`, read into kinema job data.

controlnet_map (prompt travel's config/prompts/prompt_travel.json):

    "controlnet_map": {"input_image_dir": "controlnet_image/test", "is_loop": true,
                       "controlnet_openpose": {"enable": true, "use_preprocessor": false,
                                               "controlnet_conditioning_scale": 1.0, "control_guidance_start": 0.0,
                                               "control_guidance_end": 1.0,
                                               "control_scale_list": [0.5, 0.4, 0.3, 0.2, 0.1]}, ...}

Each enabled ControlNet whose folder `input_image_dir/<name>/` holds images named by frame number (`0000.png`,
`16.png`) steers those keyframes, and the frames beside them at control_scale_list's weights (kinema's
control_indices, control_falloff and control_loop). As there, a folder without images leaves its ControlNet out.
The folder is looked for under `data/` of the current folder (prompt travel's place), then the current folder, then
the config's. The networks are prompt travel's (lllyasviel/control_v11p_sd15_openpose, ...), found in the local
Hugging Face cache, or a `"path"` kinema reads in the entry. kinema makes Canny maps itself; for the other
preprocessors give maps already made (`"use_preprocessor": false`).

ip_adapter_map: `{"enable": true, "input_image_dir": "ip_adapter_image/test", "scale": 0.5, "is_plus": true, ...}`:
the images in that folder, named by frame number, are the image prompt (several: it travels) of h94/IP-Adapter's
file the flags name, from the cache, prompt travel's `data/models/ip_adapter/models/`, or `"path"` (and
`"image_encoder"`).

img2img_map: `{"enable": true, "init_img_dir": "init_img/test", "denoising_strength": 0.7}`: the folder's frames,
named by number, remade as video-to-video at that strength; every frame needs one.

Where kinema differs from prompt travel: it steers every ControlNet with one start, end, guess mode and falloff, at
the same keyframes (a config whose ControlNets differ there is one line, before anything loads); the ControlNet
runs on a keyframe's neighbour's own latents with the keyframe's image (prompt travel adds the keyframe's residuals
to the neighbour); an image prompt travels with the text's prompt_fixed_ratio (the map's own must agree).
control_region_list and controlnet_ref are left out with a warning, as region_map is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError, shorten
from kinema.sampling.prompt_travel import frame_number

logger = logging.getLogger(__name__)

# prompt travel's controlnet_address_table: name -> (Hugging Face repository, subfolder)
CONTROLNET_REPOS: dict[str, tuple[str, str]] = {
    **{f"controlnet_{name}": (f"lllyasviel/control_v11p_sd15_{name}", "") for name in (
        "canny", "openpose", "softedge", "inpaint", "lineart", "mlsd", "normalbae", "scribble", "seg")},
    "controlnet_tile": ("lllyasviel/control_v11f1e_sd15_tile", ""),
    "controlnet_lineart_anime": ("lllyasviel/control_v11p_sd15s2_lineart_anime", ""),
    "controlnet_ip2p": ("lllyasviel/control_v11e_sd15_ip2p", ""),
    "controlnet_shuffle": ("lllyasviel/control_v11e_sd15_shuffle", ""),
    "controlnet_depth": ("lllyasviel/control_v11f1p_sd15_depth", ""),
    "qr_code_monster_v1": ("monster-labs/control_v1p_sd15_qrcode_monster", ""),
    "qr_code_monster_v2": ("monster-labs/control_v1p_sd15_qrcode_monster", "v2"),
    "controlnet_mediapipe_face": ("CrucibleAI/ControlNetMediaPipeFace", "diffusion_sd15"),
}
# ... and the one it keeps as a file of its own data folder.
LOCAL_CONTROLNETS = {"animatediff_controlnet": "data/models/controlnet/animatediff_controlnet/"
                                               "controlnet_checkpoint.ckpt"}
# prompt travel's default_preprocessor_table, where it is not "none"; kinema makes Canny maps only.
DEFAULT_PREPROCESSORS = {"controlnet_canny": "canny", "controlnet_openpose": "dwpose",
                         "controlnet_depth": "depth_midas", "qr_code_monster_v1": "depth_midas",
                         "qr_code_monster_v2": "depth_midas",
                         "controlnet_softedge": "softedge_hedsafe", "controlnet_lineart": "lineart_realistic",
                         "controlnet_lineart_anime": "lineart_anime", "controlnet_mlsd": "mlsd",
                         "controlnet_normalbae": "normal_bae", "controlnet_scribble": "scribble_hed",
                         "controlnet_seg": "upernet_seg", "controlnet_shuffle": "shuffle",
                         "controlnet_mediapipe_face": "mediapipe_face"}
# Top-level keys of controlnet_map that tune prompt travel's memory and files, not the video.
CONTROLNET_MAP_SETTINGS = ("input_image_dir", "is_loop", "max_samples_on_vram", "max_models_on_vram",
                           "save_detectmap", "preprocess_on_gpu", "no_shrink_list")
CONTROLNET_KEYS = ("enable", "use_preprocessor", "preprocessor", "guess_mode", "controlnet_conditioning_scale",
                   "control_guidance_start", "control_guidance_end", "control_scale_list", "control_region_list",
                   "path")
IP_ADAPTER_KEYS = ("enable", "input_image_dir", "prompt_fixed_ratio", "save_input_image", "resized_to_square",
                   "scale", "is_plus_face", "is_plus", "is_light", "is_full_face", "path", "image_encoder")
IMG2IMG_KEYS = ("enable", "init_img_dir", "save_init_image", "denoising_strength")
IP_ADAPTER_REPO = "h94/IP-Adapter"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DIGITS = "0123456789"


def cached_hub_folder(repo: str, subfolder: str = "") -> str | None:
    """The local Hugging Face cache's folder of `repo` (its `subfolder`), where a config.json was downloaded; None
    when it is not there. Reads the cache only: nothing is fetched."""
    found = _cached_hub_file(repo, f"{subfolder}/config.json" if subfolder else "config.json")
    return None if found is None else str(Path(found).parent)


def _cached_hub_file(repo: str, filename: str) -> str | None:
    """The local Hugging Face cache's copy of `repo`'s `filename`; None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) else None


def _folder(given: Any, key: str, config_folder: Path, example: str, folder_key: str = "input_image_dir") -> Path:
    """prompt travel's image folder `given` (a map's `folder_key`), found under ./data (its own rule), ., or the
    config's folder; one KinemaError line when it is in none of them."""
    if not isinstance(given, str) or not given:
        raise KinemaError(f"{key}.{folder_key} is the folder of the images (e.g. \"{example}\"), got {given!r}")
    bases = (Path.cwd() / "data", Path.cwd(), config_folder)
    for base in bases:
        if (base / given).is_dir():
            return (base / given).resolve()
    raise KinemaError(f"{key}.{folder_key} {given!r} is no folder under {', '.join(str(b) for b in bases)}; fix "
                      f"the name, or drop {key} to make the video without it")


def _flag(entry: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    """A true/false setting; text such as "false" is refused (prompt travel compares with True)."""
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise KinemaError(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _number(entry: Mapping[str, Any], key: str, default: float, where: str, low: float = 0.0,
            high: float = math.inf) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        span = f"from {low:g} to {high:g}" if math.isfinite(high) else f"of at least {low:g}"
        raise KinemaError(f"{where}.{key} must be a number {span}, got {value!r}")
    return float(value)


def numbered_images(folder: Path, suffixes: tuple[str, ...] = (".png",)) -> dict[int, Path]:
    """The images of `folder` named by frame number (`0016.png`: frame 16), as prompt travel globs them
    (`[0-9]*.png`); a name that starts with a digit and is not a number is one KinemaError line, and other files
    are named in one warning."""
    found: dict[int, Path] = {}
    skipped = []
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and path.suffix.lower() in suffixes and path.name[:1] in _DIGITS):
            if path.is_file():
                skipped.append(path.name)
            continue
        # The name starts with a digit, so no sign; and a file name is its number alone ("0016 .png" is not).
        frame = frame_number(path.stem) if path.stem == path.stem.strip() else None
        if frame is None:
            raise KinemaError(f"{path}: images here are named by their frame number (0016.png for frame 16); "
                              "rename it")
        if frame in found:
            raise KinemaError(f"{path} and {found[frame]} are both frame {frame}; keep one")
        found[frame] = path
    if skipped:
        logger.warning("%s: %s left out (images here are %s files named by frame number, 0016.png)", folder,
                       shorten(", ".join(skipped), 200), " or ".join(suffixes))
    return dict(sorted(found.items()))


def _within(images: dict[int, Path], frames: int | None, folder: Path) -> dict[int, Path]:
    """The images of frames the video has (all of them when `frames` is None); those past it named in a warning."""
    if frames is None:
        return images
    past = [frame for frame in images if frame >= frames]
    if past:
        logger.warning("%s: the images of frames %s are left out: the video has %d frames (L)", folder,
                       shorten(str(past), 120), frames)
    return {frame: path for frame, path in images.items() if frame < frames}


def _preprocessor(name: str, entry: Mapping[str, Any], where: str) -> str | None:
    """kinema's control_preprocess for the entry (None: its images are the maps)."""
    if not _flag(entry, "use_preprocessor", True, where):
        return None
    given = entry.get("preprocessor")
    if given is not None and not isinstance(given, Mapping):
        raise KinemaError(f"{where}.preprocessor is {{\"type\": ..., \"param\": {{...}}}}, as prompt travel writes it "
                          f"(e.g. {{\"type\": \"canny\"}}), got {given!r}")
    kind, params = (given.get("type"), given.get("param") or {}) if given else (
        DEFAULT_PREPROCESSORS.get(name, "none"), {})
    if kind == "none":
        return None
    if not isinstance(params, Mapping):
        raise KinemaError(f"{where}.preprocessor.param is a mapping of the preprocessor's settings, got {params!r}")
    if kind == "canny":
        low, high = params.get("low_threshold", 100), params.get("high_threshold", 200)
        return f"canny:{low}:{high}" if (low, high) != (100, 200) else "canny"
    if kind in ("tile_resample", "blur"):  # the value checked as kinema's own names are (kinema.pipelines.control_maps)
        setting = "down_sampling_rate" if kind == "tile_resample" else "sigma"
        unknown = [name for name in params if name != setting]
        if unknown:
            raise KinemaError(f"{where}.preprocessor.param has {unknown[0]!r}, which {kind} does not take; it takes "
                              f"{setting}")
        value = params.get(setting)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise KinemaError(f"{where}.preprocessor.param.{setting} is a number, got {value!r}")
        return f"{kind}:{value}" if value is not None else kind
    raise KinemaError(f"{where} makes its maps with the {kind} preprocessor, which kinema does not make (it makes "
                      "canny, tile_resample and blur maps): put maps already made in its image folder and set "
                      "\"use_preprocessor\": false")


def _controlnet_path(name: str, entry: Mapping[str, Any], where: str) -> str:
    if isinstance(entry.get("path"), str):
        return str(entry["path"])
    if name in LOCAL_CONTROLNETS:
        local = Path.cwd() / LOCAL_CONTROLNETS[name]
        if local.is_file():
            return str(local)
        raise KinemaError(f"{where}: no {LOCAL_CONTROLNETS[name]} here; add \"path\": \"/path/to/"
                          f"{Path(LOCAL_CONTROLNETS[name]).name}\" to it")
    if name not in CONTROLNET_REPOS:
        raise KinemaError(f"{where}: unknown ControlNet {name!r} (prompt travel's names: "
                          f"{', '.join([*CONTROLNET_REPOS, *LOCAL_CONTROLNETS])}); add \"path\": \"/path/to/"
                          "controlnet\" to use another")
    repo, subfolder = CONTROLNET_REPOS[name]
    folder = cached_hub_folder(repo, subfolder)
    if folder is None:
        wanted = f"{repo} (subfolder {subfolder})" if subfolder else repo
        raise KinemaError(f"{where} is {wanted}, which is not in the local Hugging Face cache and cannot be fetched "
                          f"here: add \"path\": \"/path/to/{repo.split('/')[-1]}\" to it (a diffusers folder or a "
                          "single file)")
    return folder


def _one_setting(values: Mapping[str, Any], key: str) -> Any:
    """The value every enabled ControlNet gives `key` (kinema steers them all with one), or one KinemaError line."""
    first = next(iter(values.values()))
    if any(value != first for value in values.values()):
        raise KinemaError(f"controlnet_map: kinema steers every ControlNet with one {key}, and these differ: "
                          f"{', '.join(f'{name} {value!r}' for name, value in values.items())}; give them the same")
    return first


def _falloff(entry: Mapping[str, Any], where: str) -> list[float]:
    value = entry.get("control_scale_list", [])
    if not isinstance(value, list) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and 0 <= w <= 1 for w in value):
        raise KinemaError(f"{where}.control_scale_list is a list of weights from 0 to 1 for the frames 1, 2, ... from "
                          f"each keyframe (e.g. [0.5, 0.4, 0.3, 0.2, 0.1]; [] for keyframes only), got "
                          f"{shorten(repr(value), 80)}")
    return [float(w) for w in value]


def controlnet_job_data(given: Any, frames: int | None, config_folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(job data, map as run)`: the job data (controlnet, control_video, control_indices, control_falloff, ...) of a
    prompt-travel `controlnet_map` for a video of `frames` frames (None: unknown, every image kept), {} when no
    enabled ControlNet has images, as prompt travel then loads none; and the map with its image folder absolute, so
    that a config written out runs again from anywhere."""
    if not isinstance(given, Mapping):
        raise KinemaError(f"controlnet_map is a mapping of settings and ControlNets, got {type(given).__name__}")
    entries = {name: entry for name, entry in given.items() if name not in CONTROLNET_MAP_SETTINGS}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise KinemaError(f"controlnet_map.{name} is a mapping of settings ({{\"enable\": true, ...}}) or one of "
                              f"{', '.join(CONTROLNET_MAP_SETTINGS)}, got {type(entry).__name__}")
        unknown = [key for key in entry if key not in CONTROLNET_KEYS and name != "controlnet_ref"]
        if unknown:
            raise KinemaError(f"controlnet_map.{name}: unknown key {unknown[0]!r}; known keys: "
                              f"{', '.join(CONTROLNET_KEYS)}")
    enabled = {name: entry for name, entry in entries.items()
               if _flag(entry, "enable", False, f"controlnet_map.{name}")}
    if enabled.pop("controlnet_ref", None) is not None:
        logger.warning("controlnet_map.controlnet_ref (reference-only) is not a ControlNet kinema runs; it is left out")
    if not enabled:  # its image folder is not looked at, as prompt travel looks at it for enabled ones only
        logger.warning("controlnet_map enables no ControlNet (\"enable\": true), so none steers")
        return {}, dict(given)
    folder = _folder(given.get("input_image_dir"), "controlnet_map", config_folder, "controlnet_image/test")
    used = {**given, "input_image_dir": str(folder)}
    keyframes: dict[str, dict[int, Path]] = {}
    for name in enabled:
        if (folder / name).is_dir():
            images = _within(numbered_images(folder / name), frames, folder / name)
            if images:
                keyframes[name] = images
    if not keyframes:
        below = f" for frames below {frames}" if frames is not None else ""
        logger.warning("controlnet_map: no images%s in %s for %s, so no ControlNet steers (as in prompt travel)",
                       below, ", ".join(str(folder / name) for name in enabled), ", ".join(enabled))
        return {}, used
    nets = {name: enabled[name] for name in keyframes}
    places = {name: list(images) for name, images in keyframes.items()}
    if len({tuple(frame_numbers) for frame_numbers in places.values()}) > 1:
        raise KinemaError("controlnet_map: kinema steers every ControlNet at the same keyframes, and these have "
                          f"images for other frames: {'; '.join(f'{name} {p}' for name, p in places.items())}; give "
                          "each the same frame numbers")
    if any(entry.get("control_region_list") for entry in nets.values()):
        logger.warning("controlnet_map: control_region_list is left out (kinema does not read region_map)")

    def each(read: Any) -> dict[str, Any]:
        return {name: read(entry, f"controlnet_map.{name}") for name, entry in nets.items()}

    start = _one_setting(each(lambda e, w: _number(e, "control_guidance_start", 0.0, w, 0, 1)),
                         "control_guidance_start")
    end = _one_setting(each(lambda e, w: _number(e, "control_guidance_end", 1.0, w, 0, 1)), "control_guidance_end")
    falloff = _one_setting(each(_falloff), "control_scale_list")
    data: dict[str, Any] = {
        "controlnet": [], "control_video": [], "control_indices": next(iter(places.values())),
        "control_start": start, "control_end": end,
        "guess_mode": _one_setting(each(lambda e, w: _flag(e, "guess_mode", False, w)), "guess_mode"),
        "resize": True}
    preprocessors = []
    for name, entry in nets.items():
        where = f"controlnet_map.{name}"
        data["controlnet"].append({"path": _controlnet_path(name, entry, where),
                                   "scale": _number(entry, "controlnet_conditioning_scale", 1.0, where)})
        data["control_video"].append([str(path) for path in keyframes[name].values()])
        preprocessors.append(_preprocessor(name, entry, where) or "none")
    loop = _flag(given, "is_loop", True, "controlnet_map")
    if falloff:
        data["control_falloff"], data["control_loop"] = falloff, loop
    if any(p != "none" for p in preprocessors):
        data["control_preprocess"] = preprocessors
    if len(nets) == 1:  # one ControlNet: its path, images and preprocessor as themselves, not lists of one
        data["controlnet"], data["control_video"] = data["controlnet"][0], data["control_video"][0]
        if "control_preprocess" in data:
            data["control_preprocess"] = preprocessors[0]
    logger.info("controlnet_map: %s at frames %s", ", ".join(nets), data["control_indices"])
    return data, used


def _image_map(given: Any, name: str, keys: tuple[str, ...], folder_key: str, example: str, frames: int | None,
               config_folder: Path, without: str, suffixes: tuple[str, ...] = (".png",)
               ) -> tuple[dict[str, Any], Path, dict[int, Path]]:
    """A map of prompt travel's that reads one folder of numbered images (ip_adapter_map, img2img_map), checked:
    `(the map as run, its folder absolute there, the images of the video's frames)`; no images when it is not
    enabled, or (with a warning that the video is made `without` them) when its folder holds none."""
    if not isinstance(given, Mapping):
        raise KinemaError(f"{name} is a mapping of settings, got {type(given).__name__}")
    unknown = [key for key in given if key not in keys]
    if unknown:
        raise KinemaError(f"{name}: unknown key {unknown[0]!r}; known keys: {', '.join(keys)}")
    if not _flag(given, "enable", False, name):
        return dict(given), config_folder, {}
    folder = _folder(given.get(folder_key), name, config_folder, example, folder_key)
    images = _within(numbered_images(folder, suffixes), frames, folder)
    if not images:
        logger.warning("%s: no images named by frame number in %s, so %s (as in prompt travel)", name, folder, without)
    return {**given, folder_key: str(folder)}, folder, images


def ip_adapter_file(given: Mapping[str, Any]) -> str:
    """h94/IP-Adapter's SD1.5 file that prompt travel picks for the flags of `given`."""
    flag = {key: _flag(given, key, False, "ip_adapter_map") for key in (
        "is_full_face", "is_light", "is_plus_face", "is_plus")}
    if flag["is_full_face"]:
        return "ip-adapter-full-face_sd15.bin"
    if flag["is_light"]:
        return "ip-adapter_sd15_light.bin"
    if flag["is_plus_face"]:
        return "ip-adapter-plus-face_sd15.bin"
    return "ip-adapter-plus_sd15.bin" if flag["is_plus"] else "ip-adapter_sd15.bin"


def ip_adapter_job_data(given: Any, frames: int | None, config_folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(job data, map as run)`: the job data (ip_adapter, image_encoder, ip_image) of a prompt-travel
    `ip_adapter_map` for a video of `frames` frames (None: unknown), {} when it is off or its folder has no image, as
    prompt travel then prompts with none (images for several frames make an image prompt schedule, {frame: image});
    and the map with its image folder absolute."""
    used, _, images = _image_map(given, "ip_adapter_map", IP_ADAPTER_KEYS, "input_image_dir", "ip_adapter_image/test",
                                 frames, config_folder, "no image prompt", IMAGE_SUFFIXES)
    if not images:
        return {}, used
    name = ip_adapter_file(given)
    scale = _number(given, "scale", 1.0, "ip_adapter_map")
    data: dict[str, Any] = {"ip_image": str(next(iter(images.values()))) if len(images) == 1 else {
        str(frame): str(path) for frame, path in images.items()}}  # several: the image prompt travels
    path = given.get("path")
    flags = [key for key in ("is_full_face", "is_light", "is_plus_face", "is_plus") if given.get(key)]
    if isinstance(path, str) and flags:
        logger.warning("ip_adapter_map: path names the adapter file, whose tensors tell its variant, so %s chooses "
                       "nothing; drop it, or drop path to let it pick h94's file", " and ".join(flags))
    if not isinstance(path, str):
        local = Path.cwd() / "data/models/ip_adapter/models" / name
        path = str(local) if local.is_file() else _cached_hub_file(IP_ADAPTER_REPO, f"models/{name}")
        if path is None:
            raise KinemaError(f"ip_adapter_map asks for {IP_ADAPTER_REPO}'s models/{name}, which is neither in "
                              "data/models/ip_adapter/models/ nor in the local Hugging Face cache, and cannot be "
                              f"fetched here: add \"path\": \"/path/to/{name}\" to ip_adapter_map")
        encoder = Path(path).parent / "image_encoder"
        if not encoder.is_dir():
            found = cached_hub_folder(IP_ADAPTER_REPO, "models/image_encoder")
            if found is not None:
                data["image_encoder"] = found
    data["ip_adapter"] = {"path": path, "scale": scale}
    if isinstance(given.get("image_encoder"), str):
        data["image_encoder"] = given["image_encoder"]
    return data, used


def img2img_job_data(given: Any, frames: int | None, config_folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(job data, map as run)` of a prompt-travel `img2img_map`: its frames, named by number in `init_img_dir`, remade
    at `denoising_strength` (kinema's video-to-video: `video` the folder, `strength`); {} when it is off or the folder
    has no image. It needs an image for every frame and no other images in the folder (one line each): prompt travel
    starts a frame without one from zero latents, which kinema does not copy."""
    used, folder, images = _image_map(given, "img2img_map", IMG2IMG_KEYS, "init_img_dir", "init_img/test", frames,
                                      config_folder, "the video starts from noise")
    if not images:
        return {}, used
    wanted = frames if frames is not None else max(images) + 1
    missing = [frame for frame in range(wanted) if frame not in images]
    if missing:
        raise KinemaError(f"img2img_map: {folder} has no image for frames {shorten(str(missing), 80)} of {wanted}; "
                          "kinema remakes a video from every frame: give each one an image (prompt travel starts "
                          "the missing ones from zero latents)")
    strength = _number(given, "denoising_strength", 0.7, "img2img_map", 0, 1)
    if strength == 0:
        raise KinemaError("img2img_map.denoising_strength 0 remakes nothing; give a share of the noise from 0 "
                          "(exclusive) to 1")
    from kinema.data.probe import folder_frames

    if folder_frames(folder) != list(images.values()):
        raise KinemaError(f"img2img_map: {folder} holds other images beside those of frames 0 to {wanted - 1} (PNG "
                          "files named by frame number), and kinema remakes the folder's frames as a video: move the "
                          "others out")
    return {"video": str(folder), "strength": strength, "resize": True}, used  # resized to W x H, as there
