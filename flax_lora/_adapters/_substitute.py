"""The extras applied to a params tree: each trained copy replaces its leaf, each token delta
is added to (or, for `lora.unmerge`, taken out of) its embedding's rows."""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax.tree_util import KeyPath

from flax_lora._adapters._extras import Extra, StackedExtra
from flax_lora._paths import describe, path_str
from flax_lora._quant._formats import dequantize_kernel, is_quantized
from flax_lora._typing import Leaf, PyTree


def substitute(
    params: PyTree, extras: Mapping[str, Extra | StackedExtra], where: str = "lora.wrap"
) -> PyTree:
    """``params`` with each extra node applied to the leaf at its path (`TrainedCopy.apply`,
    `TokenDelta.apply`).

    Raises:
      ValueError: a path is not a leaf of ``params``, or a shape does not fit (naming it).
      TypeError: a node is a stacked one (naming its path).
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
    params: PyTree, extras: Mapping[str, Extra | StackedExtra], where: str, sign: float = 1.0
) -> tuple[PyTree, list[str]]:
    """``params`` with each node of ``extras`` applied at its path (a quantized leaf
    dequantized first), and the paths of ``extras`` that are not leaves of ``params``."""
    seen: set[str] = set()

    def apply(keypath: KeyPath, leaf: Leaf) -> Leaf:
        path = path_str(keypath)
        if path not in extras:
            return leaf
        seen.add(path)
        if is_quantized(leaf):
            leaf = dequantize_kernel(leaf)
        return extras[path].apply(path, leaf, where, sign)

    out = jax.tree_util.tree_map_with_path(apply, params, is_leaf=is_quantized)
    return out, [p for p in extras if p not in seen]


def unmerge_extras(params: PyTree, extras: dict[str, Extra]) -> PyTree:
    """`lora.unmerge` of the extra nodes: token deltas are subtracted; a trained copy raises."""
    if not extras:
        return params
    copies = [p for p, v in extras.items() if v.REPLACES_LEAF]
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
