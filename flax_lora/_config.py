"""`LoraConfig`: which kernels to adapt, with what rank, scale and initialisation."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora import _regex
from flax_lora._typing import BIASES, INITS, Bias, Init, QuantFormat

Patterns = str | Sequence[str] | None


def regex_tuple(value: Patterns, owner: str) -> tuple[str, ...] | None:
    """``value`` (one regex or several) as a tuple of valid regexes; ``None`` stays ``None``.

    A valid regex is one `flax_lora._regex` matches in linear time (Python's syntax without
    backreferences, lookarounds, conditionals, atomic groups, possessive repeats).

    Raises a TypeError / ValueError that starts with ``owner`` (e.g. ``"LoraConfig.targets"``).
    """
    if value is None:
        return None
    if isinstance(value, str):
        out: tuple[Any, ...] = (value,)
    elif isinstance(value, Iterable) and not isinstance(value, bytes | Mapping):
        out = tuple(value)
    else:
        raise TypeError(
            f"{owner} takes a regex string, a sequence of regex strings or None; got {value!r} "
            f"({type(value).__name__})."
        )
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{owner} takes regex strings; got {p!r} ({type(p).__name__}).")
        _regex.compile(p, owner)
    return out


def _as_patterns(value: Patterns, name: str) -> tuple[str, ...] | None:
    return regex_tuple(value, f"LoraConfig.{name}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how, with PEFT's meanings and defaults where PEFT has the same field.

    Every field is checked when the config is made (a ``TypeError`` / ``ValueError`` naming the
    field). A config is hashable, so it can be a ``jax.jit`` static argument or a dict key; two
    configs are equal when all fields are, the patterns' order included (the first match wins).

    Patterns are Python regexes, matched in time linear in the path (no backtracking, so a
    pattern like ``(.+)+Z`` cannot stall): literals, classes (``[...]``, ``\\d \\w \\s``, ``.``),
    ``|``, groups, greedy and lazy repeats (``* + ? {m,n}``), anchors (``^ $ \\A \\Z \\b \\B``)
    and inline flags work as in ``re``. Refused with a ``ValueError`` naming the field:
    backreferences, lookahead / lookbehind, conditionals, atomic groups, possessive repeats,
    and patterns of over 10,000 NFA nodes (e.g. a huge ``{m,n}`` count).

    Example:
      >>> import flax_lora as lora
      >>> config = lora.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")

    Attributes:
      rank: the rank ``r`` of every adapter (PEFT ``r``); at least 1.
      alpha: the scale numerator: ``scale = alpha / rank`` (PEFT ``lora_alpha``).
      targets: which kernels to adapt. ``None`` means every kernel; a string is a regex that must
        ``re.fullmatch`` the path; a sequence means any of its regexes (PEFT ``target_modules``,
        on paths rather than module names).
      exclude: regexes (``re.fullmatch``) of paths never adapted (PEFT ``exclude_modules``).
      rank_pattern: regex (``re.search`` on the path) to rank; the first match wins.
      alpha_pattern: regex (``re.search`` on the path) to alpha; the first match wins.
      init: ``"lora"`` (PEFT's default: ``a`` kaiming-uniform, ``b`` zeros; Embed: ``a`` zeros,
        ``b`` standard normal), ``"gaussian"`` (``a`` normal with std ``1/r``, ``b`` zeros),
        ``"pissa"`` / ``"olora"`` (from the SVD / QR of ``W0``; these also change the base),
        ``"random"`` (both factors nonzero: not a no-op, for tests), ``"loftq"`` (LoftQ, as PEFT:
        the base is quantized and the factors fit the quantization error; `lora.init` returns
        ``(adapters, qparams)``).
      dropout: dropout rate on the LoRA branch's input (PEFT ``lora_dropout``), applied by the
        factored execution when a call passes ``lora_rng``.
      rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank`` (PEFT ``use_rslora``).
      dtype: the dtype of the adapter factors (a floating dtype).
      layers: layer indices to adapt (PEFT ``layers_to_transform``); ``None`` means all. A path's
        layer index is the first number in it (``h3``, ``layers/3``, ``layer_3``); paths without
        a number are not adapted. For a kernel stacked by ``nn.scan`` / ``nnx.scan`` (a leading
        layer axis), the layer index is the position on that axis instead: the adapter covers
        the whole stack, with zero (and frozen) factors on the layers not picked. Indices are
        >= 0; `lora.init` refuses an index that picks no layer of any selected kernel.
      loftq_iter: ``init="loftq"``: alternations of quantize / SVD (PEFT ``loftq_iter``, default 1).
      loftq_dtype: ``init="loftq"``: the base's format, ``"nf4"`` (PEFT ``loftq_bits=4``; blocks
        of 64) or ``"int8"`` (``loftq_bits=8``; per channel), as `lora.quantize`.
      dora: DoRA (PEFT ``use_dora``; Liu et al. 2024): each adapter also holds a magnitude
        ``m`` (one entry per output unit, initialised to ``W0``'s norm over the input axes) and
        the kernel becomes ``m * V / ||V||`` with ``V = W0 + scale * a @ b``, the norm detached.
      layers_pattern: with ``layers``, where a path's layer index is (PEFT ``layers_pattern``):
        a regex (or several) that must ``re.fullmatch`` one ``/``-separated component of the
        path; the index is the number in that component (``h3``, ``block_3``) or, if it has
        none, the next component (``layers/3``). Paths with no such component are not adapted.
        ``None``: the first number in the path. For paths like ``stage_2/block_3``.
      modules_to_save: module paths (regexes that must ``re.fullmatch`` a module's path, the
        path of its leaves without the leaf name, e.g. ``"params/classifier"``) whose floating
        leaves (those of submodules included) are trained whole (PEFT ``modules_to_save``):
        `lora.init` puts a trainable copy of each (`TrainedCopy`) in the adapters, and `wrap` /
        `merge` use it in place of the base leaf. Kernels of these modules get no LoRA factors.
        ``None``: none.
      trainable_token_indices: rows (token ids) of Embed tables to train (PEFT
        ``trainable_token_indices``): a list of ids for every Embed table (2-D leaves named
        ``embedding``), or ``{regex: [ids]}``, the regex ``re.fullmatch``-ing a table's path or
        its module's path. `lora.init` adds a `TokenDelta` (zeros) per table: the table used is
        ``W0.at[ids].add(delta)``, for lookups and a tied ``attend`` alike. ``None``: none.
      bias: ``"none"`` (default), ``"all"`` (every floating leaf named ``bias`` is trained, as a
        `TrainedCopy`) or ``"lora_only"`` (the biases of the modules whose kernels get LoRA
        factors) (PEFT ``bias``).
    """

    rank: int = 8
    alpha: float = 8.0
    targets: Patterns = None
    exclude: Patterns = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    init: Init = "lora"
    dropout: float = 0.0
    rslora: bool = False
    dtype: Any = jnp.float32
    layers: Sequence[int] | int | None = None
    loftq_iter: int = 1
    loftq_dtype: QuantFormat = "nf4"
    dora: bool = False
    layers_pattern: Patterns = None
    modules_to_save: Patterns = None
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    bias: Bias = "none"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("rank", _check_rank(self.rank, "LoraConfig.rank"))
        set_("alpha", _check_real(self.alpha, "LoraConfig.alpha"))
        set_("targets", _as_patterns(self.targets, "targets"))
        set_("exclude", _as_patterns(self.exclude, "exclude") or ())
        ranks = _check_patterns(self.rank_pattern, "rank_pattern", "rank")
        set_(
            "rank_pattern", {k: _check_rank(v, f"LoraConfig.rank_pattern[{k!r}]") for k, v in ranks}
        )
        alphas = _check_patterns(self.alpha_pattern, "alpha_pattern", "alpha")
        set_(
            "alpha_pattern",
            {k: _check_real(v, f"LoraConfig.alpha_pattern[{k!r}]") for k, v in alphas},
        )
        if not isinstance(self.init, str):
            raise TypeError(
                f"LoraConfig.init must be a string, one of {INITS}; got {self.init!r} "
                f"({type(self.init).__name__})."
            )
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}; got {self.init!r}.")
        dropout = _check_real(self.dropout, "LoraConfig.dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1); got {self.dropout!r}.")
        set_("dropout", dropout)
        set_("rslora", _check_bool(self.rslora, "LoraConfig.rslora"))
        set_("dora", _check_bool(self.dora, "LoraConfig.dora"))
        if self.dtype is None:
            raise TypeError("LoraConfig.dtype must be a floating dtype; got None.")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError as e:
            raise TypeError(
                f"LoraConfig.dtype must be a floating dtype; got {self.dtype!r}."
            ) from e
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"LoraConfig.dtype must be a floating dtype; got {dtype}.")
        set_("layers", _check_layers(self.layers))
        set_("layers_pattern", _as_patterns(self.layers_pattern, "layers_pattern"))
        set_("modules_to_save", _as_patterns(self.modules_to_save, "modules_to_save"))
        set_("trainable_token_indices", _check_tokens(self.trainable_token_indices))
        if not isinstance(self.bias, str) or self.bias not in BIASES:
            raise ValueError(f"LoraConfig.bias must be one of {BIASES}; got {self.bias!r}.")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int | np.integer):
            raise TypeError(
                f"LoraConfig.loftq_iter must be an int; got {self.loftq_iter!r} "
                f"({type(self.loftq_iter).__name__})."
            )
        if self.loftq_iter < 1:
            raise ValueError(f"LoraConfig.loftq_iter must be at least 1; got {self.loftq_iter}.")
        set_("loftq_iter", int(self.loftq_iter))
        if not isinstance(self.loftq_dtype, str):
            raise TypeError(
                f"LoraConfig.loftq_dtype must be the string 'nf4' or 'int8'; got "
                f"{self.loftq_dtype!r} ({type(self.loftq_dtype).__name__})."
            )
        if self.loftq_dtype not in ("nf4", "int8"):
            raise ValueError(
                f"LoraConfig.loftq_dtype must be 'nf4' or 'int8'; got {self.loftq_dtype!r}."
            )

    # -- equality and hashing --------------------------------------------------------------
    def _key(self) -> tuple[Any, ...]:
        """The fields as a hashable tuple: the pattern dicts as their items *in order* (the
        first matching pattern wins, so order is part of the meaning), the dtype normalised."""
        norm = lambda v: tuple(v.items()) if isinstance(v, Mapping) else v
        return tuple(
            np.dtype(self.dtype) if f.name == "dtype" else norm(getattr(self, f.name))
            for f in dataclasses.fields(self)
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    # -- per-path resolution ---------------------------------------------------------------
    def matches(self, path: str, layer_in_path: bool = True) -> bool:
        """Whether ``path`` is selected by ``targets``, ``exclude`` and ``layers``.

        ``layer_in_path=False`` (a kernel stacked by ``nn.scan``: its layers are the entries of
        its leading axis, picked by `lora.init`) skips the ``layers`` check on the path.
        """
        full = _regex.fullmatch
        targets = self.targets
        if targets is not None and not any(full(p, path, "LoraConfig.targets") for p in targets):
            return False
        if any(full(p, path, "LoraConfig.exclude") for p in self.exclude):
            return False
        if self.layers is not None and layer_in_path:
            index = layer_index(path, self.layers_pattern)
            if index is None or index not in self.layers:
                return False
        return True

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at ``path``: the first matching ``rank_pattern``, or ``rank``."""
        for pattern, r in self.rank_pattern.items():
            if _regex.search(pattern, path, "LoraConfig.rank_pattern"):
                return int(r)
        return int(self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha at ``path``: the first matching ``alpha_pattern``, or ``alpha``."""
        for pattern, a in self.alpha_pattern.items():
            if _regex.search(pattern, path, "LoraConfig.alpha_pattern"):
                return float(a)
        return float(self.alpha)

    def scale_for(self, path: str) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.rslora else r)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (dtype by name)."""
        d = dataclasses.asdict(self)
        d["dtype"] = np.dtype(self.dtype).name
        for k in ("targets", "exclude", "layers", "layers_pattern", "modules_to_save"):
            d[k] = list(d[k]) if d[k] is not None else None
        tokens = d["trainable_token_indices"]
        if isinstance(tokens, Mapping):
            d["trainable_token_indices"] = {k: list(v) for k, v in tokens.items()}
        elif tokens is not None:
            d["trainable_token_indices"] = list(tokens)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        """The inverse of :meth:`to_dict`."""
        d = dict(d)
        d["dtype"] = jnp.dtype(d.get("dtype", "float32"))
        return cls(**d)


def layer_index(path: str, patterns: Sequence[str] | None = None) -> int | None:
    """A path's layer index, or ``None``: without ``patterns`` the first number in the path
    (``h3/attn`` -> 3, ``layers/2/mlp`` -> 2); with them, the number in the first component that
    fully matches one of them, or in the component after it (``LoraConfig.layers_pattern``)."""
    if patterns is None:
        m = re.search(r"(\d+)", path)
        return int(m.group(1)) if m else None
    parts = path.split("/")
    for i, part in enumerate(parts):
        if any(_regex.fullmatch(p, part, "LoraConfig.layers_pattern") for p in patterns):
            for candidate in (part, parts[i + 1] if i + 1 < len(parts) else ""):
                m = re.search(r"(\d+)", candidate)
                if m:
                    return int(m.group(1))
    return None


def _check_rank(rank: Any, name: str) -> int:
    if isinstance(rank, bool | np.bool_) or not isinstance(rank, int | np.integer):
        raise TypeError(f"{name} must be an int; got {rank!r} ({type(rank).__name__}).")
    if rank < 1:
        raise ValueError(f"{name} must be at least 1; got {rank}.")
    return int(rank)


def _check_real(value: Any, name: str) -> float:
    """``value`` (an int, a float, a NumPy scalar or a concrete 0-d array) as a finite float."""
    concrete = isinstance(value, np.ndarray | jax.Array) and not isinstance(value, jax.core.Tracer)
    if concrete and value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        value = value.item()
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__}).")
    return finite_float(value, name, repr(value))


def finite_float(value: Any, name: str, shown: str) -> float:
    """``float(value)``; ``ValueError`` ("``name`` must be finite; got ``shown``") for an inf or
    a NaN."""
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite; got {shown}.")
    return out


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool; got {value!r} ({type(value).__name__}).")
    return bool(value)


def _check_patterns(value: Any, field: str, what: str) -> list[tuple[str, Any]]:
    """The items of a ``rank_pattern`` / ``alpha_pattern`` mapping, keys checked as regexes."""
    if not isinstance(value, Mapping):
        raise TypeError(
            f"LoraConfig.{field} must be a mapping of regex string -> {what}; got {value!r} "
            f"({type(value).__name__})."
        )
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(
                f"LoraConfig.{field} keys must be regex strings; got {pattern!r} "
                f"({type(pattern).__name__})."
            )
        _as_patterns(pattern, field)
    return list(value.items())


def _check_layers(layers: Any) -> tuple[int, ...] | None:
    """``LoraConfig.layers`` as a tuple of layer indices (``None`` stays ``None``)."""
    if layers is None:
        return None
    if isinstance(layers, np.ndarray) and layers.ndim == 0:
        layers = layers.item()
    if isinstance(layers, int | np.integer) and not isinstance(layers, bool | np.bool_):
        items: tuple[Any, ...] = (layers,)
    elif isinstance(layers, Iterable) and not isinstance(layers, str | bytes | Mapping):
        items = tuple(layers)
    else:
        raise TypeError(
            "LoraConfig.layers must be an int, a sequence of ints or None; got "
            f"{layers!r} ({type(layers).__name__})."
        )
    for i in items:
        if isinstance(i, bool | np.bool_) or not isinstance(i, int | np.integer):
            raise TypeError(
                f"LoraConfig.layers takes int layer indices; got {i!r} ({type(i).__name__}) "
                f"in {layers!r}."
            )
        if i < 0:
            raise ValueError(
                f"LoraConfig.layers takes layer indices >= 0 (the first number in a path, or the "
                f"position on a stacked layer axis); got {int(i)} in {layers!r}."
            )
    return tuple(int(i) for i in items)


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    """A sequence of distinct token ids >= 0 as a tuple of ints."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of int token ids; got {value!r}.")
    ids = tuple(value)
    for i in ids:
        if isinstance(i, bool | np.bool_) or not isinstance(i, int | np.integer):
            raise TypeError(f"{name} takes int token ids; got {i!r} ({type(i).__name__}).")
        if i < 0:
            raise ValueError(f"{name} takes token ids >= 0; got {int(i)}.")
    if not ids:
        raise ValueError(f"{name} is empty; give at least one token id.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} repeats token ids: {list(ids)}.")
    return tuple(int(i) for i in ids)


def _check_tokens(value: Any) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """``LoraConfig.trainable_token_indices`` as a tuple of ids or ``{regex: ids}``."""
    name = "LoraConfig.trainable_token_indices"
    if value is None:
        return None
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{name} keys must be regex strings; got {k!r}.")
            _as_patterns(k, "trainable_token_indices")
            out[k] = _token_ids(v, f"{name}[{k!r}]")
        if not out:
            raise ValueError(f"{name} is an empty mapping; use None for no trainable tokens.")
        return out
    return _token_ids(value, name)
