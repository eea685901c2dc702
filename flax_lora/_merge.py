"""`lora.merge` / `lora.unmerge`: pure functions from (params, adapters) to params."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flax_lora._adapters import adapter_table, check_fits, delta
from flax_lora._paths import describe, path_str

PyTree = Any


def merge(params: PyTree, adapters: PyTree) -> PyTree:
    """Folds each adapter into its kernel: ``W = W0 + scale * a @ b``.

    The sum is computed in float32 (or the kernel's dtype, if wider) and cast once to the
    kernel's dtype; every other leaf is returned untouched, and the tree keeps its type (a Linen
    variables dict, an NNX state). Pure and jit-able.

    Example:
      >>> merged = jax.jit(lora.merge)(params, adapters)
      >>> y = model.apply(merged, x)  # zero added latency

    Args:
      params: the base params tree.
      adapters: adapters from `lora.init` (or `lora.load`, `lora.load_peft`, `lora.combine`).

    Returns:
      A params tree of the same structure with the adapted kernels merged.

    Raises:
      ValueError: an adapter's path is not in ``params``, or its kernel shape does not fit.
    """
    return _fold(params, adapters, +1.0)


def unmerge(params: PyTree, adapters: PyTree) -> PyTree:
    """The inverse of `merge`: ``W0 = W - scale * a @ b``, with the same precision rule.

    Example:
      >>> base = lora.unmerge(lora.merge(params, adapters), adapters)

    Args:
      params: a params tree with the adapters merged in.
      adapters: the adapters that were merged.

    Returns:
      The params tree with the adapters taken out again.

    Raises:
      ValueError: an adapter's path is not in ``params``, or its kernel shape does not fit.
    """
    return _fold(params, adapters, -1.0)


def _fold(params: PyTree, adapters: PyTree, sign: float) -> PyTree:
    if adapters is None:
        return params
    table = adapter_table(adapters)
    seen: set[str] = set()
    kernels: list[str] = []

    def fold(keypath: Any, leaf: Any) -> Any:
        path = path_str(keypath)
        if getattr(leaf, "ndim", 0) >= 2:
            kernels.append(path)
        w = table.get(path)
        if w is None:
            return leaf
        seen.add(path)
        check_fits(path, w, tuple(leaf.shape))
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"Kernel {path!r} has dtype {leaf.dtype}; expected a floating dtype.")
        compute = jnp.promote_types(leaf.dtype, jnp.float32)
        out = leaf.astype(compute) + sign * delta(w, compute)
        return out.astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(fold, params)
    missing = [p for p in table if p not in seen]
    if missing:
        raise ValueError(
            f"Adapters for {describe(missing)} have no kernel at that path in params. Kernels in "
            f"params: {describe(kernels, limit=20)}. Were these adapters made for another model?"
        )
    return out
