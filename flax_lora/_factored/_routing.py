"""Per-example routing inside the factored interpreter (``lora_ids=`` in modes auto/factored).

The model runs once on the whole batch. Each adapted kernel enters it as a *routed* view: the
base kernel ``W0`` as usual, and factors with a leading example axis, ``a[ids]`` and
``b[ids]`` (zeros where ``ids == -1``). At each use of such a kernel (``dot_general``,
``gather``, ``conv_general_dilated``) the batch axis of the activation (axis 0, the batch axis
of the model's inputs) is matched with the factors' example axis: the rule for one example is
`jax.vmap`-ed over the pair, so the base op is batched back into one op over the batch and
only the low-rank branch uses per-example factors. Everything else in the model (batch
statistics, masks passed as keywords) sees the whole batch, as without routing.

A kernel stacked by ``nn.scan`` / ``nnx.scan`` enters as a routed *stacked* view (factors
``(B, *L, *I, R)`` and ``(B, *L, R, *O)``); the scan rule (`flax_lora._factored._scan`) slices
its layer axis, keeping the example axis first, so each layer's view is an ordinary routed view.

A use that does not fit (an activation whose axis 0 is not the batch, a kernel used by another
operation) raises `RoutingFallback`; `lora.wrap` then runs the model per example instead
(mode ``"auto"``) or reports it (mode ``"factored"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flax_lora import _jaxpr as jx
from flax_lora._adapters import LoraWeights
from flax_lora._factored._view import KernelView, make_view

ROUTED_OPS = ("dot_general", "gather", "conv_general_dilated")


class RoutingFallback(ValueError):
    """A use of a routed kernel the per-example rules cannot serve on the whole batch."""


def make_routed_view(path: str, kernel: Any, w: Any, ids: jax.Array) -> KernelView:
    """The view of kernel ``path`` whose factors are adapter ``ids[j]``'s for example ``j``.

    ``w`` is a `StackedLoraWeights` (scales folded into ``b``); the view's ``a`` / ``b`` (and
    ``root_a`` / ``root_b``) carry a leading example axis of length ``len(ids)``. With DoRA
    adapters in the stack so do ``g`` (``m / ||V||`` of example ``j``'s adapter, 1 for plain
    adapters and ``-1``; `flax_lora._stack_dora`) and ``root_m`` (the magnitude giving that
    ``g``, for `materialize`).
    """
    from flax_lora._multi import gather
    from flax_lora._stack_dora import gather_dora

    a_sel, b_sel = gather(w, ids)
    static = LoraWeights(
        a=None,
        b=None,
        scale=1.0,
        in_axes=tuple(w.in_axes),
        kernel_shape=tuple(w.kernel_shape),
        kind=w.kind,
        dropout=float(w.dropout),
        layer_axes=int(w.layer_axes),
    )
    one = lambda ra, rb, a, b, g: make_view(path, kernel, static.replace(a=a, b=b))
    view = _mapped_factors(one, a_sel, b_sel, a_sel, b_sel)
    if w.m is None:
        return view
    g, m_eff = gather_dora(w, kernel, ids)  # (B, *L, *O): the view's O axes are in kernel order
    return dataclasses.replace(view, g=g, root_m=m_eff)


def view_axes(v: KernelView) -> KernelView:
    """The `jax.vmap` axes of a routed view: its factors (and DoRA's ``g``, ``root_m``) are
    mapped on axis 0, ``W0`` is not."""
    dora = None if v.g is None else 0
    return dataclasses.replace(
        v, root=None, root_a=0, root_b=0, base=None, a=0, b=0, g=dora, root_m=dora
    )


def is_routed(v: Any) -> bool:
    """Whether ``v`` is a routed view (its ``a`` has the extra leading example axis).

    Decided on ``root_a``, which keeps the kernel's layout (``(*L, *I, r)`` unrouted) whatever
    layout ops the view went through.
    """
    if not isinstance(v, KernelView):
        return False
    w = v.meta.weights
    return v.root_a.ndim == w.layer_axes + len(w.in_axes) + 2


def routed_layout(v: KernelView, layout: Callable[[KernelView], KernelView]) -> KernelView:
    """A layout op (transpose, reshape, ...) on a routed view, example by example."""
    one = lambda ra, rb, a, b, g: layout(
        dataclasses.replace(v, root_a=ra, root_b=rb, a=a, b=b, g=g)
    )
    return _mapped_factors(one, v.root_a, v.root_b, v.a, v.b, v.g)


def _mapped_factors(
    one: Callable[..., KernelView], root_a: Any, root_b: Any, a: Any, b: Any, g: Any = None
) -> KernelView:
    """``one(root_a[j], root_b[j], a[j], b[j], g[j])`` for every example ``j``, as one routed
    view (``g``: DoRA's per-example factor, or ``None``).

    ``one`` builds a view of one example's factors; its factors are `jax.vmap`-ed over the
    examples, and the rest of the view (``W0``, ``root_m`` and the static metadata) is example
    0's view's.
    """
    factors = lambda *xs: (lambda v: (v.root_a, v.root_b, v.a, v.b, v.g))(one(*xs))
    outs = jax.vmap(factors)(root_a, root_b, a, b, g)
    first = one(root_a[0], root_b[0], a[0], b[0], None if g is None else g[0])
    return dataclasses.replace(
        first, root_a=outs[0], root_b=outs[1], a=outs[2], b=outs[3], g=outs[4]
    )


def per_example(
    eqn: Any,
    invals: list[Any],
    batch: int,
    key: Any,
    rule: Callable[[Any, list[Any]], list[Any]],
    with_key: Callable[[Any, Callable[[], list[Any]]], list[Any]],
) -> list[Any]:
    """Evaluates ``eqn`` (a use of routed kernels) with ``rule`` for each example, vmapped.

    ``rule(eqn, invals)`` is the interpreter's rule for one example (views unrouted, the
    activation a batch of one); ``with_key(key, fn)`` runs ``fn`` with the interpreter's dropout
    key set to one example's key.

    Raises:
      RoutingFallback: the activation's batch axis is not where routing expects it.
    """
    name = eqn.primitive.name
    path = next(x.path for x in invals if isinstance(x, KernelView))
    try:
        in_pos, out_pos = _batch_axes(eqn, invals)
    except RoutingFallback as e:
        raise RoutingFallback(f"kernel {path!r} is used by `{name}` where {e}") from None
    for k, d in in_pos.items():
        x = invals[k]
        if jnp.ndim(x) <= d or jnp.shape(x)[d] != batch:
            raise RoutingFallback(
                f"the activation reaching kernel {path!r} through `{name}` has shape "
                f"{jnp.shape(x)}, not the batch ({batch}) on axis {d}"
            )
    in_axes = [
        view_axes(x) if is_routed(x) else in_pos.get(k) if not isinstance(x, KernelView) else None
        for k, x in enumerate(invals)
    ]
    keys = None if key is None else jax.random.split(key, batch)

    def one(key_j: Any, *vals: Any) -> list[Any]:
        vals = [jnp.expand_dims(x, in_pos[k]) if k in in_pos else x for k, x in enumerate(vals)]
        outs = with_key(key_j, lambda: rule(eqn, vals))
        return [jnp.squeeze(o, out_pos) for o in outs]

    return jax.vmap(one, in_axes=(None if keys is None else 0, *in_axes), out_axes=out_pos)(
        keys, *invals
    )


def _batch_axes(eqn: Any, invals: list[Any]) -> tuple[dict[int, int], int]:
    """``({operand index: its batch axis}, the output's batch axis)`` for a routed use.

    Raises:
      RoutingFallback: no operand is an activation with the batch on a free axis.
    """
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        if isinstance(invals[0], KernelView):
            raise RoutingFallback("the kernel is the convolution's input")
        dn = jx.param(eqn, "dimension_numbers")
        return {0: dn.lhs_spec[0]}, dn.out_spec[0]
    if name == "gather":
        if not isinstance(invals[0], KernelView) or isinstance(invals[1], KernelView):
            raise RoutingFallback("the kernel is gathered as indices")
        dn = jx.param(eqn, "dimension_numbers")
        out_ndim = len(eqn.outvars[0].aval.shape)
        batch_dims = [d for d in range(out_ndim) if d not in dn.offset_dims]
        if not batch_dims or jnp.ndim(invals[1]) < 2:
            raise RoutingFallback("the lookup has no batch axis")
        return {1: 0}, batch_dims[0]
    # dot_general: the activation's axis 0 must be a free (not contracted, not batch) axis
    d = jx.dot(eqn)
    lc, rc, lb, rb = d.lhs_contract, d.rhs_contract, d.lhs_batch, d.rhs_batch
    if all(isinstance(x, KernelView) for x in invals[:2]):
        raise RoutingFallback("both operands are kernels")
    x_pos = 0 if not isinstance(invals[0], KernelView) else 1
    contracted, batched = (lc, lb) if x_pos == 0 else (rc, rb)
    if 0 in contracted or 0 in batched or lb:
        raise RoutingFallback("the activation's axis 0 is contracted or a batch dimension")
    lhs_ndim = len(eqn.invars[0].aval.shape)
    lhs_free = [d for d in range(lhs_ndim) if d not in lc and d not in lb]
    rhs_ndim = len(eqn.invars[1].aval.shape)
    rhs_free = [d for d in range(rhs_ndim) if d not in rc and d not in rb]
    out = lhs_free.index(0) if x_pos == 0 else len(lhs_free) + rhs_free.index(0)
    return {x_pos: 0}, out
