"""Strict comparison of a checkpoint's tensors with a model's: one rule and one message format for every loader.

kinema never loads with `strict=False`: a missing, extra or mis-shaped tensor stops the load, and the error names
the first few of each so the user can tell a wrong file from a wrong config.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kinema.errors import KinemaError

SHOW = 3  # keys named per kind of problem


def key_problems(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], ignore: Iterable[str] = ()
) -> dict[str, list[str]]:
    """How `found` differs from `expected` (both `{name: shape}`), by kind: `{"missing": [names], "unexpected":
    [names], "mismatched": ["name: file (3, 4) vs model (4, 4)"]}` in `expected` / `found` order, holding only the
    kinds that occur (empty when they agree). Names in `ignore` may be in `found` without being unexpected."""
    ignore = set(ignore)
    problems = {
        "missing": [k for k in expected if k not in found],
        "unexpected": [k for k in found if k not in expected and k not in ignore],
        "mismatched": [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
                       for k in expected if k in found and tuple(found[k]) != tuple(expected[k])],
    }
    return {kind: keys for kind, keys in problems.items() if keys}


def problems_phrase(problems: Mapping[str, Sequence[str]], *, quoted_lists: bool = False) -> str | None:
    """`{"missing": [a.weight], ...}` as `1 missing (e.g. a.weight); ...`, naming the first SHOW of each kind;
    None when there are none. `quoted_lists` gives the older form `1 missing keys (e.g. ['a.weight'])`, which
    Stable Diffusion folder loads have always printed (and scripts may match)."""
    if quoted_lists:
        parts = [f"{len(keys)} {kind} keys (e.g. {list(keys[:SHOW])})" for kind, keys in problems.items() if keys]
    else:
        parts = [f"{len(keys)} {kind} (e.g. {', '.join(keys[:SHOW])})" for kind, keys in problems.items() if keys]
    return "; ".join(parts) or None


def key_mismatch(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], ignore: Iterable[str] = ()
) -> str | None:
    """How the tensor names and shapes in `found` differ from `expected` (both `{name: shape}`), as one phrase
    such as `1 missing (e.g. a.weight); 2 mismatched (e.g. b.weight: file (3, 4) vs model (4, 4))`; None when
    they agree. Names in `ignore` may be present in `found` without counting as unexpected."""
    return problems_phrase(key_problems(expected, found, ignore))


def shapes(tensors: Mapping) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of a state dict."""
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def _refuse(context: str, problems: Mapping[str, Sequence[str]], advice: str, quoted_lists: bool = False) -> None:
    """The one refusal of every strict check: `"{context}: {problems}. {advice}"`, when there are problems."""
    phrase = problems_phrase(problems, quoted_lists=quoted_lists)
    if phrase:
        raise KinemaError(f"{context}: {phrase}" + (f". {advice}" if advice else ""))


def check_fits(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], context: str, *,
    ignore: Iterable[str] = (), advice: str = "",
) -> None:
    """Raise one KinemaError, `"{context}: 1 missing (e.g. ...); ... {advice}"`, unless `found` has exactly the names
    and shapes of `expected` (both `{name: shape}`; names in `ignore` may be extra). Checked before anything is
    copied, so a wrong file changes nothing."""
    _refuse(context, key_problems(expected, found, ignore), advice)


def loading_info_problems(info: Mapping[str, Any]) -> dict[str, list[str]]:
    """The `output_loading_info=True` report of a diffusers or transformers `from_pretrained` as `key_problems`'
    `{"missing": [names], "unexpected": [...], "mismatched": [...]}` (only the kinds that occur)."""
    problems = {kind: [key if isinstance(key, str) else key[0] for key in info.get(f"{kind}_keys") or []]
                for kind in ("missing", "unexpected", "mismatched")}  # mismatched keys come as (name, shapes...)
    return {kind: keys for kind, keys in problems.items() if keys}


def check_loading_info(info: Mapping[str, Any], context: str, *, advice: str = "", quoted_lists: bool = False) -> None:
    """`check_fits` for a model a library has already loaded: one KinemaError in the same form when its loading
    report (`output_loading_info=True`) names any missing, unexpected or mismatched key. `quoted_lists`: see
    `problems_phrase`."""
    _refuse(context, loading_info_problems(info), advice, quoted_lists)


def load_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], context: str, *, ignore: Iterable[str] = (),
    advice: str = "", assign: bool = False,
) -> None:
    """Load `state_dict` into `model` only if every tensor is present, none is extra (bar `ignore`) and every shape
    is equal; otherwise raise `check_fits`' one-line KinemaError and leave the model as it was. `assign=True`
    takes the tensors themselves (e.g. into a model built on the meta device)."""
    ignore = set(ignore)
    check_fits(shapes(model.state_dict()), shapes(state_dict), context, ignore=ignore, advice=advice)
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in ignore}, strict=True, assign=assign)


def empty_model(cls: Any, config: Mapping[str, Any]) -> Any:
    """The diffusers model `cls.from_config(config)` with its parameters on the meta device: names and shapes
    without memory, for `assign_checked` to fill."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(config)


def assign_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, *,
                   dtype: torch.dtype | None = None, advice: str = "",
                   extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load a file's tensors into `model` built on the meta device: every value finite (one KinemaError line naming
    `what` otherwise), each tensor a contiguous copy of its own in `dtype` (default float32; copies, not views of the
    file's tensors, as a load into a built model would make them), then `load_strict` with `assign`. `extra`: tensors
    the model makes itself (a table of positions), loaded as they are."""
    from kinema.loaders.checkpoint_io import check_weight_values

    check_weight_values(state_dict, what)
    fresh = {name: tensor.to(dtype or torch.float32).clone(memory_format=torch.contiguous_format)
             for name, tensor in state_dict.items()}
    load_strict(model, {**fresh, **(extra or {})}, f"its weights do not fit {what}", advice=advice, assign=True)


class _DiffusersModelClass(Protocol):
    """What `StrictFromPretrained` needs of the class it is mixed into: diffusers' `ConfigMixin.from_config` and,
    after the mixin in the method order, `ModelMixin.from_pretrained`."""

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> Any: ...

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any: ...


class StrictFromPretrained:
    """Mixin for diffusers `ModelMixin` models: `from_pretrained` loads a folder `save_pretrained` wrote (config.json
    and its weights) and refuses one whose weights do not match the model its config builds, where diffusers would
    only log the missing and unused keys and carry on (and stops at a mis-shaped tensor with its own error). Put it
    before `ModelMixin` and `ConfigMixin` in the model's bases."""

    @classmethod
    def from_pretrained(
        cls: type[_DiffusersModelClass], pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> Any:
        """diffusers' `from_pretrained` of a local folder, once every weight name and shape is checked against the
        model config.json builds (`check_fits`); a KinemaError naming any missing, unexpected or mismatched key."""
        from kinema.fileio import read_json_object
        from kinema.loaders.checkpoint_io import find_weights

        folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        if not folder.is_dir():
            raise KinemaError(f"no such model folder: {folder}; {cls.__name__}.from_pretrained loads a folder that "
                              "save_pretrained wrote (config.json and its weights)")
        context = f"{pretrained_model_name_or_path}: weights do not fit the {cls.__name__} its config.json describes"
        advice = "Re-save the model, or check that config.json and the weights file belong together"
        config = read_json_object(folder / "config.json", f"the {cls.__name__}'s config")
        expected = shapes(empty_model(cls, config).state_dict())
        check_fits(expected, find_weights(folder, variants=(kwargs.get("variant"),)).shapes(), context, advice=advice)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        check_loading_info(info, context, advice=advice)  # diffusers' own view, in case it renames keys
        return (model, info) if want_info else model
