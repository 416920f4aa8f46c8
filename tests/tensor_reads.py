"""Make every way kinema, safetensors, torch or diffusers has of reading tensor data fail, for tests of code that
promises to read only a safetensors header (names, shapes, dtypes, metadata)."""

import importlib
import pkgutil
import sys

import pytest
import safetensors
import safetensors.torch
import torch

from kinema.loaders import checkpoint_io


class TensorDataRead(AssertionError):
    """Tensor data was read where only a header should be."""


class _HeaderOnlySlice:
    def __init__(self, part, name: str, refuse):
        self._part, self._name, self._refuse = part, name, refuse

    def __getattr__(self, attribute):  # get_shape, get_dtype: header facts
        return getattr(self._part, attribute)

    def __getitem__(self, index):
        self._refuse(f"a slice of tensor {self._name}")


class _HeaderOnlyFile:
    """A `safe_open` handle that answers keys, metadata and slices' shapes and dtypes, and refuses tensor data."""

    def __init__(self, handle, path: str, refuse):
        self._handle, self._path, self._refuse = handle, path, refuse

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def __getattr__(self, attribute):
        return getattr(self._handle, attribute)

    def get_tensor(self, name):
        self._refuse(f"tensor {name} of {self._path}")

    def get_tensors(self, *args, **kwargs):
        self._refuse(f"every tensor of {self._path}")

    def get_slice(self, name):
        return _HeaderOnlySlice(self._handle.get_slice(name), name, self._refuse)


def forbid_tensor_data_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now until the test ends, reading tensor data raises `TensorDataRead`: safetensors' `safe_open(...)
    .get_tensor` / `.get_tensors` / slicing, `safetensors.torch.load_file` / `load`, `torch.load`, and kinema's
    whole-file readers (`read_checkpoint`, `read_state_dict`, `iter_safetensors`). Every attempt is also listed in
    the returned list, so a caller that swallows the exception is still caught."""
    attempts: list[str] = []

    def refuse(what: str):
        attempts.append(what)
        raise TensorDataRead(f"{what} was read; only the header should be")

    real_safe_open = safetensors.safe_open

    def header_only_open(path, *args, **kwargs):
        return _HeaderOnlyFile(real_safe_open(path, *args, **kwargs), str(path), refuse)

    def refusing(name: str):
        def reader(*args, **kwargs):
            refuse(f"{name}({', '.join(map(str, args))})")

        return reader

    # A module first imported while the guard holds would keep the refusing readers it imported after the test ends
    # (monkeypatch restores only what it rebound), so every kinema module that reads checkpoints is imported first.
    import kinema.loaders

    for found in pkgutil.walk_packages(kinema.loaders.__path__, "kinema.loaders."):
        importlib.import_module(found.name)
    replacements = {id(real_safe_open): header_only_open}
    for owner, names in ((safetensors.torch, ("load_file", "load")), (torch, ("load",)),
                         (checkpoint_io, ("read_checkpoint", "read_state_dict", "iter_safetensors",
                                          "_read_safetensors", "_read_pickle"))):
        for name in names:
            replacements[id(getattr(owner, name))] = refusing(f"{owner.__name__}.{name}")
    # Rebind every module-level name for these functions, however it was imported (`from x import y as z`), in
    # kinema and in the libraries it reads through.
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("kinema", "safetensors", "torch", "diffusers",
                                                         "transformers")):
            continue
        for attribute, value in list(vars(module).items()):
            replacement = replacements.get(id(value))
            if replacement is not None:
                monkeypatch.setattr(module, attribute, replacement)
    return attempts
