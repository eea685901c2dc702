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
adapter axis (`flax_lora._multi._stack_extras`, which also picks one adapter's again: the base
leaf, or a zero delta, for ``-1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._paths import describe, path_str
from flax_lora._quant._formats import dequantize_kernel, is_quantized
from flax_lora._typing import PyTree

Role = Literal["module", "bias"]
"""What a `TrainedCopy` stands for: a leaf of a module in ``modules_to_save``, or a bias."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainedCopy:
    """A trainable copy of one base leaf that replaces it (PEFT's ``modules_to_save`` / ``bias``).

    Example:
      >>> config = lora.LoraConfig(targets=".*/query/kernel", modules_to_save=["params/head"])
      >>> adapters = lora.init(jax.random.key(0), params, config)
      >>> adapters["params"]["head"]["kernel"].value.shape  # a copy of the head's kernel
      (384, 2)

    Attributes:
      value: the trained leaf, the shape of the base leaf (its only pytree leaf).
      role: ``"module"`` (a leaf of a module in ``modules_to_save``) or ``"bias"`` (a bias
        trained by ``LoraConfig.bias``); static.
    """

    value: Any
    role: Role = dataclasses.field(default="module", metadata=dict(static=True))

    def replace(self, **changes: Any) -> TrainedCopy:
        """A copy with the given fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def meta(self) -> dict[str, Any]:
        """The static fields as a JSON-ready dict."""
        return dict(type="copy", role=self.role)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenDelta:
    """A trainable additive delta for some rows of an Embed table (PEFT's trainable tokens).

    The table in use is ``W0.at[indices].add(delta)``: a lookup of a token in ``indices`` gets
    its row plus its delta, every other row is ``W0``'s; a tied ``attend`` sees the same table.

    Example:
      >>> config = lora.LoraConfig(targets=".*/query/kernel", trainable_token_indices=[5, 7])
      >>> adapters = lora.init(jax.random.key(0), params, config)
      >>> adapters["params"]["embed"]["embedding"].delta.shape  # (2, features), zeros at init
      (2, 384)

    Attributes:
      delta: shape ``(len(indices), *table.shape[1:])``, the only pytree leaf.
      indices: the table rows (token ids) it adds to, distinct; static.
      num_rows: the number of rows of the table it was made for; static.
    """

    delta: Any
    indices: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    num_rows: int = dataclasses.field(metadata=dict(static=True))

    def replace(self, **changes: Any) -> TokenDelta:
        """A copy with the given fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def meta(self) -> dict[str, Any]:
        """The static fields as a JSON-ready dict."""
        return dict(type="tokens", indices=list(self.indices), num_rows=self.num_rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedCopy:
    """``N`` `TrainedCopy` of one leaf stacked for routing (`lora.stack`): ``values``
    ``(N, *shape)``."""

    values: Any
    role: Role = dataclasses.field(default="module", metadata=dict(static=True))

    @property
    def num_adapters(self) -> int:
        """``N``, the number of stacked copies."""
        return int(self.values.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedTokenDelta:
    """``N`` `TokenDelta` of one embedding stacked for routing: ``delta (N, k, *row)`` on the union
    ``indices`` of the stacked adapters' rows (zeros where an adapter has no delta)."""

    delta: Any
    indices: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    num_rows: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_adapters(self) -> int:
        """``N``, the number of stacked deltas."""
        return int(self.delta.shape[0])


Extra = TrainedCopy | TokenDelta
"""An adapter node beside the factors, for one adapter set."""
StackedExtra = StackedCopy | StackedTokenDelta
"""An adapter node beside the factors, stacked for routing."""
EXTRA_TYPES = (TrainedCopy, TokenDelta)
STACKED_TYPES = (StackedCopy, StackedTokenDelta)


def is_extra(x: Any) -> bool:
    """Whether ``x`` is one of the non-factor adapter nodes (plain or stacked)."""
    return isinstance(x, EXTRA_TYPES + STACKED_TYPES)


def substitute(params: PyTree, extras: dict[str, Extra], where: str = "lora.wrap") -> PyTree:
    """``params`` with each extra node applied to the leaf at its path: a `TrainedCopy` replaces
    the leaf (cast to its dtype), a `TokenDelta` scatter-adds its rows (computed in float32 or
    the embedding's dtype, if wider, and cast once).

    Raises:
      ValueError: a path is not a leaf of ``params``, or a shape does not fit (naming it).
    """
    if not extras:
        return params
    out, missing = _apply_all(params, extras, where)
    if missing:
        raise ValueError(
            f"{where}: adapters hold trained copies or token deltas for {describe(missing)}, "
            "which are not leaves of params. Were these adapters made for another model?"
        )
    return out


def _apply_all(
    params: PyTree, extras: dict[str, Extra], where: str, sign: float = 1.0
) -> tuple[PyTree, list[str]]:
    """``params`` with `apply_one` at each path of ``extras`` (a quantized leaf dequantized
    first), and the paths of ``extras`` that are not leaves of ``params``."""
    seen: set[str] = set()

    def apply(keypath: Any, leaf: Any) -> Any:
        path = path_str(keypath)
        if path not in extras:
            return leaf
        seen.add(path)
        if is_quantized(leaf):
            leaf = dequantize_kernel(leaf)
        return apply_one(path, leaf, extras[path], where, sign)

    out = jax.tree_util.tree_map_with_path(apply, params, is_leaf=is_quantized)
    return out, [p for p in extras if p not in seen]


def apply_one(
    path: str, leaf: Any, node: Extra | StackedExtra, where: str, sign: float = 1.0
) -> Any:
    """One leaf with its extra node applied (``sign=-1``: a token delta taken out again)."""
    shape = tuple(np.shape(leaf))
    if isinstance(node, TrainedCopy):
        if tuple(np.shape(node.value)) != shape:
            raise ValueError(
                f"{where}: the trained copy for {path!r} has shape "
                f"{tuple(np.shape(node.value))}, but the leaf at that path has shape {shape}."
            )
        return jnp.asarray(node.value).astype(leaf.dtype)
    if isinstance(node, TokenDelta):
        check_token_delta(path, node, shape, where)
        compute = jnp.promote_types(leaf.dtype, jnp.float32)
        idx = jnp.asarray(node.indices, jnp.int32)
        d = jnp.asarray(node.delta).astype(compute) * sign
        return jnp.asarray(leaf).astype(compute).at[idx].add(d).astype(leaf.dtype)
    raise TypeError(
        f"{where}: the adapter entry at {path!r} is a {type(node).__name__}; a stacked adapter "
        "tree (lora.stack) needs lora_ids."
    )


def check_token_delta(path: str, node: TokenDelta, shape: tuple[int, ...], where: str) -> None:
    """Raises ``ValueError`` naming ``path`` unless ``node`` fits an embedding of ``shape``."""
    expected = (len(node.indices), *shape[1:])
    if len(shape) < 2 or shape[0] != node.num_rows or tuple(np.shape(node.delta)) != expected:
        raise ValueError(
            f"{where}: the token delta for {path!r} (rows {list(node.indices)} of a table with "
            f"{node.num_rows} rows) has shape {tuple(np.shape(node.delta))}; the table at that "
            f"path has shape {shape}, so a delta of shape {expected} and {node.num_rows} rows "
            "were expected."
        )


def unmerge_extras(params: PyTree, extras: dict[str, Extra]) -> PyTree:
    """`lora.unmerge` of the extra nodes: token deltas are subtracted; a trained copy raises."""
    if not extras:
        return params
    copies = [p for p, v in extras.items() if isinstance(v, TrainedCopy)]
    if copies:
        raise ValueError(
            f"lora.unmerge: the adapters hold trained copies (modules_to_save or trained biases) "
            f"of {describe(copies)}; merge replaced those leaves, so their base values are lost. "
            "Keep the base params instead (merge is pure and does not change them)."
        )
    out, missing = _apply_all(params, extras, "lora.unmerge", sign=-1.0)
    if missing:
        raise ValueError(f"lora.unmerge: no leaf of params at {describe(missing)}.")
    return out


def from_meta(meta: dict[str, Any], arrays: dict[str, Any], path: str) -> Extra:
    """The extra node of ``path`` from checkpoint metadata and its arrays (`lora.load`)."""
    if meta["type"] == "copy":
        return TrainedCopy(value=jnp.asarray(arrays[f"{path}/value"]), role=meta["role"])
    return TokenDelta(
        delta=jnp.asarray(arrays[f"{path}/delta"]),
        indices=tuple(int(i) for i in meta["indices"]),
        num_rows=int(meta["num_rows"]),
    )


def arrays_of(node: Extra) -> dict[str, Any]:
    """The arrays of an extra node by field name (for checkpoints)."""
    return {"value": node.value} if isinstance(node, TrainedCopy) else {"delta": node.delta}
