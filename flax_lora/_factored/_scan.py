"""Factored execution through ``scan``: layered kernels (``nn.scan`` / ``nnx.scan``).

A model whose layers are stacked by ``nn.scan`` passes each layered kernel ``(L, *rest)`` to a
``scan`` primitive as a per-iteration operand: the body sees one layer's slice. A kernel stored
with its layer axis elsewhere (MaxText's ``param_scan_axis: 1``, ``(d, L, mlp)``) reaches the
scan through a transpose that brings the layer axis first; the view follows it
(`flax_lora._factored._layout_ops`) and `per_layer` slices the stored kernel on its own axis.
The scan rule runs a real `jax.lax.scan` whose body evaluates the scan's body jaxpr with the
same interpreter, feeding it, for each layered kernel view, the slices of ``W0`` and of the
factors along their ``"layer"`` carried axis (`flax_lora._factored._view.per_layer`): an
ordinary view of one layer.
So the layer's kernel uses are factored as anywhere else and no per-layer merged kernel is
formed. A DoRA view's ``g`` (and ``m``) are sliced with the factors; a routed view keeps its
example axis; a quantized layered kernel is sliced per layer
(`flax_lora._factored._quant_base.layer_base`).
Kernel views among the scan's constants (a single-layer kernel used by every iteration) are
closed over by the body unchanged.

The body's dropout key is the equation's, folded with the layer index: a different mask in
every layer, the same for a layer whatever else the model does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_lora import _jaxpr as jx
from flax_lora._factored._contract import (
    Evaluator,
    InterpValue,
    Passed,
    Result,
    RoutingFallback,
    Unfactored,
    leaving,
    returned,
)
from flax_lora._factored._quant_base import as_array, is_quant_base, layer_base
from flax_lora._factored._view import LAYER, KernelView, per_layer
from flax_lora._typing import Key


def scan_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``scan`` with kernel views (or quantized kernels) among its operands, evaluated by
    ``interp`` inside a real `jax.lax.scan`; `Unfactored` when it does not fit (a view as loop
    carry, a view whose sliced axis is not its layer axis, ...)."""
    loop = jx.scan(eqn)
    n_consts, n_carry = loop.num_consts, loop.num_carry
    consts = invals[:n_consts]
    carry = [as_array(c) for c in invals[n_consts : n_consts + n_carry]]
    xs = invals[n_consts + n_carry :]
    if any(isinstance(c, KernelView) for c in carry):
        return Unfactored("the kernel is a loop carry of the scan")
    for x in xs:
        if isinstance(x, KernelView) and (why := _sliceable(x)) is not None:
            return Unfactored(why)
    xs_in: list[InterpValue] = [
        per_layer(x) if isinstance(x, KernelView) else layer_base(x) for x in xs
    ]
    if key is not None:  # the layer index, for each layer's dropout key
        xs_in.append(jnp.arange(loop.length, dtype=jnp.uint32))

    def body(
        c: list[InterpValue], sl: list[InterpValue]
    ) -> tuple[list[InterpValue], list[InterpValue] | RoutingFallback]:
        """One layer; a ys output that is a layer's kernel as it came in is `Passed` (the
        scan's xs operand is returned), and a `RoutingFallback` is returned as the ys (the
        carry unchanged) for `scan_rule` to return."""
        layer = sl[: len(xs)]
        layer_key = None if key is None else jax.random.fold_in(key, sl[-1])
        outs = interp.eval(loop.body.jaxpr, loop.body.consts, [*consts, *c, *layer], layer_key)
        if isinstance(outs, RoutingFallback):
            return c, outs
        passed = [None] * n_carry + [_passed(o, layer) for o in outs[n_carry:]]
        plain = leaving(interp, outs, passed, "scan", "the kernel leaves the scan body")
        if isinstance(plain, RoutingFallback):
            return c, plain
        new_c = [
            o.astype(i.dtype) if o.dtype != i.dtype else o
            for o, i in zip(plain[:n_carry], c, strict=True)
        ]
        return new_c, plain[n_carry:]

    carry_out, ys = jax.lax.scan(
        body,
        list(carry),
        xs_in,
        length=loop.length,
        reverse=loop.reverse,
        unroll=loop.unroll,
    )
    if isinstance(ys, RoutingFallback):
        return ys
    rest = returned(ys, xs)
    if not isinstance(rest, list):  # `returned` gives the fallback back only
        return rest
    return [*carry_out, *rest]


def _passed(o: InterpValue, layer: list[InterpValue]) -> Passed | None:
    """`Passed` when the body output ``o`` is one of the layer's kernel inputs as it came in."""
    if not (isinstance(o, KernelView) or is_quant_base(o)):
        return None
    return next((Passed(k) for k, v in enumerate(layer) if o is v), None)


def _sliceable(v: KernelView) -> str | None:
    """Why the scan cannot slice the view into per-layer views, or ``None`` if it can."""
    if v.meta.why is not None:
        return v.meta.why
    if not v.meta.side or v.meta.side[0] != LAYER:
        return "the scan slices an axis of the kernel that is not its layer axis"
    if any(prim.name not in (*jx.VALUE_OPS, "transpose") for prim, _ in v.meta.ops):
        return "the layered kernel is reshaped before the scan"
    return None
