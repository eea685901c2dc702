"""The rules of the ops that use a kernel: ``dot_general``, ``gather`` and ``conv_general_dilated``.

Each computes ``op(x, W0) + branch`` without forming the adapted kernel, the low-rank branch
being one small function of the layer input and the two factors (`flax_lora._factored._lowrank`):

- ``dot_general`` (Dense, DenseGeneral, Einsum; also a kernel contracted on its output axes, as
  ``Embed.attend`` does: then ``a`` and ``b`` swap roles): ``(x @ a) @ (scale * b)``, computed
  together with the later uses of the same activation by other kernels (q, k, v of attention);
- ``gather`` (an Embed lookup): the gathered rows of ``a`` times ``scale * b``;
- ``conv_general_dilated``: ``conv(x, a)`` contracted with ``scale * b``.

What every such rule checks first is in `kernel_use`: a routed kernel runs per example
(`flax_lora._factored._routing`), a layered kernel used whole and mode ``"merged"`` are
`Unfactored`; and an op on quantized kernels without adapter (QLoRA) dequantizes them at the
product or the lookup (`flax_lora._factored._quant_base`). LoRA dropout masks the branch input with
the equation's key; DoRA scales the output per unit by ``g`` (PEFT's form under dropout).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from flax_lora import _jaxpr as jx
from flax_lora._factored._contract import (
    Ahead,
    Evaluator,
    InterpValue,
    Result,
    Rule,
    Unfactored,
    no_rule,
)
from flax_lora._factored._lowrank import cast_like, conv_branch, dense_branches, embed_branch
from flax_lora._factored._quant_base import as_array, base_gather, base_product, is_quant_base
from flax_lora._factored._routing import routed_rule
from flax_lora._factored._view import I_SIDE, O_SIDE, KernelView
from flax_lora._typing import Key

BaseRule = Callable[[jx.Eqn, list[InterpValue]], Result]


# -- what every use of a kernel checks first ----------------------------------------------------
def kernel_use(base_rule: BaseRule) -> Callable[[Rule], Rule]:
    """Completes the rule of an op that uses a kernel with what every such rule does first.

    ``base_rule(eqn, invals)`` serves the op when no adapted kernel is among its inputs, only
    quantized kernels without adapter (QLoRA).
    """

    def complete(rule: Rule) -> Rule:
        @functools.wraps(rule)
        def checked(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
            views = [x for x in invals if isinstance(x, KernelView)]
            if not views:
                return base_rule(eqn, invals)
            if any(v.routed for v in views):  # one adapter per example: vmapped over them
                return routed_rule(interp, eqn, invals, key)
            if any(v.layered for v in views):
                return Unfactored(
                    "the layered kernel is used whole, not sliced by a scan over its layers"
                )
            if interp.mode == "merged":  # a quantized base: each use merges (`lora.wrap`)
                return Unfactored("mode 'merged'")
            return rule(interp, eqn, invals, key)

        return checked

    return complete


def dequantized(eqn: jx.Eqn, invals: list[InterpValue]) -> Unfactored:
    """Quantized kernels, no adapter, an op without a rule of its own: dequantized there."""
    del eqn, invals
    return Unfactored("dequantized at this use")


def _base_dense(eqn: jx.Eqn, invals: list[InterpValue]) -> Result:
    """``dot_general`` with one quantized kernel: dequantized at the product (`base_product`)."""
    dims = jx.dot(eqn)
    if sum(is_quant_base(x) for x in invals) == 1:
        x_first = is_quant_base(invals[1])
        if not (dims.rhs_batch if x_first else dims.lhs_batch):  # no expert (batch) axis
            x, w = (invals[0], invals[1]) if x_first else (invals[1], invals[0])
            return [base_product(eqn, x, w, x_first)]
    return dequantized(eqn, invals)


def _base_gather(eqn: jx.Eqn, invals: list[InterpValue]) -> Result:
    """``gather`` from a quantized embedding: only the rows are dequantized (`base_gather`)."""
    if is_quant_base(invals[0]) and not is_quant_base(invals[1]):
        return [base_gather(eqn, invals[0], invals[1])]
    return dequantized(eqn, invals)


# -- helpers ------------------------------------------------------------------------------------
def operand(interp: Evaluator, x: InterpValue, op: str, reason: str) -> jax.Array:
    """An operand the rule needs as an array: a view is merged, a quantized base dequantized."""
    return interp.merged(x, op, reason) if isinstance(x, KernelView) else as_array(x)


def dropout(x: jax.Array, v: KernelView, key: Key) -> jax.Array:
    """Inverted dropout at the adapter's rate on a LoRA branch input (only with a key)."""
    rate = float(v.meta.weights.dropout)
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _matrix(f: jax.Array, rows: Sequence[int], cols: Sequence[int]) -> jax.Array:
    """Transposes ``f`` to ``(*rows, *cols)`` and flattens it to a matrix."""
    perm = (*rows, *cols)
    if perm != tuple(range(f.ndim)):
        f = jnp.transpose(f, perm)
    n = math.prod(f.shape[: len(rows)])
    return jnp.reshape(f, (n, -1))


def _scaled(b: jax.Array, scale: float, dtype: DTypeLike) -> jax.Array:
    return cast_like(b * jnp.asarray(scale, b.dtype), dtype)


def dora_scale(
    v: KernelView, out_ndim: int, o_pos: list[int], dtype: DTypeLike
) -> jax.Array | None:
    """DoRA's ``g`` broadcastable against an array of ``out_ndim`` axes whose axes ``o_pos``
    are the view's O axes, in view order; ``None`` without DoRA."""
    if v.g is None:
        return None
    order = sorted(range(len(o_pos)), key=lambda k: o_pos[k])
    g = v.g if order == list(range(len(order))) else jnp.transpose(v.g, order)
    g = jnp.expand_dims(g, tuple(d for d in range(out_ndim) if d not in o_pos))
    return cast_like(g, dtype)


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
    first: jax.Array
    second: jax.Array
    tail: tuple[int, ...]
    on_out: bool = False
    x_scale: jax.Array | None = None

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
    eqn: jx.Eqn, x_shape: tuple[int, ...], v: KernelView, x_first: bool
) -> DensePlan | Unfactored:
    """The factored form of ``dot_general`` of an activation with a kernel view ``v``."""
    d = jx.dot(eqn)
    lc, rc, lb, rb = d.lhs_contract, d.rhs_contract, d.lhs_batch, d.rhs_batch
    xc, vc, vb = (lc, rc, rb) if x_first else (rc, lc, lb)
    if vb:
        return Unfactored("it is contracted with batch dimensions")
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
        return Unfactored("it is contracted on a mix of its input and output axes")
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
    eqn: jx.Eqn,
    x: jax.Array,
    v: KernelView,
    plan: DensePlan,
    low: jax.Array,
    x_drop: jax.Array | None = None,
) -> list[jax.Array]:
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
    base_out: jax.Array,
    low: jax.Array,
    v: KernelView,
    o_pos: list[int],
    drop_out: jax.Array | None = None,
) -> jax.Array:
    """``g * (base_out + low)`` (or PEFT's dropout form), in at least float32, cast back."""
    acc = jnp.promote_types(base_out.dtype, jnp.float32)
    g = dora_scale(v, base_out.ndim, o_pos, acc)
    if g is None:  # only a DoRA view's output goes here
        raise AssertionError(f"kernel {v.path!r} has no DoRA magnitude")
    base, low = cast_like(base_out, acc), cast_like(low, acc)
    if drop_out is None:
        out = (base + low) * g
    else:
        out = base + (g - 1.0) * cast_like(drop_out, acc) + g * low
    return cast_like(out, base_out.dtype)


@kernel_use(_base_dense)
def dense_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``dot_general`` with a kernel view, its branch shared with later siblings where it can."""
    x_pos = 0 if isinstance(invals[1], KernelView) else 1
    v = invals[1 - x_pos]
    if v.meta.why is not None:
        return no_rule(invals)
    x = operand(interp, invals[x_pos], "dot_general", "both operands are kernels")
    dims = jx.dot(eqn)
    plan = plan_dense(eqn, tuple(jnp.shape(x)), v, x_pos == 0)
    if isinstance(plan, Unfactored):
        return plan
    if plan.x_scale is not None:  # DoRA, kernel contracted on its output axes
        x = x * plan.x_scale.astype(x.dtype)
    branches = functools.partial(
        dense_branches, precision=dims.precision, out_type=dims.preferred_element_type
    )
    x_drop = None
    low = interp.branch_ahead()  # computed with an earlier sibling's
    peft_dora = v.g is not None and not plan.on_out and float(v.meta.weights.dropout) > 0
    if low is None and peft_dora and key is not None:  # DoRA with dropout: PEFT's form
        x_drop = dropout(x, v, key)
        low = branches(plan.prepare(x_drop), [plan.first], [plan.second])[0]
    if low is None:
        group = [] if key is not None or interp.routing else _siblings(interp, eqn, x_pos, plan, v)
        plans = [plan] + [p for _, p in group]
        x_in = dropout(plan.prepare(x), v, key)
        lows = branches(x_in, [p.first for p in plans], [p.second for p in plans])
        out = finish_dense(eqn, x, v, plan, lows[0], x_drop)
        if group:  # the siblings' branches, for their rules
            return Ahead(out, {i: lw for (i, _), lw in zip(group, lows[1:], strict=True)})
        return out
    return finish_dense(eqn, x, v, plan, low, x_drop)


def _siblings(
    interp: Evaluator, eqn: jx.Eqn, x_pos: int, plan: DensePlan, v: KernelView
) -> list[tuple[int, DensePlan]]:
    """Later ``dot_general`` equations of the same activation with other kernel views whose
    branches can be computed with this one (one product of the activation with the
    concatenated ``a`` factors). Not with LoRA dropout, whose masks are drawn per adapter, nor
    under routing."""
    dims = jx.dot(eqn)
    x_shape = jx.shape(eqn.invars[x_pos])
    group = []
    for i, e, kv in interp.later_uses(eqn, x_pos):
        other = jx.dot(e)
        if (
            (other.precision, other.preferred_element_type)
            != (dims.precision, dims.preferred_element_type)
            or kv.meta.why is not None
            or kv.meta.carried
            or kv.dtype != v.dtype
        ):
            continue
        p = plan_dense(e, x_shape, kv, x_pos == 0)
        if not isinstance(p, Unfactored) and p.shares_input_with(plan):
            group.append((i, p))
    return group


@kernel_use(_base_gather)
def gather_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``gather`` of rows of a kernel view (an Embed lookup; no dropout there, as PEFT)."""
    del key
    v = invals[0]
    if not isinstance(v, KernelView) or v.meta.why is not None:
        return no_rule(invals)
    indices = operand(interp, invals[1], "gather", "kernel as indices")
    dn = jx.param(eqn, "dimension_numbers")
    sizes = tuple(jx.param(eqn, "slice_sizes"))
    ins, outs = v.axes(I_SIDE), v.axes(O_SIDE)
    if getattr(dn, "operand_batching_dims", ()):
        return Unfactored("it is gathered with batching dimensions")
    if set(dn.collapsed_slice_dims) != set(ins) or set(dn.start_index_map) != set(ins):
        return Unfactored("the gather does not pick whole rows along the kernel's input axes")
    if any(sizes[d] != v.shape[d] for d in outs):
        return Unfactored("the gather takes partial slices of the output axes")
    base_out = base_gather(eqn, v.base, indices)  # a quantized embedding: rows dequantized
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


@kernel_use(dequantized)
def conv_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``conv_general_dilated`` of an input with a kernel view (not a grouped convolution)."""
    v = invals[1]
    if not isinstance(v, KernelView) or v.meta.why is not None:
        return no_rule(invals)
    x = operand(interp, invals[0], "conv_general_dilated", "both operands are kernels")
    if jx.param(eqn, "feature_group_count") != 1 or jx.param(eqn, "batch_group_count") != 1:
        return Unfactored("it is a grouped convolution")
    dn = jx.param(eqn, "dimension_numbers")
    out_feat, *in_axes = dn.rhs_spec
    if v.axes(O_SIDE) != [out_feat] or sorted(v.axes(I_SIDE)) != sorted(in_axes):
        return Unfactored(
            "its input and output axes are not the convolution's (in, spatial) and out axes"
        )
    w0 = as_array(v.base)  # a quantized base is dequantized at the convolution
    base_out = jx.bind(eqn, (x, w0))[0]
    pos = {d: k for k, d in enumerate(v.axes(I_SIDE))}
    r_axis = v.a.ndim - 1
    a_dn = dn._replace(rhs_spec=(r_axis, *[pos[d] for d in in_axes]))
    conv = lambda lhs, a: jx.rebind(eqn, (lhs, a), dimension_numbers=a_dn)
    b = _scaled(v.b, v.scale, v.dtype)
    x_drop = dropout(x, v, key)
    low = conv_branch(x_drop, cast_like(v.a, v.dtype), b, conv, dn.out_spec[1])
    if v.g is not None:  # DoRA, with PEFT's dropout form when dropout is on
        drop_out = None if x_drop is x else jx.bind(eqn, (x_drop, w0))[0]
        return [_dora_out(base_out, low, v, [dn.out_spec[1]], drop_out)]
    return [base_out + cast_like(low, base_out.dtype)]
