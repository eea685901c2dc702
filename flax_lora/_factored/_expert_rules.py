"""The rules of the products that use an expert kernel (issue 16): one LoRA per expert, no expert
kernel formed forward or backward.

An expert view carries its expert axes (`flax_lora._factored._view.EXPERT`) before the factors'
input and output axes: ``a (E, *I, r)``, ``b (E, r, *O)``.

- ``dot_general`` whose kernel batch dimensions are exactly the view's expert axes (the batched
  einsum ``"etd,edf->etf"``, the kernel on either side):
  ``dot(x, W0) + scale * dot(dot(x, a), b)``, both low-rank products keeping the expert axes as
  batch dimensions, laid out as the equation's output (kernel first: the branch is transposed);
- ``dot_general`` whose kernel has no batch dimension and whose expert axes are free (MaxText's
  dense MoE, ``"BSM,EMH->BSEH"``: every token through every expert):
  ``dot(x, W0) + scale * dot(dot(x, a), b)``, the first product ``(B, S, E, r)`` with the expert
  axes free in it, the second batched over them, laid out as the equation's output;
- ``ragged_dot_general`` (``jax.lax.ragged_dot``), the kernel as rhs with its group axis the
  expert axis: ``rd(x, W0, gs) + scale * rd(rd(x, a, gs), b, gs)``, the same group sizes and
  ragged dimension. JAX differentiates both into products of the factors' size (the ragged
  backward contracts the ragged axis: ``da (E, *I, r)``).

Routing stacks (``lora_ids``): the batched einsum's expert axis is a batch dimension, and a
ragged product's rows are sorted assignments, so neither is routed kernel by kernel; mode
``"auto"`` runs each example as a batch of one, ``"factored"`` says so.

LoRA dropout masks the branch input with the equation's key, as for Dense. DoRA: the output
times ``g = m / ||V||`` per expert and output unit (the norms factored, mapped over the carried
axes in `flax_lora._factored._view.make_view`; for a ragged product each row takes its group's
``g``). DoRA with LoRA dropout on an expert kernel (PEFT refuses both on ``target_parameters``)
is merged at its use in mode ``"auto"``.
"""

from __future__ import annotations

from typing import TypedDict

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from flax_lora import _jaxpr as jx
from flax_lora._factored._contract import Evaluator, InterpValue, Result, Unfactored, no_rule
from flax_lora._factored._layout_ops import value_ops_only
from flax_lora._factored._lowrank import cast_like
from flax_lora._factored._quant_base import as_array
from flax_lora._factored._rules import dequantized, dropout, kernel_use, operand
from flax_lora._factored._view import EXPERT, I_SIDE, O_SIDE, KernelView, expert_slice
from flax_lora._typing import Key


class _Hints(TypedDict):
    """A product's precision settings, as keywords of ``jax.lax.dot_general``."""

    precision: jax.lax.PrecisionLike
    preferred_element_type: DTypeLike | None


def _hints(d: jx.Dot) -> _Hints:
    return _Hints(precision=d.precision, preferred_element_type=d.preferred_element_type)


def _branch_inputs(
    interp: Evaluator, v: KernelView, x: InterpValue, op: str, key: Key
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The branch input (dropout applied) and the two factors in a common compute dtype."""
    x = operand(interp, x, op, "both operands are kernels")
    dtype = jnp.promote_types(x.dtype, v.a.dtype)
    return dropout(x, v, key).astype(dtype), v.a.astype(dtype), v.b.astype(dtype)


def _finish(
    base_out: jax.Array, low: jax.Array, v: KernelView, g: jax.Array | None = None
) -> list[jax.Array]:
    """``base_out + scale * low``; DoRA: times ``g`` (broadcast to the output already)."""
    low = low * jnp.asarray(v.scale, low.dtype)
    acc = jnp.promote_types(base_out.dtype, jnp.float32)
    out = base_out.astype(acc) + low.astype(acc)
    return [cast_like(out if g is None else out * g.astype(acc), base_out.dtype)]


def _dora_with_dropout(v: KernelView, key: Key) -> bool:
    return v.g is not None and key is not None and float(v.meta.weights.dropout) > 0


def _expert_dense(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``dot_general`` with an expert view: the low-rank products batched over the experts."""
    x_pos = 0 if isinstance(invals[1], KernelView) else 1
    v = invals[1 - x_pos]
    if not isinstance(v, KernelView) or v.meta.why is not None:
        return no_rule(invals)
    d = jx.dot(eqn)
    kc, kb = (d.rhs_contract, d.rhs_batch) if x_pos == 0 else (d.lhs_contract, d.lhs_batch)
    xc, xb = (d.lhs_contract, d.lhs_batch) if x_pos == 0 else (d.rhs_contract, d.rhs_batch)
    ins, experts = v.axes(I_SIDE), v.axes(EXPERT)
    if _dora_with_dropout(v, key):
        return Unfactored("DoRA with LoRA dropout on an expert kernel")
    if not kb and sorted(kc) == ins and len(v.meta.carried) == len(experts):
        return _free_experts(interp, eqn, invals, v, x_pos, key)
    if tuple(kb) != tuple(experts) or sorted(kc) != ins or len(v.meta.carried) != len(experts):
        return Unfactored(
            f"the expert kernel's batch dimensions {tuple(kb)} and contracted axes {tuple(kc)} "
            f"are not its expert axes {tuple(experts)} and input axes {tuple(ins)}"
        )
    x, a, b = _branch_inputs(interp, v, invals[x_pos], "dot_general", key)
    n = len(experts)
    lead = tuple(range(n))
    hints = _hints(d)
    t = jax.lax.dot_general(
        x, a, ((xc, tuple(n + ins.index(k) for k in kc)), (xb, lead)), **hints
    )  # (E, x free..., r)
    low = jax.lax.dot_general(t, b, (((t.ndim - 1,), (n,)), (lead, lead)), **hints)
    n_x = t.ndim - 1 - n
    if x_pos == 1:  # kernel first: the output is (E, kernel free..., x free...)
        n_o = low.ndim - n - n_x
        low = jnp.transpose(low, (*lead, *range(n + n_x, n + n_x + n_o), *range(n, n + n_x)))
    operands = list(invals)
    operands[x_pos] = as_array(invals[x_pos])
    operands[1 - x_pos] = as_array(v.base)
    g = None
    if v.g is not None:  # (E, *O) -> against (E, x free..., *O), or (E, *O, x free...)
        ones = (1,) * n_x
        o_shape = v.g.shape[n:]
        g = v.g.reshape(*v.g.shape[:n], *(ones + o_shape if x_pos == 0 else o_shape + ones))
    return _finish(jx.bind(eqn, operands)[0], low, v, g)


def _free_experts(
    interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], v: KernelView, x_pos: int, key: Key
) -> Result:
    """``dot_general`` whose kernel's expert axes are free (not batch dimensions): ``x @ a``
    keeps them free, ``(x free..., E..., r)``, then the product with ``b`` is batched over them
    and laid out as the equation's output (``(x free..., kernel free...)``, kernel first
    ``(kernel free..., x free...)``, the kernel's free axes being its expert and output axes in
    view order)."""
    d = jx.dot(eqn)
    kc, xc = (d.rhs_contract, d.lhs_contract) if x_pos == 0 else (d.lhs_contract, d.rhs_contract)
    ins, experts, outs = v.axes(I_SIDE), v.axes(EXPERT), v.axes(O_SIDE)
    x, a, b = _branch_inputs(interp, v, invals[x_pos], "dot_general", key)
    n, n_x = len(experts), x.ndim - len(xc)
    hints = _hints(d)
    t = jax.lax.dot_general(
        x, a, ((xc, tuple(n + ins.index(k) for k in kc)), ((), ())), **hints
    )  # (x free..., E..., r)
    e_in_t = tuple(range(n_x, n_x + n))
    low = jax.lax.dot_general(
        t, b, (((t.ndim - 1,), (n,)), (e_in_t, tuple(range(n)))), **hints
    )  # (E..., x free..., O...)
    kernel_free = [  # each free view axis' position in ``low``, in view order
        experts.index(k) if k in experts else n + n_x + outs.index(k)
        for k in range(len(v.shape))
        if k not in kc
    ]
    x_free = list(range(n, n + n_x))
    perm = tuple(x_free + kernel_free if x_pos == 0 else kernel_free + x_free)
    operands = list(invals)
    operands[x_pos] = as_array(invals[x_pos])
    operands[1 - x_pos] = as_array(v.base)
    g = None
    if v.g is not None:  # (E..., O...) -> (E..., 1 per x free axis, O...), laid out as ``low``
        g = jnp.transpose(v.g.reshape(*v.g.shape[:n], *(1,) * n_x, *v.g.shape[n:]), perm)
    return _finish(jx.bind(eqn, operands)[0], jnp.transpose(low, perm), v, g)


def _ragged(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``ragged_dot_general`` with an expert view as rhs: two grouped low-rank products."""
    v = invals[1]
    if any(isinstance(x, KernelView) for x in (invals[0], invals[2])) or not isinstance(
        v, KernelView
    ):
        return Unfactored("the expert kernel is not the rhs of the grouped product")
    if v.meta.why is not None:
        return no_rule(invals)
    if _dora_with_dropout(v, key):
        return Unfactored("DoRA with LoRA dropout on an expert kernel")
    rd = jx.ragged_dot(eqn)
    d = rd.dot
    ins, experts = v.axes(I_SIDE), v.axes(EXPERT)
    if (
        d.lhs_batch
        or d.rhs_batch
        or tuple(rd.rhs_group) != tuple(experts)
        or len(experts) != 1
        or sorted(d.rhs_contract) != ins
        or len(v.meta.carried) != 1
    ):
        return Unfactored(
            f"a grouped product with group axes {rd.rhs_group} and contracted axes "
            f"{d.rhs_contract} of an expert kernel with expert axes {tuple(experts)} and input "
            f"axes {tuple(ins)}"
        )
    x, a, b = _branch_inputs(interp, v, invals[0], "ragged_dot_general", key)
    gs = as_array(invals[2])
    hints = _hints(d)
    first = jx.Dot(
        d.lhs_contract,
        tuple(1 + ins.index(k) for k in d.rhs_contract),
        (),
        (),
        d.precision,
        d.preferred_element_type,
    )
    free = [k for k in range(x.ndim) if k not in d.lhs_contract]
    ragged = tuple(free.index(k) for k in rd.lhs_ragged)
    second = jx.Dot(
        (x.ndim - len(d.lhs_contract),), (1,), (), (), d.precision, d.preferred_element_type
    )
    try:
        t = jax.lax.ragged_dot_general(
            x, a, gs, jx.ragged_numbers(first, rd.lhs_ragged, (0,)), **hints
        )  # (x free..., r)
        low = jax.lax.ragged_dot_general(t, b, gs, jx.ragged_numbers(second, ragged, (0,)), **hints)
        base_out = jx.bind(eqn, [as_array(invals[0]), as_array(v.base), gs])[0]
    except NotImplementedError:  # under jax.vmap (per-example routing): no batching rule
        return Unfactored("ragged_dot has no batching rule for the factors (jax.vmap)")
    g = None
    if v.g is not None:  # each row's expert's g: (E, *O) -> rows on the ragged axis
        rows = x.shape[rd.lhs_ragged[0]]
        expert_of_row = jnp.repeat(jnp.arange(v.g.shape[0]), gs, total_repeat_length=rows)
        shape = [1] * len(free)
        shape[ragged[0]] = rows
        g = v.g[expert_of_row].reshape(*shape, *v.g.shape[1:])
    return _finish(base_out, low, v, g)


expert_dense_rule = kernel_use(dequantized)(_expert_dense)
_ragged_checked = kernel_use(dequantized)(_ragged)


def ragged_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``ragged_dot_general``; a routed expert view (``lora_ids``) cannot be mapped per example
    here (``ragged_dot`` has no batching rule, and its rows are sorted assignments, not
    examples): the call then runs each example as a batch of one (mode ``"auto"``)."""
    if any(isinstance(x, KernelView) and x.routed for x in invals):
        return Unfactored("routing over a ragged_dot expert kernel runs per example")
    return _ragged_checked(interp, eqn, invals, key)


def slice_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``slice`` / ``dynamic_slice`` of an expert view to one expert (``w[e]`` in a loop over
    the experts; the ``squeeze`` that follows is a layout op): the factors are sliced with
    ``W0``, so each expert's uses are factored by the ordinary rules."""
    del interp, key
    v = invals[0]
    if not isinstance(v, KernelView) or any(isinstance(x, KernelView) for x in invals[1:]):
        return no_rule(invals)
    if v.meta.why is not None or EXPERT not in v.meta.carried:
        return no_rule(invals)
    if v.routed or v.layered or not value_ops_only(v):
        return Unfactored("a slice of an expert kernel after a layout op")
    old, new = v.shape, jx.shape(eqn.outvars[0])
    changed = [d for d in range(len(old)) if old[d] != new[d]]
    if len(changed) != 1 or v.meta.side[changed[0]] != EXPERT or new[changed[0]] != 1:
        return Unfactored("a slice of an expert kernel other than one expert")
    d = changed[0]
    if eqn.primitive.name == "slice":
        start: int | jax.Array = int(jx.param(eqn, "start_indices")[d])
    else:  # dynamic_slice(operand, *start_indices)
        start = as_array(invals[1 + d])
    take = lambda x, k: jax.lax.dynamic_slice_in_dim(x, start, 1, axis=k)
    base = jx.bind(eqn, [as_array(v.base), *(as_array(x) for x in invals[1:])])[0]
    return [expert_slice(v, d, take, base)]
