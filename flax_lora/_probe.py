"""Which axes of a kernel are its input axes, learned by tracing a probe function abstractly.

The probe is traced to a jaxpr with `jax.make_jaxpr` (no FLOPs). Each kernel's invar is followed
through the layout-only operations Flax applies to kernels (dtype promotion, transposes,
reshapes, nested `jit`, remat, custom derivatives, `scan` over layered kernels) to the op that
uses it:

- ``gather`` (an Embed lookup): the gathered axis is the input axis -> ``"embed"``;
- ``conv_general_dilated``: the input-feature and spatial axes -> ``"conv"``;
- ``dot_general``: the contracted axes -> ``"dense"``; the kernel's batch dimensions are its
  **expert axes** (``jnp.einsum("etd,edf->etf", x, w)``);
- ``ragged_dot_general`` (``jax.lax.ragged_dot``), the kernel as rhs: the contracted axes ->
  ``"dense"``, the group axis an expert axis;
- a Python loop over experts (``w[e]``: ``slice`` / ``dynamic_slice`` to size 1, then
  ``squeeze``): the axis sliced to one index and squeezed is an expert axis too.

An embedding is classified by its lookup also when the same embedding is contracted by ``attend``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from flax_lora import _jaxpr as jx
from flax_lora._paths import describe, path_str
from flax_lora._typing import Kind

AxisMap = tuple[tuple[int, ...], ...]  # for each axis of a var: the kernel axes it stems from


@dataclasses.dataclass
class Use:
    """How a kernel is used: its kind, its input axes, and the layer axes enclosing scans slice."""

    kind: Kind
    in_axes: tuple[int, ...]
    layer_axes: tuple[int, ...] = ()  # kernel axes sliced off by enclosing scans (nn.scan layers)
    expert_axes: tuple[int, ...] = ()  # batch / group axes of the product, or sliced per expert


def reshape_groups(
    old_shape: Sequence[int], new_shape: Sequence[int]
) -> list[tuple[list[int], list[int]]]:
    """Splits a reshape into the smallest groups of old and new axes with equal products.

    A size-1 axis joins the group before it (the first group, for leading ones), so every axis,
    of either shape, is in exactly one group. The probe maps each new axis to the kernel axes of
    its group's old axes (`reshape_axis_map`); a kernel view gives each new axis the side of its
    group's old axes (`flax_lora._factored._layout_ops`).
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old_shape) or j < len(new_shape):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi == pj and gi and gj:
                # absorb trailing size-1 axes into this group
                while i < len(old_shape) and old_shape[i] == 1 and pi == pj:
                    gi.append(i)
                    i += 1
                while j < len(new_shape) and new_shape[j] == 1:
                    gj.append(j)
                    j += 1
                break
            if (pi <= pj or j >= len(new_shape)) and i < len(old_shape):
                pi *= old_shape[i]
                gi.append(i)
                i += 1
            elif j < len(new_shape):
                pj *= new_shape[j]
                gj.append(j)
                j += 1
            else:
                break
        groups.append((gi, gj))
    return groups


def reshape_axis_map(old_shape: Sequence[int], new_shape: Sequence[int], amap: AxisMap) -> AxisMap:
    """Maps each new axis to the kernel axes of the old axes it was formed from."""
    out: list[tuple[int, ...]] = [()] * len(new_shape)
    for gi, gj in reshape_groups(old_shape, new_shape):
        src = tuple(sorted({k for i in gi for k in amap[i]}))
        for j in gj:
            out[j] = src
    return tuple(out)


def _axes(amap: AxisMap, dims: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({k for d in dims for k in amap[d]}))


def _walk(jaxpr: Any, tracked: dict[Any, tuple[str, AxisMap]], uses: dict[str, list[Use]]) -> dict:
    """Follows tracked vars through ``jaxpr``; returns the tracked outvars."""
    env = dict(tracked)
    pinned: dict[Any, tuple[int, ...]] = {}  # var -> kernel axes taken at one index (``w[e]``)

    def get(v: Any) -> tuple[str, AxisMap] | None:
        return None if jx.is_literal(v) else env.get(v)

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [get(v) for v in eqn.invars]
        if not any(ins):
            continue
        first = eqn.invars[0]
        held = pinned.get(first, ()) if not jx.is_literal(first) else ()
        if held and name in jx.LAYOUT_OPS | jx.KEEPS_AXES | {"slice", "dynamic_slice"}:
            pinned[eqn.outvars[0]] = held
        if name in jx.KEEPS_AXES and ins[0] is not None:
            for o in eqn.outvars:
                env[o] = ins[0]
        elif name in ("slice", "dynamic_slice") and ins[0] is not None:
            path, amap = ins[0]
            env[eqn.outvars[0]] = ins[0]
            old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
            one = {k for d in range(len(old)) if new[d] == 1 < old[d] for k in amap[d]}
            pinned[eqn.outvars[0]] = tuple(sorted({*held, *one}))
        elif name == "transpose":
            path, amap = ins[0]
            env[eqn.outvars[0]] = (path, tuple(amap[p] for p in jx.param(eqn, "permutation")))
        elif name == "reshape" and ins[0] is not None:
            path, amap = ins[0]
            old = eqn.invars[0].aval.shape
            new = eqn.outvars[0].aval.shape
            env[eqn.outvars[0]] = (path, reshape_axis_map(old, new, amap))
        elif name == "squeeze":
            path, amap = ins[0]
            drop = {d % len(amap) for d in jx.param(eqn, "dimensions")}
            env[eqn.outvars[0]] = (path, tuple(m for i, m in enumerate(amap) if i not in drop))
        elif name == "dot_general":
            d = jx.dot(eqn)
            for k, contract, batch in (
                (0, d.lhs_contract, d.lhs_batch),
                (1, d.rhs_contract, d.rhs_batch),
            ):
                if ins[k] is not None:
                    path, amap = ins[k]
                    experts = tuple(sorted({*_axes(amap, batch), *pinned.get(eqn.invars[k], ())}))
                    use = Use("dense", _axes(amap, contract), expert_axes=experts)
                    uses.setdefault(path, []).append(use)
        elif name == "ragged_dot_general" and ins[1] is not None:
            rd = jx.ragged_dot(eqn)
            path, amap = ins[1]
            experts = _axes(amap, rd.rhs_group)
            uses.setdefault(path, []).append(
                Use("dense", _axes(amap, rd.dot.rhs_contract), (), experts)
            )
        elif name == "conv_general_dilated" and ins[1] is not None:
            path, amap = ins[1]
            rhs_spec = jx.param(eqn, "dimension_numbers").rhs_spec
            uses.setdefault(path, []).append(Use("conv", _axes(amap, rhs_spec[1:])))
        elif name == "gather" and ins[0] is not None:
            path, amap = ins[0]
            dn = jx.param(eqn, "dimension_numbers")
            uses.setdefault(path, []).append(Use("embed", _axes(amap, dn.start_index_map)))
        elif name == "scan":
            _walk_scan(jx.scan(eqn), ins, uses)
        elif name == "cond":
            for branch in jx.cond(eqn).branches:
                inner = {iv: t for iv, t in zip(branch.jaxpr.invars, ins[1:], strict=True) if t}
                _walk(branch.jaxpr, inner, uses)
        elif name == "while":
            loop = jx.while_loop(eqn)
            n_skip = loop.cond_nconsts
            body_ins = ins[n_skip:]
            inner = {iv: t for iv, t in zip(loop.body.jaxpr.invars, body_ins, strict=True) if t}
            _walk(loop.body.jaxpr, inner, uses)
        else:
            sub = jx.sub_body(eqn)
            if sub is not None:
                inner = {iv: t for iv, t in zip(sub.jaxpr.invars, ins, strict=True) if t}
                out = _walk(sub.jaxpr, inner, uses)
                for o, io in zip(eqn.outvars, sub.jaxpr.outvars, strict=True):
                    if io in out:
                        env[o] = out[io]
    return {v: env[v] for v in jaxpr.outvars if not jx.is_literal(v) and v in env}


def _walk_scan(
    loop: jx.Scan, ins: list[tuple[str, AxisMap] | None], uses: dict[str, list[Use]]
) -> None:
    """A scan's body: its xs are sliced on axis 0 (for a layered kernel: the layer axis)."""
    first_x = loop.num_consts + loop.num_carry
    inner: dict[Any, tuple[str, AxisMap]] = {}
    sliced: dict[str, tuple[int, ...]] = {}  # path -> the kernel axes the scan slices
    for k, (iv, t) in enumerate(zip(loop.body.jaxpr.invars, ins, strict=True)):
        if t is None:
            continue
        path, amap = t
        if k >= first_x:
            sliced[path] = amap[0]
        inner[iv] = (path, amap[1:] if k >= first_x else amap)
    inner_uses: dict[str, list[Use]] = {}
    _walk(loop.body.jaxpr, inner, inner_uses)
    for path, found in inner_uses.items():
        for u in found:
            if path in sliced:
                u.layer_axes = tuple(sorted({*sliced[path], *u.layer_axes}))
        uses.setdefault(path, []).extend(found)


def kernel_uses(probe: Callable[[Any], Any], params: Any) -> dict[str, Use]:
    """Traces ``probe(params)`` abstractly; returns each used kernel's path -> `Use`.

    An Embed lookup wins over other uses of the same embedding (``attend``); then a conv; then the
    first contraction.

    Raises:
      ValueError: ``params`` has leaves of 2 or more dimensions but the probe contracts or
        gathers none of them (it ignores its argument, e.g. closes over other params).
    """
    closed = jax.make_jaxpr(probe)(params)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    tracked = {}
    for var, (kp, leaf) in zip(closed.jaxpr.invars, flat, strict=True):
        if getattr(leaf, "ndim", 0) >= 2:
            tracked[var] = (path_str(kp), tuple((i,) for i in range(leaf.ndim)))
    uses: dict[str, list[Use]] = {}
    _walk(closed.jaxpr, tracked, uses)
    if tracked and not uses:
        read = {v for e in closed.jaxpr.eqns for v in e.invars if not jx.is_literal(v)}
        read |= {v for v in closed.jaxpr.outvars if not jx.is_literal(v)}
        how = (
            "its traced function does not read its argument at all"
            if not read & set(closed.jaxpr.invars)
            else "it reads its argument, but no leaf of 2 or more dimensions reaches a dot, conv "
            "or gather"
        )
        raise ValueError(
            "The probe never contracted or gathered any leaf of the params it was given (leaves "
            f"of 2 or more dimensions: {describe([t[0] for t in tracked.values()], 5)}): {how}. "
            "A probe must compute from its argument, e.g. probe=lambda p: model.apply(p, x), "
            "not from params it closes over."
        )
    rank: dict[Kind, int] = {"embed": 0, "conv": 1, "dense": 2}
    return {p: min(us, key=lambda u: rank[u.kind]) for p, us in uses.items()}
