"""Checks of the numbers in a model's config.json, before a model class is built from them: a string, a float or a
zero where a width or count goes failed later as a bare TypeError or ZeroDivisionError inside torch, and an infinite
scaling factor ran into a NaN video."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from kinema.errors import KinemaError

Rule = tuple[Callable[[Any], bool], str]  # (valid, what a valid value is, for the message)


def is_positive_int(value: Any) -> bool:
    """A whole number above 0 (a bool, which Python counts as an int, is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_positive_number(value: Any) -> bool:
    """A finite number above 0."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def is_fraction(value: Any) -> bool:
    """A finite number from 0 up to (not including) 1."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


def is_positive_ints(value: Any) -> bool:
    """A non-empty list (or tuple) of whole numbers above 0."""
    return isinstance(value, list | tuple) and bool(value) and all(map(is_positive_int, value))


POSITIVE_INT: Rule = (is_positive_int, "a positive whole number")
POSITIVE_NUMBER: Rule = (is_positive_number, "a number above 0")
FRACTION: Rule = (is_fraction, "a number from 0 to below 1")
POSITIVE_INTS: Rule = (is_positive_ints, "a list of positive whole numbers")
BOOLEAN: Rule = (lambda value: isinstance(value, bool), "true or false")


def check_config_values(config: Mapping[str, Any], rules: Mapping[str, Rule], where: str, fix: str) -> None:
    """One KinemaError line for the first value of `config` that breaks its rule (names without a rule, and names
    the config leaves out, pass), naming `where` the config is and `fix`."""
    for name, (valid, wanted) in rules.items():
        if name in config and not valid(config[name]):
            raise KinemaError(f"{where}'s {name} is {json.dumps(config[name])}, not {wanted}: {fix}")
