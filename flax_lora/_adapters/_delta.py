"""What the factors of a `LoraWeights` stand for: the update ``delta`` in the kernel's layout, the
masks of the carried indices an adapter does not adapt, and the check that it fits its kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from flax_lora._adapters._weights import LoraWeights

HIGHEST = jax.lax.Precision.HIGHEST
"""The precision of every product of factors (``a @ b`` and its kin), so that TPUs do not round
them through bfloat16."""


def check_fits(path: str, w: LoraWeights, shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` naming ``path`` unless ``w`` fits a kernel of ``shape``."""
    if tuple(shape) != tuple(w.stored_shape):
        raise ValueError(
            f"Adapter for {path!r} was made for a kernel of shape {tuple(w.stored_shape)}, but "
            f"the kernel at that path has shape {tuple(shape)}. Were these adapters made for "
            "another model?"
        )
    r = w.a.shape[-1] if w.a.ndim else None
    c = w.carried_shape
    if tuple(w.a.shape) != (*c, *w.in_shape, r) or tuple(w.b.shape) != (*c, r, *w.out_shape):
        raise ValueError(
            f"Adapter for {path!r}: expected a of shape {(*c, *w.in_shape, 'r')} and b of "
            f"shape {(*c, 'r', *w.out_shape)} with one rank r; got a {tuple(w.a.shape)}, "
            f"b {tuple(w.b.shape)}."
        )
    if w.m is not None and tuple(w.m.shape) != (*c, *w.out_shape):
        raise ValueError(
            f"DoRA adapter for {path!r}: expected a magnitude m of shape {tuple(w.out_shape)} "
            f"(the kernel's output axes); got {tuple(w.m.shape)}."
        )


def delta(w: LoraWeights, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """``scale * a @ b`` in the kernel's layout, computed in ``dtype`` (float32 by default).

    The product runs at the highest matmul precision, so TPUs do not round it through bfloat16.
    For a layered kernel (``nn.scan``) it is one product per layer (layers not picked by
    ``LoraConfig(layers=...)`` give zeros), with the layer axes where the kernel holds them
    (``LoraWeights.layer_at``). A DoRA adapter's magnitude is not applied here:
    `lora.merge` forms the DoRA kernel.

    Examples:
      >>> params = {"kernel": jnp.ones((3, 4))}
      >>> adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2, init="random"))
      >>> d = lora.delta(adapters["kernel"])  # the kernel's shape
      >>> d.shape, d.dtype
      ((3, 4), dtype('float32'))
      >>> w = adapters["kernel"]
      >>> bool(jnp.allclose(d, w.scale * w.a @ w.b))
      True

    Args:
      w: the `LoraWeights` of one kernel.
      dtype: the dtype to compute and return in.

    Returns:
      An array of the kernel's shape (``w.stored_shape``): the update ``merge`` adds for a
      plain LoRA adapter.
    """
    r = w.a.shape[-1]
    n_in = math.prod(w.in_shape)
    n_out = math.prod(w.out_shape)
    lead = w.carried_shape  # one product per carried index (a batched matmul)
    a = masked_factor(w, w.a.reshape(*lead, n_in, r).astype(dtype))
    b = w.b.reshape(*lead, r, n_out).astype(dtype)
    d = jnp.matmul(a, b, precision=HIGHEST) * jnp.asarray(w.scale, dtype)
    d = d.reshape(lead + w.in_shape + w.out_shape)
    order = w.carried_axes + w.in_axes + w.out_axes
    inverse = tuple(order.index(i) for i in range(len(order)))
    return w.to_stored(d.transpose(inverse))


def layer_mask(w: LoraWeights) -> np.ndarray | None:
    """For a layered kernel adapted on some layers only: 1.0 on the adapted indices of its first
    layer axis, 0.0 elsewhere (shape ``(L,)``); ``None`` when every layer is adapted."""
    if w.layers is None or not w.layer_axes:
        return None
    return np.isin(np.arange(w.kernel_shape[0]), np.asarray(w.layers, int)).astype(np.float32)


def carried_mask(w: LoraWeights, ndim: int | None = None) -> np.ndarray | None:
    """1.0 on the carried indices that ``w`` adapts, 0.0 on the others (today: the layers
    `layer_mask` picks); ``None`` when it adapts every index.

    Shape ``w.carried_shape``; with ``ndim``, that shape followed by size-1 axes up to ``ndim``
    axes, to broadcast against an array whose leading axes are the carried axes (a factor, a
    magnitude, or an array in the layout of a kernel whose carried axes lead).
    """
    mask = layer_mask(w)
    if mask is None:
        return None
    c = len(w.carried_axes)
    mask = np.broadcast_to(mask.reshape(mask.shape + (1,) * (c - 1)), w.carried_shape)
    return mask if ndim is None else mask.reshape(mask.shape + (1,) * (ndim - c))


def masked_factor(w: LoraWeights, x: jax.Array) -> jax.Array:
    """``x`` (leading axes: ``w``'s carried axes, e.g. a factor) zeroed on the carried indices
    ``w`` does not adapt (`carried_mask`), so they give a zero update and a zero gradient."""
    mask = carried_mask(w, jnp.ndim(x))
    return x if mask is None else x * jnp.asarray(mask, x.dtype)
