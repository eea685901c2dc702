"""`KernelView`: an adapted kernel seen through the layout ops a model applies to it.

Factored execution never forms ``W = W0 + scale * a @ b``. Instead each adapted kernel enters
the traced model as a `KernelView`: the base kernel ``W0`` with the model's layout ops applied
to it (dtype promotion, transposes, reshapes), together with the factors ``a`` and ``b`` carried
through the same ops. Each axis of the view belongs to the input side ``I`` or the output side
``O`` of the kernel, and the factors keep the invariant

    view == base + scale * contract_r(a, b),  with
    a: (the I-axes of the view, in view order..., r),  b: (r, the O-axes of the view, in order...)

so a layout op that moves or regroups axes within one side is applied to the factor of that
side. A reshape that merges an input axis with an output axis breaks the factorisation; the view
then records why, and can only be materialised (`materialize`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from flax_lora import _jaxpr as jx
from flax_lora._adapters import LoraWeights, delta
from flax_lora._factored._quant import as_array, layout

I_SIDE, O_SIDE = "I", "O"
L_SIDE = "L"  # a layer axis of a kernel stacked by a scan (see `flax_lora._factored._scan`)

# ops that change neither the layout nor the meaning of the kernel (applied to the base only)
VALUE_OPS = {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "sharding_constraint",
    "device_put",
    "mesh_cast",
    "reshard",
}
LAYOUT_OPS = VALUE_OPS | {"transpose", "reshape", "squeeze", "broadcast_in_dim"}


@dataclasses.dataclass(eq=False)
class ViewMeta:
    """The static part of a view (compared by identity, so it can sit in a pytree treedef)."""

    path: str
    weights: LoraWeights  # static fields only (a and b are None)
    ops: tuple[tuple[Any, dict[str, Any]], ...]  # layout ops applied so far, for `materialize`
    side: tuple[str, ...]  # I / O for each axis of the view
    why: str | None  # why the view can no longer be factored, if it cannot


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelView:
    """An adapted kernel inside the interpreted model; its arrays are pytree leaves.

    Attributes:
      root: the base kernel ``W0`` as it entered the model.
      root_a: the adapter's ``a`` as given (kernel layout), for `materialize`.
      root_b: the adapter's ``b`` as given (kernel layout), for `materialize`.
      base: ``W0`` with the view's layout ops applied.
      a: the input-side factor in view layout, ``(*I-axes of the view, r)``.
      b: the output-side factor in view layout, ``(r, *O-axes of the view)``.
      meta: path, adapter metadata, the op history and the axis sides.
      g: DoRA only: the per-output-unit factor ``m / ||V||`` (norm detached) in view layout,
        ``(*O-axes of the view)``; the view then stands for ``g * (base + scale * a @ b)``
        (``g`` broadcast over the I-axes). ``None`` for plain LoRA.
    """

    root: Any
    root_a: Any
    root_b: Any
    base: Any
    a: Any
    b: Any
    meta: ViewMeta = dataclasses.field(metadata=dict(static=True))
    g: Any = None
    root_m: Any = None  # DoRA: the magnitude as given, for `materialize`

    @property
    def path(self) -> str:
        return self.meta.path

    @property
    def scale(self) -> float:
        return float(self.meta.weights.scale)

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def axes(self, side: str) -> list[int]:
        """The view's axes on ``side``, in view order (= the factor's axis order)."""
        return [d for d, s in enumerate(self.meta.side) if s == side]


def make_view(path: str, kernel: Any, w: LoraWeights) -> KernelView:
    """The view of a kernel that no op has touched yet."""
    if w.layer_axes:  # stacked by a scan: sliced into per-layer views by the scan rule
        from flax_lora._factored._scan import make_stacked_view

        return make_stacked_view(path, kernel, w)
    side = tuple(I_SIDE if d in w.in_axes else O_SIDE for d in range(len(w.kernel_shape)))
    a, b = w.a, w.b
    order = sorted(range(len(w.in_axes)), key=lambda k: w.in_axes[k])
    if order != list(range(len(order))):  # factor axes must follow the kernel's axis order
        a = jnp.transpose(a, (*order, len(order)))
    order = sorted(range(len(w.out_axes)), key=lambda k: w.out_axes[k])
    if order != list(range(len(order))):
        b = jnp.transpose(b, (0, *[1 + k for k in order]))
    g = None
    if w.m is not None:  # DoRA: the factor per output unit, from W0's norms and low-rank terms
        from flax_lora._dora import dora_factor

        g = dora_factor(as_array(kernel), w)
        if order != list(range(len(order))):
            g = jnp.transpose(g, order)
    static = w.replace(a=None, b=None, m=None)
    return KernelView(
        kernel, w.a, w.b, kernel, a, b, ViewMeta(path, static, (), side, None), g=g, root_m=w.m
    )


def materialize(v: KernelView) -> jax.Array:
    """``W0 + scale * a @ b`` in the kernel's dtype (as `lora.merge`), then the view's ops."""
    w = v.meta.weights.replace(a=v.root_a, b=v.root_b, m=v.root_m)
    root = as_array(v.root)  # a quantized base (`_quant_view`) is dequantized here
    compute = jnp.promote_types(root.dtype, jnp.float32)
    if w.m is not None:  # DoRA, as `lora.merge`
        from flax_lora._dora import dora_kernel

        out = dora_kernel(root, w, compute).astype(root.dtype)
    else:
        out = (root.astype(compute) + delta(w, compute)).astype(root.dtype)
    for prim, params in v.meta.ops:
        out = prim.bind(out, **params)
    return out


def apply_layout(v: KernelView, prim: Any, params: dict[str, Any], out_aval: Any) -> KernelView:
    """Applies one layout op (``prim.name in LAYOUT_OPS``) to the view."""
    name = prim.name
    base = layout(v.base, prim, params, out_aval)  # recorded, for a quantized base
    meta = v.meta
    ops = (*meta.ops, (prim, params))
    new = lambda a, b, side, why=meta.why, g=v.g: KernelView(
        v.root,
        v.root_a,
        v.root_b,
        base,
        a,
        b,
        ViewMeta(meta.path, meta.weights, ops, tuple(side), why),
        g=g,
        root_m=v.root_m,
    )
    if name not in VALUE_OPS and meta.why is None and L_SIDE in meta.side:
        return new(v.a, v.b, [I_SIDE] * len(out_aval.shape), f"`{name}` of a stacked kernel")
    if name in VALUE_OPS or meta.why is not None:
        if name in VALUE_OPS:
            return new(v.a, v.b, meta.side)
        return new(v.a, v.b, [I_SIDE] * len(out_aval.shape))  # sides no longer mean anything
    if name == "transpose":
        perm = tuple(jx.bound_param(prim, params, "permutation"))
        return _permute(v, perm, new)
    if name == "squeeze":
        drop = {d % len(meta.side) for d in jx.bound_param(prim, params, "dimensions")}
        side = [s for d, s in enumerate(meta.side) if d not in drop]
        return new(*_refactor(v, side, base.shape), side, g=_refactor_g(v, side, base.shape))
    if name == "broadcast_in_dim":
        kept = tuple(jx.bound_param(prim, params, "broadcast_dimensions"))
        shape = tuple(jx.bound_param(prim, params, "shape"))
        added = [d for d in range(len(shape)) if d not in kept]
        if (
            list(kept) != sorted(kept)
            or any(shape[d] != 1 for d in added)
            or any(shape[d] != v.shape[k] for k, d in enumerate(kept))
        ):
            return new(v.a, v.b, [I_SIDE] * len(shape), f"`{name}` (a broadcast)")
        side = [I_SIDE] * len(shape)
        for k, d in enumerate(kept):
            side[d] = meta.side[k]
        return new(*_refactor(v, side, shape), side, g=_refactor_g(v, side, shape))
    # reshape
    if params.get("dimensions") is not None:
        return new(v.a, v.b, [I_SIDE] * len(base.shape), f"`{name}` with dimensions")
    side, why = _reshape_sides(v.shape, tuple(base.shape), meta.side)
    if why is not None:
        return new(v.a, v.b, [I_SIDE] * len(base.shape), why)
    return new(*_refactor(v, side, base.shape), side, g=_refactor_g(v, side, base.shape))


def _permute(v: KernelView, perm: tuple[int, ...], new: Any) -> KernelView:
    side = [v.meta.side[p] for p in perm]
    old_i, old_o = v.axes(I_SIDE), v.axes(O_SIDE)
    pa = [old_i.index(p) for p in perm if v.meta.side[p] == I_SIDE]
    pb = [old_o.index(p) for p in perm if v.meta.side[p] == O_SIDE]
    a = v.a if pa == sorted(pa) else jnp.transpose(v.a, (*pa, len(pa)))
    b = v.b if pb == sorted(pb) else jnp.transpose(v.b, (0, *[1 + k for k in pb]))
    g = v.g if v.g is None or pb == sorted(pb) else jnp.transpose(v.g, pb)
    return new(a, b, side, g=g)


def _refactor(v: KernelView, side: list[str], shape: tuple[int, ...]) -> tuple[Any, Any]:
    """Reshapes the factors to the sizes of the new view's I and O axes (order is kept)."""
    r = v.a.shape[-1]
    a_shape = (*[shape[d] for d, s in enumerate(side) if s == I_SIDE], r)
    b_shape = (r, *[shape[d] for d, s in enumerate(side) if s == O_SIDE])
    a = v.a if tuple(v.a.shape) == a_shape else jnp.reshape(v.a, a_shape)
    b = v.b if tuple(v.b.shape) == b_shape else jnp.reshape(v.b, b_shape)
    return a, b


def _refactor_g(v: KernelView, side: list[str], shape: tuple[int, ...]) -> Any:
    """DoRA's factor ``g`` reshaped to the sizes of the new view's O axes, like ``b``."""
    if v.g is None:
        return None
    g_shape = tuple(shape[d] for d, s in enumerate(side) if s == O_SIDE)
    return v.g if tuple(v.g.shape) == g_shape else jnp.reshape(v.g, g_shape)


def dora_scale(v: KernelView, out_ndim: int, o_pos: list[int], dtype: Any) -> Any:
    """DoRA's ``g`` broadcastable against an array of ``out_ndim`` axes whose axes ``o_pos``
    are the view's O axes, in view order; ``None`` without DoRA."""
    if v.g is None:
        return None
    order = sorted(range(len(o_pos)), key=lambda k: o_pos[k])
    g = v.g if order == list(range(len(order))) else jnp.transpose(v.g, order)
    g = jnp.expand_dims(g, tuple(d for d in range(out_ndim) if d not in o_pos))
    return cast_like(g, dtype)


def reshape_groups(old: tuple[int, ...], new: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Splits a reshape into the smallest groups of old and new axes with equal products.

    Size-1 axes form groups of their own (``([i], [])`` or ``([], [j])``) where they can.
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(new) and new[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = old[i], new[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= old[i]
                gi.append(i)
                i += 1
            else:
                pj *= new[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def _reshape_sides(
    old: tuple[int, ...], new: tuple[int, ...], side: tuple[str, ...]
) -> tuple[list[str], str | None]:
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


def cast_like(x: Any, dtype: Any) -> Any:
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)
