"""Factored execution through ``scan``: stacked layers (``nn.scan`` / ``nnx.scan``).

A model whose layers are stacked by ``nn.scan`` passes each stacked kernel ``(L, *rest)`` to a
``scan`` primitive as a per-iteration operand: the body sees one layer's slice. The scan rule
runs a real `jax.lax.scan` whose body evaluates the scan's body jaxpr with the same interpreter,
feeding it, for each stacked kernel view, the per-layer slices of ``W0`` and of the factors
``a`` ``(L, *I, r)`` and ``b`` ``(L, r, *O)`` as a per-layer `KernelView`. So the layer's
kernel uses are factored as anywhere else and no per-layer merged kernel is formed. Kernel
views among the scan's constants (an unstacked kernel used by every iteration) are closed over
by the body unchanged.

A DoRA adapter (a magnitude ``m`` ``(L, *O)``) gets its per-output-unit factor
``g = m / ||V||`` for every layer at once (the factored norm of `flax_lora._dora`, mapped over
the layer axes: no kernel-sized array), and the scan slices ``g`` and ``m`` along with the
others, so each layer's view is an ordinary DoRA view.

Under routing (``lora_ids``) a stacked view is routed: its factors carry the example axis first,
``(B, *L, *I, r)``. The scan slices them on their layer axis (axis 1) instead, so each layer's
view keeps the example axis and is an ordinary routed view (`flax_lora._factored._routing`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flax_lora import _jaxpr as jx
from flax_lora._adapters import LoraWeights, layer_mask
from flax_lora._factored._quant import as_array, is_base, layer_base
from flax_lora._factored._routing import is_routed
from flax_lora._factored._view import (
    I_SIDE,
    L_SIDE,
    O_SIDE,
    VALUE_OPS,
    KernelView,
    ViewMeta,
)

# ops that commute with slicing a layer off (they act on values only, with no shape in their
# parameters); a sharding op on the stack is dropped for the per-layer view's `materialize`
_ELEMENTWISE = {"convert_element_type", "copy", "copy_p", "reduce_precision"}


def is_stacked(v: KernelView) -> bool:
    return L_SIDE in v.meta.side


def make_stacked_view(path: str, kernel: Any, w: LoraWeights) -> KernelView:
    """The view of a stacked kernel: sides ``L...`` then ``I``/``O``; factors
    ``a`` ``(*L, *I, r)``, ``b`` ``(*L, r, *O)`` (the per-layer mask applied to ``a``) and, for
    DoRA, ``g`` ``(*L, *O)`` (1 on layers not picked)."""
    n = w.layer_axes
    side = tuple(
        L_SIDE if d < n else I_SIDE if d in w.in_axes else O_SIDE
        for d in range(len(w.kernel_shape))
    )
    a, b = w.a, w.b
    mask = layer_mask(w)
    if mask is not None:  # layers not picked: zero update, zero gradient
        a = a * jnp.asarray(mask, a.dtype).reshape(mask.shape + (1,) * (a.ndim - 1))
    root_a = a
    lead = tuple(range(n))
    order = sorted(range(len(w.in_axes)), key=lambda k: w.in_axes[k])
    if order != list(range(len(order))):  # factor axes follow the kernel's axis order
        a = jnp.transpose(a, (*lead, *[n + k for k in order], a.ndim - 1))
    order = sorted(range(len(w.out_axes)), key=lambda k: w.out_axes[k])
    if order != list(range(len(order))):
        b = jnp.transpose(b, (*lead, n, *[n + 1 + k for k in order]))
    g, root_m = None, None
    if w.m is not None:  # DoRA: g per layer and output unit, sliced by the scan like b
        g, root_m = _stacked_dora(kernel, w, root_a, mask)
        if order != list(range(len(order))):
            g = jnp.transpose(g, (*lead, *[n + k for k in order]))
    static = w.replace(a=None, b=None, m=None)
    meta = ViewMeta(path, static, (), side, None)
    return KernelView(kernel, root_a, w.b, kernel, a, b, meta, g=g, root_m=root_m)


def _stacked_dora(kernel: Any, w: LoraWeights, a: Any, mask: Any) -> tuple[Any, Any]:
    """DoRA on a stacked kernel: ``g = m / ||V||`` (norm detached) for every layer, shape
    ``(*L, *O)``, from the factored norm of each layer (``a`` with the layer mask applied); and
    the magnitude a per-layer view materializes with. On layers not picked ``g`` is 1 and that
    magnitude is ``||W0||`` (so one layer's merged kernel is ``W0`` there, as `lora.merge`)."""
    from flax_lora._dora import layered_factor

    inner = w.unstacked(w.layer_axes, a=None, b=None, m=None)
    keep = None if mask is None else jnp.asarray(mask > 0)  # layers not picked stay W0
    return layered_factor(as_array(kernel), inner, a, w.b, w.m, w.layer_axes, keep)


def _sliceable(v: KernelView) -> str | None:
    """Why the scan cannot slice the view into per-layer views, or ``None`` if it can."""
    if v.meta.why is not None:
        return v.meta.why
    if not v.meta.side or v.meta.side[0] != L_SIDE:
        return "the scan slices an axis of the kernel that is not its layer axis"
    if any(prim.name not in VALUE_OPS for prim, _ in v.meta.ops):
        return "the stacked kernel is reshaped before the scan"
    return None


def _layer_meta(meta: ViewMeta) -> ViewMeta:
    """The static part of one layer's view of a stacked view."""
    w = meta.weights
    weights = w.unstacked(1)  # layers cleared: the mask is already in root_a and a
    ops = tuple((p, k) for p, k in meta.ops if p.name in _ELEMENTWISE)
    return ViewMeta(meta.path, weights, ops, meta.side[1:], None)


def scan_rule(interp: Any, eqn: Any, invals: list[Any]) -> list[Any] | str:
    """``scan`` with kernel views among its operands, evaluated by ``interp`` inside a real
    `jax.lax.scan`; a reason string when it does not fit (a view as loop carry, ...)."""
    loop = jx.scan(eqn)
    n_consts, n_carry = loop.num_consts, loop.num_carry
    consts = invals[:n_consts]
    carry = [as_array(c) for c in invals[n_consts : n_consts + n_carry]]
    xs = invals[n_consts + n_carry :]
    if any(isinstance(c, KernelView) for c in carry):
        return "the kernel is a loop carry of the scan"
    for x in xs:
        if isinstance(x, KernelView):
            why = _sliceable(x)
            if why is not None:
                return why
    slots = [_layer_meta(x.meta) if isinstance(x, KernelView) else None for x in xs]
    # a quantized stack (QLoRA) is sliced per layer and dequantized in the body (`_quant_view`)
    xs_in: list[Any] = [
        _layer_slices(x) if isinstance(x, KernelView) else layer_base(x) for x in xs
    ]
    with_key = interp.key is not None
    if with_key:  # a different dropout mask in every layer
        xs_in.append(jnp.arange(loop.length, dtype=jnp.uint32))
    passthrough: dict[int, int] = {}  # ys output -> xs operand: a kernel view returned as is

    def body(c: list[Any], sl: list[Any]) -> tuple[list[Any], list[Any]]:
        layer = [
            KernelView(*s[:6], m, g=s[6], root_m=s[7]) if m is not None else s
            for s, m in zip(sl, slots, strict=False)
        ]
        outer = interp.key
        if with_key:
            interp.key = jax.random.fold_in(outer, sl[-1])
        try:
            outs = interp.eval(loop.body.jaxpr, loop.body.consts, [*consts, *c, *layer])
        finally:
            interp.key = outer
        new_c = [_plain(interp, o) for o in outs[:n_carry]]
        new_c = [
            o.astype(i.dtype) if o.dtype != i.dtype else o for o, i in zip(new_c, c, strict=True)
        ]
        ys = []
        for j, o in enumerate(outs[n_carry:]):
            k = next((k for k, v in enumerate(layer) if o is v), None)
            if (isinstance(o, KernelView) or is_base(o)) and k is not None:
                passthrough[j] = k
                ys.append(jnp.zeros((), jnp.float32))
            else:
                ys.append(_plain(interp, o))
        return new_c, ys

    carry_out, ys = jax.lax.scan(
        body,
        list(carry),
        xs_in,
        length=loop.length,
        reverse=loop.reverse,
        unroll=loop.unroll,
    )
    ys = [xs[passthrough[j]] if j in passthrough else y for j, y in enumerate(ys)]
    return [*carry_out, *ys]


def _layer_slices(v: KernelView) -> tuple[Any, ...]:
    """The arrays of a stacked view, each with the layer axis the scan slices first: a routed
    view's factors have the example axis first, so their layer axis (1) is moved before it."""
    factors = (v.root_a, v.root_b, v.a, v.b, v.g, v.root_m)
    if is_routed(v):  # DoRA's g and root_m too: (B, *L, *O)
        factors = tuple(None if f is None else jnp.moveaxis(f, 1, 0) for f in factors)
    ra, rb, a, b, g, root_m = factors
    return (layer_base(v.root), ra, rb, layer_base(v.base), a, b, g, root_m)


def _plain(interp: Any, o: Any) -> Any:
    if isinstance(o, KernelView):
        return interp.fallback(o, "scan", "the kernel leaves the scan body")
    return as_array(o)
