"""One front door for every weights file and model folder kinema reads: `describe`, `load`, `convert`.

Each kind (motion module, motion LoRA, EasyAnimate transformer or folder, Slice VAE, ...) is one entry of the
format registry in `kinema.loaders.formats`; the per-family code is in `animatediff/`, `easyanimate/` and
`stable_diffusion.py`. `describe` and `load` also take a bundled model's name (kinema.bundled) where a path does not
exist.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any

from kinema.errors import KinemaError, with_article

logger = logging.getLogger(__name__)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What `path` holds, as plain data (`{"kind": ..., "format": ..., ...}`), every tensor name and shape checked;
    KinemaError naming the problem when it is broken or not a format kinema knows. Reads headers, not weights.
    `path` may be a bundled model's name ("kinema-tiny")."""
    from kinema.bundled import resolve_model
    from kinema.loaders.source import describe as describe_path

    return describe_path(resolve_model(path, f"no such file or folder: {path}"))


def load(path: str | os.PathLike, **options: Any) -> Any:
    """Load whatever `path` is, strictly (every key present, none extra, every shape equal).

    What comes back depends on the kind `describe` finds: a motion module gives a `VideoUNet` (pass `unet=`, the
    base image UNet), a motion LoRA is applied to `video_unet=` and returns it, an image LoRA is fused into `sd=`
    (Stable Diffusion components) and returns them, an EasyAnimate transformer gives a `VideoDiT` and a whole V3
    folder an `EasyAnimateModel`, a Slice VAE folder a `SliceVAE`, a Stable Diffusion 1.5 folder or single file
    `StableDiffusionComponents` (a single file needs `tokenizer=`). `options` go to that
    kind's loader (e.g. `dtype`, `mmap`, `strength`). `path` may be a bundled model's name ("kinema-tiny").
    """
    from kinema.bundled import resolve_model
    from kinema.loaders.formats import format_of
    from kinema.loaders.source import Source, describe_source

    began = time.perf_counter()
    if "dtype" in options:
        options = {**options, "dtype": _torch_dtype(options["dtype"])}
    source = Source(resolve_model(path, f"no such file or folder: {path}"), options)
    report = describe_source(source)
    kind = report["kind"]
    logger.info("loading %s: %s (%s)", path, kind, report.get("format", "kinema"))
    loader = format_of(kind).function("load")
    _check_options(loader, options, f"{source.path} is {with_article(format_of(kind).name)}")
    loaded = loader(source, **options)
    logger.info("loaded %s as %s in %.1f s", path, type(loaded).__name__, time.perf_counter() - began)
    return loaded


def _check_options(loader: Any, options: dict[str, Any], what: str) -> None:
    """One KinemaError line for an option `loader` does not take (a motion LoRA's `dtype=`, an image LoRA's
    `video_unet=`), naming those it takes, where Python's TypeError named a function the caller never called. A
    loader taking `**options` checks its own."""
    parameters = list(inspect.signature(loader).parameters.values())[1:]  # the first is the Source
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return
    taken = [parameter.name for parameter in parameters]
    unknown = [name for name in options if name not in taken]
    if unknown:
        raise KinemaError(f"{what}, whose load takes {', '.join(f'{name}=' for name in taken) or 'no options'}; "
                          f"not {', '.join(f'{name}=' for name in unknown)}")


def _torch_dtype(value: Any) -> Any:
    """`dtype=` as every loader takes it, a torch dtype: one of kinema's names ("float16") or the dtype itself; one
    KinemaError line for anything else, where diffusers quietly loaded "float16" as float32 beside a float16 text
    encoder."""
    import torch

    from kinema.pipelines.request import DTYPES

    if isinstance(value, str) and value in DTYPES:
        return getattr(torch, value)
    if isinstance(value, torch.dtype) and value in {getattr(torch, name) for name in DTYPES}:
        return value
    raise KinemaError(f"dtype {value!r} is not one kinema loads; give one of {', '.join(DTYPES)} (a name or the "
                      "torch dtype)")


def convert(
    source: str | os.PathLike, target: str | os.PathLike, to: str, *, overwrite: bool = False
) -> tuple[Path, list[str]]:
    """Rewrite `source` in layout `to` at `target`, weights unchanged; returns the written path and notes. `target`
    is new, or with `overwrite` an earlier kinema output of the same kind (never anything kinema did not write)."""
    from kinema.loaders.conversion import convert as convert_path

    return convert_path(source, target, to, overwrite=overwrite)


__all__ = ["convert", "describe", "load"]
