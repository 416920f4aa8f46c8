"""The motion-module contract and the registry that builds modules by name.

A motion module maps video hidden states `(B, C, F, H, W)` to the same shape and is an identity at
initialisation (its output projection is zeroed), so it can be dropped into a pretrained image model.
Built-in modules register themselves on import; users register their own with `@register_motion_module`.
`MotionModule` states what is required; hosts reach the optional parts only through the helpers below
(`motion_max_frames`, `motion_takes_text`, `initialize_motion_weights`, `set_motion_attention_chunk_size`), which
supply the default when a module leaves a part out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kinema.errors import KinemaError

# What `motion_max_frames` reports for a module that sets no limit: more frames than any video holds.
UNLIMITED_FRAMES = 2**31


@runtime_checkable
class MotionModule(Protocol):
    """What a motion module must provide; an `nn.Module` subclass registered with `@register_motion_module`.

    Required:
        `__init__(channels, **settings)`: built as `cls(channels, **settings)`, where `channels` is the width C at its
            place in the host and `settings` are the spec's other entries (`{"type": name, **settings}`).
        `forward(x)`: video hidden states `(B, C, F, H, W)` -> `(B, C, F, H, W)`. It should be an identity when freshly
            built (zero its output layer), so an inflated model starts out as its image model.

    Optional, each read through a helper of this module that gives the default when it is missing:
        `max_frames` (int attribute or property): most frames it can take in one pass, e.g. the length of a frame
            encoding. Default: unlimited (`motion_max_frames`).
        `takes_text` (bool attribute or property): true when `forward(x, text=...)` needs the prompt tokens of every
            frame `(B*F, L, D)`; a host that has them passes them. Default: false (`motion_takes_text`).
        `initialize_weights()`: put the weights back to their fresh, identity state. Default: nothing to do
            (`initialize_motion_weights`).
        `set_attention_chunk_size(chunk_size)`: attend over at most `chunk_size` sequences at a time (None: all at
            once), same result with less memory. Default: nothing to chunk (`set_motion_attention_chunk_size`).
    """

    def __init__(self, channels: int, **settings: Any) -> None: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


MOTION_MODULES: dict[str, type[nn.Module]] = {}


def register_motion_module(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a motion module (see `MotionModule`) buildable as `{"type": name, **settings}`."""

    if not isinstance(name, str) or not name:
        raise KinemaError(f"a motion module is registered under a name (text), got {name!r}")

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise KinemaError(f"register_motion_module decorates a torch.nn.Module class, got {cls!r}")
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
    import inspect

    cls = MOTION_MODULES[name]
    try:  # the settings against the signature alone: a TypeError inside the module's own __init__ is its bug
        inspect.signature(cls).bind(channels, **spec)
    except TypeError as err:
        raise KinemaError(f"bad settings for motion module {name!r}: {err}") from None
    return cls(channels, **spec)


def run_motion_module(module: nn.Module, video: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
    """`module(video)` (with `text=` for a module that takes the prompt tokens), `(B, C, F, H, W)` in and out; one
    KinemaError line naming the module when it returns anything else (a custom module that drops a frame or
    changes the channels would otherwise fail deep in the next layer)."""
    out = module(video, text=text) if motion_takes_text(module) else module(video)
    if not isinstance(out, torch.Tensor) or out.shape != video.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise KinemaError(f"the motion module {type(module).__name__} returned {got} for a {tuple(video.shape)} "
                          "input: a motion module returns a tensor of its input's shape, (B, C, F, H, W)")
    return out


def motion_max_frames(module: nn.Module) -> int:
    """The most frames `module` takes in one pass: its `max_frames`, or `UNLIMITED_FRAMES` when it sets none."""
    return getattr(module, "max_frames", UNLIMITED_FRAMES)


def motion_takes_text(module: nn.Module) -> bool:
    """Whether `module`'s forward needs the prompt tokens (`forward(x, text=...)`): its `takes_text`, else False."""
    return bool(getattr(module, "takes_text", False))


def initialize_motion_weights(module: nn.Module) -> None:
    """Reset `module` to its fresh (identity) weights with its `initialize_weights()`; nothing when it has none."""
    initialize = getattr(module, "initialize_weights", None)
    if initialize is not None:
        initialize()


def set_motion_attention_chunk_size(module: nn.Module, chunk_size: int | None) -> None:
    """Chunk `module`'s attention into at most `chunk_size` sequences (None: unchunked) with its
    `set_attention_chunk_size`; a module without one has nothing to chunk and is left as it is."""
    set_chunk_size = getattr(module, "set_attention_chunk_size", None)
    if set_chunk_size is not None:
        set_chunk_size(chunk_size)
