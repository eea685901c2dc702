"""Factored execution: run ``apply_fn`` with adapters without ever forming an adapted kernel.

The function is traced to a jaxpr (`jax.make_jaxpr`) on the abstract values of its inputs, then
evaluated by a small interpreter (JAX's documented custom-interpreter technique). Each adapted
kernel enters as a `KernelView` (``W0`` plus its factors, carried through the model's layout
ops); the ops that use a view are computed by the rules of `_factored_rules`
(``op(x, W0) + low-rank branch``); every other op is bound unchanged. Nested ``jit`` calls are
inlined, remat regions are re-wrapped in `jax.checkpoint` with their policy, and a ``scan``
(``nn.scan`` / ``nnx.scan`` stacked layers, or a loop closing over a kernel) runs as a real
`jax.lax.scan` whose body is evaluated by this interpreter on per-layer views (`_scan`). A use
that no rule fits (``cond``, a kernel carried by a loop, custom derivatives, arithmetic on the
kernel itself, ...) merges that kernel in mode ``"auto"`` and raises in mode ``"factored"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flax_lora import _jaxpr as jx
from flax_lora._factored._lowrank import dense_branches
from flax_lora._factored._quant import as_array, is_base, quant_rule
from flax_lora._factored._routing import (
    ROUTED_OPS,
    RoutingFallback,
    is_routed,
    per_example,
    routed_layout,
)
from flax_lora._factored._rules import (
    DensePlan,
    conv_rule,
    finish_dense,
    gather_rule,
    plan_dense,
)
from flax_lora._factored._scan import is_stacked, scan_rule
from flax_lora._factored._view import (
    LAYOUT_OPS,
    KernelView,
    apply_layout,
    materialize,
)

PyTree = Any
_CACHE_SIZE = 8


class _Frame:
    """The state of one jaxpr being evaluated: its environment and where the loop is."""

    def __init__(self, jaxpr: Any, env: dict[Any, Any]) -> None:
        self.jaxpr = jaxpr
        self.env = env
        self.index = 0
        self.early: set[int] = set()  # ids of layout equations evaluated ahead of the loop
        self._producers: dict[Any, Any] | None = None
        self._dots: dict[Any, list[tuple[int, Any]]] | None = None

    def producer(self, var: Any) -> Any:
        if self._producers is None:
            self._producers = {o: e for e in self.jaxpr.eqns for o in e.outvars}
        return self._producers.get(var)

    def dots_using(self, var: Any) -> list[tuple[int, Any]]:
        """The ``dot_general`` equations (with their index) that take ``var`` as an operand."""
        if self._dots is None:
            self._dots = {}
            for i, e in enumerate(self.jaxpr.eqns):
                if e.primitive.name == "dot_general":
                    for v in e.invars:
                        if not jx.is_literal(v):
                            self._dots.setdefault(v, []).append((i, e))
        return self._dots.get(var, [])


class Interpreter:
    """Evaluates a jaxpr whose inputs may be `KernelView`s.

    Attributes:
      mode: ``"factored"`` (an unfactorable use raises) or ``"auto"`` (it merges the kernel).
      key: the PRNG key for dropout on the LoRA branches, or ``None`` for no dropout.
      count: the number of dropout masks drawn so far (each branch folds it into ``key``).
    """

    def __init__(self, mode: str, key: Any = None, batch: int | None = None) -> None:
        self.mode = mode
        self.key = key
        self.batch = batch  # routing (`lora_ids`): the batch size; views carry per-example factors
        self.count = 0
        self.frames: list[_Frame] = []
        self.stash: dict[int, jax.Array] = {}  # low-rank branches computed ahead, by equation

    # -- policy ------------------------------------------------------------------------------
    def dropout(self, x: jax.Array, v: KernelView) -> jax.Array:
        """Inverted dropout at the adapter's rate on a LoRA branch input (only with a key)."""
        rate = float(v.meta.weights.dropout)
        if self.key is None or rate == 0.0:
            return x
        keep = jax.random.bernoulli(self._next_key(), 1.0 - rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))

    def fallback(self, v: KernelView, op: str, reason: str) -> jax.Array:
        """The merged kernel for a use that cannot be factored (mode "auto"), or an error."""
        if is_routed(v):
            raise RoutingFallback(f"kernel {v.path!r} is used by `{op}` ({reason})")
        if self.mode == "factored":
            raise ValueError(
                f"lora.wrap(mode='factored'): kernel {v.path!r} is used by `{op}`, which cannot "
                f"be factored ({reason}). Use mode='auto' to merge this kernel and factor the "
                "others, or mode='merged'."
            )
        if self.key is not None and float(v.meta.weights.dropout) > 0:
            warnings.warn(
                f"lora.wrap(mode='auto'): kernel {v.path!r} is merged for `{op}` ({reason}), so "
                "its LoRA dropout is not applied; the other kernels' is.",
                stacklevel=2,
            )
        return materialize(v)

    # -- evaluation ---------------------------------------------------------------------------
    def eval(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(var: Any) -> Any:
            return var.val if jx.is_literal(var) else env[var]

        env.update(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))
        frame = _Frame(jaxpr, env)
        self.frames.append(frame)
        try:
            for i, eqn in enumerate(jaxpr.eqns):
                frame.index = i
                if id(eqn) in frame.early:
                    continue
                invals = [read(v) for v in eqn.invars]
                with jx.eqn_context(eqn):
                    if any(isinstance(x, KernelView) or is_base(x) for x in invals):
                        outs = self.rule(eqn, invals)
                    else:
                        outs = jx.bind(eqn, invals)
                env.update(zip(eqn.outvars, outs, strict=True))
        finally:
            self.frames.pop()
        return [read(v) for v in jaxpr.outvars]

    def rule(self, eqn: Any, invals: list[Any]) -> list[Any]:
        """Evaluates one equation that has a kernel view among its inputs."""
        name = eqn.primitive.name
        views = [x for x in invals if isinstance(x, KernelView)]
        if not views:  # quantized kernels without an adapter (QLoRA): `_quant_view`
            return quant_rule(self, eqn, invals)
        first = invals[0]
        if self.batch is not None and any(is_routed(v) for v in views):
            if name in LAYOUT_OPS and len(invals) == 1:
                return [routed_layout(first, lambda v: _layout(v, eqn))]
            if name in ROUTED_OPS:
                return per_example(
                    eqn, invals, self.batch, self._next_key(), self.rule, self._with_key
                )
            if name != "scan" and name not in jx.CALLS | jx.REMATS:
                raise RoutingFallback(f"kernel {views[0].path!r} is used by `{name}`")
        if name in LAYOUT_OPS and len(invals) == 1:
            return [_layout(first, eqn)]
        result: list[Any] | str | None = None
        if name == "scan":  # stacked layers, or kernels closed over by a loop
            result = scan_rule(self, eqn, invals)
        elif any(is_stacked(v) for v in views) and name not in jx.CALLS | jx.REMATS:
            result = "the stacked kernel is used whole, not sliced by a scan over its layers"
        elif self.mode == "merged" and name not in jx.CALLS | jx.REMATS:
            result = "mode 'merged'"  # a quantized base: each use merges (`lora.wrap`)
        elif name == "dot_general":
            result = self._dense(eqn, invals)
        elif name == "gather" and isinstance(first, KernelView) and first.meta.why is None:
            result = gather_rule(eqn, first, self._plain(invals[1], name, "kernel as indices"))
        elif name == "conv_general_dilated" and isinstance(invals[1], KernelView):
            if invals[1].meta.why is None:
                x = self._plain(first, name, "both operands are kernels")
                result = conv_rule(eqn, x, invals[1], self.dropout)
        elif name in jx.CALLS:
            body = jx.call(eqn).body
            return self.eval(body.jaxpr, body.consts, invals)
        elif name in jx.REMATS:
            return self._remat(eqn, invals)
        if isinstance(result, list):
            return result
        reason = result or next((v.meta.why for v in views if v.meta.why), None)
        reason = reason or "no factored rule for this operation"
        plain = [
            self.fallback(x, name, reason) if isinstance(x, KernelView) else as_array(x)
            for x in invals
        ]
        return jx.bind(eqn, plain)

    def _dense(self, eqn: Any, invals: list[Any]) -> list[Any] | str | None:
        """``dot_general`` with a kernel view, its branch shared with siblings where possible."""
        x_pos = 0 if isinstance(invals[1], KernelView) else 1
        v = invals[1 - x_pos]
        if v.meta.why is not None:
            return None
        x = self._plain(invals[x_pos], "dot_general", "both operands are kernels")
        dims = jx.dot(eqn)
        plan = plan_dense(eqn, tuple(jnp.shape(x)), v, x_pos == 0)
        if isinstance(plan, str):
            return plan
        if plan.x_scale is not None:  # DoRA, kernel contracted on its output axes
            x = x * plan.x_scale.astype(x.dtype)
        x_drop = None
        low = self.stash.pop(id(eqn), None)
        dora_drop = v.g is not None and not plan.on_out and self.key is not None
        if low is None and dora_drop and float(v.meta.weights.dropout) > 0:  # PEFT's form
            dropped = self.dropout(x, v)
            x_drop = None if dropped is x else dropped
            low = dense_branches(
                plan.prepare(dropped),
                [plan.first],
                [plan.second],
                dims.precision,
                dims.preferred_element_type,
            )[0]
        if low is None:
            group = self._siblings(eqn, x_pos, plan, v)
            plans = [plan] + [p for _, p in group]
            lows = dense_branches(
                self.dropout(plan.prepare(x), v),
                [p.first for p in plans],
                [p.second for p in plans],
                dims.precision,
                dims.preferred_element_type,
            )
            low = lows[0]
            self.stash.update((id(e), lw) for (e, _), lw in zip(group, lows[1:], strict=True))
        return finish_dense(eqn, x, v, plan, low, x_drop)

    def _siblings(
        self, eqn: Any, x_pos: int, plan: DensePlan, v: KernelView
    ) -> list[tuple[Any, DensePlan]]:
        """Later ``dot_general`` equations of the same activation with other kernel views.

        Their low-rank branches are computed together with this one (one product of the
        activation with the concatenated ``a`` factors). Not with LoRA dropout, whose masks
        are drawn per adapter.
        """
        xvar = eqn.invars[x_pos]
        if self.key is not None or self.batch is not None or jx.is_literal(xvar):
            return []
        frame = self.frames[-1]
        dims = jx.dot(eqn)
        group = []
        for i, e in frame.dots_using(xvar):
            if i <= frame.index or e.invars[x_pos] is not xvar or id(e) in self.stash:
                continue
            other = jx.dot(e)
            if (other.precision, other.preferred_element_type) != (
                dims.precision,
                dims.preferred_element_type,
            ):
                continue
            kv = self._resolve(e.invars[1 - x_pos], frame)
            if kv is None or kv.meta.why is not None or kv.dtype != v.dtype:
                continue
            p = plan_dense(e, tuple(xvar.aval.shape), kv, x_pos == 0)
            if not isinstance(p, str) and p.shares_input_with(plan):
                group.append((e, p))
        return group

    def _resolve(self, var: Any, frame: _Frame) -> KernelView | None:
        """The kernel view ``var`` will hold, evaluating its layout ops ahead if needed."""
        if jx.is_literal(var):
            return None
        if var in frame.env:
            val = frame.env[var]
            return val if isinstance(val, KernelView) else None
        eqn = frame.producer(var)
        if eqn is None or eqn.primitive.name not in LAYOUT_OPS or len(eqn.invars) != 1:
            return None
        src = self._resolve(eqn.invars[0], frame)
        if src is None:
            return None
        with jx.eqn_context(eqn):
            out = _layout(src, eqn)
        frame.env[eqn.outvars[0]] = out
        frame.early.add(id(eqn))
        return out

    def _next_key(self) -> Any:
        """A fresh dropout key for one use (``None`` without dropout)."""
        if self.key is None:
            return None
        self.count += 1
        return jax.random.fold_in(self.key, self.count - 1)

    def _with_key(self, key: Any, fn: Callable[[], list[Any]]) -> list[Any]:
        """``fn()`` with the dropout key set to ``key`` (one example's, under routing)."""
        outer, self.key = self.key, key
        try:
            return fn()
        finally:
            self.key = outer

    def _plain(self, x: Any, op: str, reason: str) -> Any:
        return self.fallback(x, op, reason) if isinstance(x, KernelView) else x

    def _remat(self, eqn: Any, invals: list[Any]) -> list[Any]:
        """Re-wraps a remat region in `jax.checkpoint` with its policy, evaluating it inside."""
        region = jx.remat(eqn)
        name = eqn.primitive.name
        # a kernel returned as it came in (NNX's remat returns the module state): passed by
        # outside the region instead of leaving it as an array
        where = {v: k for k, v in enumerate(region.body.jaxpr.invars)}
        passthrough = {
            j: where[o]
            for j, o in enumerate(region.body.jaxpr.outvars)
            if o in where
            and (isinstance(invals[where[o]], KernelView) or is_base(invals[where[o]]))
        }

        def body(key: Any, *vals: Any) -> list[Any]:
            outer, self.key = self.key, key
            try:
                outs = self.eval(region.body.jaxpr, region.body.consts, vals)
            finally:
                self.key = outer
            return [
                jnp.zeros((), jnp.float32)
                if j in passthrough
                else self.fallback(o, name, "the kernel leaves the remat region")
                if isinstance(o, KernelView)
                else as_array(o)
                for j, o in enumerate(outs)
            ]

        checkpointed = jax.checkpoint(body, prevent_cse=region.prevent_cse, policy=region.policy)
        outs = checkpointed(self.key, *invals)
        return [invals[passthrough[j]] if j in passthrough else o for j, o in enumerate(outs)]


def _layout(v: KernelView, eqn: Any) -> KernelView:
    return apply_layout(v, eqn.primitive, jx.bind_params(eqn), eqn.outvars[0].aval)
