"""The models shipped inside kinema, by name, and `kinema.json`, what kinema knows about a model folder.

Two small models trained by kinema on its own synthetic dataset live in this package's folder:

    kinema-tiny      EasyAnimate V3 family: transformer/ (VideoDiT), vae/ (Slice VAE), kinema.json
    kinema-tiny-ad   AnimateDiff family: unet/, vae/, motion_module.safetensors, kinema.json

Neither holds a text encoder: their `kinema.json` names one (kinema.loaders.text_encoder). A model is asked for by
name anywhere a model path is taken (`load_family`, `kinema.load`, `kinema generate --model`); an existing path
always wins over a name. `KINEMA_BUNDLED_DIR` points the registry at another folder holding model folders of these
names (tests, or weights kept outside the install).

`kinema.json` is a JSON object; kinema reads these keys (others, such as "name", "family", "description" and
"held_out", are for people and tools):

    "text_encoder": the encoder to load with the model (see kinema.loaders.text_encoder).
    "defaults": what `kinema generate` uses for the options left unset: "height", "width", "frames", "steps",
        "guidance", "scheduler".
    "world": "synth" for models that only know the synthetic dataset's coloured shapes: prompts outside that
        world get one warning.
    "motion": an AnimateDiff folder's motion-module settings (kinema.pipelines.load.model_motion_settings).
    "prediction_type": what the model predicts, "epsilon" (when absent) or "v_prediction" (kinema-tiny); sampling
        and training follow it.

Plain data and JSON only, no torch: the CLI reads names and defaults before it imports any model code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError

# Bundled model names -> their folders inside `bundled_dir()`.
BUNDLED_MODELS: dict[str, str] = {"kinema-tiny": "kinema-tiny", "kinema-tiny-ad": "kinema-tiny-ad"}
DEFAULT_MODEL = "kinema-tiny"
BUNDLED_DIR_VARIABLE = "KINEMA_BUNDLED_DIR"
MODEL_INFO = "kinema.json"
# The motion module a kinema AnimateDiff folder (one with kinema.json) carries inside it: what `kinema train` mode
# motion exports.
FOLDER_MOTION_MODULE = "motion_module.safetensors"
# Worlds a model may declare: the prompts it was trained on come from this vocabulary.
WORLDS = ("synth",)
# What a model may predict (diffusers' prediction_type names).
PREDICTION_TYPES = ("epsilon", "v_prediction")
# kinema.json "defaults" -> the type each must have (checked before a request is built).
DEFAULT_FIELDS: dict[str, str] = {"height": "int", "width": "int", "frames": "int", "steps": "int",
                                  "guidance": "number", "scheduler": "str", "overlap_frames": "int"}


def bundled_dir() -> Path:
    """The folder holding the bundled model folders: `$KINEMA_BUNDLED_DIR` when set, else this package's folder."""
    override = os.environ.get(BUNDLED_DIR_VARIABLE)
    return Path(override) if override else Path(__file__).resolve().parent


def bundled_model_path(name: str) -> Path:
    """The folder of the bundled model `name` (whether or not it is present); one KinemaError line for a name that
    is not a bundled model, listing those that are."""
    if name not in BUNDLED_MODELS:
        raise KinemaError(f"{name!r} is not a bundled model; bundled models: {', '.join(BUNDLED_MODELS)}")
    return bundled_dir() / BUNDLED_MODELS[name]


def available_models() -> list[str]:
    """The bundled models whose folder is present in this install (a name in `BUNDLED_MODELS` order)."""
    return [name for name in BUNDLED_MODELS if (bundled_model_path(name) / MODEL_INFO).is_file()]


def is_bundled_name(model: str | os.PathLike) -> bool:
    """Whether `model` is a bundled model's name and not an existing path (which always wins)."""
    return isinstance(model, str) and model in BUNDLED_MODELS and not Path(model).exists()


def check_model_name(model: Any) -> None:
    """One KinemaError line unless `model` is a path or a name (the Python API hands values straight through: None,
    a number)."""
    if not isinstance(model, str | os.PathLike):
        from kinema.errors import value_words

        raise KinemaError(f"a model is a path or a bundled model's name, got {value_words(model)}")
    if not os.fspath(model).strip():  # pathlib reads "" as the current folder
        raise KinemaError("the path is empty; give a weights file, a model folder or a bundled model's name")


def resolve_model(model: str | os.PathLike, not_found: str | None = None) -> Path:
    """`model` as a path: itself when it exists, else the folder of the bundled model of that name.

    Anything else raises one KinemaError line: `not_found` (the caller's words for a missing path; default "no such
    model file or folder: MODEL"), then the bundled models this install has, or for a bundled name whose folder is
    missing, that it is missing.
    """
    check_model_name(model)
    path = Path(model)
    if path.exists():
        return path
    if path.is_symlink():
        raise KinemaError(f"{model} is a symbolic link to {os.readlink(path)}, which does not exist; fix the link or "
                          "give another path")
    if is_bundled_name(model):
        folder = bundled_model_path(str(model))
        if not (folder / MODEL_INFO).is_file():
            where = f" (${BUNDLED_DIR_VARIABLE})" if os.environ.get(BUNDLED_DIR_VARIABLE) else ""
            raise KinemaError(f"the bundled model {model} is not in this install: {folder}{where} has no "
                              f"{MODEL_INFO}; reinstall kinema, or give a model folder instead")
        return folder
    available = available_models()
    names = ", ".join(available) if available else "none in this install"
    raise KinemaError(f"{not_found or f'no such model file or folder: {model}'}; a model is an existing path or a "
                      f"bundled model's name (available: {names})")


def folder_motion_module(model_path: str | os.PathLike) -> Path | None:
    """The motion modules a kinema AnimateDiff folder (one with kinema.json) carries as `FOLDER_MOTION_MODULE`,
    which it is loaded with when no other is given; None for other folders and files."""
    model_path = Path(model_path)
    if model_path.is_dir() and read_model_info(model_path) and (model_path / FOLDER_MOTION_MODULE).is_file():
        return model_path / FOLDER_MOTION_MODULE
    return None


def read_model_info(model_folder: str | os.PathLike) -> dict[str, Any]:
    """The `kinema.json` object of a model folder, or {} when it has none (or `model_folder` is a file)."""
    path = Path(model_folder) / MODEL_INFO
    if not path.is_file():
        return {}
    from kinema.fileio import read_json_object

    return read_json_object(path, "the model's kinema.json")


def _is_type(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1
    return isinstance(value, str) and bool(value)


def model_defaults(model_folder: str | os.PathLike) -> dict[str, Any]:
    """The generation defaults of a model folder's `kinema.json` ("defaults"), checked: {} without them. Keys are
    those of `DEFAULT_FIELDS` (height, width, frames, steps, overlap_frames: positive integers; guidance: a number
    >= 1; scheduler: a name); one KinemaError line for any other key or a value of the wrong kind."""
    info = read_model_info(model_folder)
    defaults = info.get("defaults", {})
    where = Path(model_folder) / MODEL_INFO
    if not isinstance(defaults, dict):
        raise KinemaError(f"{where}: \"defaults\" must be an object such as {{\"frames\": 16, \"steps\": 25}}, got "
                          f"{type(defaults).__name__}")
    for key, value in defaults.items():
        if key not in DEFAULT_FIELDS:
            raise KinemaError(f"{where}: unknown default {key!r}; kinema.json defaults are "
                              f"{', '.join(DEFAULT_FIELDS)}")
        kind = DEFAULT_FIELDS[key]
        if not _is_type(value, kind):
            wanted = {"int": "a positive whole number", "number": "a number >= 1", "str": "a non-empty name"}[kind]
            raise KinemaError(f"{where}: default {key} must be {wanted}, got {value!r}")
    return dict(defaults)


def model_world(model_folder: str | os.PathLike) -> str | None:
    """The world a model folder's `kinema.json` declares ("synth"), or None; one KinemaError line for another."""
    world = read_model_info(model_folder).get("world")
    if world is not None and world not in WORLDS:
        raise KinemaError(f"{Path(model_folder) / MODEL_INFO}: unknown world {world!r}; kinema knows "
                          f"{', '.join(WORLDS)} (or leave \"world\" out)")
    return world


def model_prediction_type(model_folder: str | os.PathLike) -> str:
    """What a model folder's `kinema.json` says the model predicts ("prediction_type"): "epsilon" when it says
    nothing; one KinemaError line for a value kinema does not sample."""
    prediction = read_model_info(model_folder).get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise KinemaError(f"{Path(model_folder) / MODEL_INFO}: unknown prediction_type {prediction!r}; kinema "
                          f"samples {', '.join(PREDICTION_TYPES)} models")
    return str(prediction)


__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "available_models", "bundled_model_path", "is_bundled_name",
           "model_defaults", "model_prediction_type", "model_world", "read_model_info", "resolve_model"]

