"""The motion-module contract and the registry that builds modules by name.

A motion module maps video hidden states `(B, C, F, H, W)` to the same shape and is an identity at
initialisation (its output projection is zeroed), so it can be dropped into a pretrained image model.
Built-in modules register themselves on import; users register their own with `@register_motion_module`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kinema.errors import KinemaError

MOTION_MODULES: dict[str, type[nn.Module]] = {}


def register_motion_module(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a motion module buildable as `{"type": name, ...}`.

    The class is constructed as `cls(channels, **kwargs)` and its forward maps `(B, C, F, H, W)` to
    `(B, C, F, H, W)`. It may define `max_frames` (frames it can attend over) and `initialize_weights()`.
    """

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MOTION_MODULES and MOTION_MODULES[name] is not cls:
            raise KinemaError(f"a motion module named {name!r} is already registered ({MOTION_MODULES[name]!r}); "
                              "pick another name")
        MOTION_MODULES[name] = cls
        return cls

    return decorate


def build_motion_module(spec: str | dict[str, Any], channels: int) -> nn.Module:
    """Build a registered motion module for `channels` input channels from `"name"` or `{"type": name, **kwargs}`."""
    spec = {"type": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("type", None)
    if name not in MOTION_MODULES:
        raise KinemaError(f"unknown motion module type {name!r}; registered: {sorted(MOTION_MODULES)}. "
                          "Register your own with kinema.models.motion.register_motion_module")
    try:
        return MOTION_MODULES[name](channels, **spec)
    except TypeError as err:
        raise KinemaError(f"bad settings for motion module {name!r}: {err}") from None
