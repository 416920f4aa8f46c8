"""Prompt configs: AnimateDiff's `configs/prompts/*.yaml` and animatediff-cli-prompt-travel's JSON/YAML files, read
into kinema jobs (kinema.pipelines.jobs) and run into one folder with a `config.yaml` that reproduces it.

A file holds entries: a YAML/JSON list of them, a mapping of name -> entry (AnimateDiff's older files), or one entry
at the top (prompt-travel files). An entry's keys, in either spelling:

    model, dreambooth_path, path      the model (a path or a bundled model's name; default kinema-tiny);
    base                              older AnimateDiff files: the model, with `path` then a LoRA on it
    motion_module                     a file or MotionAdapter folder, or a list of them (one run each)
    motion_module_lora_configs        [{path, alpha}]; lora_model_path + lora_alpha (default 0.8, as AnimateDiff);
    adapter_lora_path                 AnimateDiff v3's domain adapter (v3_sd15_adapter.ckpt), an image LoRA at
                                      adapter_lora_scale (default 1.0, as AnimateDiff);
    lora_map, motion_lora_map         {path: weight} (prompt travel)
    prompt                            a list of prompts (one video each), a prompt, or a prompt schedule
    head_prompt, prompt_map, tail_prompt   prompt travel: one video per seed following the schedule
    n_prompt                          negative prompts: one per prompt, or one for all
    seed                              an integer or a list (AnimateDiff: one per prompt, or one for all; prompt
                                      travel: one video per seed); -1 draws a random one
    steps, guidance_scale, scheduler, W / width, H / height, L / length, fps (or output: {fps})
    context (a length, or kinema's context settings {...}), overlap, stride     context windows
    tokenizer, dtype, name            kinema's: an SD1.5 single file's tokenizer, precision, the entry's name
    vae_path                          another VAE for the model's own (prompt travel's; a file or AutoencoderKL
                                      folder, kinema.loaders.image_vae)
    motion_scale, motion_effect, timestep_spacing, freeu   kinema's sampling settings (kinema generate's options;
                                      freeu: true, or {b1, b2, s1, s2})
    controlnet_path, controlnet_images, controlnet_image_indexs, normalize_condition_images
                                      AnimateDiff v3's SparseCtrl: the network, its keyframe images (a path or a
                                      list), the frames they go to, and gray sketches (kinema's controlnet,
                                      control_video, control_indices, normalize_control)
    controlnet_map, ip_adapter_map, img2img_map
                                      prompt travel's ControlNets steering keyframes from numbered images, its image
                                      prompt and its video-to-video (kinema.pipelines.travel_maps)
    prompt_fixed_ratio, tensor_interpolation_slerp, prompt_loop
                                      how a schedule blends (prompt travel's; its schedules default to 0.5, slerp and
                                      circular); clip_skip: the CLIP layer, counted from the end

Keys kinema has no use for (AnimateDiff's inference_config, controlnet_config; prompt travel's
region_map, ...) are accepted with one warning naming those set; any other
key is an error naming the nearest valid one. Relative paths resolve against the current folder, then the config
file's folder. Everything is checked, model files included, before any model loads.

`run_config` writes, whole or not at all, `OUT/<entry>-<prompt>/` per video set (a jobs folder each) and
`OUT/config.yaml`: the config with every seed the integer used and any overrides applied, so running it again makes
the same videos frame for frame.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError
from kinema.fileio import load_config_file, slug
from kinema.pipelines.jobs import Job, job_from_mapping, unknown_key_error

if TYPE_CHECKING:
    from kinema.pipelines.jobs import FamilyCache

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CONFIG_OUTPUT_KIND = "prompt_config"
# AnimateDiff's default LoRA strength (scripts/animate.py: lora_alpha 0.8).
DEFAULT_LORA_ALPHA = 0.8
DEFAULT_ADAPTER_SCALE = 1.0  # animatediff/utils/util.py load_weights: adapter_lora_scale
MODEL_KEYS = ("model", "dreambooth_path", "path", "base")
SCHEDULE_KEYS = ("head_prompt", "prompt_map", "tail_prompt")
# kinema's own sampling settings, spelt as its job keys (and as kinema generate's options with `-` for `_`).
_KINEMA_SAMPLING_KEYS = ("motion_scale", "motion_effect", "timestep_spacing", "freeu")
ENTRY_KEYS: tuple[str, ...] = (
    *MODEL_KEYS, "motion_module", "motion_module_lora_configs", "lora_model_path", "lora_alpha", "adapter_lora_path",
    "adapter_lora_scale", "lora_map", "motion_lora_map", "tokenizer", "prompt", *SCHEDULE_KEYS, "n_prompt", "seed",
    "steps", "guidance_scale", "scheduler", "W", "H", "L", "width", "height", "length", "fps", "output", "context",
    "overlap", "stride", "dtype", "name", *_KINEMA_SAMPLING_KEYS, "controlnet_path", "controlnet_images",
    "controlnet_image_indexs", "normalize_condition_images", "controlnet_map", "ip_adapter_map", "prompt_fixed_ratio",
    "tensor_interpolation_slerp", "img2img_map", "clip_skip", "prompt_loop", "vae_path")
# Keys of AnimateDiff and animatediff-cli-prompt-travel files that kinema accepts and ignores (with a warning).
IGNORED_KEYS = (
    "inference_config", "controlnet_config", "compile",
    "unet_batch_size",
    "upscale_config", "stylize_config", "region_map", "gradual_latent_hires_fix_map", "apply_lcm_lora",
    "lcm_lora_scale", "is_single_prompt_mode",
    "domain_lora_scale",  # AnimateDiff's v3 configs set it, and its code reads adapter_lora_scale
    "context_schedule", "lcm_map", "result")  # prompt travel's own files and the prompt.json it writes with a video
# animatediff-cli-prompt-travel's scheduler names that are kinema's under another name.
SCHEDULER_ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "k_dpmpp_2m": "dpmpp_2m",
                     "k_dpmpp_2m_karras": "dpmpp_2m_karras", "dpmpp_2m_karras": "dpmpp_2m_karras"}
# prompt travel's defaults for its schedules (its settings.py): each prompt held half the way to the next, slerp.
TRAVEL_HOLD, TRAVEL_SLERP = 0.5, True
# Entry keys the command line may set for every entry (kinema generate --config --steps 4 ...).
OVERRIDE_KEYS = ("steps", "L", "H", "W", "guidance_scale", "scheduler", "fps", "dtype", "tokenizer", "vae_path",
                 *_KINEMA_SAMPLING_KEYS)
_SIZE_KEYS = {"W": "width", "H": "height", "L": "length"}


@dataclass
class ConfigRun:
    """One job of a config: `folder` is its subfolder of the output, `entry` and `prompt` where it came from."""

    folder: str
    job: Job
    entry: str
    prompt: int


@dataclass
class PromptConfig:
    """A checked prompt config: its runs (one job each) and, in `used`, the config as run (seeds as used)."""

    path: Path
    runs: list[ConfigRun]
    used: Any
    ignored: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading


def _entries(data: Any, path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """`(name, entry)` pairs of a config: a list of entries, name -> entry, or one entry at the top."""
    if isinstance(data, list):
        if not data:
            raise KinemaError(f"{path} holds an empty list; give at least one entry with a prompt")
        named = []
        for index, entry in enumerate(data):
            if not isinstance(entry, Mapping):
                raise KinemaError(f"{path}: entry {index + 1} is {type(entry).__name__}, not a mapping of settings "
                                  "(prompt: [...], seed: ...)")
            named.append((str(entry.get("name") or f"entry{index + 1}"), entry))
        return named
    if isinstance(data, Mapping):
        if data and all(isinstance(value, Mapping) for value in data.values()) and not any(
                key in ENTRY_KEYS for key in data):
            return [(str(name), entry) for name, entry in data.items()]
        return [(str(data.get("name") or path.stem), data)]
    what = "empty" if data is None else f"a {type(data).__name__}"
    raise KinemaError(f"{path} is {what}, not a prompt config: give a list of entries (AnimateDiff) or a mapping "
                      "with prompt_map (prompt travel)")


def _given(entry: Mapping[str, Any], key: str) -> Any:
    """The entry's value for `key`, None when absent or empty ("" and {} are how those files leave a key unset)."""
    value = entry.get(key)
    return None if value in ("", {}, []) else value


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _model_and_loras(entry: Mapping[str, Any]) -> tuple[Any, list[Any]]:
    """The entry's model and LoRAs as job data: [path, weight] pairs."""
    models = {key: _given(entry, key) for key in MODEL_KEYS if _given(entry, key) is not None}
    loras: list[Any] = []
    if "base" in models and "path" in models:  # AnimateDiff's first files: path is then a LoRA on the base model
        loras.append([models.pop("path"), entry.get("lora_alpha", DEFAULT_LORA_ALPHA)])
    if len(models) > 1:
        raise KinemaError(f"give the model once: {' and '.join(models)} are all set")
    model = next(iter(models.values()), None)
    if model is None and _given(entry, "motion_module") is not None:
        # AnimateDiff's v3 configs leave dreambooth_path "" for its --pretrained-model-path, which kinema has not.
        raise KinemaError("the entry gives a motion module but no model (model, dreambooth_path and path are empty "
                          "or missing): set dreambooth_path (or model) to the Stable Diffusion 1.5 folder or file it "
                          "animates")
    if _given(entry, "lora_model_path") is not None:
        loras.append([entry["lora_model_path"], entry.get("lora_alpha", DEFAULT_LORA_ALPHA)])
    if _given(entry, "adapter_lora_path") is not None:
        scale = _given(entry, "adapter_lora_scale")
        loras.append([entry["adapter_lora_path"], DEFAULT_ADAPTER_SCALE if scale is None else scale])
    for weight, path, default in (("adapter_lora_scale", "adapter_lora_path", DEFAULT_ADAPTER_SCALE),
                                  ("lora_alpha", "lora_model_path", DEFAULT_LORA_ALPHA)):
        # AnimateDiff's templates leave the path empty at the default weight; another weight was meant for a file.
        if _given(entry, path) is None and _given(entry, weight) not in (None, default) and not (
                weight == "lora_alpha" and "base" in models):
            logger.warning("%s %s has no %s to weigh, so it does nothing; give the file or drop it", weight,
                           entry[weight], path)
    for item in _given(entry, "motion_module_lora_configs") or []:
        if not isinstance(item, Mapping) or set(item) - {"path", "alpha"}:
            raise KinemaError(f"motion_module_lora_configs holds {{path, alpha}} items, got {item!r}")
        if _given(item, "path") is not None:
            loras.append([item["path"], item.get("alpha", 1.0)])
    for key in ("lora_map", "motion_lora_map"):
        mapping = _given(entry, key) or {}
        if not isinstance(mapping, Mapping):
            raise KinemaError(f"{key} maps LoRA paths to weights ({{path: weight}}), got {type(mapping).__name__}")
        loras.extend([lora_path, weight] for lora_path, weight in mapping.items())
    return model, loras


def _shared(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The job data every prompt of the entry shares, besides model and prompts."""
    data: dict[str, Any] = {}
    for key, job_key in (("steps", "steps"), ("guidance_scale", "guidance"), ("fps", "fps"), ("dtype", "dtype"),
                         ("clip_skip", "clip_skip"), ("vae_path", "vae"),
                         ("tokenizer", "tokenizer"), *((key, key) for key in _KINEMA_SAMPLING_KEYS)):
        if _given(entry, key) is not None:
            data[job_key] = entry[key]
    for short, long in _SIZE_KEYS.items():
        if _given(entry, short) is not None and _given(entry, long) is not None:
            raise KinemaError(f"give {short} or {long}, not both")
        value = _given(entry, short) if _given(entry, short) is not None else _given(entry, long)
        if value is not None:
            data["frames" if long == "length" else long] = value
    # AnimateDiff v3's SparseCtrl entries (configs/prompts/v3/*sparsectrl*), as its animate.py reads them.
    for key, job_key in (("controlnet_path", "controlnet"), ("controlnet_images", "control_video"),
                         ("controlnet_image_indexs", "control_indices"),
                         ("normalize_condition_images", "normalize_control")):
        if _given(entry, key) is not None:
            data[job_key] = entry[key]
    output = _given(entry, "output")
    if output is not None:
        if not isinstance(output, Mapping):
            raise KinemaError(f"output is a mapping such as {{fps: 8}}, got {type(output).__name__}")
        unknown = sorted(set(map(str, output)) - {"fps", "format", "encode_param"})
        if unknown:
            raise KinemaError(f"unknown key {unknown[0]!r} in output; it takes fps (prompt travel's format and "
                              "encode_param are read and ignored: kinema writes mp4)")
        if output.get("format") not in (None, "", "mp4"):
            logger.warning("output format %r is ignored: kinema writes mp4 videos (and their settings beside them)",
                           output["format"])
        if "fps" in output and "fps" not in data:
            data["fps"] = output["fps"]
    scheduler = _given(entry, "scheduler")
    if scheduler is not None:
        data["scheduler"] = SCHEDULER_ALIASES.get(scheduler, scheduler) if isinstance(scheduler, str) else scheduler
    context = _given(entry, "context")
    windows: dict[str, Any] = {}
    if isinstance(context, Mapping):
        windows.update(context)
    elif context is not None:
        windows["length"] = context  # prompt travel's --context: the window length
    for key in ("overlap", "stride"):
        if _given(entry, key) is not None:
            windows[key] = entry[key]
    if windows:
        data["context"] = windows
    return data


# Entry keys that name files (a path, or a list of them); lora_map's and motion_lora_map's keys and
# motion_module_lora_configs' paths are files too.
PATH_KEYS = ("model", "dreambooth_path", "path", "base", "lora_model_path", "adapter_lora_path", "tokenizer",
             "vae_path", "controlnet_path", "motion_module", "controlnet_images")


def _paths_as_found(entry: Mapping[str, Any], config_folder: Path) -> dict[str, Any]:
    """The entry with each relative path that was found beside the config file, not from the current folder, made
    absolute: config.yaml is written elsewhere, and must run again from there."""
    def found(value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value
        try:
            if Path(value).is_absolute() or Path(value).exists() or not (config_folder / value).exists():
                return value
        except (OSError, ValueError):  # a text no path can be: the job has named it already
            return value
        return os.path.abspath(config_folder / value)

    made = dict(entry)
    for key in PATH_KEYS:
        if key in made:
            made[key] = [found(item) for item in made[key]] if isinstance(made[key], list) else found(made[key])
    for key in ("lora_map", "motion_lora_map"):
        if isinstance(made.get(key), Mapping):
            made[key] = {found(path): weight for path, weight in made[key].items()}
    if isinstance(made.get("motion_module_lora_configs"), list):
        made["motion_module_lora_configs"] = [{**item, "path": found(item.get("path"))} if isinstance(item, Mapping)
                                              else item for item in made["motion_module_lora_configs"]]
    return made


def _travel_maps(entry: Mapping[str, Any], shared: Mapping[str, Any], config_folder: Path
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(job data, entry keys as run)` of prompt travel's controlnet_map, ip_adapter_map and img2img_map
    (kinema.pipelines.travel_maps): their images for the frames the entry makes (its L, else the model's default)."""
    from kinema.pipelines.travel_maps import controlnet_job_data, img2img_job_data, ip_adapter_job_data

    data: dict[str, Any] = {}
    used: dict[str, Any] = {}
    if all(_given(entry, key) is None for key in ("controlnet_map", "ip_adapter_map", "img2img_map")):
        return data, used
    frames = shared.get("frames")
    if frames is None:
        frames = _default_frames(shared.get("model"))
    frames = frames if isinstance(frames, int) and not isinstance(frames, bool) else None
    if _given(entry, "controlnet_map") is not None:
        if "controlnet" in shared:
            raise KinemaError("give controlnet_map (prompt travel) or controlnet_path (AnimateDiff's SparseCtrl), "
                              "not both")
        found, used["controlnet_map"] = controlnet_job_data(entry["controlnet_map"], frames, config_folder)
        data.update(found)
    if _given(entry, "ip_adapter_map") is not None:
        found, used["ip_adapter_map"] = ip_adapter_job_data(entry["ip_adapter_map"], frames, config_folder)
        data.update(found)
    if _given(entry, "img2img_map") is not None:
        found, used["img2img_map"] = img2img_job_data(entry["img2img_map"], frames, config_folder)
        data.update(found)
    return data, used


def _travel_blend(entry: Mapping[str, Any], where: str, travel_form: bool) -> dict[str, Any]:
    """How the entry's schedule blends (job keys interpolation, prompt_hold, prompt_loop): prompt_fixed_ratio,
    tensor_interpolation_slerp and kinema's prompt_loop where given; a prompt-travel schedule (`travel_form`:
    head_prompt / prompt_map / tail_prompt) otherwise blends as prompt travel does (held half the way, slerp,
    circular). An ip_adapter_map's images travel alike, so its own ratio must agree."""
    def flag(key: str, default: bool) -> bool:
        value = _given(entry, key)
        if value is not None and not isinstance(value, bool):
            raise KinemaError(f"{where}: {key} must be true or false, got {value!r}")
        return default if value is None else value

    def ratio(mapping: Mapping[str, Any], key: str) -> float | None:
        value = _given(mapping, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1):
            raise KinemaError(f"{where}: {key} is the share of the way to the next keyframe a prompt is held, a number "
                              f"from 0 to 1 (e.g. 0.5), got {value!r}")
        return value

    blend: dict[str, Any] = {}
    hold = ratio(entry, "prompt_fixed_ratio")
    hold = TRAVEL_HOLD if hold is None and travel_form else hold
    if hold is not None:
        blend["prompt_hold"] = hold
    slerp = flag("tensor_interpolation_slerp", TRAVEL_SLERP if travel_form else False)
    if slerp or _given(entry, "tensor_interpolation_slerp") is not None:
        blend["interpolation"] = "slerp" if slerp else "linear"
    if flag("prompt_loop", travel_form):
        blend["prompt_loop"] = True
    ip_map = entry.get("ip_adapter_map")
    if isinstance(ip_map, Mapping) and ip_map.get("enable") is True:
        theirs = ratio(ip_map, "prompt_fixed_ratio")
        if theirs is not None and theirs != blend.get("prompt_hold", 0.0):
            raise KinemaError(f"{where}: ip_adapter_map.prompt_fixed_ratio {theirs!r} differs from the prompts' "
                              f"{blend.get('prompt_hold', 0.0)!r}, and kinema holds the text and the image prompt "
                              "alike; give them the same")
    return blend


def _default_frames(model: Any) -> int | None:
    """The frames a job of `model` makes when L is not given (its kinema.json default, else the library's); None
    when the model cannot be found (the job names that)."""
    from kinema.bundled import DEFAULT_MODEL
    from kinema.pipelines.jobs import model_defaults_for
    from kinema.pipelines.request import LIBRARY_DEFAULTS

    try:
        _, defaults = model_defaults_for(model if model is not None else DEFAULT_MODEL, ["frames"])
    except KinemaError:
        return None
    return int(defaults.get("frames", LIBRARY_DEFAULTS["frames"]))


def _seeds_per_prompt(seed: Any, prompts: int) -> list[Any]:
    """AnimateDiff's rule: one seed for every prompt, or one per prompt (default -1, random)."""
    seeds = _list(-1 if seed is None else seed)
    if len(seeds) == 1:
        return seeds * prompts
    if len(seeds) != prompts:
        raise KinemaError(f"seed lists {len(seeds)} seeds for {prompts} prompts; give one seed, or one per prompt")
    return seeds


def _first_words(prompt: Any) -> str:
    """What a run's folder is named after: the prompt, or a schedule's first prompt."""
    if isinstance(prompt, Mapping):
        prompt = next(iter(prompt.get("prompt_map", prompt).values()), "") if prompt else ""
    return prompt if isinstance(prompt, str) else ""


def _check_keys(entry: Mapping[str, Any]) -> list[str]:
    """The ignored keys the entry sets; unknown keys are an error naming the nearest valid one."""
    for key in entry:
        if key not in ENTRY_KEYS and key not in IGNORED_KEYS:
            raise unknown_key_error(key, ENTRY_KEYS, also_near=IGNORED_KEYS)
    return [key for key in entry if key in IGNORED_KEYS and _given(entry, key) not in (None, False)
            and not _changes_nothing(key, entry[key])]


def _changes_nothing(key: str, value: Any) -> bool:
    """An ignored key whose value would change nothing here: prompt travel's `context_schedule` "uniform" (kinema's
    windows' own schedule), an `lcm_map` not enabled, and the `result` record it writes beside a video."""
    if key == "context_schedule":
        return value == "uniform"
    if key == "lcm_map":
        return not (isinstance(value, Mapping) and value.get("enable"))
    return key == "result"


def _entry_runs(name: str, entry: Mapping[str, Any], index: int, where: str, config_folder: Path
                ) -> tuple[list[ConfigRun], dict[str, Any]]:
    """The runs of one entry and the entry as run (its seeds the integers used)."""
    model, loras = _model_and_loras(entry)
    shared = _shared(entry)
    shared.update(_travel_blend(entry, f"{where}, entry {name!r}", any(_given(entry, key) is not None
                                                                      for key in SCHEDULE_KEYS)))
    try:
        travelled, travel_used = _travel_maps(entry, shared, config_folder)
    except KinemaError as err:
        raise KinemaError(f"{where}, entry {name!r}: {err}") from None
    shared.update(travelled)
    if model is not None:
        shared["model"] = model
    if loras:
        shared["loras"] = loras
    motion_modules = _list(_given(entry, "motion_module"))
    schedule = {key: entry[key] for key in SCHEDULE_KEYS if _given(entry, key) is not None}
    n_prompt = _given(entry, "n_prompt")
    used = _paths_as_found({**entry, **travel_used}, config_folder)
    stem = f"{index + 1:02d}-{slug(name, 24)}"
    runs: list[ConfigRun] = []

    def job(data: dict[str, Any], label: str, modules_label: str) -> Job:
        return job_from_mapping(data, where=f"{where}, entry {name!r}{label}{modules_label}", base=Path.cwd(),
                                models_dir=config_folder)

    if schedule:
        if _given(entry, "prompt") is not None:
            raise KinemaError(f"{where}, entry {name!r}: give prompt or a prompt schedule (head_prompt, prompt_map, "
                              "tail_prompt), not both")
        negatives = _list(n_prompt if n_prompt is not None else "")
        if len(negatives) != 1:
            raise KinemaError(f"{where}, entry {name!r}: a prompt schedule takes one n_prompt, got {len(negatives)}")
        seed = _given(entry, "seed")  # "" and [] leave it unset, as the other keys: a random seed
        seeds = _list(-1 if seed is None else seed)
        used_seeds: list[int] = []
        for module_index, module in enumerate(motion_modules):
            tail = f"-mm{module_index + 1}" if len(motion_modules) > 1 else ""
            data = {**shared, "prompt": schedule, "negative_prompt": negatives[0],
                    "seed": used_seeds or seeds, "motion_module": module}
            made = job(data, "", f" (motion module {module_index + 1})" if tail else "")
            used_seeds = list(made.request.seeds)
            runs.append(ConfigRun(f"{stem}{tail}", made, name, 0))
        used["seed"] = used_seeds
        return runs, used

    prompts = _list(_given(entry, "prompt"))
    if prompts == [None]:
        raise KinemaError(f"{where}, entry {name!r}: no prompt; add prompt: [\"a red circle moving right\"] (or "
                          "prompt_map for prompt travel)")
    negatives = _list(n_prompt if n_prompt is not None else "")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    elif len(negatives) != len(prompts):
        raise KinemaError(f"{where}, entry {name!r}: n_prompt lists {len(negatives)} negative prompts for "
                          f"{len(prompts)} prompts; give one, or one per prompt")
    try:
        seeds = _seeds_per_prompt(_given(entry, "seed"), len(prompts))
    except KinemaError as err:
        raise KinemaError(f"{where}, entry {name!r}: {err}") from None
    used_seeds = []
    for prompt_index, (prompt, negative, seed) in enumerate(zip(prompts, negatives, seeds, strict=True)):
        label = f", prompt {prompt_index + 1}" if len(prompts) > 1 else ""
        words = _first_words(prompt)
        for module_index, module in enumerate(motion_modules):
            tail = f"-mm{module_index + 1}" if len(motion_modules) > 1 else ""
            data = {**shared, "prompt": prompt, "negative_prompt": negative, "motion_module": module,
                    "seed": used_seeds[prompt_index] if len(used_seeds) > prompt_index else seed}
            made = job(data, label, f" (motion module {module_index + 1})" if tail else "")
            if len(used_seeds) == prompt_index:
                used_seeds.append(int(made.request.seeds[0]))
            folder = f"{stem}-{prompt_index + 1:02d}-{slug(words, 40)}{tail}"
            runs.append(ConfigRun(folder, made, name, prompt_index))
    used["seed"] = used_seeds
    return runs, used


def read_config(path: str | os.PathLike, *, overrides: Mapping[str, Any] | None = None) -> PromptConfig:
    """Read and check the prompt config `path` into its runs (random seeds drawn now), without loading a model.

    `overrides` are entry keys (`OVERRIDE_KEYS`: steps, L, H, W, guidance_scale, scheduler, fps, dtype, tokenizer,
    vae_path, motion_scale, motion_effect, timestep_spacing, freeu)
    set on every entry, as `kinema generate --config --steps 4` does; they are recorded in `used`. Logs one
    warning naming the keys set that kinema ignores. Raises one KinemaError line for a malformed file (with line
    and column), an unknown key (naming the nearest valid one), a wrong value, or a missing file.
    """
    path = Path(path)
    overrides = dict(overrides or {})
    unknown = [key for key in overrides if key not in OVERRIDE_KEYS]
    if unknown:
        raise KinemaError(f"cannot override {unknown[0]!r} for every entry; overrides are {', '.join(OVERRIDE_KEYS)}")
    data = load_config_file(path)
    entries = _entries(data, path)
    runs: list[ConfigRun] = []
    used_entries: list[tuple[str, dict[str, Any]]] = []
    ignored: list[str] = []
    for index, (name, entry) in enumerate(entries):
        where = f"{path}, entry {name!r}"
        try:
            ignored.extend(key for key in _check_keys(entry) if key not in ignored)
        except KinemaError as err:
            raise KinemaError(f"{where}: {err}") from None
        entry = {**entry, **{_override_key(entry, key): value for key, value in overrides.items()}}
        try:
            entry_runs, used = _entry_runs(name, entry, index, str(path), path.parent)
        except KinemaError as err:
            message = str(err)
            raise KinemaError(message if message.startswith(str(path)) else f"{where}: {message}") from None
        runs.extend(entry_runs)
        used_entries.append((name, used))
    if ignored:
        logger.warning("%s: kinema ignores %s (AnimateDiff / prompt-travel settings it has no use for)", path,
                       ", ".join(ignored))
    return PromptConfig(path, runs, _same_shape(data, used_entries), ignored)


def _override_key(entry: Mapping[str, Any], key: str) -> str:
    """Where an override goes in this entry: the spelling it already uses (W or width, ...)."""
    long = _SIZE_KEYS.get(key)
    return long if long is not None and long in entry and key not in entry else key


def _same_shape(data: Any, used: list[tuple[str, dict[str, Any]]]) -> Any:
    """The config as run, in the file's own layout (list, name -> entry, or one entry)."""
    if isinstance(data, list):
        return [entry for _, entry in used]
    if len(used) == 1 and any(key in ENTRY_KEYS for key in data):
        name, entry = used[0]
        return {"name": name, **entry}  # named, so that the rerun's folders are named alike
    return {name: entry for name, entry in used}


# ---------------------------------------------------------------- running


def check_config_output(out: str | os.PathLike, *, overwrite: bool = False) -> None:
    """The output policy for a config's output folder, before any model loads (one KinemaError line)."""
    from kinema.fileio import check_output

    check_output(out, CONFIG_OUTPUT_KIND, folder=True, overwrite=overwrite)


def run_config(config: PromptConfig, out: str | os.PathLike, *, cache: FamilyCache | None = None,
               overwrite: bool = False, progress: bool = False) -> list[Path]:
    """Run every job of `config` into the folder `out`, written whole or not at all: one subfolder per run
    (`run_job`'s folder: video-seedS.mp4 each with its settings, job.json, report.json) and `config.yaml`, the
    config as run. Jobs sharing a model load it once (`cache`, a new FamilyCache by default). Returns the videos."""
    import yaml

    from kinema.fileio import atomic_folder
    from kinema.pipelines.jobs import FamilyCache, run_job, video_names

    cache = cache if cache is not None else FamilyCache(max_models=1)
    out = Path(out)
    check_config_output(out, overwrite=overwrite)
    # Runs of one model next to each other: with one model kept loaded, each loads once.
    models = list(dict.fromkeys(run.job.model_key() for run in config.runs))
    order = sorted(range(len(config.runs)), key=lambda i: models.index(config.runs[i].job.model_key()))
    with atomic_folder(out, CONFIG_OUTPUT_KIND, overwrite=overwrite) as folder:
        for index in order:
            run = config.runs[index]
            logger.info("%s: %s", run.folder, run.job.request.prompt)
            run_job(run.job, folder / run.folder, cache=cache, progress=progress)
        (folder / CONFIG_FILE).write_text(
            f"# kinema ran {config.path.name} with these settings; every seed is the one used\n"
            + yaml.safe_dump(config.used, sort_keys=False, allow_unicode=True, width=120))
    return [out / run.folder / name for run in config.runs for name in video_names(run.job.request.seeds)]


__all__ = ["CONFIG_FILE", "ENTRY_KEYS", "IGNORED_KEYS", "OVERRIDE_KEYS", "ConfigRun", "PromptConfig",
           "check_config_output", "read_config", "run_config"]
