"""The free axes of a kernel's product, followed to where they may meet an expert axis (issue 29).

A **free** kernel axis is neither contracted nor batched by the ``dot_general`` using it: it
becomes an axis of the product. The probe (`flax_lora._probe`) follows such axes of the
products of kernels with two or more free axes through the ops that keep an axis as it is
(elementwise ops, slices, transposes, reshapes that keep the axis whole, ``broadcast_in_dim``,
``squeeze``; calls, by the probe) to a later ``dot_general``. Where one is a batch dimension of
that product and the other operand's batch dimension is a kernel axis, it is an expert axis of
the kernel it came from: MaxText's dense MoE, ``"BSM,EMH->BSEH"`` for ``wi_0`` / ``wi_1``, then
``silu(h0) * h1`` and ``"BSEH,EHM->BSEM"`` for ``wo`` (``wo``'s ``E`` a batch dimension).

Any other end leaves it an output axis: Gemma's attention heads (``q`` ``"BTD,DNH->BTNH"``, the
fused ``kv`` ``"BTD,SKDH->SBTKH"``) meet only each other as batch dimensions (activations on
both sides), then are contracted by the output projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from flax_lora import _jaxpr as jx


class Origin(Protocol):
    """A kernel's use (`flax_lora._probe.Use`), whose expert axes a free axis may add to."""

    expert_axes: tuple[int, ...]


Origins = tuple[tuple[Origin, tuple[int, ...]], ...]
"""The kernel uses an axis of a product is a free axis of, each with those kernel axes."""

Free = tuple[Origins, ...]
"""A product of kernels with activations (or a value computed from it axis by axis): the
`Origins` of each of its axes."""

KernelAxes = Sequence[tuple[int, ...]] | None
"""For an operand that stems from a kernel: the kernel axes of each of its axes; else ``None``."""


def join(*axes: Origins) -> Origins:
    """The origins of several operands' same axis, each once (``h * h``)."""
    return tuple({(id(u), ax): (u, ax) for a in axes for u, ax in a}.values())


def union(*found: tuple[Free | None, ...]) -> tuple[Free | None, ...]:
    """The free axes of each outvar of an equation as several rules found them, joined."""
    out: list[Free | None] = []
    for k in range(max(map(len, found))):
        fs = [f[k] for f in found if k < len(f) and f[k] is not None]
        out.append(tuple(join(*axes) for axes in zip(*fs, strict=True)) if fs else None)
    return tuple(out)


def _meet(eqn: jx.Eqn, kernels: list[KernelAxes], free: list[Free | None]) -> Free | None:
    """``dot_general``: a free axis that is a batch dimension against a kernel axis is an expert
    axis of its use; a product passes no free axis on."""
    d = jx.dot(eqn)
    batches = (d.lhs_batch, d.rhs_batch)
    for k in (0, 1):
        kernel, f = kernels[1 - k], free[k]
        if f is None or kernel is None:
            continue
        for mine, theirs in zip(batches[k], batches[1 - k], strict=True):
            if kernel[theirs]:  # the other side's batch dimension is a kernel axis
                for use, axes in f[mine]:
                    use.expert_axes = tuple(sorted({*use.expert_axes, *axes}))
    return None


def _transpose(eqn: jx.Eqn, f: Free) -> Free:
    return tuple(f[p] for p in jx.param(eqn, "permutation"))


def _broadcast(eqn: jx.Eqn, f: Free) -> Free:
    old, new = jx.shape(eqn.invars[0]), jx.shape(eqn.outvars[0])
    out: list[Origins] = [()] * len(new)
    for i, j in enumerate(jx.param(eqn, "broadcast_dimensions")):
        out[j] = f[i] if old[i] == new[j] else ()  # an axis broadcast from 1 is a new one
    return tuple(out)


def _squeeze(eqn: jx.Eqn, f: Free) -> Free:
    drop = {d % len(f) for d in jx.param(eqn, "dimensions")}
    return tuple(m for i, m in enumerate(f) if i not in drop)


def _reshape(eqn: jx.Eqn, f: Free) -> Free:
    """An axis kept whole: the same size, with the same product of sizes before it."""
    old, new = jx.shape(eqn.invars[0]), jx.shape(eqn.outvars[0])
    kept = {(math.prod(old[:i]), old[i]): f[i] for i in range(len(old)) if old[i] > 1}
    return tuple(kept.get((math.prod(new[:j]), new[j]), ()) for j in range(len(new)))


_LOOPS = frozenset({"scan", "cond", "while"})  # a loop's or branch's products stay inside it

FREE_RULES: dict[str, Callable[[jx.Eqn, Free], Free]] = {
    "transpose": _transpose,
    "broadcast_in_dim": _broadcast,
    "squeeze": _squeeze,
    "reshape": _reshape,
}
"""The layout ops that move a one-operand value's axes; elementwise ops keep them (`carry`)."""


def carry(
    eqn: jx.Eqn, kernels: list[KernelAxes], free: list[Free | None]
) -> tuple[Free | None, ...]:
    """The free axes of ``eqn``'s outvars (``()``: none) given those of its operands ``free``;
    ``kernels``: the kernel axes of each operand that stems from a kernel (at a
    ``dot_general``, where free axes may become expert axes)."""
    name = eqn.primitive.name
    if name == "dot_general":
        return (_meet(eqn, kernels, free),)
    if len(eqn.outvars) != 1 or "dimension_numbers" in eqn.params or name in _LOOPS:
        return ()  # products, gathers, scatters, convolutions mix axes; loops keep theirs
    rule = FREE_RULES.get(name)
    if rule is not None:
        return (None,) if free[0] is None else (rule(eqn, free[0]),)
    # elementwise ops (and slices, which keep each axis): each output axis has the free axes
    # of the operands' same axis
    shape = jx.shape(eqn.outvars[0])
    same = [
        f
        for f, v in zip(free, eqn.invars, strict=True)
        if f is not None and len(jx.shape(v)) == len(shape)
    ]
    resized = [v for v in eqn.invars if len(jx.shape(v)) == len(shape) and jx.shape(v) != shape]
    if not same or (resized and name not in ("slice", "dynamic_slice")):
        return ()
    return (tuple(join(*(f[i] for f in same)) for i in range(len(shape))),)
