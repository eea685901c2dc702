"""The extras of several adapter sets (trained copies, token deltas) stacked for routing
(`lora.stack`), picked again (`lora.unstack`, a routed call's per-example ``select``) and
combined (`lora.combine`): the methods of the extras' types
(`flax_lora._adapters._extras`) run over the tables of the sets.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from flax_lora._adapters._extras import Extra, StackedExtra
from flax_lora._paths import describe, flatten
from flax_lora._typing import PyTree


def stack_extras(tables: list[dict[str, Extra]], fn: str) -> dict[str, StackedExtra]:
    """One stacked node per path from the extra nodes of ``N`` adapter sets (same paths), made
    by the ``stack`` of their type.

    Raises:
      ValueError: the sets hold extra nodes at different paths, or of different kinds, shapes
        or tables (naming the path).
      TypeError: a node is stacked already (naming the path).
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
        # every node has n0's type (checked above), which mypy cannot see through ``type(n0)``
        out[path] = type(n0).stack(cast(Any, nodes), path, fn)
    return out


def select_extras(
    stacked: dict[str, StackedExtra], index: ArrayLike, params: PyTree
) -> dict[str, Extra]:
    """Adapter ``index``'s extra nodes (possibly traced); for ``-1`` (or out of range) the base
    leaf (from ``params``) and a zero delta."""
    leaves = flatten(params) if params is not None else {}
    index = jnp.asarray(index, jnp.int32)
    return {path: node.select(index, leaves.get(path), path) for path, node in stacked.items()}


def unstack_extras(stacked: dict[str, StackedExtra], i: int) -> dict[str, Extra]:
    """Adapter ``i``'s extra nodes of a stacked tree (token deltas on the union rows)."""
    return {path: node.unstack(i) for path, node in stacked.items()}


def combine_extras(tables: list[dict[str, Extra]], weights: jax.Array) -> dict[str, Extra]:
    """`lora.combine` of the extra nodes: the weighted sums ``Σᵢ wᵢ vᵢ`` of the trained copies
    (so weights summing to 1 average the heads) and of the token deltas (on the union of rows).

    Raises:
      ValueError: the sets hold extra nodes at different paths or of different kinds or shapes.
    """
    stacked = stack_extras(tables, "combine")
    return {path: node.combine(weights) for path, node in stacked.items()}
