"""Package exports imported on first use (PEP 562): importing a package, or one light module inside it, does not
import torch, diffusers and every model with it (`kinema --help` and the format registry stay fast).

A package states once which module defines each public name (".name" is a module of the package itself):

    __all__, __getattr__, __dir__ = lazy_exports(__name__, {".video_unet": ("VideoUNet",), ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def export(package: str, exports: Mapping[str, str], name: str) -> Any:
    """The public `name` of `package`, imported from `exports[name]` now and kept in the package, so later lookups
    are plain attribute reads; AttributeError for a name the package does not export."""
    if name not in exports:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(exports[name]), name)
    setattr(sys.modules[package], name, value)
    return value


def exported_names(package: str, exports: Mapping[str, str]) -> list[str]:
    """What `dir(package)` shows: what it holds already and every name it exports."""
    return sorted({*vars(sys.modules[package]), *exports})


def lazy_exports(package: str, names_by_module: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for `package`, whose public names `names_by_module[m]` are defined in
    module `m` (".m" for `package.m`) and imported from there on first use."""
    exports = {name: f"{package}{module}" if module.startswith(".") else module
               for module, names in names_by_module.items() for name in names}

    def __getattr__(name: str) -> Any:
        return export(package, exports, name)

    def __dir__() -> list[str]:
        return exported_names(package, exports)

    return sorted(exports), __getattr__, __dir__
