"""Which device the models run on: the `--device` of `kinema generate` (v2v, extend, decode), `eval`, `batch`, `ui`
and `serve`.

`auto`, the default, takes the first CUDA GPU when torch sees one and the CPU otherwise. Apple's MPS is used only
when asked for (`mps`): video diffusion on it is often slower than the CPU or wrong (huggingface/diffusers#548).
The initial noise is drawn on the CPU (kinema.sampling.loop.initial_noise), so a seed makes the same video on every
device, up to the devices' float rounding.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from kinema.errors import KinemaError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_HELP = (f"where the models run: {DEVICE_NAMES} (default auto: the first CUDA GPU when there is one, else the "
               "CPU)")
# ASCII digits without leading zeros: torch refuses "cuda:01", and \d would take other scripts' digits.
_DEVICE = re.compile(r"auto|cpu|mps|cuda(?::(?:0|[1-9][0-9]{0,3}))?")


def check_device_name(name: str) -> str:
    """`name` when it names a device kinema runs on (`DEVICE_NAMES`), else one KinemaError line; torch-free, for
    checks before anything heavy."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name.strip().lower()):
        raise KinemaError(f"unknown device {name!r}: use {DEVICE_NAMES}")
    return name.strip().lower()


def resolve_device(name: str | None = AUTO) -> torch.device:
    """The torch device `name` (`DEVICE_NAMES`; None is auto) stands for on this machine; one KinemaError line when
    this machine has no such device, naming what it has."""
    import torch

    name = check_device_name(AUTO if name is None else name)
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built for the CPU only" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise KinemaError(f"device {name}: {why}; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise KinemaError(f"device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KinemaError(f"device {name}: Apple's MPS is not available here; use --device cpu (or auto)")
    return device
