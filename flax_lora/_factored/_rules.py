"""The factored rules: how an op that uses an adapted kernel is computed without forming it.

One rule per kind of use, each computing ``op(x, W0) + branch`` where the low-rank branch is
one small function of the layer input and the two factors:

- `dense_branch`: ``(x @ a) @ (scale * b)`` on 2-D ``(tokens, features)`` operands, for
  ``dot_general`` (Dense, DenseGeneral, Einsum; also a kernel contracted on its output axes, as
  ``Embed.attend`` does: then ``a`` and ``b`` swap roles);
- `embed_branch`: the gathered rows of ``a`` times ``scale * b``, for an Embed lookup (``gather``);
- `conv_branch`: ``conv(x, a)`` contracted with ``scale * b``, for ``conv_general_dilated``.

A rule returns a string, the reason, when the use does not fit; the interpreter then merges the
kernel (mode ``"auto"``) or raises (mode ``"factored"``) with that reason in the message.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flax_lora import _jaxpr as jx
from flax_lora._factored._lowrank import conv_branch, embed_branch
from flax_lora._factored._quant import as_array, base_product, quant_gather
from flax_lora._factored._view import I_SIDE, O_SIDE, KernelView, cast_like, dora_scale

Rejected = str  # the reason a use cannot be factored


# -- helpers -------------------------------------------------------------------------------
def _matrix(f: jax.Array, rows: Sequence[int], cols: Sequence[int]) -> jax.Array:
    """Transposes ``f`` to ``(*rows, *cols)`` and flattens it to a matrix."""
    perm = (*rows, *cols)
    if perm != tuple(range(f.ndim)):
        f = jnp.transpose(f, perm)
    n = math.prod(f.shape[: len(rows)])
    return jnp.reshape(f, (n, -1))


def _scaled(b: jax.Array, scale: float, dtype: Any) -> jax.Array:
    return cast_like(b * jnp.asarray(scale, b.dtype), dtype)


# -- the rules -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DensePlan:
    """How one ``dot_general`` of an activation with a kernel view is factored.

    Attributes:
      x_first: whether the activation is the left operand.
      x_perm: the transpose that puts the activation's contracted axes last (sorted), or None.
      lead: the sizes of the activation's free axes.
      first: the factor contracted with the activation, as a ``(K, r)`` matrix.
      second: the other factor, scaled, as an ``(r, M)`` matrix.
      tail: the sizes of the kernel's free axes (the output's last axes, unflattened).
      on_out: whether the kernel is contracted on its output axes (``Embed.attend``).
      x_scale: DoRA with ``on_out``: the factor ``m / ||V||`` laid out along the activation's
        contracted axes (the activation is scaled by it before both products), else None.
    """

    x_first: bool
    x_perm: tuple[int, ...] | None
    lead: tuple[int, ...]
    first: Any
    second: Any
    tail: tuple[int, ...]
    on_out: bool = False
    x_scale: Any = None

    def prepare(self, x: jax.Array) -> jax.Array:
        """The activation as ``(*lead, K)``."""
        if self.x_perm is not None:
            x = jnp.transpose(x, self.x_perm)
        return jnp.reshape(x, (*self.lead, -1))

    def shares_input_with(self, other: DensePlan) -> bool:
        if self.x_scale is not None or other.x_scale is not None:  # DoRA scales x per kernel
            return False
        return (self.x_first, self.x_perm, self.lead) == (other.x_first, other.x_perm, other.lead)


def plan_dense(
    eqn: Any, x_shape: tuple[int, ...], v: KernelView, x_first: bool
) -> DensePlan | Rejected:
    """The factored form of ``dot_general`` of an activation with a kernel view ``v``."""
    d = jx.dot(eqn)
    lc, rc, lb, rb = d.lhs_contract, d.rhs_contract, d.lhs_batch, d.rhs_batch
    xc, vc, vb = (lc, rc, rb) if x_first else (rc, lc, lb)
    if vb:
        return "it is contracted with batch dimensions"
    sides = {v.meta.side[d] for d in vc}
    n_in, n_out = len(v.axes(I_SIDE)), len(v.axes(O_SIDE))
    pairs = sorted(zip(xc, vc, strict=True))
    dt = v.dtype
    if sides == {I_SIDE} and len(vc) == n_in:  # x @ a @ b
        pos = {d: k for k, d in enumerate(v.axes(I_SIDE))}
        first = _matrix(v.a, [pos[p[1]] for p in pairs], [v.a.ndim - 1])
        second = jnp.reshape(v.b, (v.b.shape[0], -1))
        tail = tuple(v.shape[d] for d in v.axes(O_SIDE))
    elif sides == {O_SIDE} and len(vc) == n_out:  # x @ b.T @ a.T (Embed.attend)
        pos = {d: k + 1 for k, d in enumerate(v.axes(O_SIDE))}
        first = _matrix(v.b, [pos[p[1]] for p in pairs], [0])
        second = _matrix(v.a, [v.a.ndim - 1], list(range(v.a.ndim - 1)))
        tail = tuple(v.shape[d] for d in v.axes(I_SIDE))
    else:
        return "it is contracted on a mix of its input and output axes"
    free = [d for d in range(len(x_shape)) if d not in xc]
    perm = (*free, *[p[0] for p in pairs])
    on_out = sides == {O_SIDE}
    x_scale = None
    if on_out and v.g is not None:  # x @ (g * V).T == (x * g) @ V.T: g goes onto x
        x_of = dict(zip(vc, xc, strict=True))
        x_scale = dora_scale(v, len(x_shape), [x_of[d] for d in v.axes(O_SIDE)], dt)
    return DensePlan(
        x_first=x_first,
        x_perm=None if perm == tuple(range(len(x_shape))) else perm,
        lead=tuple(x_shape[d] for d in free),
        first=cast_like(first, dt),
        second=_scaled(second, v.scale, dt),
        tail=tail,
        on_out=on_out,
        x_scale=x_scale,
    )


def finish_dense(
    eqn: Any, x: Any, v: KernelView, plan: DensePlan, low: jax.Array, x_drop: Any = None
) -> list[Any]:
    """``dot_general(x, W0) + low``, with the branch ``low`` (``(*lead, M)``) laid out to fit.

    DoRA (``v.g``, the kernel contracted on its input axes): ``g * (x @ W0 + low)``, or with
    LoRA dropout (``x_drop``, the dropped activation), PEFT's
    ``x @ W0 + (g - 1) * (x_drop @ W0) + g * low``. (With ``plan.on_out`` the activation was
    scaled by ``g`` before, see `DensePlan`.)
    """
    base_out = base_product(eqn, x, v.base, plan.x_first)  # a quantized W0 dequantized here
    low = jnp.reshape(low, (*plan.lead, *plan.tail))
    if not plan.x_first:  # dot_general(W, x): the kernel's free axes come first
        k = len(plan.lead)
        low = jnp.transpose(low, (*range(k, low.ndim), *range(k)))
    if v.g is None or plan.on_out:
        return [base_out + cast_like(low, base_out.dtype)]
    k, n = len(plan.lead), len(plan.tail)
    o_pos = list(range(k, k + n)) if plan.x_first else list(range(n))
    drop_out = None
    if x_drop is not None:
        drop_out = base_product(eqn, x_drop, v.base, plan.x_first)
    return [_dora_out(base_out, low, v, o_pos, drop_out)]


def _dora_out(
    base_out: jax.Array, low: jax.Array, v: KernelView, o_pos: list[int], drop_out: Any = None
) -> jax.Array:
    """``g * (base_out + low)`` (or PEFT's dropout form), in at least float32, cast back."""
    acc = jnp.promote_types(base_out.dtype, jnp.float32)
    g = dora_scale(v, base_out.ndim, o_pos, acc)
    base, low = cast_like(base_out, acc), cast_like(low, acc)
    if drop_out is None:
        out = (base + low) * g
    else:
        out = base + (g - 1.0) * cast_like(drop_out, acc) + g * low
    return cast_like(out, base_out.dtype)


def gather_rule(eqn: Any, v: KernelView, indices: Any) -> list[Any] | Rejected:
    """``gather`` of rows of a kernel view (an Embed lookup)."""
    dn = jx.param(eqn, "dimension_numbers")
    sizes = tuple(jx.param(eqn, "slice_sizes"))
    ins, outs = v.axes(I_SIDE), v.axes(O_SIDE)
    if getattr(dn, "operand_batching_dims", ()):
        return "it is gathered with batching dimensions"
    if set(dn.collapsed_slice_dims) != set(ins) or set(dn.start_index_map) != set(ins):
        return "the gather does not pick whole rows along the kernel's input axes"
    if any(sizes[d] != v.shape[d] for d in outs):
        return "the gather takes partial slices of the output axes"
    base_out = quant_gather(eqn, v.base, indices)  # a quantized table: rows dequantized
    pos = {d: k for k, d in enumerate(ins)}
    n_batch = indices.ndim - 1
    a_dn = dn._replace(
        offset_dims=(n_batch,),
        collapsed_slice_dims=tuple(pos[d] for d in dn.collapsed_slice_dims),
        start_index_map=tuple(pos[d] for d in dn.start_index_map),
    )
    a_sizes = (*[1] * len(ins), v.a.shape[-1])
    rows = jx.rebind(eqn, (v.a, indices), dimension_numbers=a_dn, slice_sizes=a_sizes)
    b = _scaled(jnp.reshape(v.b, (v.b.shape[0], -1)), v.scale, v.dtype)
    low = embed_branch(rows, b)
    low = jnp.reshape(low, (*low.shape[:-1], *[v.shape[d] for d in outs]))
    # base output: offset dims carry the kernel's output axes; the rest are batch axes
    offset = tuple(dn.offset_dims)
    batch_pos = [d for d in range(base_out.ndim) if d not in offset]
    src = [0] * base_out.ndim
    for k, d in enumerate(batch_pos):
        src[d] = k
    for k, d in enumerate(offset):
        src[d] = n_batch + k
    if src != list(range(base_out.ndim)):
        low = jnp.transpose(low, src)
    if v.g is not None:  # DoRA: the offset dims are the kernel's output axes, in view order
        return [_dora_out(base_out, low, v, list(offset))]
    return [base_out + cast_like(low, base_out.dtype)]


def conv_rule(
    eqn: Any, x: Any, v: KernelView, dropout: Callable[[Any, KernelView], Any]
) -> list[Any] | Rejected:
    """``conv_general_dilated`` of an input ``x`` with a kernel view ``v``."""
    if jx.param(eqn, "feature_group_count") != 1 or jx.param(eqn, "batch_group_count") != 1:
        return "it is a grouped convolution"
    dn = jx.param(eqn, "dimension_numbers")
    out_feat, *in_axes = dn.rhs_spec
    if v.axes(O_SIDE) != [out_feat] or sorted(v.axes(I_SIDE)) != sorted(in_axes):
        return "its input and output axes are not the convolution's (in, spatial) and out axes"
    w0 = as_array(v.base)  # a quantized base is dequantized at the convolution
    base_out = jx.bind(eqn, (x, w0))[0]
    pos = {d: k for k, d in enumerate(v.axes(I_SIDE))}
    r_axis = v.a.ndim - 1
    a_dn = dn._replace(rhs_spec=(r_axis, *[pos[d] for d in in_axes]))
    conv = lambda lhs, a: jx.rebind(eqn, (lhs, a), dimension_numbers=a_dn)
    b = _scaled(v.b, v.scale, v.dtype)
    x_drop = dropout(x, v)
    low = conv_branch(x_drop, cast_like(v.a, v.dtype), b, conv, dn.out_spec[1])
    if v.g is not None:  # DoRA, with PEFT's dropout form when dropout is on
        drop_out = None if x_drop is x else jx.bind(eqn, (x_drop, w0))[0]
        return [_dora_out(base_out, low, v, [dn.out_spec[1]], drop_out)]
    return [base_out + cast_like(low, base_out.dtype)]
