"""Layout ops on kernel views: dtype casts, sharding, transposes, reshapes, squeezes, broadcasts.

A layout op is applied to the view's base ``W0`` as it is (recorded, for a quantized base) and
to the factor of the side whose axes it moves or regroups, after the factor's carried axes: a
transpose permutes the I-axes of ``a`` and the O-axes of ``b`` (and DoRA's ``g``); a reshape,
squeeze or size-1 broadcast reshapes them. A reshape that merges an input axis with an output
axis, a broadcast that repeats the kernel, or any such op on a layered kernel (``nn.scan``) breaks
the factorisation; the view then records why (`ViewMeta.why`), and can only be materialised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp

from flax_lora import _jaxpr as jx
from flax_lora._factored._contract import Evaluator, InterpValue, Result, no_rule
from flax_lora._factored._quant_base import Base, base_layout
from flax_lora._factored._view import (
    EXPERT,
    I_SIDE,
    LAYER,
    O_SIDE,
    KernelView,
    ViewMeta,
    drop_experts,
    transposed,
)
from flax_lora._probe import reshape_groups
from flax_lora._typing import Key

_New = Callable[..., KernelView]  # the view after the op, from its factors and sides


def layout_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """The rule of the ops in `flax_lora._jaxpr.LAYOUT_OPS`: the view (or quantized base)
    follows the op."""
    del interp, key
    if len(invals) != 1:
        return no_rule(invals)
    return [layout_of(invals[0], eqn)]


def layout_of(x: KernelView | Base, eqn: jx.Eqn) -> KernelView | Base:
    """A view or a base after the layout equation ``eqn``."""
    params = jx.bind_params(eqn)
    out_aval = cast(jax.core.ShapedArray, eqn.outvars[0].aval)  # a layout op's: an array's
    if isinstance(x, KernelView):
        return apply_layout(x, eqn.primitive, params, out_aval)
    return base_layout(x, eqn.primitive, params, out_aval)


@dataclasses.dataclass(frozen=True)
class _Op:
    """One layout op on a view: its primitive and bound params, the base after it, the view's
    sides once the op has made them meaningless (``unknown``), and ``new``: the view after the
    op from its factors and sides (`apply_layout`)."""

    name: str
    prim: jx.Primitive
    params: dict[str, Any]
    base: Base
    unknown: list[str]
    new: _New


def apply_layout(
    v: KernelView, prim: jx.Primitive, params: dict[str, Any], out_aval: jax.core.ShapedArray
) -> KernelView:
    """Applies one layout op (``prim.name in LAYOUT_OPS``) to the view: value ops keep it; a
    view that cannot be factored any more (or a layered one) records why; the ops that move
    axes go by `SHAPE_RULES`."""
    name = prim.name
    base = base_layout(v.base, prim, params, out_aval)  # recorded, for a quantized base
    meta = v.meta
    ops = (*meta.ops, (prim, params))

    def new(
        a: jax.Array,
        b: jax.Array,
        side: Sequence[str],
        why: str | None = meta.why,
        g: jax.Array | None = v.g,
    ) -> KernelView:
        if why is None and _experts_of(side, base.shape) != _experts_of(meta.side, v.shape):
            why = f"`{name}` moves, merges or drops an expert axis"
        changed = ViewMeta(meta.path, meta.weights, ops, tuple(side), meta.carried, why)
        return dataclasses.replace(v, base=base, a=a, b=b, g=g, meta=changed)

    if name in jx.VALUE_OPS:
        return new(v.a, v.b, meta.side)
    unknown = [I_SIDE] * len(out_aval.shape)  # sides no longer mean anything
    if meta.why is not None:
        return new(v.a, v.b, unknown)
    if LAYER in meta.side and not (name == "transpose" and _keeps_layers(v, params, prim)):
        return new(v.a, v.b, unknown, f"`{name}` of a layered kernel")
    return SHAPE_RULES[name](v, _Op(name, prim, params, base, unknown, new))


def _keeps_layers(v: KernelView, params: dict[str, Any], prim: jx.Primitive) -> bool:
    """Whether a transpose keeps the layer axes in their order (MaxText's ``moveaxis`` of a
    kernel stored ``(d, L, ...)`` before its scan): the factors, whose layer axes lead, then
    stay as they are."""
    perm = tuple(jx.bound_param(prim, params, "permutation"))
    layers = [d for d in perm if v.meta.side[d] == LAYER]
    return layers == sorted(layers)


def _transpose(v: KernelView, op: _Op) -> KernelView:
    return _permute(v, tuple(jx.bound_param(op.prim, op.params, "permutation")), op.new)


def _squeeze(v: KernelView, op: _Op) -> KernelView:
    side = v.meta.side
    drop = {d % len(side) for d in jx.bound_param(op.prim, op.params, "dimensions")}
    if any(side[d] == EXPERT for d in drop):  # ``w[e]``: one expert's kernel
        if any(side[d] != EXPERT for d in drop) or not value_ops_only(v):
            return op.new(v.a, v.b, op.unknown, "`squeeze` of an expert axis after a layout op")
        return drop_experts(v, drop, op.base)
    kept = [s for d, s in enumerate(side) if d not in drop]
    return _refactor(v, kept, op.base.shape, op.new)


def _broadcast(v: KernelView, op: _Op) -> KernelView:
    kept = tuple(jx.bound_param(op.prim, op.params, "broadcast_dimensions"))
    shape = tuple(jx.bound_param(op.prim, op.params, "shape"))
    added = [d for d in range(len(shape)) if d not in kept]
    if (
        list(kept) != sorted(kept)
        or any(shape[d] != 1 for d in added)
        or any(shape[d] != v.shape[k] for k, d in enumerate(kept))
    ):
        return op.new(v.a, v.b, op.unknown, f"`{op.name}` (a broadcast)")
    side = [I_SIDE] * len(shape)
    for k, d in enumerate(kept):
        side[d] = v.meta.side[k]
    return _refactor(v, side, shape, op.new)


def _reshape(v: KernelView, op: _Op) -> KernelView:
    if op.params.get("dimensions") is not None:
        return op.new(v.a, v.b, op.unknown, f"`{op.name}` with dimensions")
    side, why = _reshape_sides(v.shape, tuple(op.base.shape), v.meta.side)
    if why is not None:
        return op.new(v.a, v.b, op.unknown, why)
    return _refactor(v, side, op.base.shape, op.new)


SHAPE_RULES: dict[str, Callable[[KernelView, _Op], KernelView]] = {
    "transpose": _transpose,
    "squeeze": _squeeze,
    "broadcast_in_dim": _broadcast,
    "reshape": _reshape,
}
"""The layout ops that move or regroup axes, by primitive name: the view after the op."""


def value_ops_only(v: KernelView) -> bool:
    """Whether only value ops (casts, sharding) were applied: the view's layout is the
    kernel's."""
    return all(p.name in jx.VALUE_OPS for p, _ in v.meta.ops)


def _experts_of(side: Sequence[str], shape: Sequence[int]) -> list[int]:
    """The sizes of the expert axes, in order (they must pass a layout op unchanged)."""
    return [shape[d] for d, s in enumerate(side) if s == EXPERT]


def _permute(v: KernelView, perm: tuple[int, ...], new: _New) -> KernelView:
    side = [v.meta.side[p] for p in perm]
    old_i, old_o = v.axes(I_SIDE), v.axes(O_SIDE)
    pa = [old_i.index(p) for p in perm if v.meta.side[p] == I_SIDE]
    pb = [old_o.index(p) for p in perm if v.meta.side[p] == O_SIDE]
    n = len(v.meta.carried)
    lead = tuple(range(n))
    a = transposed(v.a, (*lead, *[n + k for k in pa], v.a.ndim - 1))
    b = transposed(v.b, (*lead, n, *[n + 1 + k for k in pb]))
    g = None if v.g is None else transposed(v.g, (*lead, *[n + k for k in pb]))
    return new(a, b, side, g=g)


def _refactor(v: KernelView, side: list[str], shape: tuple[int, ...], new: _New) -> KernelView:
    """The view with factors (and DoRA's ``g``) reshaped to the sizes of the new view's I and O
    axes, after the carried axes (the order is kept)."""
    n = len(v.meta.carried)
    ins = [shape[d] for d, s in enumerate(side) if s == I_SIDE]
    outs = [shape[d] for d, s in enumerate(side) if s == O_SIDE]
    r = v.a.shape[-1]
    a = _reshaped(v.a, (*v.a.shape[:n], *ins, r))
    b = _reshaped(v.b, (*v.b.shape[:n], r, *outs))
    g = None if v.g is None else _reshaped(v.g, (*v.g.shape[:n], *outs))
    return new(a, b, side, g=g)


def _reshaped(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return x if tuple(x.shape) == shape else jnp.reshape(x, shape)


def _reshape_sides(
    old: tuple[int, ...], new: tuple[int, ...], side: tuple[str, ...]
) -> tuple[list[str], str | None]:
    """The sides of a reshape's new axes: those of the old axes in their group (size-1 old
    axes belong to either side), or why there are none."""
    out = [I_SIDE] * len(new)
    for gi, gj in reshape_groups(old, new):
        sides = {side[i] for i in gi if old[i] != 1}
        if len(sides) > 1:
            return out, (
                f"`reshape` {old} -> {new} merges input axes with output axes of the kernel"
            )
        s = sides.pop() if sides else I_SIDE
        for j in gj:
            out[j] = s
    return out, None
