"""Telling a PIA image animator's motion module from the others without torch, for checks before any model loads
(kinema generate, kinema batch): a MotionAdapter folder whose config has conv_in_channels, or a safetensors file with
conv_in beside its motion modules (the loader, kinema.loaders.animatediff.load, reads either kind fully)."""

from __future__ import annotations

import json
from pathlib import Path


def is_pia_file(path: Path) -> bool | None:
    """Whether the motion module at `path` is PIA's; None when telling takes unpickling (a .ckpt) or the file is not
    readable here (the loader names the problem)."""
    from kinema.sniff import Kind, sniff

    try:
        if path.is_dir():
            return bool(json.loads((path / "config.json").read_text()).get("conv_in_channels"))
        found = sniff(path)
    except (OSError, ValueError, AttributeError):
        return None
    if found.kind is not Kind.SAFETENSORS:
        return None
    return "conv_in.weight" in found.names and any(".motion_modules." in name for name in found.names)
