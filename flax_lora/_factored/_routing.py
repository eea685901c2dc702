"""Per-example routing inside the factored interpreter (``lora_ids=`` in modes auto/factored).

The model runs once on the whole batch. Each adapted kernel enters it as a *routed* view
(`flax_lora._factored._view.make_routed_view`): the base kernel ``W0`` as usual, and factors
whose leading carried axis is the example axis, ``a[ids]`` and ``b[ids]`` (zeros where
``ids == -1``). Layout ops and scans treat that axis as any carried axis. At each use of such a
kernel (``dot_general``, ``gather``, ``conv_general_dilated``) the batch axis of the activation
(axis 0, the batch axis of the model's inputs) is matched with the example axis: the rule for
one example is `jax.vmap`-ed over the pair, so the base op is batched back into one op over the
batch and only the low-rank branch uses per-example factors. Everything else in the model
(batch statistics, masks passed as keywords) sees the whole batch, as without routing.

A use that does not fit (an activation whose axis 0 is not the batch, a kernel used by another
operation) is `Unfactored`; the interpreter then records that the call must fall back, and
`lora.wrap` runs the model per example instead (mode ``"auto"``) or reports it (mode
``"factored"``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from flax_lora import _jaxpr as jx
from flax_lora._factored._contract import (
    Evaluator,
    InterpValue,
    Result,
    RoutingFallback,
    Unfactored,
)
from flax_lora._factored._view import EXAMPLE, KernelView, per_example
from flax_lora._typing import Key


def routed_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """Evaluates ``eqn``, a use of routed kernels, for each example: the interpreter's rule
    for one example (views of one adapter, the activation a batch of one), vmapped. Each
    example's dropout key is split from the equation's."""
    axes = _batch_axes(eqn, invals)
    if isinstance(axes, Unfactored):
        return axes
    in_pos, out_pos = axes
    routed = next(x for x in invals if isinstance(x, KernelView) and x.routed)
    batch = routed.a.shape[routed.meta.carried.index(EXAMPLE)]
    for k, d in in_pos.items():
        x = invals[k]
        if jnp.ndim(x) <= d or jnp.shape(x)[d] != batch:
            return Unfactored(
                f"the activation has shape {jnp.shape(x)}, not the batch ({batch}) on axis {d} "
                "(the batch that lora_ids routes: one id per example)"
            )
    vals: list[InterpValue] = []
    in_axes: list[KernelView | int | None] = []  # a view's in_axes: a view of axes
    for k, x in enumerate(invals):
        if isinstance(x, KernelView) and x.routed:
            one_view, axis = per_example(x)
            vals.append(one_view)
            in_axes.append(axis)
        else:
            vals.append(x)
            in_axes.append(None if isinstance(x, KernelView) else in_pos.get(k))
    keys = None if key is None else jax.random.split(key, batch)

    def one(key_j: Key, *ex: InterpValue) -> list[InterpValue] | RoutingFallback:
        vals_j = [jnp.expand_dims(x, in_pos[k]) if k in in_pos else x for k, x in enumerate(ex)]
        outs = interp.apply(eqn, vals_j, key_j)
        if isinstance(outs, RoutingFallback):
            return outs
        return [jnp.squeeze(o, out_pos) for o in outs]

    key_axis = None if keys is None else 0
    return jax.vmap(one, in_axes=(key_axis, *in_axes), out_axes=out_pos)(keys, *vals)


BatchAxes = tuple[dict[int, int], int]
"""``({operand index: its batch axis}, the output's batch axis)`` of a routed use."""


def _batch_axes(eqn: jx.Eqn, invals: list[InterpValue]) -> BatchAxes | Unfactored:
    """The batch axes of a routed use (by the rule of its primitive in `BATCH_AXES`), or why
    no operand is an activation with the batch on a free axis."""
    rule = BATCH_AXES.get(eqn.primitive.name)
    if rule is None:  # `kernel_use` routes only the primitives of the table
        return Unfactored("no routed rule for this operation")
    return rule(eqn, invals)


def _conv_axes(eqn: jx.Eqn, invals: list[InterpValue]) -> BatchAxes | Unfactored:
    if isinstance(invals[0], KernelView):
        return Unfactored("the kernel is the convolution's input")
    dn = jx.param(eqn, "dimension_numbers")
    return {0: dn.lhs_spec[0]}, dn.out_spec[0]


def _gather_axes(eqn: jx.Eqn, invals: list[InterpValue]) -> BatchAxes | Unfactored:
    if not isinstance(invals[0], KernelView) or isinstance(invals[1], KernelView):
        return Unfactored("the kernel is gathered as indices")
    dn = jx.param(eqn, "dimension_numbers")
    out_ndim = len(jx.shape(eqn.outvars[0]))
    batch_dims = [d for d in range(out_ndim) if d not in dn.offset_dims]
    if not batch_dims or jnp.ndim(invals[1]) < 2:
        return Unfactored("the lookup has no batch axis")
    return {1: 0}, batch_dims[0]


def _dot_axes(eqn: jx.Eqn, invals: list[InterpValue]) -> BatchAxes | Unfactored:
    """The activation's axis 0 must be a free (not contracted, not batch) axis."""
    d = jx.dot(eqn)
    lc, rc, lb, rb = d.lhs_contract, d.rhs_contract, d.lhs_batch, d.rhs_batch
    if all(isinstance(x, KernelView) for x in invals[:2]):
        return Unfactored("both operands are kernels")
    x_pos = 0 if not isinstance(invals[0], KernelView) else 1
    contracted, batched = (lc, lb) if x_pos == 0 else (rc, rb)
    if 0 in contracted or 0 in batched or lb:
        return Unfactored("the activation's axis 0 is contracted or a batch dimension")
    lhs_ndim = len(jx.shape(eqn.invars[0]))
    lhs_free = [d for d in range(lhs_ndim) if d not in lc and d not in lb]
    rhs_ndim = len(jx.shape(eqn.invars[1]))
    rhs_free = [d for d in range(rhs_ndim) if d not in rc and d not in rb]
    out = lhs_free.index(0) if x_pos == 0 else len(lhs_free) + rhs_free.index(0)
    return {x_pos: 0}, out


BATCH_AXES: dict[str, Callable[[jx.Eqn, list[InterpValue]], BatchAxes | Unfactored]] = {
    "conv_general_dilated": _conv_axes,
    "gather": _gather_axes,
    "dot_general": _dot_axes,
}
"""The batch axes of a routed use, by primitive name (as the interpreter's `RULES`)."""
