"""animatediff-cli-prompt-travel's `controlnet_map` and `ip_adapter_map`, read into kinema job data.

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

Where kinema differs from prompt travel: it steers every ControlNet with one start, end, guess mode and falloff, at
the same keyframes (a config whose ControlNets differ there is one line, before anything loads); the ControlNet
runs on a keyframe's neighbour's own latents with the keyframe's image (prompt travel adds the keyframe's residuals
to the neighbour); an image prompt travels as kinema's prompt schedules do (blended from keyframe to keyframe, held
after the last, where prompt travel holds each for prompt_fixed_ratio of the way and wraps back to the first).
control_region_list and controlnet_ref are left out with a warning, as region_map is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError

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
IP_ADAPTER_REPO = "h94/IP-Adapter"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cached_hub_folder(repo: str, subfolder: str = "") -> str | None:
    """The local Hugging Face cache's folder of `repo` (its `subfolder`), where a config.json was downloaded; None
    when it is not there. Reads the cache only: nothing is fetched."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, f"{subfolder}/config.json" if subfolder else "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def _cached_hub_file(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) else None


def _folder(given: Any, key: str, config_folder: Path) -> Path | None:
    """prompt travel's `input_image_dir` `given`: under ./data (its own rule), ., or the config's folder."""
    if not isinstance(given, str) or not given:
        raise KinemaError(f"{key}.input_image_dir is the folder of the images (e.g. \"controlnet_image/test\"), got "
                          f"{given!r}")
    for base in (Path.cwd() / "data", Path.cwd(), config_folder):
        if (base / given).is_dir():
            return base / given
    return None


def numbered_images(folder: Path, suffixes: tuple[str, ...] = (".png",)) -> dict[int, Path]:
    """The images of `folder` named by frame number (`0016.png`: frame 16), as prompt travel globs them
    (`[0-9]*.png`); a name that starts with a digit and is not a number is one KinemaError line."""
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and path.suffix.lower() in suffixes and path.name[:1].isdigit()):
            continue
        if not path.stem.isdigit():
            raise KinemaError(f"{path}: control images are named by their frame number (0016.png for frame 16); "
                              "rename it")
        if int(path.stem) in found:
            raise KinemaError(f"{path} and {found[int(path.stem)]} are both frame {int(path.stem)}; keep one")
        found[int(path.stem)] = path
    return dict(sorted(found.items()))


def _preprocessor(name: str, entry: Mapping[str, Any], where: str) -> str | None:
    """kinema's control_preprocess for the entry (None: its images are the maps)."""
    if not entry.get("use_preprocessor", True):
        return None
    given = entry.get("preprocessor")
    if isinstance(given, Mapping):
        kind, params = given.get("type"), given.get("param") or {}
    else:
        kind, params = DEFAULT_PREPROCESSORS.get(name, "none"), {}
    if kind == "none":
        return None
    if kind == "canny":
        low, high = params.get("low_threshold", 100), params.get("high_threshold", 200)
        return f"canny:{low}:{high}" if (low, high) != (100, 200) else "canny"
    raise KinemaError(f"{where} makes its maps with the {kind} preprocessor, which kinema does not have (its weights "
                      "cannot be fetched here; kinema makes canny maps itself): put maps already made in its image "
                      "folder and set \"use_preprocessor\": false")


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


def _one_setting(nets: Mapping[str, Mapping[str, Any]], key: str, default: Any) -> Any:
    """The value every enabled ControlNet gives `key` (kinema steers them all with one), or one KinemaError line."""
    values = {name: entry.get(key, default) for name, entry in nets.items()}
    if len({repr(value) for value in values.values()}) > 1:
        raise KinemaError(f"controlnet_map: kinema steers every ControlNet with one {key}, and these differ: "
                          f"{', '.join(f'{name} {value!r}' for name, value in values.items())}; give them the same")
    return next(iter(values.values()))


def controlnet_job_data(given: Any, frames: int | None, config_folder: Path) -> dict[str, Any]:
    """The job data (controlnet, control_video, control_indices, control_falloff, ...) of a prompt-travel
    `controlnet_map` for a video of `frames` frames (None: not said, so every keyframe is kept); {} when no enabled
    ControlNet has images, as prompt travel then loads none."""
    if not isinstance(given, Mapping):
        raise KinemaError(f"controlnet_map is a mapping of settings and ControlNets, got {type(given).__name__}")
    folder = _folder(given.get("input_image_dir"), "controlnet_map", config_folder)
    entries = {name: entry for name, entry in given.items() if name not in CONTROLNET_MAP_SETTINGS}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise KinemaError(f"controlnet_map.{name} is a mapping of settings ({{\"enable\": true, ...}}) or one of "
                              f"{', '.join(CONTROLNET_MAP_SETTINGS)}, got {type(entry).__name__}")
        unknown = [key for key in entry if key not in CONTROLNET_KEYS and name != "controlnet_ref"]
        if unknown:
            raise KinemaError(f"controlnet_map.{name}: unknown key {unknown[0]!r}; known keys: "
                              f"{', '.join(CONTROLNET_KEYS)}")
    enabled = {name: entry for name, entry in entries.items() if entry.get("enable")}
    if enabled.pop("controlnet_ref", None) is not None:
        logger.warning("controlnet_map.controlnet_ref (reference-only) is not a ControlNet kinema runs; it is left out")
    keyframes: dict[str, dict[int, Path]] = {}
    for name in enabled:
        images = numbered_images(folder / name) if folder is not None and (folder / name).is_dir() else {}
        images = {frame: path for frame, path in images.items() if frames is None or frame < frames}
        if images:
            keyframes[name] = images
    if not keyframes:
        if enabled:
            logger.warning("controlnet_map: no images in %s for %s, so no ControlNet steers (as in prompt travel)",
                           folder if folder is not None else given.get("input_image_dir"), ", ".join(enabled))
        return {}
    nets = {name: enabled[name] for name in keyframes}
    places = {name: list(images) for name, images in keyframes.items()}
    if len({tuple(frames) for frames in places.values()}) > 1:
        raise KinemaError("controlnet_map: kinema steers every ControlNet at the same keyframes, and these have "
                          f"images for other frames: {'; '.join(f'{name} {p}' for name, p in places.items())}; give "
                          "each the same frame numbers")
    if any(entry.get("control_region_list") for entry in nets.values()):
        logger.warning("controlnet_map: control_region_list is left out (kinema does not read region_map)")
    falloff = list(_one_setting(nets, "control_scale_list", []) or [])
    data: dict[str, Any] = {
        "controlnet": [], "control_video": [], "control_indices": next(iter(places.values())),
        "control_start": _one_setting(nets, "control_guidance_start", 0.0),
        "control_end": _one_setting(nets, "control_guidance_end", 1.0),
        "guess_mode": bool(_one_setting(nets, "guess_mode", False)), "resize": True}
    preprocessors = []
    for name, entry in nets.items():
        where = f"controlnet_map.{name}"
        data["controlnet"].append({"path": _controlnet_path(name, entry, where),
                                   "scale": entry.get("controlnet_conditioning_scale", 1.0)})
        data["control_video"].append([str(path) for path in keyframes[name].values()])
        preprocessors.append(_preprocessor(name, entry, where) or "none")
    if falloff:
        data["control_falloff"] = falloff
        data["control_loop"] = bool(given.get("is_loop", True))
    if any(p != "none" for p in preprocessors):
        data["control_preprocess"] = preprocessors
    if len(nets) == 1:  # one ControlNet: its path, images and preprocessor as themselves, not lists of one
        data["controlnet"], data["control_video"] = data["controlnet"][0], data["control_video"][0]
        if "control_preprocess" in data:
            data["control_preprocess"] = preprocessors[0]
    logger.info("controlnet_map: %s at frames %s", ", ".join(nets), data["control_indices"])
    return data


def ip_adapter_file(given: Mapping[str, Any]) -> str:
    """h94/IP-Adapter's SD1.5 file that prompt travel picks for the flags of `given`."""
    if given.get("is_full_face"):
        return "ip-adapter-full-face_sd15.bin"
    if given.get("is_light"):
        return "ip-adapter_sd15_light.bin"
    if given.get("is_plus_face"):
        return "ip-adapter-plus-face_sd15.bin"
    return "ip-adapter-plus_sd15.bin" if given.get("is_plus") else "ip-adapter_sd15.bin"


def ip_adapter_job_data(given: Any, frames: int | None, config_folder: Path) -> dict[str, Any]:
    """The job data (ip_adapter, image_encoder, ip_image) of a prompt-travel `ip_adapter_map` for a video of `frames`
    frames (None: not said); {} when it is off or its folder has no image, as prompt travel then prompts with none.
    Images for several frames make an image prompt schedule ({frame: image})."""
    if not isinstance(given, Mapping):
        raise KinemaError(f"ip_adapter_map is a mapping of settings, got {type(given).__name__}")
    unknown = [key for key in given if key not in IP_ADAPTER_KEYS]
    if unknown:
        raise KinemaError(f"ip_adapter_map: unknown key {unknown[0]!r}; known keys: {', '.join(IP_ADAPTER_KEYS)}")
    if not given.get("enable"):
        return {}
    folder = _folder(given.get("input_image_dir"), "ip_adapter_map", config_folder)
    images = numbered_images(folder, IMAGE_SUFFIXES) if folder is not None else {}
    images = {frame: path for frame, path in images.items() if frames is None or frame < frames}
    if not images:
        logger.warning("ip_adapter_map: no images in %s, so no image prompt (as in prompt travel)",
                       folder if folder is not None else given.get("input_image_dir"))
        return {}
    name = ip_adapter_file(given)
    data: dict[str, Any] = {"ip_image": str(next(iter(images.values()))) if len(images) == 1 else {
        str(frame): str(path) for frame, path in images.items()}}  # several: the image prompt travels
    path = given.get("path")
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
    scale = given.get("scale", 1.0)
    data["ip_adapter"] = {"path": path, "scale": scale}
    if isinstance(given.get("image_encoder"), str):
        data["image_encoder"] = given["image_encoder"]
    return data
