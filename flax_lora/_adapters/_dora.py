"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), as PEFT's ``use_dora``.

An adapter with a magnitude ``m`` (`LoraWeights.m`, one entry per output unit of the kernel)
stands for the kernel

    W = m * V / ||V||,   V = W0 + scale * a @ b,

where ``||V||`` is the L2 norm of ``V`` over the kernel's input axes, one value per output unit,
and is detached from the gradient (``jax.lax.stop_gradient``; the paper's section 4.3 and PEFT).
For a layered kernel (``nn.scan``, ``LoraWeights.layer_axes``) ``m`` has the leading layer axes too.
The axes match PEFT's, so that files interoperate: a Linear's norm runs over ``in_features`` (a
Flax Dense kernel's rows), a Conv's over ``(in_channels, *kernel_size)`` (all of a Flax conv
kernel's axes but the last), an Embedding's over the vocabulary (the embedding's rows: PEFT's
``lora_magnitude_vector`` of an Embedding has one entry per embedding dimension).

Factored execution (`factored_norm`) computes ``||V||**2`` per output unit as
``||W0||**2 + 2 scale colsum(W0 * (a @ b)) + scale**2 ||a @ b||**2`` from ``W0.T @ a`` (``O x r``)
and ``a.T @ a`` (``r x r``), never forming ``a @ b``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from flax_lora._adapters._delta import HIGHEST, delta, layer_mask
from flax_lora._adapters._weights import AdapterLayout, LoraWeights


def weight_norm(kernel: jax.Array, w: LoraWeights, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """``||W0 + scale * a @ b||`` over the input axes, shape ``w.out_shape``, in ``dtype``.

    Not detached: `lora.init` uses it for ``m``; `dora_kernel` detaches it.
    """
    if w.layer_at:  # layer axes held elsewhere: the norm of the scan layout
        return weight_norm(w.to_scan(kernel), w.replace(layer_at=0), dtype)
    v = kernel.astype(dtype) + delta(w, dtype)
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(sorted(w.in_axes))))


def dora_kernel(kernel: jax.Array, w: LoraWeights, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """The DoRA kernel ``m * V / stop_gradient(||V||)`` in the kernel's layout, in ``dtype``."""
    if w.layer_at:  # layer axes held elsewhere: computed in the scan layout, moved back
        return w.to_stored(dora_kernel(w.to_scan(kernel), w.replace(layer_at=0), dtype))
    v = kernel.astype(dtype) + delta(w, dtype)
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(sorted(w.in_axes)), keepdims=True))
    m = jnp.expand_dims(magnitude(w).astype(dtype), tuple(sorted(w.in_axes)))
    factor = magnitude_ratio(m, jax.lax.stop_gradient(norm))
    mask = layer_mask(w)
    if mask is not None:  # a layered kernel adapted on some layers only: the others stay W0
        keep = jnp.asarray(mask > 0).reshape(mask.shape + (1,) * (factor.ndim - 1))
        factor = jnp.where(keep, factor, jnp.ones((), dtype))
    return v * factor


def factored_norm(kernel: jax.Array, w: LoraWeights) -> jax.Array:
    """``||W0 + scale * a @ b||`` over the input axes without forming ``a @ b`` (float32).

    Shape ``w.out_shape``; detached from the gradient. Three contractions on the kernel's own
    layout (no transposed copy of ``W0`` and, for a float32 kernel, no kernel-sized array):
    ``||W0||**2`` per output unit, ``W0.T @ a`` (``O x r``) and ``a.T @ a`` (``r x r``).
    """
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    ins = tuple(w.in_axes)
    outs = tuple(w.out_axes)
    k = len(ins)
    a = jax.lax.stop_gradient(w.a)
    b = jax.lax.stop_gradient(w.b).astype(acc)
    w0 = kernel.astype(acc)  # a no-op for float32 kernels; the result is detached below
    dot = lambda x, y, dn: jax.lax.dot_general(
        x, y, dn, precision=HIGHEST, preferred_element_type=acc
    ).astype(acc)
    w0_sq = dot(w0, w0, ((ins, ins), (outs, outs)))  # (*O,)
    a_f = a.astype(acc)
    w0t_a = dot(w0, a_f, ((ins, tuple(range(k))), ((), ())))  # (*O, r)
    cross = jnp.sum(jnp.moveaxis(w0t_a, -1, 0) * b, axis=0)  # colsum(W0 * (a @ b)), (*O,)
    gram = dot(a_f, a_f, ((tuple(range(k)), tuple(range(k))), ((), ())))  # (r, r)
    gb = jnp.tensordot(gram, b, axes=(1, 0), precision=HIGHEST)  # (r, *O)
    ab_sq = jnp.sum(gb * b, axis=0)  # ||a @ b||**2 per output unit
    s = jnp.asarray(w.scale, acc)
    sq = w0_sq + 2.0 * s * cross + s * s * ab_sq
    return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(sq, 0.0)))


def dora_factor(kernel: jax.Array, w: LoraWeights) -> jax.Array:
    """``m / stop_gradient(||V||)`` per output unit (shape ``w.out_shape``), factored."""
    norm = factored_norm(kernel, w)
    m = magnitude(w)
    m = m.astype(jnp.promote_types(m.dtype, jnp.float32))
    return magnitude_ratio(m, norm.astype(m.dtype))


def layered_factor(
    kernel: jax.Array,
    inner: AdapterLayout,
    a: jax.Array,
    b: jax.Array,
    m: jax.Array,
    layer_axes: int,
    keep: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """DoRA's ``g = m / ||V||`` (norm detached, factored) per layer of a layered kernel
    (``nn.scan``), shape ``(*L, *O)``, and the magnitude that gives it.

    ``inner`` holds one layer's metadata (input axes and kernel shape past the ``layer_axes``
    leading axes); ``a``, ``b``, ``m`` carry the layer axes. Where ``keep`` (broadcast from the
    leading axes) is False, the layer is not DoRA: ``g = 1`` and the magnitude is ``||V||``.
    """
    norm_of = lambda k, a_, b_: factored_norm(k, inner.with_factors(a_, b_))
    for _ in range(layer_axes):
        norm_of = jax.vmap(norm_of)
    acc = jnp.promote_types(m.dtype, jnp.float32)
    norm = norm_of(kernel, a, b).astype(acc)
    g = magnitude_ratio(m.astype(acc), norm)
    if keep is None:
        return g, m
    keep = jnp.reshape(keep, jnp.shape(keep) + (1,) * (g.ndim - jnp.ndim(keep)))
    m_eff = jnp.where(keep, m.astype(acc), norm).astype(m.dtype)
    return jnp.where(keep, g, jnp.ones((), acc)), m_eff


def magnitude(w: LoraWeights) -> jax.Array:
    """DoRA's magnitude ``w.m``; ``ValueError`` for a plain LoRA adapter (no ``m``)."""
    if w.m is None:
        raise ValueError("DoRA needs an adapter with a magnitude m; got a plain LoRA adapter.")
    return w.m


def magnitude_ratio(m: jax.Array, norm: jax.Array) -> jax.Array:
    """``m / norm``, and 1 where ``norm`` is 0: a zero column of ``V`` stays zero (rather than
    NaN, and with no NaN in the gradient either)."""
    nonzero = norm > 0
    return jnp.where(nonzero, m / jnp.where(nonzero, norm, jnp.ones((), norm.dtype)), 1.0)
