"""Strict comparison of a checkpoint's tensors with a model's: one rule and one message format for every loader.

kinema never loads with `strict=False`: a missing, extra or mis-shaped tensor stops the load, and the error names
the first few of each so the user can tell a wrong file from a wrong config.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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


def problems_phrase(problems: Mapping[str, Sequence[str]]) -> str | None:
    """`{"missing": [a.weight], ...}` as `1 missing (e.g. a.weight); ...`, naming the first SHOW of each kind;
    None when there are none."""
    return "; ".join(f"{len(keys)} {kind} (e.g. {', '.join(keys[:SHOW])})" for kind, keys in problems.items()
                     if keys) or None


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


def check_fits(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], context: str, *,
    ignore: Iterable[str] = (), advice: str = "",
) -> None:
    """Raise one KinemaError, `"{context}: 1 missing (e.g. ...); ... {advice}"`, unless `found` has exactly the names
    and shapes of `expected` (both `{name: shape}`; names in `ignore` may be extra). Checked before anything is
    copied, so a wrong file changes nothing."""
    found_phrase = key_mismatch(expected, found, ignore)
    if found_phrase:
        raise KinemaError(f"{context}: {found_phrase}" + (f". {advice}" if advice else ""))


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


class StrictFromPretrained:
    """Mixin for diffusers `ModelMixin` models: `from_pretrained` refuses a folder whose weights do not match the
    model its config builds, where diffusers would only log the missing and unused keys and carry on."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """diffusers' `from_pretrained`, then a KinemaError naming any missing, unexpected or mismatched key."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        found = problems_phrase({kind: [k if isinstance(k, str) else k[0] for k in info.get(field) or []]
                                 for kind, field in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                                                     ("mismatched", "mismatched_keys"))})
        if found:
            raise KinemaError(f"{pretrained_model_name_or_path}: weights do not fit the {cls.__name__} its "
                              f"config.json describes: {found}. Re-save the model, or check that config.json and "
                              "the weights file belong together")
        return (model, info) if want_info else model
