"""The base kernel ``W0`` of a view: an array, or a quantized kernel dequantized at its use.

A `QuantizedKernel` (QLoRA's base, `lora.quantize`) enters the interpreted model as a `QuantBase`:
the codes and scales, plus the layout ops the model applies to the kernel (dtype promotion,
transposes, reshapes), recorded instead of applied. Nothing is dequantized until an op uses
the kernel:

- ``dot_general`` (Dense, DenseGeneral, Einsum, ``Embed.attend``): `base_product`, a
  `jax.custom_vjp` that dequantizes the kernel at the product and again in the backward pass,
  whose residuals are the codes (never the float kernel); each dequantization is made
  data-dependent on the product's input (forward) or incoming gradient (backward) by adding a
  zero computed from its first element to its scales and NF4 levels (`_zero_of`: exactly 0 for
  every value, a NaN or inf included, so no value of the data reaches the kernel), so XLA can
  neither hoist it to the start of the step nor share one float copy between the passes;
- ``gather`` (an Embed lookup of a 2-D embedding): `base_gather`, the rows are gathered from the
  codes and only they are dequantized (nf4: when each row is whole blocks; otherwise the embedding
  is dequantized at the lookup);
- ``scan`` over a layered kernel (``nn.scan`` / ``nnx.scan``): the scan slices the codes and
  scales per layer (`layer_base`), so the body dequantizes one layer's kernel; with remat on
  the body it is dequantized again in that layer's backward step;
- any other use: the kernel is dequantized there (`as_array`: ``dequantize_kernel`` then the
  recorded ops).

A `QuantBase` stands in for ``W0`` in an adapted kernel's `KernelView` (its ``root`` and
``base``) and, for a quantized kernel without adapter, on its own; the rules of the ops above
(`flax_lora._factored._rules`) serve both. The numbers are those of
``apply_fn(lora.dequantize(params))``: the same dequantization, only placed elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeGuard, TypeVar, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_lora import _jaxpr as jx
from flax_lora._quant._formats import (
    QuantizedKernel,
    block_absmax,
    decode,
    dequantize_kernel,
    int8_values,
    is_quantized,
    nf4_values,
)
from flax_lora._typing import Leaf

T = TypeVar("T")


@dataclasses.dataclass(eq=False)
class _Meta:
    """The static part of a `QuantBase` (compared by identity, so it can sit in a treedef)."""

    ops: tuple[tuple[jx.Primitive, dict[str, Any]], ...]  # layout ops recorded, in order
    shape: tuple[int, ...]  # after the ops
    dtype: np.dtype  # after the ops


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantBase:
    """A quantized kernel as the interpreted model sees it: codes plus pending layout ops.

    Attributes:
      q: the `QuantizedKernel` (its arrays are this node's leaves).
      meta: the recorded layout ops and the shape and dtype of the kernel after them.
    """

    q: QuantizedKernel
    meta: _Meta = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    @property
    def dtype(self) -> np.dtype:
        return self.meta.dtype

    @property
    def ndim(self) -> int:
        return len(self.meta.shape)

    def value(self, tie: jax.Array | None = None) -> jax.Array:
        """The float kernel: dequantized, then the recorded ops applied.

        ``tie``: a float32 zero computed from data (an activation, a gradient; `_zero_of`).
        It is added to the scales and to the NF4 levels, so that XLA can compute the
        float kernel only once that data exists: not hoisted to the start of the step, not
        shared between the forward and backward passes. (XLA:CPU drops optimization barriers
        before it schedules, so they cannot do this: measured on `benchmarks/quant.py`, the
        barriers alone leave 16-69 MiB more temporaries than with the tie.)"""
        tied = tie is not None and not self.q.layer_axes
        out = decode(self.q, tie) if tied else dequantize_kernel(self.q)
        for prim, params in self.meta.ops:
            out = prim.bind(out, **params)
        return out


def _zero_of(x: jax.Array) -> jax.Array:
    """A float32 zero that XLA cannot compute before ``x``: ``0 * x[0]``, with a non-finite
    ``x[0]`` replaced by 0 first, so that it is exactly 0 (or -0) whatever ``x`` holds and a
    NaN or inf in ``x`` never reaches the kernel (only that example's rows of the product are
    non-finite, as with a float base). XLA does not fold it away: it cannot know the select's
    result finite, and ``0 * y`` is not 0 for every float ``y``."""
    first = lax.stop_gradient(jnp.reshape(x, (-1,))[0]).astype(jnp.float32)
    return jnp.float32(0.0) * jnp.where(jnp.isfinite(first), first, jnp.float32(0.0))


Base = jax.Array | QuantBase
"""The base kernel ``W0`` of a view, or a kernel without adapter: an array or a `QuantBase`."""


def as_base(leaf: T) -> T | QuantBase:
    """How an input leaf enters the interpreted model: a quantized kernel as the `QuantBase`
    that no op has touched yet, anything else as it is."""
    if not is_quantized(leaf):
        return leaf
    return QuantBase(leaf, _Meta((), tuple(leaf.shape), jnp.dtype(leaf.dtype)))


def is_quant_base(x: object) -> TypeGuard[QuantBase]:
    return isinstance(x, QuantBase)


@overload
def as_array(x: Base) -> jax.Array: ...
@overload
def as_array(x: T) -> T: ...
def as_array(x: object) -> object:
    """``x`` itself, or for a `QuantBase` the dequantized kernel (at this use)."""
    return x.value() if isinstance(x, QuantBase) else x


def input_aval(x: Leaf) -> jax.core.ShapedArray:
    """The abstract value the model is traced with for an input leaf (a `QuantizedKernel`
    stands for its float kernel)."""
    if is_quantized(x):
        return jax.core.ShapedArray(tuple(x.shape), jnp.dtype(x.dtype))
    return jax.typeof(x)


def base_layout(
    x: Base, prim: jx.Primitive, params: dict[str, Any], out_aval: jax.core.ShapedArray
) -> Base:
    """A layout op (transpose, reshape, dtype cast, ...) on an array or a `QuantBase`."""
    if not isinstance(x, QuantBase):
        return prim.bind(x, **params)
    meta = _Meta((*x.meta.ops, (prim, params)), tuple(out_aval.shape), jnp.dtype(out_aval.dtype))
    return QuantBase(x.q, meta)


# -- scan: one layer at a time ---------------------------------------------------------------
def _per_layer(q: QuantizedKernel) -> QuantizedKernel | None:
    """``q`` with at least one leading layer axis in its leaves, or ``None`` when a flat
    (``layer_axes == 0``) quantization cannot be cut per layer exactly."""
    if q.layer_axes:
        return q
    size = q.shape[0]
    if q.format == "int8":  # channel scales shared by the layers: repeat them per layer
        absmax = jnp.broadcast_to(q.absmax, (size, *q.absmax.shape))
        return dataclasses.replace(q, absmax=absmax, layer_axes=1)
    per_layer = int(np.prod(q.shape[1:]))
    if per_layer % q.block_size:
        return None  # a block straddles two layers
    absmax = q.absmax
    if q.double_quant:  # the block absmaxes in float (one per block: small)
        absmax = block_absmax(q)
    return QuantizedKernel(
        q.codes.reshape(size, -1),
        absmax.reshape(size, -1),
        None,
        None,
        shape=q.shape,
        dtype=q.dtype,
        format=q.format,
        block_size=q.block_size,
        layer_axes=1,
    )


def layer_base(x: Base) -> Base:
    """What a ``scan`` over the leading axis of ``x`` slices: a `QuantBase` whose leaves keep
    the layer axis first and whose static part is one layer's, so that `jax.lax.scan` hands
    the body one layer's quantized kernel; an array is returned as is. A quantized kernel that
    cannot be cut per layer (an nf4 block straddling layers, a reshape before the scan) is
    dequantized whole."""
    if not isinstance(x, QuantBase):
        return x
    q = _per_layer(x.q)
    if q is None or any(p.name not in jx.VALUE_OPS for p, _ in x.meta.ops):
        return x.value()
    ops = tuple((p, k) for p, k in x.meta.ops if p.name in jx.ELEMENTWISE)
    return QuantBase(q.layer(), _Meta(ops, tuple(x.shape[1:]), x.dtype))


# -- the base product ------------------------------------------------------------------------
def _zero_cotangent(x: jax.Array) -> jax.Array | np.ndarray:
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def base_product(eqn: jx.Eqn, x: jax.Array, base: Base, x_first: bool) -> jax.Array:
    """``dot_general(x, W0)`` (or ``(W0, x)``) with the equation's params; for a `QuantBase`
    ``W0`` is dequantized at the product and again in its backward pass (residuals: the
    codes), never kept between them."""
    if not isinstance(base, QuantBase):
        return jx.bind(eqn, (x, base) if x_first else (base, x))[0]
    leaves, treedef = jax.tree.flatten(base)

    def product(xv: jax.Array, w: jax.Array) -> jax.Array:
        return jx.bind(eqn, (xv, w) if x_first else (w, xv))[0]

    def kernel(ls: list[jax.Array], tie: jax.Array) -> jax.Array:
        return jax.tree.unflatten(treedef, ls).value(tie)

    @jax.custom_vjp
    def f(xv: jax.Array, ls: list[jax.Array]) -> jax.Array:
        return product(xv, kernel(ls, _zero_of(xv)))

    # x's shape and dtype, static: a residual must be an array (`jax.jit(wrap)` under `grad`
    # makes the residuals outputs of the jitted forward pass)
    x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def fwd(  # dequantized here, not earlier
        xv: jax.Array, ls: list[jax.Array]
    ) -> tuple[jax.Array, list[jax.Array]]:
        xv, ls = lax.optimization_barrier((xv, ls))
        out = product(xv, kernel(ls, _zero_of(xv)))
        return out, ls

    def bwd(ls: list[jax.Array], g: jax.Array) -> tuple[jax.Array, list[jax.Array | np.ndarray]]:
        g, ls = lax.optimization_barrier((g, ls))
        w = kernel(ls, _zero_of(g))  # dequantized again, once g is there
        (g_x,) = jax.linear_transpose(lambda xv: product(xv, w), x_aval)(g)
        return g_x, [_zero_cotangent(leaf) for leaf in ls]

    f.defvjp(fwd, bwd)
    return f(x, leaves)


def _rows(q: QuantizedKernel) -> QuantizedKernel | None:
    """A 2-D embedding's quantization with one leading "layer" per row (so rows can be gathered
    from the codes), or ``None`` when its nf4 blocks straddle rows."""
    if q.format == "int8":
        return q  # codes have the embedding's shape; the channel scales apply to every row
    rows = dataclasses.replace(q, shape=(q.shape[0], q.shape[1]), layer_axes=0)
    return _per_layer(rows)


def base_gather(eqn: jx.Eqn, base: Base, indices: jax.Array) -> jax.Array:
    """``gather`` of rows of a kernel (an Embed lookup). From a `QuantBase` of a 2-D embedding
    the rows are gathered from the codes and only they are dequantized; any other gather
    dequantizes the kernel at the lookup."""
    if not isinstance(base, QuantBase):
        return jx.bind(eqn, (base, indices))[0]
    dn, sizes = jx.param(eqn, "dimension_numbers"), tuple(jx.param(eqn, "slice_sizes"))
    q = base.q
    simple = (
        q.ndim == 2
        and not q.layer_axes
        and all(p.name in jx.VALUE_OPS for p, _ in base.meta.ops)
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not getattr(dn, "operand_batching_dims", ())
        and sizes == (1, q.shape[1])
        and tuple(dn.offset_dims) == (indices.ndim - 1,)
    )
    by_row = _rows(q) if simple else None
    if by_row is None:
        return jx.bind(eqn, (base.value(), indices))[0]

    def take(x: jax.Array) -> jax.Array:  # an out-of-range row of integer codes reads as code 0
        fill = jx.param(eqn, "fill_value") if jnp.issubdtype(x.dtype, jnp.floating) else 0
        return jx.rebind(eqn, (x, indices), slice_sizes=(1, *x.shape[1:]), fill_value=fill)

    if q.format == "int8":
        rows = int8_values(take(q.codes), q.absmax)
    else:
        rows = nf4_values(take(by_row.codes), take(by_row.absmax), q.block_size)
    out = rows.astype(q.dtype)
    for prim_op, op_params in base.meta.ops:
        out = prim_op.bind(out, **op_params)
    return out
