"""`LoraConfig`: which kernels to adapt, with what rank, scale and initialisation."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from flax_lora import _regex
from flax_lora._field_checks import (
    Check,
    Patterns,
    boolean,
    integer,
    is_int,
    one_of,
    pattern_map,
    real,
    regex_tuple,
)
from flax_lora._paths import leaf_name, module_path
from flax_lora._typing import BIASES, INITS, Bias, Init, QuantFormat

ALL_LINEAR = "all-linear"
"""``LoraConfig(targets="all-linear")``: PEFT's shorthand, every kernel contracted as a linear
map except the model's output head (`flax_lora._init._select`)."""

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def is_plain_name(pattern: str) -> bool:
    """Whether a ``targets`` / ``exclude`` entry is a plain name: letters, digits, ``_`` and
    ``-`` only (one path component: no regex metacharacter, no ``/``), matched as PEFT matches
    ``target_modules`` names (`name_matches`) rather than as a regex that must
    ``re.fullmatch`` the whole path (a plain name could only fullmatch a top-level leaf)."""
    return _PLAIN_NAME.fullmatch(pattern) is not None


def name_matches(name: str, path: str, kernel: bool = True) -> bool:
    """PEFT's rule for a module name (``key == name or key.endswith("." + name)``) on paths: the
    plain name ``name`` is the leaf's name, or, for a ``kernel`` leaf (PEFT names the module,
    whose kernel is adapted), the name of the module holding it: ``"q_proj"`` and ``"kernel"``
    select ``params/h0/attn/q_proj/kernel``, ``"gating_einsum"`` selects
    ``params/layer_0/mlp/gating_einsum``; ``"proj"`` and ``"attn"`` select neither."""
    return leaf_name(path) == name or (kernel and leaf_name(module_path(path)) == name)


def target_matches(pattern: str, path: str, owner: str, kernel: bool = True) -> bool:
    """One ``targets`` / ``exclude`` entry against a path: a plain name by `name_matches` (a
    module name selects only a leaf that is a ``kernel`` of its module), any other regex by
    ``re.fullmatch`` on the whole path (``owner`` names the field in errors)."""
    if is_plain_name(pattern):
        return name_matches(pattern, path, kernel)
    return _regex.fullmatch(pattern, path, owner)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how, with PEFT's meanings and defaults where PEFT has the same field.

    A frozen dataclass: every field is checked when the config is made (a ``TypeError`` /
    ``ValueError`` naming the field), and a config is hashable (a ``jax.jit`` static argument),
    equal to another when all fields are, the patterns' order included (the first match wins).
    Patterns are Python regexes matched in time linear in the path; backreferences,
    lookarounds, conditionals, atomic groups and possessive repeats are refused. Paths are key
    paths joined with ``/`` (``params/h0/attn/query/kernel``). Guide: `docs/guides/config.md`.

    Examples:
      >>> config = lora.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")
      >>> config.scale_for("params/h0/attn/query/kernel")
      2.0

    Attributes:
      rank: the rank ``r`` of every adapter, at least 1 (PEFT ``r``).
      alpha: ``scale = alpha / rank`` (PEFT ``lora_alpha``).
      targets: kernels to adapt (PEFT ``target_modules``): ``None`` (every kernel),
        ``"all-linear"`` (every kernel contracted as a linear map: Dense, DenseGeneral, Einsum,
        expert kernels; not embeddings, convolutions or the model's output head, see
        `lora.select`), or one entry or a sequence of them, any of which selects a path. An
        entry of letters, digits, ``_`` and ``-`` only is a plain name, matched as PEFT
        matches module names: the leaf's name (``"gating_einsum"``), or the name of the module
        holding a kernel (``"q_proj"`` selects ``params/h0/attn/q_proj/kernel``, not that
        module's bias: a kernel is a leaf the probe contracts or gathers, without a probe one
        named ``kernel`` or ``embedding``). Any other entry (one with ``/`` or a regex
        metacharacter, e.g. PEFT's dotted ``"self_attn.q_proj"``) is a regex that must
        ``re.fullmatch`` the whole path.
      exclude: entries (plain names or regexes, as ``targets``) of paths never adapted (PEFT
        ``exclude_modules``).
      rank_pattern: regex (``re.search`` on the path) -> rank; the first match wins.
      alpha_pattern: regex (``re.search`` on the path) -> alpha; the first match wins.
      init: ``"lora"`` (PEFT's default: ``b = 0``, or ``a = 0`` for an Embed), ``"gaussian"``,
        ``"random"`` (not a no-op, for tests), ``"pissa"`` / ``"olora"`` / ``"loftq"`` (these
        change the base: `lora.init` returns a pair).
      dropout: dropout rate on the LoRA branch's input, applied when a call passes ``lora_rng``
        (PEFT ``lora_dropout``).
      rslora: ``scale = alpha / sqrt(rank)`` (PEFT ``use_rslora``).
      dtype: the floating dtype of the adapter factors.
      layers: layer indices (>= 0) to adapt, ``None`` for all (PEFT ``layers_to_transform``):
        the first number in a path, or the position on an ``nn.scan`` kernel's layer axis.
      loftq_iter: ``init="loftq"``: quantize / SVD alternations (PEFT ``loftq_iter``).
      loftq_dtype: ``init="loftq"``: the base's format, ``"nf4"`` or ``"int8"``.
      dora: DoRA (PEFT ``use_dora``): a magnitude ``m`` per output unit, the kernel
        ``m * V / ||V||`` with ``V = W0 + scale * a @ b``.
      layers_pattern: with ``layers``, regexes that ``re.fullmatch`` the path component holding
        the layer index (PEFT ``layers_pattern``); ``None``: the first number in the path.
      modules_to_save: regexes (``re.fullmatch`` a module's path) of modules trained whole as
        `TrainedCopy` entries (PEFT ``modules_to_save``).
      trainable_token_indices: Embed rows to train as a `TokenDelta`: ids for every embedding, or
        ``{regex: ids}`` (PEFT ``trainable_token_indices``).
      bias: ``"none"``, ``"all"`` or ``"lora_only"``: biases trained as `TrainedCopy` entries
        (PEFT ``bias``).
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
    dtype: DTypeLike = jnp.float32
    layers: Sequence[int] | int | None = None
    loftq_iter: int = 1
    loftq_dtype: QuantFormat = "nf4"
    dora: bool = False
    layers_pattern: Patterns = None
    modules_to_save: Patterns = None
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    bias: Bias = "none"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = FIELD_CHECKS[f.name](getattr(self, f.name), f"LoraConfig.{f.name}")
            object.__setattr__(self, f.name, value)

    # -- equality and hashing --------------------------------------------------------------
    def _key(self) -> tuple[object, ...]:
        """The fields as a hashable tuple: the pattern dicts as their items *in order* (the
        first matching pattern wins, so order is part of the meaning), the dtype normalised."""
        norm = lambda v: tuple(v.items()) if isinstance(v, Mapping) else v
        return tuple(
            np.dtype(self.dtype) if f.name == "dtype" else norm(getattr(self, f.name))
            for f in dataclasses.fields(self)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LoraConfig) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # -- per-path resolution ---------------------------------------------------------------
    def matches(self, path: str, layer_in_path: bool = True) -> bool:
        """Whether ``path`` is selected by ``targets``, ``exclude`` and ``layers``.

        Args:
          path: a leaf's path, keys joined with ``/``.
          layer_in_path: ``False`` for a layered kernel (one whose layers ``nn.scan`` stacks:
            its layers are the entries of its leading axis, picked by `lora.init`) skips the
            ``layers`` check on the path.

        Returns:
          Whether the config adapts the leaf at ``path``.
        """
        full = target_matches
        targets = self.targets
        # the pattern fields hold tuples once __post_init__ has run (`_targets`, `regex_tuple`);
        # "all-linear" selects by the kernel's use (`flax_lora._init._select`), not by path
        if (
            targets is not None
            and targets != ALL_LINEAR
            and not any(full(p, path, "LoraConfig.targets") for p in targets)
        ):
            return False
        if any(full(p, path, "LoraConfig.exclude") for p in self.exclude or ()):
            return False
        if self.layers is not None and layer_in_path:
            index = layer_index(path, self.layers_pattern)
            if index is None or index not in layer_tuple(self):
                return False
        return True

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at ``path``: the first matching ``rank_pattern``, or ``rank``.

        Args:
          path: a kernel's path, keys joined with ``/``.

        Returns:
          The rank.
        """
        for pattern, r in self.rank_pattern.items():
            if _regex.search(pattern, path, "LoraConfig.rank_pattern"):
                return int(r)
        return int(self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha at ``path``: the first matching ``alpha_pattern``, or ``alpha``.

        Args:
          path: a kernel's path, keys joined with ``/``.

        Returns:
          The alpha.
        """
        for pattern, a in self.alpha_pattern.items():
            if _regex.search(pattern, path, "LoraConfig.alpha_pattern"):
                return float(a)
        return float(self.alpha)

    def scale_for(self, path: str) -> float:
        """The scale of the adapter at ``path``: ``alpha / r``, or ``alpha / sqrt(r)`` with
        ``rslora`` (``r`` and ``alpha`` from `rank_for` and `alpha_for`).

        Args:
          path: a kernel's path, keys joined with ``/``.

        Returns:
          The scale.
        """
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.rslora else r)

    def to_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict (the dtype by name).

        Returns:
          A dict of plain values: lists, strings, numbers, ``None``.
        """
        d = dataclasses.asdict(self)
        d["dtype"] = np.dtype(self.dtype).name
        for k in ("targets", "exclude", "layers", "layers_pattern", "modules_to_save"):
            d[k] = list(d[k]) if d[k] is not None and d[k] != ALL_LINEAR else d[k]
        tokens = d["trainable_token_indices"]
        if isinstance(tokens, Mapping):
            d["trainable_token_indices"] = {k: list(v) for k, v in tokens.items()}
        elif tokens is not None:
            d["trainable_token_indices"] = list(tokens)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> LoraConfig:
        """The config whose `to_dict` is ``d``.

        Args:
          d: a dict as `to_dict` makes it (every field is checked, as in the constructor).

        Returns:
          The config.
        """
        fields: dict[str, Any] = dict(d)  # each value is checked by __post_init__
        fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
        return cls(**fields)


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


def layer_tuple(config: LoraConfig) -> tuple[int, ...]:
    """``config.layers`` as ``__post_init__`` normalised it: a tuple of ints (``()`` for
    ``None``, which selects every layer: test ``config.layers is None`` first)."""
    return cast(tuple[int, ...], config.layers or ())


def _layers(layers: object, name: str) -> tuple[int, ...] | None:
    """``LoraConfig.layers`` as a tuple of layer indices (``None`` stays ``None``)."""
    if layers is None:
        return None
    if isinstance(layers, np.ndarray) and layers.ndim == 0:
        layers = layers.item()
    if is_int(layers):
        items: tuple[object, ...] = (layers,)
    elif isinstance(layers, Iterable) and not isinstance(layers, str | bytes | Mapping):
        items = tuple(layers)
    else:
        raise TypeError(
            f"{name} must be an int, a sequence of ints or None; got {layers!r} "
            f"({type(layers).__name__})."
        )
    for i in items:
        if not is_int(i):
            raise TypeError(
                f"{name} takes int layer indices; got {i!r} ({type(i).__name__}) in {layers!r}."
            )
        if i < 0:
            raise ValueError(
                f"{name} takes layer indices >= 0 (the first number in a path, or the "
                f"position on a layered kernel's layer axis); got {int(i)} in {layers!r}."
            )
    return tuple(int(cast(int, i)) for i in items)  # each an int: checked above


def _targets(value: object, name: str) -> str | tuple[str, ...] | None:
    """``LoraConfig.targets``: ``"all-linear"`` (any case, as PEFT) kept as that string, else
    one entry or a sequence of them as a tuple (`regex_tuple`)."""
    if isinstance(value, str) and value.lower() == ALL_LINEAR:
        return ALL_LINEAR
    out = regex_tuple(value, name)
    if out is not None and any(p.lower() == ALL_LINEAR for p in out):
        raise ValueError(
            f"{name}: 'all-linear' is PEFT's shorthand for every linear kernel and stands alone; "
            f"got it in the sequence {list(out)!r}. Pass targets='all-linear' (and exclude= to "
            "leave kernels out)."
        )
    return out


def _token_ids(value: object, name: str) -> tuple[int, ...]:
    """A sequence of distinct token ids >= 0 as a tuple of ints."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of int token ids; got {value!r}.")
    ids = tuple(value)
    for i in ids:
        if not is_int(i):
            raise TypeError(f"{name} takes int token ids; got {i!r} ({type(i).__name__}).")
        if i < 0:
            raise ValueError(f"{name} takes token ids >= 0; got {int(i)}.")
    if not ids:
        raise ValueError(f"{name} is empty; give at least one token id.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} repeats token ids: {list(ids)}.")
    return tuple(int(i) for i in ids)


_token_map = pattern_map(_token_ids, "token ids")


def _tokens(value: object, name: str) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """``LoraConfig.trainable_token_indices`` as a tuple of ids or ``{regex: ids}``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        out = _token_map(value, name)
        if not out:
            raise ValueError(f"{name} is an empty mapping; use None for no trainable tokens.")
        return out
    return _token_ids(value, name)


def _dtype(value: object, name: str) -> DTypeLike:
    """A floating dtype (anything `numpy.dtype` reads: a JAX / NumPy type, a name)."""
    if value is None:
        raise TypeError(f"{name} must be a floating dtype; got None.")
    like = cast(DTypeLike, value)  # what numpy.dtype reads: checked by it, just below
    try:
        dtype = np.dtype(like)
    except TypeError as e:
        raise TypeError(f"{name} must be a floating dtype; got {value!r}.") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype; got {dtype}.")
    return like


FIELD_CHECKS: dict[str, Check[object]] = {
    "rank": integer(lo=1),
    "alpha": real(),
    "targets": _targets,
    "exclude": lambda v, name: regex_tuple(v, name) or (),
    "rank_pattern": pattern_map(integer(lo=1), "rank"),
    "alpha_pattern": pattern_map(real(), "alpha"),
    "init": one_of(INITS),
    "dropout": real(lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
    "rslora": boolean,
    "dtype": _dtype,
    "layers": _layers,
    "loftq_iter": integer(lo=1),
    "loftq_dtype": one_of(("nf4", "int8")),  # PEFT's loftq_bits 4 and 8
    "dora": boolean,
    "layers_pattern": regex_tuple,
    "modules_to_save": regex_tuple,
    "trainable_token_indices": _tokens,
    "bias": one_of(BIASES),
}
"""`LoraConfig`'s field -> its check (`flax_lora._field_checks`), run in field order when a
config is made; the checked value (normalised: plain ints, floats, tuples) is stored."""
