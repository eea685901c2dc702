"""DoRA in a stack of adapters (`lora.stack`): the per-adapter factor ``g = m / ||V||``.

A `StackedLoraWeights` with DoRA holds the magnitudes ``m`` ``(N, *L, *O)`` and the static
flags `StackedLoraWeights.dora`. For routing, ``g`` of every stacked adapter is computed once
per call from the base kernel and the stacked factors (the factored norm of `flax_lora._dora`,
mapped over the adapters and layer axes: no kernel-sized array per adapter), plus one row for
the base model (``ids == -1``: zero factors, ``g = 1``), then gathered per example. A plain
adapter's ``g`` is 1, i.e. it behaves as a DoRA adapter whose magnitude is ``||W0 + a @ b||``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flax_lora._adapters import LoraWeights
from flax_lora._dora import layered_factor


def stacked_dora(w: Any, kernel: Any) -> tuple[jax.Array, jax.Array]:
    """``(g, m_eff)`` for every adapter of ``w`` (a DoRA `StackedLoraWeights`) and the base.

    Both have shape ``(N + 1, *L, *O)``, row ``N`` being the base model. ``g = m / ||V||`` (the
    norm detached) where the adapter is DoRA (`StackedLoraWeights.dora_keep`), else 1;
    ``m_eff`` is the magnitude that gives that ``g``: ``m`` where DoRA, else ``||V||`` (detached),
    for code that forms the DoRA kernel (`lora.merge`, `materialize`).
    """
    n_layer = w.layer_axes
    inner = LoraWeights(
        a=None,
        b=None,
        scale=1.0,
        in_axes=tuple(d - n_layer for d in w.in_axes),
        kernel_shape=tuple(w.kernel_shape[n_layer:]),
        kind=w.kind,
    )
    with_base = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:1])])  # row N: the base
    keep = with_base(jnp.asarray(w.dora_keep()))
    one = lambda a, b, m, k: layered_factor(kernel, inner, a, b, m, n_layer, k)
    g, m_eff = jax.vmap(one)(with_base(w.a), with_base(w.b), with_base(w.m), keep)
    return g, m_eff  # (N + 1, *L, *O)


def gather_dora(w: Any, kernel: Any, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`stacked_dora` gathered by ``ids`` (``(B,)`` or a scalar): ids outside ``[0, N)``
    (``-1``, or out-of-range traced ids) take the base row (``g = 1``)."""
    n = w.num_adapters
    idx = jnp.where((ids < 0) | (ids >= n), n, ids)
    g, m_eff = stacked_dora(w, kernel)
    return jnp.take(g, idx, axis=0), jnp.take(m_eff, idx, axis=0)
