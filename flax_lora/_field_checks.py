"""One checker per kind of argument field: integers in a range, real numbers, bools, enums
(strings from a fixed tuple), regex patterns and mappings of patterns to values.

A checker is a `Check`: ``check(value, name) -> value`` normalised (plain Python ``int`` /
``float`` / ``bool`` / ``tuple``), or a ``TypeError`` (wrong type) / ``ValueError`` (bad value)
whose message starts with ``name`` and shows ``value``. `LoraConfig` is a table of them
(``_config.FIELD_CHECKS``); `lora.combine` checks ``rank`` and ``density`` with them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import SupportsFloat, TypeGuard, TypeVar

import jax
import numpy as np

from flax_lora import _regex

T = TypeVar("T")
Check = Callable[[object, str], T]
"""``check(value, name)``: ``value`` normalised, or an error starting with ``name``."""
Patterns = str | Sequence[str] | None
"""One regex, several, or ``None``."""


def _got(value: object, show: Callable[[object], str] = repr) -> str:
    return f"got {show(value)} ({type(value).__name__})"


def is_int(value: object) -> TypeGuard[int | np.integer]:
    """An ``int`` or a NumPy integer, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def integer(lo: int | None = None) -> Check[int]:
    """A checker of ints (NumPy integers too, not bools) of at least ``lo`` (if given).

    Examples:
      >>> integer(lo=1)(np.int64(3), "LoraConfig.rank")
      3
    """

    def check(value: object, name: str) -> int:
        if not is_int(value):
            raise TypeError(f"{name} must be an int; {_got(value)}.")
        if lo is not None and value < lo:
            raise ValueError(f"{name} must be at least {lo}; got {value}.")
        return int(value)

    return check


def finite_float(value: SupportsFloat, name: str, shown: str) -> float:
    """``float(value)``; ``ValueError`` ("``name`` must be finite; got ``shown``") for an inf or
    a NaN."""
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite; got {shown}.")
    return out


def real(ok: Callable[[float], bool] | None = None, expected: str = "") -> Check[float]:
    """A checker of finite real numbers (ints, floats, NumPy scalars, concrete 0-d arrays; not
    bools or strings) for which ``ok`` holds (``expected`` says which, e.g. ``"in [0, 1)"``).

    Examples:
      >>> real(lambda x: 0.0 <= x < 1.0, "in [0, 1)")(np.float32(0.5), "LoraConfig.dropout")
      0.5
    """

    def check(value: object, name: str) -> float:
        if (
            isinstance(value, np.ndarray | jax.Array)
            and not isinstance(value, jax.core.Tracer)
            and value.ndim == 0
            and np.issubdtype(value.dtype, np.number)
        ):
            value = value.item()
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number; {_got(value)}.")
        out = finite_float(value, name, repr(value))
        if ok is not None and not ok(out):
            raise ValueError(f"{name} must be {expected}; got {value!r}.")
        return out

    return check


def boolean(value: object, name: str) -> bool:
    """A ``bool`` (or NumPy bool) as a ``bool``."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool; {_got(value)}.")
    return bool(value)


def one_of(choices: tuple[str, ...], show: Callable[[object], str] = repr) -> Check[str]:
    """A checker of strings among ``choices`` (said ``'a' or 'b'`` for two): ``TypeError`` for a
    non-string, ``ValueError`` for another string; ``show`` writes the value in the message
    (e.g. a bounded repr for untrusted files)."""

    said = f"{choices[0]!r} or {choices[1]!r}" if len(choices) == 2 else f"one of {choices}"

    def check(value: object, name: str) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, {said}; {_got(value, show)}.")
        if value not in choices:
            raise ValueError(f"{name} must be {said}; got {show(value)}.")
        return value

    return check


def regex_tuple(value: object, owner: str) -> tuple[str, ...] | None:
    """``value`` (one regex or several) as a tuple of valid regexes; ``None`` stays ``None``.

    A valid regex is one `flax_lora._regex` matches in linear time (Python's syntax without
    backreferences, lookarounds, conditionals, atomic groups, possessive repeats).

    Raises a TypeError / ValueError that starts with ``owner`` (e.g. ``"LoraConfig.targets"``).
    """
    if value is None:
        return None
    if isinstance(value, str):
        out: tuple[object, ...] = (value,)
    elif isinstance(value, Iterable) and not isinstance(value, bytes | Mapping):
        out = tuple(value)
    else:
        raise TypeError(
            f"{owner} takes a regex string, a sequence of regex strings or None; {_got(value)}."
        )
    patterns = []
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{owner} takes regex strings; {_got(p)}.")
        _regex.compile(p, owner)
        patterns.append(p)
    return tuple(patterns)


def pattern_map(check: Check[T], what: str) -> Check[dict[str, T]]:
    """A checker of mappings regex -> value (e.g. ``LoraConfig.rank_pattern``): the keys valid
    regexes, each value checked by ``check`` under the name ``name[key]``; the order is kept."""

    def check_map(value: object, name: str) -> dict[str, T]:
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping of regex string -> {what}; {_got(value)}.")
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{name} keys must be regex strings; {_got(key)}.")
            regex_tuple(key, name)
        return {k: check(v, f"{name}[{k!r}]") for k, v in value.items()}

    return check_map
