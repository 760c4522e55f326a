"""Scalar arguments of the cache and the policies: Python and NumPy numbers are accepted, anything
else (a string, a bool, a tensor) is a TypeError that names the argument, before range checks
would report a misleading "out of range"."""
from __future__ import annotations

import numbers


def as_float(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def as_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)
