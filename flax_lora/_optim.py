"""optax helpers: train the adapter leaves (and chosen base leaves), freeze the rest."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import KeyPath

from flax_lora import _regex
from flax_lora._adapters._extras import is_extra
from flax_lora._adapters._weights import is_lora
from flax_lora._paths import path_str
from flax_lora._typing import Leaf, PyTree


def trainable(tree: PyTree, also: str | None = None) -> PyTree:
    """A bool pytree: True exactly on adapter leaves and on leaves whose path matches ``also``.

    Adapter leaves include trained copies (``modules_to_save``, trained biases) and token
    deltas, so a head trained through ``LoraConfig(modules_to_save=...)`` needs no ``also``.

    Examples:
      >>> params = {"kernel": jnp.ones((3, 4)), "head": jnp.ones((4, 2))}
      >>> adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2))
      >>> mask = lora.trainable({"params": params, "lora": adapters}, also="head")
      >>> mask["params"], jax.tree.leaves(mask["lora"])  # the adapters and the head
      ({'head': True, 'kernel': False}, [True, True])

    Args:
      tree: any pytree that holds adapters (as returned by `lora.init`) and base leaves.
      also: a regex (``re.search`` on the path; the syntax of `LoraConfig` patterns) of base
        leaves to train too.

    Returns:
      A pytree of the structure of ``tree`` with a bool at every leaf.

    Raises:
      ValueError: ``also`` is not a valid regex, or uses a feature the linear-time matcher
        refuses (a backreference, a lookaround, ...); the message names ``also``.
      TypeError: ``also`` is not a string.
    """
    pattern = _regex.compile(also, "lora.trainable: also") if also is not None else None

    def label(keypath: KeyPath, x: Leaf) -> PyTree:
        if is_lora(x) or is_extra(x):
            return jax.tree.map(lambda _: True, x)
        return bool(pattern and pattern.search(path_str(keypath)))

    return jax.tree_util.tree_map_with_path(
        label, tree, is_leaf=lambda x: is_lora(x) or is_extra(x)
    )


def freeze_base(
    tx: optax.GradientTransformation, tree: PyTree, also: str | None = None
) -> optax.GradientTransformation:
    """Wraps ``tx`` to update only the adapter leaves of ``tree`` (and those matching ``also``).

    Every other leaf gets an exact zero update and no optimizer state. Unlike a plain
    ``optax.masked(tx, mask)``, which passes the raw gradient through for masked-out leaves,
    nothing reaches a frozen leaf.

    Examples:
      >>> params = {"kernel": jnp.ones((3, 4))}
      >>> adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2))
      >>> tree = {"params": params, "lora": adapters}
      >>> tx = lora.freeze_base(optax.adamw(1e-3), tree)
      >>> opt_state = tx.init(tree)
      >>> grads = jax.tree.map(jnp.ones_like, tree)
      >>> updates, opt_state = tx.update(grads, opt_state, tree)
      >>> tree = optax.apply_updates(tree, updates)
      >>> bool((tree["params"]["kernel"] == 1.0).all())  # the base did not move
      True

    Args:
      tx: the optimizer for the trainable leaves.
      tree: the joint tree the optimizer will see (only its structure and paths are used).
      also: a regex (``re.search`` on the path) of base leaves to train too, e.g. ``"head"``.

    Returns:
      An optax ``GradientTransformation``.

    Raises:
      ValueError: ``also`` is not a valid regex (as for `trainable`).
      TypeError: ``also`` is not a string.
    """
    mask = trainable(tree, also)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": _frozen()}, labels)


def _frozen() -> optax.GradientTransformation:
    """Stateless updates of ``-0.0``: ``p + (-0.0)`` is ``p`` bit for bit for every ``p``.

    (``optax.set_to_zero`` gives ``+0.0``, which turns a ``-0.0`` parameter into ``+0.0`` when
    the step is not jitted: XLA folds ``p + 0`` away, eager execution does not.)
    """

    def init_fn(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: PyTree, state: optax.EmptyState, params: PyTree = None
    ) -> tuple[PyTree, optax.EmptyState]:
        del params
        return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(init_fn, update_fn)
