"""Parameter paths: the "/"-joined key path of a leaf, as used for matching and for adapters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from flax_lora._typing import PyTree

KeyPath = tuple[Any, ...]

KERNEL_LEAVES = ("kernel", "embedding")
"""The leaf names Flax gives kernels: ``kernel`` (Dense, DenseGeneral, Einsum, Conv) and
``embedding`` (Embed), Linen and NNX alike."""


def leaf_name(path: str) -> str:
    """The last component of a path: ``leaf_name("params/fc/kernel") == "kernel"``."""
    return path.rsplit("/", 1)[-1]


def module_path(path: str) -> str:
    """The path of the module that holds the leaf at ``path``: all but its last component
    (``module_path("params/fc/kernel") == "params/fc"``; ``""`` for a top-level leaf)."""
    return path.rsplit("/", 1)[0] if "/" in path else ""


def key_str(key: Any) -> str:
    """One entry of a JAX key path as text."""
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath: KeyPath) -> str:
    """Joins a JAX key path with "/".

    The trailing ``.value`` that an NNX ``Variable`` adds is dropped, so an NNX state path reads
    ``h0/attn/query/kernel`` like its Linen twin without the ``params`` collection.
    """
    keys = list(keypath)
    if keys and isinstance(keys[-1], GetAttrKey) and keys[-1].name in ("value", "raw_value"):
        keys = keys[:-1]
    return "/".join(key_str(k) for k in keys)


def flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Maps each leaf's path string to the leaf, in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {path_str(kp): leaf for kp, leaf in flat}


def nest(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Builds nested dicts from ``(path, value)`` pairs, splitting each path on "/"."""
    root: dict[str, Any] = {}
    for path, value in items:
        node = root
        *parents, last = path.split("/")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"Path {path!r} runs through the leaf at {part!r}.")
            node = child
        if last in node:
            raise ValueError(f"Path {path!r} is given twice.")
        node[last] = value
    return root


def describe(paths: Iterable[str], limit: int = 12) -> str:
    """A short, readable list of paths for error messages."""
    paths = list(paths)
    shown = ", ".join(repr(p) for p in paths[:limit])
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return f"[{shown}{more}]" if paths else "[] (none)"
