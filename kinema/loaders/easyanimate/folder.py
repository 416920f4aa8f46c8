"""Load a whole EasyAnimate V3 model folder: kinema's transformer and Slice VAE, transformers' T5, tokenizer and CLIP.

A V3 folder (`alibaba-pai/EasyAnimateV3-XL-2-InP-*`) holds `transformer/` (see transformer.py), `vae/` (vae.py),
`text_encoder/` + `tokenizer/` (T5-v1.1-XXL, the encoder shipped only as fp16 shards) and, for InP models,
`image_encoder/` (CLIP vision with projection). Every folder and the tokenizer are checked before any weight is read.

A folder whose `kinema.json` names its text encoder (kinema's bundled models: `transformer/`, `vae/`, `kinema.json`)
needs no `text_encoder/` or `tokenizer/`: the encoder comes from where the entry says (kinema.loaders.text_encoder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kinema.errors import KinemaError
from kinema.loaders.checkpoint_io import find_weights, load_pretrained
from kinema.loaders.easyanimate.config import video_dit_config_from_easyanimate
from kinema.loaders.easyanimate.transformer import load_video_dit, read_transformer_config
from kinema.loaders.easyanimate.vae import load_slice_vae
from kinema.loaders.text_encoder import (
    TextEncoderEntry,
    into_memory,
    load_text_encoder,
    resolve_text_encoder,
    text_encoder_entry,
)
from kinema.models.video_dit import VideoDiT

# The folders every V3 model has; InP models also have image_encoder/.
MODEL_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
# What a folder whose kinema.json names its text encoder needs.
NAMED_ENCODER_PARTS = ("transformer", "vae")
IMAGE_ENCODER = "image_encoder"


@dataclass
class EasyAnimateModel:
    """The parts of an EasyAnimate V3 folder. `image_encoder` / `image_processor` are None without `image_encoder/`.
    `text_max_length` / `lowercase` are the prompt settings of a text encoder named in kinema.json (None: V3's)."""

    transformer: VideoDiT
    vae: Any
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any | None
    image_processor: Any | None
    text_max_length: int | None = None
    lowercase: bool | None = None


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a whole V3 model folder, not a transformer folder: every one of `MODEL_PARTS` is there, or
    `transformer/` and `vae/` with a kinema.json naming the text encoder."""
    folder = Path(path)
    if all((folder / part).is_dir() for part in MODEL_PARTS):
        return True
    return all((folder / part).is_dir() for part in NAMED_ENCODER_PARTS) and text_encoder_entry(folder) is not None


def _require_dir(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_dir():
        found = sorted(p.name for p in folder.iterdir())
        raise KinemaError(f"{folder} has no {name}/ folder (it holds {found}); an EasyAnimate V3 model folder has "
                          f"{', '.join(part + '/' for part in MODEL_PARTS)} (or {', '.join(NAMED_ENCODER_PARTS)} and a "
                          f"kinema.json naming its text encoder) and, for InP models, {IMAGE_ENCODER}/")
    return path


def _encoder_variant(folder: Path) -> str | None:
    """transformers' weight variant of an encoder folder: "fp16" when only fp16 weights are there (V3's T5 is
    `model.fp16-0000N-of-0000M.safetensors` + `model.safetensors.index.fp16.json`), else None."""
    return find_weights(folder, stems=("model", "pytorch_model"), variants=(None, "fp16")).variant


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    if (folder / "spiece.model").is_file() and not (folder / "tokenizer.json").is_file() \
            and not (is_sentencepiece_available() and is_protobuf_available()):
        raise KinemaError(f"{folder} holds only a SentencePiece spiece.model; reading it needs the sentencepiece "
                          "and protobuf packages: pip install sentencepiece protobuf")
    return AutoTokenizer.from_pretrained(folder)


def load_easyanimate(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    mmap: bool = False,
) -> EasyAnimateModel:
    """Load a whole EasyAnimate V3 folder: transformer, Slice VAE, T5 encoder + tokenizer (or the text encoder its
    kinema.json names), CLIP image encoder.

    All models are cast to `dtype` and moved to `device`; the encoders are returned in eval mode. Weights are read
    into memory; `mmap=True` leaves every part's weights mapped from its file (less memory, a slow first pass).
    """
    # The PIL image processor is the one EasyAnimate's pipeline used (transformers 4's CLIPImageProcessor); the
    # default CLIPImageProcessor of transformers 5 wants torchvision and prints a notice when falling back to it.
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection, T5EncoderModel

    # Every folder and the tokenizer are checked before the multi-GB weights are read.
    folder = Path(folder)
    entry: TextEncoderEntry | None = text_encoder_entry(folder)
    dirs = {name: _require_dir(folder, name) for name in (MODEL_PARTS if entry is None else NAMED_ENCODER_PARTS)}
    transformer_config = video_dit_config_from_easyanimate(read_transformer_config(dirs["transformer"]))
    image_dir = folder / IMAGE_ENCODER
    if transformer_config.get("image_embed_dim") is not None and not image_dir.is_dir():
        raise KinemaError(f"{folder} is an InP model (its transformer takes CLIP image tokens) but has no "
                          f"{IMAGE_ENCODER}/ folder; restore it from the original download")
    if entry is None:
        tokenizer = _load_tokenizer(dirs["tokenizer"])
    else:  # a package that is not installed fails here, before the weights are read
        resolve_text_encoder(entry, folder)

    transformer = load_video_dit(dirs["transformer"], dtype=dtype, device=device, mmap=mmap)
    vae = load_slice_vae(dirs["vae"], torch_dtype=dtype, mmap=mmap, device=device)
    in_memory = (lambda module: module) if mmap else into_memory
    text_max_length: int | None = None
    lowercase: bool | None = None
    if entry is None:
        text_dir = dirs["text_encoder"]
        text_encoder = in_memory(load_pretrained(T5EncoderModel, text_dir, "text encoder", dtype=dtype,
                                                 variant=_encoder_variant(text_dir)))
    else:
        named = load_text_encoder(entry, folder, dtype=dtype, device=device, mmap=mmap)
        text_encoder, tokenizer = named.text_encoder, named.tokenizer
        text_max_length, lowercase = named.max_length, named.lowercase
    image_encoder = image_processor = None
    if image_dir.is_dir():
        image_encoder = in_memory(load_pretrained(CLIPVisionModelWithProjection, image_dir, "image encoder",
                                                  dtype=dtype, variant=_encoder_variant(image_dir)))
        image_encoder = image_encoder.to(device).eval()
        image_processor = CLIPImageProcessorPil.from_pretrained(image_dir)
    return EasyAnimateModel(transformer, vae, text_encoder.to(device).eval(), tokenizer, image_encoder,
                            image_processor, text_max_length=text_max_length, lowercase=lowercase)
