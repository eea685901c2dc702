"""The checks of the ``adapter_config.json`` fields `load_peft` uses, one per field in `CHECKS`.

A downloaded ``adapter_config.json`` is untrusted input: every field the loader reads is
checked for its JSON type and range before use (``r: "two"`` or ``use_rslora: "false"`` must
not reach an ``int()`` or a truth test). A check takes the field's JSON value and returns it
normalised (``null`` -> the field's default, a number -> ``float``), or raises ``TypeError``
(the wrong JSON type) or ``ValueError`` (out of range) with a message that continues the
field's name (`read_config` puts the file and the field in front). Fields not in the table
are ignored: PEFT adds fields over its versions.

Bounds: ``r`` (and each ``rank_pattern`` value) an int in ``[1, MAX_RANK]``; ``lora_alpha``
(and each ``alpha_pattern`` value) a finite number with ``|alpha| <= MAX_ALPHA`` (``1e6``: real
adapters use alphas up to a few thousand; beyond, ``alpha / r`` times the factors' product
overflows float16 / bfloat16 activations); ``lora_dropout`` in ``[0, 1)``; token ids ints
``>= 0`` (their range is checked against the embedding on load).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from flax_lora import _regex
from flax_lora._typing import BIASES

MAX_RANK = 2**31 - 1
MAX_ALPHA = 1e6
Check = Callable[[Any], Any]


def _show(v: Any) -> str:
    text = repr(v)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(v).__name__})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def rank(v: Any) -> int:
    """A rank: an int in ``[1, MAX_RANK]`` (a bool is not an int)."""
    if not _is_int(v):
        raise TypeError(f" must be an int (a rank); got {_show(v)}")
    if not 1 <= v <= MAX_RANK:
        raise ValueError(f" must be an int in [1, {MAX_RANK}]; got {v}")
    return v


def alpha(v: Any) -> float:
    """An alpha: a finite number with ``|alpha| <= MAX_ALPHA``."""
    if not _is_number(v):
        raise TypeError(f" must be a number; got {_show(v)}")
    x = float(v) if abs(v) <= MAX_ALPHA else math.inf  # float(10**400) would overflow
    if not abs(x) <= MAX_ALPHA:  # also NaN
        raise ValueError(f" must be a finite number with |alpha| <= {MAX_ALPHA:g}; got {v!r}")
    return x


def _dropout(v: Any) -> float:
    if v is None:
        return 0.0
    if not _is_number(v):
        raise TypeError(f" must be a number in [0, 1); got {_show(v)}")
    if not 0 <= v < 1:  # also NaN
        raise ValueError(f" must be in [0, 1); got {v!r}")
    return float(v)


def _flag(v: Any) -> bool:
    if v is None:
        return False
    if not isinstance(v, bool):
        raise TypeError(f" must be true or false; got {_show(v)}")
    return v


def compile_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a regular expression `flax_lora._regex` matches (``None`` when it
    is): invalid syntax, or a construct that can backtrack (lookarounds, backreferences)."""
    try:
        _regex.compile(pattern)
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {str(e)[:200]}".rstrip(".")
    return None


def _patterns(check: Check, what: str) -> Check:
    """A ``rank_pattern`` / ``alpha_pattern``: an object of regex keys (PEFT matches ``k`` as
    ``(.*\\.)?(k)$``) to values that pass ``check``."""

    def patterns(v: Any) -> dict[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise TypeError(f" must be an object {{regex: {what}}}; got {_show(v)}")
        peft_regex = lambda key: rf"(.*\.)?({key})$"
        how = lambda key: f" (PEFT matches it as (.*\\.)?({key})$)"
        return _by_regex(v, check, peft_regex, how)

    return patterns


def _by_regex(
    v: dict[str, Any],
    check: Check,
    regex: Callable[[str], str] = lambda key: key,
    how: Callable[[str], str] = lambda key: "",
) -> dict[str, Any]:
    """``{key: check(value)}`` of an object whose keys are regular expressions (``regex(key)``
    the one compiled, ``how(key)`` how PEFT matches it, for the error)."""
    out = {}
    for key, value in v.items():
        error = compile_error(regex(key))
        if error is not None:
            raise ValueError(
                f"[{key!r}]: the key is not a regular expression flax_lora matches{how(key)}: "
                f"{error}"
            )
        try:
            out[key] = check(value)
        except (TypeError, ValueError) as e:
            raise type(e)(f"[{key!r}]{e}") from None
    return out


def _names(v: Any) -> list[str] | None:
    """A list of module names (PEFT's ``modules_to_save``, ``target_parameters``)."""
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise TypeError(f" must be a list of strings; got {_show(v)}")
    return v


def _names_or_regex(v: Any) -> str | list[str] | None:
    """A regex string or a list of names (``target_modules``, ``layers_pattern``, ...)."""
    return v if isinstance(v, str) else _names(v)


def _string(v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise TypeError(f" must be a string; got {_show(v)}")
    return v


def _peft_type(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f" must be a string, 'LORA'; got {_show(v)}")
    if v.upper() != "LORA":
        raise ValueError(f" is {v!r}: only LORA adapters are read")
    return v


def _bias(v: Any) -> str:
    if v is None:
        return "none"
    if not isinstance(v, str):
        raise TypeError(f" must be one of {BIASES}; got {_show(v)}")
    if v not in BIASES:
        raise ValueError(f" must be one of {BIASES}; got {v!r}")
    return v


def _ids(v: Any) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(i) for i in v):
        raise TypeError(f" must be a list of token ids (ints); got {_show(v)}")
    if any(i < 0 for i in v):
        raise ValueError(f" must be token ids >= 0; got {v}")
    return v


def _token_indices(v: Any) -> list[int] | dict[str, list[int]] | None:
    """PEFT's ``trainable_token_indices``: ids, or ``{module regex: ids}``."""
    if v is None or isinstance(v, list):
        return None if v is None else _ids(v)
    if not isinstance(v, dict):
        raise TypeError(
            f" must be a list of token ids or an object {{module: ids}}; got {_show(v)}"
        )
    return _by_regex(v, _ids)


def _layers(v: Any) -> int | list[int] | None:
    """PEFT's ``layers_to_transform``: a layer index or a list of them."""
    if v is None or (_is_int(v) and v >= 0):
        return v
    if isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v):
        return v
    raise TypeError(f" must be a layer index (an int >= 0) or a list of them; got {_show(v)}")


def _init(v: Any) -> bool | str:
    """PEFT's ``init_lora_weights``: a bool or the name of an init."""
    if v is None:
        return True
    if not isinstance(v, bool | str):
        raise TypeError(f" must be true, false or the name of an init; got {_show(v)}")
    return v


CHECKS: dict[str, Check] = {
    "peft_type": _peft_type,
    "r": rank,
    "lora_alpha": alpha,
    "lora_dropout": _dropout,
    "use_rslora": _flag,
    "use_dora": _flag,
    "fan_in_fan_out": _flag,
    "rank_pattern": _patterns(rank, "rank"),
    "alpha_pattern": _patterns(alpha, "alpha"),
    "target_modules": _names_or_regex,
    "exclude_modules": _names_or_regex,
    "layers_pattern": _names_or_regex,
    "layers_to_transform": _layers,
    "modules_to_save": _names,
    "target_parameters": _names,
    "trainable_token_indices": _token_indices,
    "bias": _bias,
    "task_type": _string,
    "init_lora_weights": _init,
}
"""Field -> its check, for every field `load_peft` reads (or that decides what it reads)."""
REQUIRED = ("peft_type", "r", "lora_alpha")
