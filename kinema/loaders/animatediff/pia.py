"""Telling a PIA image animator's motion module from the others without torch, for checks before any model loads
(kinema generate, kinema batch): a MotionAdapter folder whose config has conv_in_channels, or a safetensors file or
torch zip checkpoint (pia.ckpt) with conv_in beside its motion modules (the loader,
kinema.loaders.animatediff.load, reads each kind fully)."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path


def is_pia_file(path: Path) -> bool | None:
    """Whether the motion module at `path` is PIA's, from tensor names alone (a pickle's are read without unpickling
    it); None when the file is not readable here or is a legacy pickle (the loader names the problem)."""
    from kinema.sniff import Kind, pickled_tensor_names, sniff

    try:
        if path.is_dir():
            return bool(json.loads((path / "config.json").read_text()).get("conv_in_channels"))
        found = sniff(path)
    except (OSError, ValueError, AttributeError):
        return None
    names: Collection[str] | None = found.names if found.kind is Kind.SAFETENSORS else None
    if found.kind is Kind.TORCH_ZIP:
        names = pickled_tensor_names(path)
    if names is None:
        return None
    return "conv_in.weight" in names and any(".motion_modules." in name for name in names)
