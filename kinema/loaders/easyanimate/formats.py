"""EasyAnimate V3 entries of the format registry (kinema.loaders.formats): transformers, Slice VAEs, whole folders.

Describers read config.json and the safetensors header only, never tensor data (a V3 transformer is GBs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kinema.loaders.source import Source


def describe_easyanimate_source(source: Source) -> dict[str, Any] | None:
    """An EasyAnimate V3 folder, or a transformer folder (one weights file or shards) or file
    (kinema.loaders.easyanimate.transformer)."""
    from kinema.loaders.easyanimate.transformer import describe_easyanimate

    return describe_easyanimate(source.path)


def describe_slice_vae_source(source: Source) -> dict[str, Any] | None:
    """An EasyAnimate V3 Slice VAE folder (kinema.loaders.easyanimate.vae)."""
    from kinema.loaders.easyanimate.vae import describe_slice_vae

    return describe_slice_vae(source.path) if source.path.is_dir() else None


def load_easyanimate_path(source: Source, *, dtype: Any = None, device: Any = "cpu", mmap: bool = False) -> Any:
    """A whole V3 folder (transformer/, vae/, text_encoder/, tokenizer/[, image_encoder/]) as an `EasyAnimateModel`
    (`dtype` default float32); a transformer folder or file as a `VideoDiT` (`dtype` default: as stored)."""
    from kinema.loaders.easyanimate.folder import is_model_folder, load_easyanimate
    from kinema.loaders.easyanimate.transformer import load_video_dit

    path = source.path
    options = {"device": device, "mmap": mmap, **({} if dtype is None else {"dtype": dtype})}
    return load_easyanimate(path, **options) if is_model_folder(path) else load_video_dit(path, **options)


def load_slice_vae_path(source: Source, dtype: Any = None, device: Any = "cpu", mmap: bool = False) -> Any:
    """A Slice VAE folder (or a model folder holding vae/) as a `SliceVAE`. Options: `dtype` (default float32),
    `device`, `mmap`, as for the transformer."""
    from kinema.loaders.easyanimate.vae import load_slice_vae, slice_vae_folder

    # describe found a Slice VAE here, so the folder exists; the same rule as describe's picks it.
    folder = slice_vae_folder(source.path) or source.path
    return load_slice_vae(folder, torch_dtype=dtype, mmap=mmap, device=device)


def convert_easyanimate_source(source: Source, target: Path, to: str, *, overwrite: bool = False
                               ) -> tuple[Path, list[str]]:
    """A V3 transformer in layout `to` (original / kinema), weights unchanged."""
    from kinema.loaders.easyanimate.transformer import convert_easyanimate_transformer

    return convert_easyanimate_transformer(source.path, target, to, overwrite=overwrite)
