"""Which axes of a kernel are its input axes, learned by tracing a probe function abstractly.

The probe is traced to a jaxpr with `jax.make_jaxpr` (no FLOPs). Each kernel's invar is followed
through the layout-only operations Flax applies to kernels (dtype promotion, transposes,
reshapes, nested `jit`, remat, custom derivatives, `scan` over layered kernels) and through a
product with a value that is not a kernel (``w * w_scale``, Gemma 3n / 4) to the op that uses it:

- ``gather`` (an Embed lookup): the gathered axis is the input axis -> ``"embed"``;
- ``conv_general_dilated``: the input-feature and spatial axes -> ``"conv"``;
- ``dot_general``: the contracted axes -> ``"dense"``; the kernel's batch dimensions are its
  **expert axes** (``jnp.einsum("etd,edf->etf", x, w)``); so is a **free** kernel axis (neither
  contracted nor batched) whose axis of the product later meets a kernel's batch dimension
  (MaxText's dense MoE ``"BSM,EMH->BSEH"``, then ``"BSEH,EHM->BSEM"``: `flax_lora._free_axes`);
- ``ragged_dot_general`` (``jax.lax.ragged_dot``), the kernel as rhs: the contracted axes ->
  ``"dense"``, the group axis an expert axis;
- a Python loop over experts (``w[e]``: ``slice`` / ``dynamic_slice`` to size 1, then
  ``squeeze``): the axis sliced to one index and squeezed is an expert axis too.

An embedding is classified by its lookup also when the same embedding is contracted by ``attend``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax

from flax_lora import _jaxpr as jx
from flax_lora._free_axes import Free, Origins, carry, union
from flax_lora._head import output_heads
from flax_lora._paths import describe, path_str
from flax_lora._typing import Kind, PyTree

AxisMap = tuple[tuple[int, ...], ...]  # for each axis of a var: the kernel axes it stems from


@dataclasses.dataclass
class Use:
    """How a kernel is used: its kind, its input axes, and the layer axes enclosing scans slice."""

    kind: Kind
    in_axes: tuple[int, ...]
    layer_axes: tuple[int, ...] = ()  # kernel axes sliced off by enclosing scans (nn.scan layers)
    expert_axes: tuple[int, ...] = ()  # batch / group axes of the product, or sliced per expert
    head: bool = False  # its product is an output of the traced function (`flax_lora._head`)


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
        gi: list[int] = []
        gj: list[int] = []
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


Tracked = tuple[str, AxisMap]
"""A var that stems from a kernel: the kernel's path and the var's axis map."""

Uses = dict[str, list[Use]]
"""Each kernel path -> the uses found of it."""


@dataclasses.dataclass(frozen=True)
class Step:
    """What a probe rule found of one equation: the tracked value of each outvar (fewer values
    than outvars: the rest are untracked) and the kernel axes outvar 0 takes at one index."""

    outs: tuple[Tracked | None, ...] = ()
    pin: tuple[int, ...] = ()
    free: tuple[Free | None, ...] = ()  # the free axes of the products among the outvars


Pins = list[tuple[int, ...]]
"""For each operand of an equation: the kernel axes it takes at one index (``w[e]``)."""

ProbeRule = Callable[[jx.Eqn, list[Tracked | None], Pins, Uses], Step]
"""``rule(eqn, ins, pins, uses)``: ``ins`` the tracked value of each operand (``None``: not a
kernel's), ``pins`` their pinned axes; records the uses it finds in ``uses``."""


def _walk(
    jaxpr: jx.Jaxpr,
    tracked: dict[jx.Var, Tracked],
    uses: Uses,
    free: dict[jx.Var, Free] | None = None,
) -> tuple[dict[jx.Var, Tracked], dict[jx.Var, Free]]:
    """Follows tracked vars through ``jaxpr`` by the rule of each primitive (`PROBE_RULES`, a
    call-like equation's body otherwise), and the free axes of products (`Free`) by
    `flax_lora._free_axes.carry`; returns the tracked outvars and those holding free axes."""
    env = dict(tracked)
    frees = dict(free or {})
    pinned: dict[jx.Var, tuple[int, ...]] = {}  # var -> kernel axes taken at one index (``w[e]``)
    for eqn in jaxpr.eqns:
        # a literal (a constant) is unhashable and stems from no kernel
        vs = [None if jx.is_literal(v) else v for v in eqn.invars]
        ins = [None if v is None else env.get(v) for v in vs]
        fins = [None if v is None else frees.get(v) for v in vs]
        if not any(ins) and not any(fins):
            continue
        pins = [() if v is None else pinned.get(v, ()) for v in vs]
        rule = PROBE_RULES.get(eqn.primitive.name)
        sub = jx.sub_body(eqn) if rule is None else None
        if sub is not None:
            step = _call(sub, ins, fins, uses)
        else:
            step = rule(eqn, ins, pins, uses) if rule is not None and any(ins) else Step()
            found = carry(eqn, [None if t is None else t[1] for t in ins], fins)
            step = dataclasses.replace(step, free=union(step.free, found))
        for o, t in zip(eqn.outvars, step.outs, strict=False):
            if t is not None:
                env[o] = t
        for o, f in zip(eqn.outvars, step.free, strict=False):
            if f is not None:
                frees[o] = f
        if step.pin:
            pinned[eqn.outvars[0]] = step.pin
    outs = [v for v in jaxpr.outvars if not jx.is_literal(v)]
    return {v: env[v] for v in outs if v in env}, {v: frees[v] for v in outs if v in frees}


T = TypeVar("T")


def _inner(invars: Sequence[jx.Var], ins: Sequence[T | None]) -> dict[jx.Var, T]:
    return {iv: t for iv, t in zip(invars, ins, strict=True) if t}


def _keep(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    """An op whose outputs have the axes of its first operand (dtype casts, copies, ...)."""
    return Step((ins[0],) * len(eqn.outvars), pins[0])


def _untracked(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    """A layout op the probe does not follow (``broadcast_in_dim``)."""
    return Step()


def _scaled(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    """``mul`` / ``div`` of one kernel by an untracked value (``w * w_scale``, Gemma 3n / 4): the
    product has the kernel's axes (JAX multiplies by a scalar as is, and by anything else of
    the kernel's shape). A product of two kernels tracks nothing; nor does ``c / w``."""
    # a leaf of size 1 (a ``(1, 1)`` scale parameter) is a scalar, not a kernel
    at = [k for k, t in enumerate(ins) if t is not None and math.prod(jx.shape(eqn.invars[k])) > 1]
    if len(at) != 1 or (eqn.primitive.name == "div" and at[0] != 0):
        return Step()
    if jx.shape(eqn.outvars[0]) != jx.shape(eqn.invars[at[0]]):
        return Step()  # broadcast to more axes: not the kernel's layout any more
    return Step((ins[at[0]],), pins[at[0]])


def _slice(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    """``slice`` / ``dynamic_slice``: an axis sliced to size 1 is taken at one index (``w[e]``
    in a Python loop over experts; an expert axis once squeezed)."""
    if ins[0] is None:
        return Step()
    amap = ins[0][1]
    old, new = jx.shape(eqn.invars[0]), jx.shape(eqn.outvars[0])
    one = {k for d in range(len(old)) if new[d] == 1 < old[d] for k in amap[d]}
    return Step((ins[0],), tuple(sorted({*pins[0], *one})))


def _transpose(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    path, amap = _first(ins)
    perm = jx.param(eqn, "permutation")
    return Step(((path, tuple(amap[p] for p in perm)),), pins[0])


def _reshape(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    if ins[0] is None:
        return Step((), pins[0])
    path, amap = ins[0]
    old, new = jx.shape(eqn.invars[0]), jx.shape(eqn.outvars[0])
    return Step(((path, reshape_axis_map(old, new, amap)),), pins[0])


def _squeeze(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    path, amap = _first(ins)
    drop = {d % len(amap) for d in jx.param(eqn, "dimensions")}
    return Step(((path, tuple(m for i, m in enumerate(amap) if i not in drop)),), pins[0])


def _first(ins: list[Tracked | None]) -> Tracked:
    """The tracked value of a one-operand op's operand (tracked, or the op is not walked)."""
    assert ins[0] is not None  # an equation is walked when one of its operands is tracked
    return ins[0]


def _dot(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    """``dot_general``: the contracted axes are input axes, the batch axes expert axes; the
    product's axes from the kernel's free axes are `Free` (expert axes if they later meet a
    kernel's batch dimension)."""
    d = jx.dot(eqn)
    sides = ((d.lhs_contract, d.lhs_batch), (d.rhs_contract, d.rhs_batch))
    free: list[Origins] = [() for _ in jx.shape(eqn.outvars[0])]
    at = len(d.lhs_batch)  # the output is (batch..., lhs free..., rhs free...)
    for k, (t, pin, (contract, batch)) in enumerate(zip(ins, pins, sides, strict=False)):
        dims = [i for i in range(len(jx.shape(eqn.invars[k]))) if i not in (*contract, *batch)]
        if t is not None:
            path, amap = t
            experts = tuple(sorted({*_axes(amap, batch), *pin}))
            use = Use("dense", _axes(amap, contract), (), experts)
            uses.setdefault(path, []).append(use)
            if len(dims) >= 2:  # one may be an expert axis, another stays an output axis
                for n, i in enumerate(dims):
                    free[at + n] = ((use, amap[i]),) if amap[i] else ()
        at += len(dims)
    return Step(free=(tuple(free),) if any(free) else ())


def _ragged_dot(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    """``ragged_dot_general``, the kernel as rhs: the group axis is an expert axis."""
    if ins[1] is not None:
        rd = jx.ragged_dot(eqn)
        path, amap = ins[1]
        experts = _axes(amap, rd.rhs_group)
        uses.setdefault(path, []).append(
            Use("dense", _axes(amap, rd.dot.rhs_contract), (), experts)
        )
    return Step()


def _conv(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    if ins[1] is not None:
        path, amap = ins[1]
        rhs_spec = jx.param(eqn, "dimension_numbers").rhs_spec
        uses.setdefault(path, []).append(Use("conv", _axes(amap, rhs_spec[1:])))
    return Step()


def _gather(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    if ins[0] is not None:
        path, amap = ins[0]
        dn = jx.param(eqn, "dimension_numbers")
        uses.setdefault(path, []).append(Use("embed", _axes(amap, dn.start_index_map)))
    return Step()


def _scan(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    """A scan's body: its xs are sliced on axis 0 (for a layered kernel: the layer axis)."""
    loop = jx.scan(eqn)
    first_x = loop.num_consts + loop.num_carry
    inner: dict[jx.Var, Tracked] = {}
    sliced: dict[str, tuple[int, ...]] = {}  # path -> the kernel axes the scan slices
    for k, (iv, t) in enumerate(zip(loop.body.jaxpr.invars, ins, strict=True)):
        if t is None:
            continue
        path, amap = t
        if k >= first_x:
            sliced[path] = amap[0]
        inner[iv] = (path, amap[1:] if k >= first_x else amap)
    inner_uses: Uses = {}
    _walk(loop.body.jaxpr, inner, inner_uses)
    for path, found in inner_uses.items():
        for u in found:
            if path in sliced:
                u.layer_axes = tuple(sorted({*sliced[path], *u.layer_axes}))
        uses.setdefault(path, []).extend(found)
    return Step()


def _cond(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    for branch in jx.cond(eqn).branches:
        _walk(branch.jaxpr, _inner(branch.jaxpr.invars, ins[1:]), uses)
    return Step()


def _while(eqn: jx.Eqn, ins: list[Tracked | None], pins: Pins, uses: Uses) -> Step:
    loop = jx.while_loop(eqn)
    _walk(loop.body.jaxpr, _inner(loop.body.jaxpr.invars, ins[loop.cond_nconsts :]), uses)
    return Step()


def _call(sub: jx.Body, ins: list[Tracked | None], fins: list[Free | None], uses: Uses) -> Step:
    """A call-like equation (jit, remat, custom derivatives, ``shard_map``, ...) with body
    ``sub``: its tracked and free outputs are the body's."""
    invars = sub.jaxpr.invars
    out, free = _walk(sub.jaxpr, _inner(invars, ins), uses, _inner(invars, fins))
    # a literal outvar (a constant returned beside a product) is unhashable and tracks nothing
    outvars = [None if jx.is_literal(o) else o for o in sub.jaxpr.outvars]
    return Step(
        tuple(None if o is None else out.get(o) for o in outvars),
        free=tuple(None if o is None else free.get(o) for o in outvars),
    )


PROBE_RULES: dict[str, ProbeRule] = {
    **dict.fromkeys(jx.KEEPS_AXES, _keep),
    **dict.fromkeys(jx.LAYOUT_OPS - jx.KEEPS_AXES, _untracked),
    "mul": _scaled,
    "div": _scaled,
    "slice": _slice,
    "dynamic_slice": _slice,
    "transpose": _transpose,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "dot_general": _dot,
    "ragged_dot_general": _ragged_dot,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "scan": _scan,
    "cond": _cond,
    "while": _while,
}
"""The probe's rule of each primitive, keyed by primitive name as the interpreter's `RULES`;
any other primitive goes to `_call` (a call-like equation's body, else nothing tracked)."""


def kernel_uses(probe: Callable[[PyTree], PyTree], params: PyTree) -> dict[str, Use]:
    """Traces ``probe(params)`` abstractly; returns each used kernel's path -> `Use`.

    An Embed lookup wins over other uses of the same embedding (``attend``); then a conv; then the
    first contraction. `Use.head` marks the model's output heads (`flax_lora._head`).

    Raises:
      ValueError: ``params`` has leaves of 2 or more dimensions but the probe contracts or
        gathers none of them (it ignores its argument, e.g. closes over other params).
    """
    closed = jax.make_jaxpr(probe)(params)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    tracked: dict[jx.Var, Tracked] = {}
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
    out = {p: min(us, key=lambda u: rank[u.kind]) for p, us in uses.items()}
    kernels = {v: t[0] for v, t in tracked.items() if math.prod(jx.shape(v)) > 1}
    heads = output_heads(closed.jaxpr, kernels)  # a leaf of size 1 is a scale, not a kernel
    return {p: dataclasses.replace(u, head=p in heads) for p, u in out.items()}
