"""The extras of several adapter sets (trained copies, token deltas) stacked for routing
(`lora.stack`), picked again (`lora.unstack`, a routed call's per-example ``select``) and
combined (`lora.combine`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters._extras import (
    Extra,
    StackedCopy,
    StackedExtra,
    StackedTokenDelta,
    TokenDelta,
    TrainedCopy,
)
from flax_lora._paths import describe, flatten
from flax_lora._typing import PyTree


def stack_extras(tables: list[dict[str, Extra]], fn: str) -> dict[str, StackedExtra]:
    """One stacked node per path from the extra nodes of ``N`` adapter sets (same paths).

    Raises:
      ValueError: the sets hold extra nodes at different paths, or of different kinds, shapes
        or tables (naming the path).
    """
    first = tables[0]
    for i, t in enumerate(tables[1:], start=1):
        if set(t) != set(first):
            raise ValueError(
                f"lora.{fn}: all adapter sets must hold trained copies / token deltas at the "
                f"same paths; set {i} lacks {describe([p for p in first if p not in t])} and has "
                f"extra {describe([p for p in t if p not in first])} compared with set 0."
            )
    out: dict[str, StackedExtra] = {}
    for path, n0 in first.items():
        nodes = [t[path] for t in tables]
        if any(type(n) is not type(n0) for n in nodes):
            raise ValueError(
                f"lora.{fn}: the adapter sets hold different kinds of entries at {path!r}: "
                f"{[type(n).__name__ for n in nodes]}."
            )
        if isinstance(n0, TrainedCopy):
            shapes = {tuple(np.shape(n.value)) for n in nodes}
            if len(shapes) > 1:
                raise ValueError(f"lora.{fn}: the trained copies of {path!r} differ in shape.")
            dtype = jnp.result_type(*[n.value.dtype for n in nodes])
            out[path] = StackedCopy(
                values=jnp.stack([jnp.asarray(n.value, dtype) for n in nodes]), role=n0.role
            )
        elif isinstance(n0, TokenDelta):
            if len({n.num_rows for n in nodes}) > 1:
                raise ValueError(f"lora.{fn}: the token deltas of {path!r} are for other tables.")
            union = tuple(sorted({i for n in nodes for i in n.indices}))
            pos = {t: k for k, t in enumerate(union)}
            dtype = jnp.result_type(*[n.delta.dtype for n in nodes])
            rows = (len(union), *np.shape(n0.delta)[1:])
            deltas = [
                jnp.zeros(rows, dtype)
                .at[jnp.asarray([pos[t] for t in n.indices], jnp.int32)]
                .set(jnp.asarray(n.delta, dtype))
                for n in nodes
            ]
            out[path] = StackedTokenDelta(
                delta=jnp.stack(deltas), indices=union, num_rows=n0.num_rows
            )
        else:
            raise TypeError(f"lora.{fn}: {path!r} holds an already stacked entry.")
    return out


def select_extras(stacked: dict[str, StackedExtra], index: Any, params: PyTree) -> dict[str, Extra]:
    """Adapter ``index``'s extra nodes (possibly traced); for ``-1`` (or out of range) the base
    leaf (from ``params``) and a zero delta."""
    leaves = flatten(params) if params is not None else {}
    index = jnp.asarray(index, jnp.int32)
    out: dict[str, Extra] = {}
    for path, node in stacked.items():
        n = node.num_adapters
        valid = (index >= 0) & (index < n)
        safe = jnp.clip(index, 0, n - 1)
        if isinstance(node, StackedCopy):
            if path not in leaves:
                raise ValueError(
                    f"select: the stacked trained copies of {path!r} need the base leaf (for "
                    "id -1) from params; it is not there."
                )
            base = jnp.asarray(leaves[path]).astype(node.values.dtype)
            out[path] = TrainedCopy(value=jnp.where(valid, node.values[safe], base), role=node.role)
        else:
            d = jnp.where(valid, node.delta[safe], jnp.zeros_like(node.delta[0]))
            out[path] = TokenDelta(delta=d, indices=node.indices, num_rows=node.num_rows)
    return out


def unstack_extras(stacked: dict[str, StackedExtra], i: int) -> dict[str, Extra]:
    """Adapter ``i``'s extra nodes of a stacked tree (token deltas on the union rows)."""
    out: dict[str, Extra] = {}
    for path, node in stacked.items():
        if isinstance(node, StackedCopy):
            out[path] = TrainedCopy(value=node.values[i], role=node.role)
        else:
            out[path] = TokenDelta(
                delta=node.delta[i], indices=node.indices, num_rows=node.num_rows
            )
    return out


def combine_extras(tables: list[dict[str, Extra]], weights: jax.Array) -> dict[str, Extra]:
    """`lora.combine` of the extra nodes: the weighted sums ``Σᵢ wᵢ vᵢ`` of the trained copies
    (so weights summing to 1 average the heads) and of the token deltas (on the union of rows).

    Raises:
      ValueError: the sets hold extra nodes at different paths or of different kinds or shapes.
    """
    stacked = stack_extras(tables, "combine")
    out: dict[str, Extra] = {}
    for path, node in stacked.items():
        if isinstance(node, StackedCopy):
            v = jnp.tensordot(weights, node.values.astype(jnp.float32), axes=1)
            out[path] = TrainedCopy(value=v.astype(node.values.dtype), role=node.role)
        else:
            d = jnp.tensordot(weights, node.delta.astype(jnp.float32), axes=1)
            out[path] = TokenDelta(
                delta=d.astype(node.delta.dtype), indices=node.indices, num_rows=node.num_rows
            )
    return out
