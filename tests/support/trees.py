"""Pytree helpers of the tests, written independently of ``flax_lora._paths``: leaves by their
"/"-joined path, leaves replaced by path, the adapter entries of an adapter tree, and the
kernel deltas an adapter tree stands for."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

import flax_lora as lora


def keypath_to_str(keypath: tuple[Any, ...]) -> str:
    """ "/"-joined key path, without the trailing ``.value`` of an NNX Variable."""
    parts = []
    for k in keypath:
        if isinstance(k, DictKey):
            parts.append(str(k.key))
        elif isinstance(k, SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    if parts and parts[-1] in ("value", "raw_value"):
        parts = parts[:-1]
    return "/".join(parts)


def leaves_by_path(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Path -> leaf (``is_leaf`` as in `jax.tree_util`: e.g. whole `lora.QuantizedKernel` s)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {keypath_to_str(kp): x for kp, x in flat}


def replace_leaves(tree: Any, new: Mapping[str, Any]) -> Any:
    """``tree`` with the leaves at the given paths replaced (each path must exist)."""
    found = set()

    def f(kp: Any, x: Any) -> Any:
        p = keypath_to_str(kp)
        if p in new:
            found.add(p)
            return new[p]
        return x

    out = jax.tree_util.tree_map_with_path(f, tree)
    assert found == set(new), f"paths not in tree: {set(new) - found}"
    return out


def is_lora(x: Any) -> bool:
    """``is_leaf`` for an adapter tree: a whole `lora.LoraWeights` entry."""
    return isinstance(x, lora.LoraWeights)


def adapter_entries(adapters: Any) -> dict[str, Any]:
    """Path -> the adapter entry (an object with ``a`` and ``b``: `lora.LoraWeights` or
    `lora.StackedLoraWeights`, or their gradients) of every adapted kernel."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if hasattr(node, "a") and hasattr(node, "b"):
            out[prefix] = node
            return
        assert isinstance(node, Mapping), f"unexpected node {type(node)} at {prefix!r}"
        for k, v in node.items():
            walk(v, f"{prefix}/{k}" if prefix else str(k))

    walk(adapters, "")
    return out


_merge = jax.jit(lora.merge)


def kernel_deltas(params: Any, adapters: Any) -> dict[str, np.ndarray]:
    """Path -> each kernel's delta in the kernel's layout (float64), read off `lora.merge` onto
    zero params (independent of `lora.combine` and `lora.stack`); every leaf of two or more
    dimensions is listed (unadapted ones give zeros)."""
    merged = _merge(jax.tree.map(jnp.zeros_like, params), adapters)
    return {p: np.asarray(x, np.float64) for p, x in leaves_by_path(merged).items() if x.ndim >= 2}


def perturb(tree: Any, seed: int, std: float) -> Any:
    """Every leaf of ``tree`` moved by ``std * N(0, 1)`` (adapters away from their init values,
    trained copies away from their base)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [
        x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, moved)
