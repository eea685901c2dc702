"""The extras: the adapter entries beside the LoRA factors, trained copies of base leaves and
token-row deltas, and how they apply to the params.

PEFT trains three things besides the LoRA factors, all of them here as adapter leaves in their
own pytree node types, keyed (like `LoraWeights`) by the path of the base leaf they stand for:

- `TrainedCopy` (``role="module"``): a leaf of a module in ``LoraConfig.modules_to_save`` (a new
  classifier head), trained whole; it *replaces* the base leaf.
- `TrainedCopy` (``role="bias"``): a bias trained whole (``LoraConfig.bias="all"`` /
  ``"lora_only"``); it replaces the base bias.
- `TokenDelta`: ``LoraConfig.trainable_token_indices``: an additive delta for a few rows of an
  Embed's embedding: the embedding used is ``W0.at[indices].add(delta)``.

`lora.wrap` and `lora.merge` substitute these into the params before anything else runs (a
copy replaces its leaf; a token delta is a scatter-add of ``k`` rows, not a kernel-sized
product), so a lookup and a tied ``attend`` of the embedding both see the new rows, and the factored
machinery never needs to know about them. Their static metadata travels in the tree structure,
so ``jax.tree.leaves(adapters)`` stays exactly the trainable arrays.

For routing (`lora.stack`) they stack as `StackedCopy` / `StackedTokenDelta` with a leading
adapter axis. What an extra does is a method of its type, so no caller asks which type it holds:
a plain one ``apply``-s to its leaf, ``stack``-s with its likes (a classmethod), gives its
checkpoint ``meta`` and ``arrays`` (and is rebuilt by ``from_meta``); a stacked one ``unstack``-s
an adapter's, ``select``-s one (possibly traced) adapter's (the base leaf, or a zero delta, for
``-1``) and ``combine``-s them by weights. `flax_lora._multi._stack_extras` runs these over the
tables of several adapter sets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, NoReturn, TypeGuard, cast

import jax
import jax.numpy as jnp
import numpy as np

Value = jax.Array | np.ndarray
"""A concrete leaf of ``params`` (a JAX or NumPy array)."""

Role = Literal["module", "bias"]
"""What a `TrainedCopy` stands for: a leaf of a module in ``modules_to_save``, or a bias."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainedCopy:
    """A trainable copy of one base leaf that replaces it (PEFT's ``modules_to_save`` / ``bias``).

    Examples:
      >>> model = nn.Sequential([nn.Dense(8), nn.Dense(2)])
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> config = lora.LoraConfig(rank=2, targets="layers_0", modules_to_save=["params/layers_1"])
      >>> adapters = lora.init(jax.random.key(1), params, config)
      >>> adapters["params"]["layers_1"]["kernel"].value.shape  # a copy of the head's kernel
      (8, 2)

    Attributes:
      value: the trained leaf, the shape of the base leaf (its only pytree leaf).
      role: ``"module"`` (a leaf of a module in ``modules_to_save``) or ``"bias"`` (a bias
        trained by ``LoraConfig.bias``); static.
    """

    value: jax.Array
    role: Role = dataclasses.field(default="module", metadata=dict(static=True))

    TYPE: ClassVar[str] = "copy"
    """Its ``type`` in checkpoint metadata (`EXTRA_TYPES`)."""
    REPLACES_LEAF: ClassVar[bool] = True
    """It replaces its base leaf, so merging it cannot be undone (`unmerge_extras`)."""

    @property
    def kind(self) -> Role:
        """What it trains, for `lora.summary`: its ``role``."""
        return self.role

    @property
    def array(self) -> jax.Array:
        """Its trained array (``value``)."""
        return self.value

    def replace(self, **changes: object) -> TrainedCopy:
        """A copy with the given fields changed.

        Args:
          **changes: fields to set, as `dataclasses.replace`.

        Returns:
          The new `TrainedCopy`.
        """
        return dataclasses.replace(self, **cast(dict[str, Any], changes))  # checked at run time

    def meta(self) -> dict[str, object]:
        """The static fields as a JSON-ready dict (a checkpoint's metadata).

        Returns:
          ``{"type": "copy", "role": role}``.
        """
        return dict(type=self.TYPE, role=self.role)

    def arrays(self) -> dict[str, jax.Array]:
        """Its arrays by field name (for checkpoints).

        Returns:
          ``{"value": value}``.
        """
        return {"value": self.value}

    @classmethod
    def from_meta(
        cls, meta: Mapping[str, object], arrays: Mapping[str, Value], path: str
    ) -> TrainedCopy:
        """The copy at ``path`` from its checkpoint metadata and arrays (`lora.load`).

        Args:
          meta: its `meta`.
          arrays: a checkpoint's arrays by ``"<path>/<field>"``.
          path: the path of the leaf it replaces.

        Returns:
          The `TrainedCopy`.
        """
        return cls(value=jnp.asarray(arrays[f"{path}/value"]), role=cast(Role, meta["role"]))

    def apply(self, path: str, leaf: Value, where: str, sign: float = 1.0) -> jax.Array:
        """The leaf replaced by the copy, cast to the leaf's dtype.

        Args:
          path: the leaf's path, for errors.
          leaf: the base leaf.
          where: the caller, for errors (e.g. ``"lora.merge"``).
          sign: not used: a copy is never taken out again (`REPLACES_LEAF`).

        Returns:
          The copy, in the leaf's dtype.

        Raises:
          ValueError: the copy's shape is not the leaf's.
        """
        del sign
        shape = tuple(np.shape(leaf))
        if tuple(np.shape(self.value)) != shape:
            raise ValueError(
                f"{where}: the trained copy for {path!r} has shape "
                f"{tuple(np.shape(self.value))}, but the leaf at that path has shape {shape}."
            )
        return jnp.asarray(self.value).astype(leaf.dtype)

    @classmethod
    def stack(cls, nodes: Sequence[TrainedCopy], path: str, fn: str) -> StackedCopy:
        """The copies of ``N`` adapter sets at ``path``, stacked (for `lora.stack`).

        Args:
          nodes: one copy per adapter set.
          path: their leaf's path, for errors.
          fn: the public function, for errors (``"stack"``).

        Returns:
          The stacked copies, adapter axis first.

        Raises:
          ValueError: their shapes differ (naming ``lora.{fn}`` and ``path``).
        """
        if len({tuple(np.shape(n.value)) for n in nodes}) > 1:
            raise ValueError(f"lora.{fn}: the trained copies of {path!r} differ in shape.")
        dtype = jnp.result_type(*[n.value.dtype for n in nodes])
        values = jnp.stack([jnp.asarray(n.value, dtype) for n in nodes])
        return StackedCopy(values=values, role=nodes[0].role)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenDelta:
    """A trainable additive delta for some rows of an Embed's embedding (PEFT's trainable tokens).

    The embedding in use is ``W0.at[indices].add(delta)``: a lookup of a token in ``indices``
    gets its row plus its delta, every other row is ``W0``'s; a tied ``attend`` sees the same
    embedding.

    Examples:
      >>> model = nn.Sequential([nn.Embed(10, 8), nn.Dense(4)])
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3), int))
      >>> config = lora.LoraConfig(rank=2, targets=".*/kernel", trainable_token_indices=[5, 7])
      >>> adapters = lora.init(jax.random.key(1), params, config)
      >>> adapters["params"]["layers_0"]["embedding"].delta.shape  # rows 5 and 7, zeros at init
      (2, 8)

    Attributes:
      delta: shape ``(len(indices), *embedding.shape[1:])``, the only pytree leaf.
      indices: the embedding's rows (token ids) it adds to, distinct; static.
      num_rows: the number of rows of the embedding it was made for; static.
    """

    delta: jax.Array
    indices: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    num_rows: int = dataclasses.field(metadata=dict(static=True))

    TYPE: ClassVar[str] = "tokens"
    """Its ``type`` in checkpoint metadata (`EXTRA_TYPES`)."""
    REPLACES_LEAF: ClassVar[bool] = False
    """It adds to its base leaf, so merging it is undone by subtracting it."""

    @property
    def kind(self) -> Literal["tokens"]:
        """What it trains, for `lora.summary`: ``"tokens"``."""
        return "tokens"

    @property
    def array(self) -> jax.Array:
        """Its trained array (``delta``)."""
        return self.delta

    def replace(self, **changes: object) -> TokenDelta:
        """A copy with the given fields changed.

        Args:
          **changes: fields to set, as `dataclasses.replace`.

        Returns:
          The new `TokenDelta`.
        """
        return dataclasses.replace(self, **cast(dict[str, Any], changes))  # checked at run time

    def meta(self) -> dict[str, object]:
        """The static fields as a JSON-ready dict (a checkpoint's metadata).

        Returns:
          ``{"type": "tokens", "indices": [...], "num_rows": num_rows}``.
        """
        return dict(type=self.TYPE, indices=list(self.indices), num_rows=self.num_rows)

    def arrays(self) -> dict[str, jax.Array]:
        """Its arrays by field name (for checkpoints).

        Returns:
          ``{"delta": delta}``.
        """
        return {"delta": self.delta}

    @classmethod
    def from_meta(
        cls, meta: Mapping[str, object], arrays: Mapping[str, Value], path: str
    ) -> TokenDelta:
        """The token delta at ``path`` from its checkpoint metadata and arrays (`lora.load`).

        Args:
          meta: its `meta`.
          arrays: a checkpoint's arrays by ``"<path>/<field>"``.
          path: the embedding's path.

        Returns:
          The `TokenDelta`.
        """
        return cls(
            delta=jnp.asarray(arrays[f"{path}/delta"]),
            indices=tuple(int(i) for i in cast(Sequence[int], meta["indices"])),
            num_rows=int(cast(int, meta["num_rows"])),
        )

    def apply(self, path: str, leaf: Value, where: str, sign: float = 1.0) -> jax.Array:
        """The embedding with ``sign * delta`` added to its rows ``indices``.

        Args:
          path: the embedding's path, for errors.
          leaf: the embedding.
          where: the caller, for errors (e.g. ``"lora.merge"``).
          sign: ``1.0`` adds the delta, ``-1.0`` takes it out again (`lora.unmerge`).

        Returns:
          The embedding, computed in float32 (or its dtype, if wider) and cast once to its
          dtype.

        Raises:
          ValueError: the delta does not fit the embedding (naming ``path``).
        """
        check_token_delta(path, self, tuple(np.shape(leaf)), where)
        compute = jnp.promote_types(leaf.dtype, jnp.float32)
        idx = jnp.asarray(self.indices, jnp.int32)
        d = jnp.asarray(self.delta).astype(compute) * sign
        return jnp.asarray(leaf).astype(compute).at[idx].add(d).astype(leaf.dtype)

    @classmethod
    def stack(cls, nodes: Sequence[TokenDelta], path: str, fn: str) -> StackedTokenDelta:
        """The deltas of ``N`` adapter sets at ``path``, stacked (for `lora.stack`).

        Args:
          nodes: one token delta per adapter set.
          path: their embedding's path, for errors.
          fn: the public function, for errors (``"stack"``).

        Returns:
          The deltas on the union of their rows (zeros where a set has none), adapter axis
          first.

        Raises:
          ValueError: they are for embeddings of different row counts (naming ``lora.{fn}``
            and ``path``).
        """
        if len({n.num_rows for n in nodes}) > 1:
            raise ValueError(
                f"lora.{fn}: the token deltas of {path!r} are for embeddings of different "
                f"row counts ({sorted({n.num_rows for n in nodes})})."
            )
        union = tuple(sorted({i for n in nodes for i in n.indices}))
        pos = {t: k for k, t in enumerate(union)}
        dtype = jnp.result_type(*[n.delta.dtype for n in nodes])
        rows = (len(union), *np.shape(nodes[0].delta)[1:])
        deltas = [
            jnp.zeros(rows, dtype)
            .at[jnp.asarray([pos[t] for t in n.indices], jnp.int32)]
            .set(jnp.asarray(n.delta, dtype))
            for n in nodes
        ]
        return StackedTokenDelta(delta=jnp.stack(deltas), indices=union, num_rows=nodes[0].num_rows)


def _weighted(weights: jax.Array, stacked: jax.Array) -> jax.Array:
    """``Σᵢ wᵢ xᵢ`` over the leading adapter axis, in float32, cast back to ``stacked``'s dtype."""
    return jnp.tensordot(weights, stacked.astype(jnp.float32), axes=1).astype(stacked.dtype)


def _picked(index: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Whether ``index`` (possibly traced) is in ``[0, n)``, and ``index`` clipped into it."""
    return (index >= 0) & (index < n), jnp.clip(index, 0, n - 1)


class _Stacked:
    """What a stacked extra does as a plain one: it refuses (it stands for ``N`` adapters)."""

    REPLACES_LEAF: ClassVar[bool] = False
    """Not a plain extra: `unmerge_extras` reaches its `apply`, which refuses."""

    def apply(self, path: str, leaf: Value, where: str, sign: float = 1.0) -> jax.Array:
        """Refused: a stacked extra needs a routed call (``TypeError`` naming ``path``)."""
        del leaf, sign
        raise TypeError(
            f"{where}: the adapter entry at {path!r} is a {type(self).__name__}; a stacked "
            "adapter tree (lora.stack) needs lora_ids."
        )

    @classmethod
    def stack(cls, nodes: Sequence[object], path: str, fn: str) -> NoReturn:
        """Refused: the entry is stacked already (``TypeError`` naming ``path``)."""
        del nodes
        raise TypeError(f"lora.{fn}: {path!r} holds an already stacked entry.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedCopy(_Stacked):
    """``N`` `TrainedCopy` of one leaf stacked for routing (`lora.stack`): ``values``
    ``(N, *shape)``."""

    values: jax.Array
    role: Role = dataclasses.field(default="module", metadata=dict(static=True))

    @property
    def num_adapters(self) -> int:
        """``N``, the number of stacked copies."""
        return int(self.values.shape[0])

    def unstack(self, i: int) -> TrainedCopy:
        """Adapter ``i``'s copy."""
        return TrainedCopy(value=self.values[i], role=self.role)

    def select(self, index: jax.Array, base: Value | None, path: str) -> TrainedCopy:
        """The copy of adapter ``index`` (possibly traced); for ``-1`` (or out of range) the
        base leaf ``base`` (``ValueError`` naming ``path`` when it is ``None``)."""
        if base is None:
            raise ValueError(
                f"select: the stacked trained copies of {path!r} need the base leaf (for "
                "id -1) from params; it is not there."
            )
        valid, safe = _picked(index, self.num_adapters)
        base = jnp.asarray(base).astype(self.values.dtype)
        return TrainedCopy(value=jnp.where(valid, self.values[safe], base), role=self.role)

    def combine(self, weights: jax.Array) -> TrainedCopy:
        """The weighted sum ``Σᵢ wᵢ vᵢ`` of the copies (weights summing to 1 average them)."""
        return TrainedCopy(value=_weighted(weights, self.values), role=self.role)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedTokenDelta(_Stacked):
    """``N`` `TokenDelta` of one embedding stacked for routing: ``delta (N, k, *row)`` on the union
    ``indices`` of the stacked adapters' rows (zeros where an adapter has no delta)."""

    delta: jax.Array
    indices: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    num_rows: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_adapters(self) -> int:
        """``N``, the number of stacked deltas."""
        return int(self.delta.shape[0])

    def _one(self, delta: jax.Array) -> TokenDelta:
        return TokenDelta(delta=delta, indices=self.indices, num_rows=self.num_rows)

    def unstack(self, i: int) -> TokenDelta:
        """Adapter ``i``'s delta (on the union rows)."""
        return self._one(self.delta[i])

    def select(self, index: jax.Array, base: Value | None, path: str) -> TokenDelta:
        """The delta of adapter ``index`` (possibly traced); zeros for ``-1`` (or out of range).
        ``base`` and ``path`` are not needed."""
        del base, path
        valid, safe = _picked(index, self.num_adapters)
        return self._one(jnp.where(valid, self.delta[safe], jnp.zeros_like(self.delta[0])))

    def combine(self, weights: jax.Array) -> TokenDelta:
        """The weighted sum ``Σᵢ wᵢ dᵢ`` of the deltas (on the union rows)."""
        return self._one(_weighted(weights, self.delta))


Extra = TrainedCopy | TokenDelta
"""An adapter node beside the factors, for one adapter set."""
StackedExtra = StackedCopy | StackedTokenDelta
"""An adapter node beside the factors, stacked for routing."""
EXTRA_TYPES: dict[str, type[TrainedCopy] | type[TokenDelta]] = {
    t.TYPE: t for t in (TrainedCopy, TokenDelta)
}
"""The plain extras by their ``type`` in checkpoint metadata."""
STACKED_TYPES = (StackedCopy, StackedTokenDelta)
_ALL_TYPES = (*EXTRA_TYPES.values(), *STACKED_TYPES)


def is_extra(x: object) -> TypeGuard[Extra | StackedExtra]:
    """Whether ``x`` is one of the non-factor adapter nodes (plain or stacked)."""
    return isinstance(x, _ALL_TYPES)


def check_token_delta(path: str, node: TokenDelta, shape: tuple[int, ...], where: str) -> None:
    """Raises ``ValueError`` naming ``path`` unless ``node`` fits an embedding of ``shape``."""
    expected = (len(node.indices), *shape[1:])
    if len(shape) < 2 or shape[0] != node.num_rows or tuple(np.shape(node.delta)) != expected:
        raise ValueError(
            f"{where}: the token delta for {path!r} (rows {list(node.indices)} of an embedding "
            f"with {node.num_rows} rows) has shape {tuple(np.shape(node.delta))}; the leaf at that "
            f"path has shape {shape}, so a delta of shape {expected} and {node.num_rows} rows "
            "were expected."
        )


def from_meta(meta: Mapping[str, object], arrays: Mapping[str, Value], path: str) -> Extra:
    """The extra node of ``path`` from checkpoint metadata (its ``type`` picks the class in
    `EXTRA_TYPES`) and its arrays (`lora.load`)."""
    return EXTRA_TYPES[cast(str, meta["type"])].from_meta(meta, arrays, path)
