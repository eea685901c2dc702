"""The low-rank branches of the factored rules, and the Dense branch's custom JVP.

Each branch is one small function of the layer input and the two factors:

- `dense_branches`: ``(x @ a) @ (scale * b)`` on 2-D ``(tokens, features)`` operands, for
  ``dot_general`` (Dense, DenseGeneral, Einsum; also a kernel contracted on its output axes, as
  ``Embed.attend`` does: then ``a`` and ``b`` swap roles), for several adapters sharing one
  input at once;
- `embed_branch`: the gathered rows of ``a`` times ``scale * b``, for an Embed lookup;
- `conv_branch`: ``conv(x, a)`` contracted with ``scale * b``, for ``conv_general_dilated``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def cast_like(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` in ``dtype`` (no op when it already is)."""
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def dense_branches(
    x: jax.Array,
    a: Sequence[jax.Array],
    b: Sequence[jax.Array],
    precision: Any = None,
    out_type: Any = None,
) -> tuple[jax.Array, ...]:
    """``(x @ a_k) @ b_k`` for each adapter ``k`` sharing the input ``x`` (q, k, v of attention):
    ``x`` of shape ``(..., K)``, ``a_k`` ``(K, r_k)``, ``b_k`` ``(r_k, M_k)``.

    One product ``x @ [a_1 | a_2 | ...]`` replaces one per adapter, and in the backward pass
    one ``x``-sized read and one expansion serve them all. The leading axes are flattened to one
    token axis (a free reshape): on XLA:CPU the gradients of ``a`` and ``b`` then need no
    transposed copy of the activations. The product with ``b`` is written as an elementwise
    rank-``r`` expansion, which XLA fuses into whatever consumes it (the base matmul's
    epilogue, an activation), instead of a rank-``r`` matmul that writes and re-reads a
    (tokens, M) array; `_lowrank` gives it a custom JVP whose transpose (the backward pass)
    is made of matmuls and one fusable expansion, none with a large operand transposed.
    """
    lead = x.shape[:-1]
    x2 = jnp.reshape(x, (math.prod(lead), x.shape[-1]))
    outs = _lowrank(x2, tuple(a), tuple(b), precision, out_type)
    return tuple(jnp.reshape(u, (*lead, u.shape[-1])) for u in outs)


def _dot(x: jax.Array, y: jax.Array, cx: int, cy: int, precision: Any, out: Any) -> jax.Array:
    return lax.dot_general(x, y, (((cx,), (cy,)), ((), ())), precision, preferred_element_type=out)


def _narrow(t: jax.Array, m: jax.Array, dtype: Any) -> bool:
    """Whether ``t``, ``m`` and the result are all one floating dtype narrower than float32
    (bfloat16, float16): the branch then runs in that dtype, as the base layer does."""
    dt = jnp.dtype(dtype)
    return t.dtype == m.dtype == dt and jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4


def _expand(t: jax.Array, m: jax.Array, dtype: Any, unrolled: bool = False) -> jax.Array:
    """``t @ m`` for a small inner dimension ``r``, as elementwise multiply-adds.

    XLA fuses these into the consumer (the base matmul's epilogue, an activation). Two
    spellings: a broadcast-multiply-sum (used in training, where XLA:CPU fuses it into the
    matmul epilogue best) or ``r`` unrolled multiply-adds (used for a forward pass alone, where
    the sum form makes XLA:CPU pull whole MLP blocks, activation and all, into one slower
    fusion). Both accumulate in at least float32.

    In training with ``t``, ``m`` and ``dtype`` all bfloat16 (or float16) it is a matmul in
    that dtype instead, as the base layer's own (XLA's CPU, GPU and TPU dots accumulate these
    in float32 and round once): fused into an activation's input (a gated MLP's gate and up
    projections), the float32 sum form leaves XLA holding float32 and base-product buffers of
    (tokens, features) for the backward pass, about 6% of the step's peak on a bfloat16
    Gemma-like decoder (``benchmarks/bf16_memory.py``). Asking the dot for a float32 result
    and casting it costs a float32 (tokens, features) buffer again.
    """
    if not unrolled and _narrow(t, m, dtype):
        return _dot(t, m, 1, 0, None, None)
    acc = jnp.promote_types(dtype, jnp.float32)
    t, m = t.astype(acc), m.astype(acc)
    if unrolled:
        out = t[:, 0:1] * m[0:1, :]
        for i in range(1, t.shape[1]):
            out = out + t[:, i : i + 1] * m[i : i + 1, :]
    else:
        out = jnp.sum(t[:, :, None] * m[None, :, :], axis=1)
    return out.astype(dtype)


def _splits(parts: Sequence[jax.Array], axis: int) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for p in parts:
        bounds.append((start, start + p.shape[axis]))
        start += p.shape[axis]
    return bounds


def _lowrank_outs(
    x2: Any, a: tuple, b: tuple, precision: Any, out: Any, unrolled: bool
) -> tuple[tuple, jax.Array, jax.Array]:
    """The branches' outputs, and ``a_all = [a_1 | a_2 | ...]`` and ``t = x2 @ a_all``."""
    a_all = a[0] if len(a) == 1 else jnp.concatenate(a, axis=1)
    t = _dot(x2, a_all, 1, 0, precision, out)
    outs = tuple(
        _expand(t[:, i:j], bk, jnp.result_type(t, bk), unrolled)
        for (i, j), bk in zip(_splits(a, 1), b, strict=True)
    )
    return outs, a_all, t


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _lowrank(x2: Any, a: tuple, b: tuple, precision: Any, out: Any) -> tuple:
    return _lowrank_outs(x2, a, b, precision, out, unrolled=True)[0]  # not differentiated


def _is_zero(t: Any) -> bool:
    return isinstance(t, SymbolicZero)


def _lowrank_jvp(precision: Any, out: Any, primals: tuple, tangents: tuple) -> tuple:
    """The tangent of the branches, linear in ``(dx, da, db)`` and written so that JAX's
    transpose of it (the backward pass of `jax.grad`) is made of matmuls and one fusable
    expansion, none with a large operand transposed:

    - ``dt = dx @ a`` as the broadcast-multiply-sum over ``K`` whose transpose is the expansion
      ``g_t @ a.T`` (fused into the consumer of the input's gradient); with ``x``, ``a`` and
      ``t`` all bfloat16 (or float16) a matmul in that dtype, transposed to the matmul
      ``g_t @ a.T``: the float32 expansion leaves a float32 (tokens, K) buffer there (see
      `_expand` for the forward's);
    - ``dt += x @ da`` contracted with ``da.T`` behind an optimization barrier: its transpose is
      ``g_t.T @ x`` of shape ``(r, K)``, then the barrier, then the transpose; without the
      barrier XLA folds the transpose into the dot, the ``(K, N) x (N, r)`` form that XLA:CPU
      runs ~10x slower;
    - ``dout_k = dt_k @ b_k + t_k @ db_k`` as two matmuls, transposed to ``g_k @ b_k.T`` and
      ``t_k.T @ g_k``.
    """
    x2, a, b = primals
    dx, da, db = tangents
    outs, a_all, t = _lowrank_outs(x2, a, b, precision, out, unrolled=False)
    dts = []
    if not _is_zero(dx):
        if _narrow(dx, a_all, t.dtype):  # bfloat16: a matmul, as the base layer's
            dts.append(_dot(dx, a_all, 1, 0, precision, out))
        else:
            acc = jnp.promote_types(dx.dtype, jnp.float32)
            dt = jnp.sum(dx.astype(acc)[:, None, :] * a_all.T.astype(acc)[None, :, :], axis=2)
            dts.append(dt.astype(t.dtype))
    if not all(_is_zero(d) for d in da):
        da_all = (
            jnp.concatenate(
                [
                    jnp.zeros(ak.shape, ak.dtype) if _is_zero(d) else d
                    for ak, d in zip(a, da, strict=True)
                ],
                axis=1,
            )
            if len(da) > 1
            else da[0]
        )
        da_t = lax.optimization_barrier(da_all.T)
        dts.append(
            lax.dot_general(
                x2, da_t, (((1,), (1,)), ((), ())), precision, preferred_element_type=out
            )
        )
    dt_all = sum(dts[1:], dts[0]) if dts else None
    douts = []
    for (i, j), bk, dbk, o in zip(_splits(a, 1), b, db, outs, strict=True):
        parts = []
        if dt_all is not None:
            parts.append(_dot(dt_all[:, i:j], cast_like(bk, dt_all.dtype), 1, 0, precision, None))
        if not _is_zero(dbk):
            parts.append(_dot(cast_like(t[:, i:j], dbk.dtype), dbk, 1, 0, precision, None))
        d = sum(parts[1:], parts[0]) if parts else jnp.zeros(o.shape, o.dtype)
        douts.append(cast_like(d, o.dtype))
    return outs, tuple(douts)


_lowrank.defjvp(_lowrank_jvp, symbolic_zeros=True)


def embed_branch(rows: jax.Array, b: jax.Array) -> jax.Array:
    """``rows @ b`` for gathered rows of ``a`` ``(..., r)`` and ``b`` ``(r, M)``."""
    lead = rows.shape[:-1]
    r2 = jnp.reshape(rows, (math.prod(lead), rows.shape[-1]))
    u = lax.dot_general(cast_like(r2, b.dtype), b, (((1,), (0,)), ((), ())))
    return jnp.reshape(u, (*lead, b.shape[-1]))


def conv_branch(
    x: jax.Array, a: jax.Array, b: jax.Array, conv: Callable[[Any, Any], Any], feature_axis: int
) -> jax.Array:
    """``conv(x, a)`` (``r`` output features) contracted with ``b`` ``(r, M)`` on its features."""
    t = jnp.moveaxis(conv(x, a), feature_axis, -1)
    lead = t.shape[:-1]
    t2 = jnp.reshape(t, (math.prod(lead), t.shape[-1]))
    u = lax.dot_general(cast_like(t2, b.dtype), b, (((1,), (0,)), ((), ())))
    u = jnp.reshape(u, (*lead, b.shape[-1]))
    return jnp.moveaxis(u, -1, feature_axis)
