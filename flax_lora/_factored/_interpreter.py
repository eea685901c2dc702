"""The interpreter of factored execution: evaluates a jaxpr whose inputs may be kernel views.

JAX's documented custom-interpreter technique: each equation is bound unchanged unless an
adapted kernel (a `KernelView`) or a quantized kernel (a `QuantBase`) is among its inputs; such
an equation goes to the rule of its primitive in `RULES`, as JAX's own interpreters keep one
rule per primitive in a table. A rule returns the equation's outputs, or `Unfactored` with the
reason it cannot factor this use; the kernels involved are then merged (mode ``"auto"``; a
warning when their LoRA dropout is thereby lost), or the call raises (mode ``"factored"``), or,
for a kernel routed per example, evaluation ends with a `RoutingFallback` (the call must run
example by example), returned in place of outputs through every enclosing rule.

Nested ``jit`` calls are inlined, remat regions are re-wrapped in `jax.checkpoint` with their
policy, and a ``scan`` runs as a real `jax.lax.scan` whose body this interpreter evaluates on
per-layer views (`flax_lora._factored._scan`).

Dropout keys are explicit: each equation's key is its jaxpr's key folded with the equation's
position (a nested body's key is its equation's; a scan folds the layer index in too), so the
masks depend on where a branch is in the model, not on the order the interpreter meets them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax

from flax_lora import _jaxpr as jx
from flax_lora._factored._contract import (
    Ahead,
    Evaluator,
    InterpValue,
    Passed,
    Result,
    RoutingFallback,
    Rule,
    Unfactored,
    leaving,
    no_rule,
    returned,
)
from flax_lora._factored._expert_rules import expert_dense_rule, ragged_rule, slice_rule
from flax_lora._factored._layout_ops import layout_of, layout_rule
from flax_lora._factored._quant_base import as_array, is_quant_base
from flax_lora._factored._rules import conv_rule, dense_rule, gather_rule
from flax_lora._factored._scale import SCALINGS, scale_rule
from flax_lora._factored._scan import scan_rule
from flax_lora._factored._view import EXPERT, KernelView, materialize
from flax_lora._typing import Key, Mode


def call_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """A nested ``jit``: its body is evaluated inline, with the equation's key."""
    body = jx.call(eqn).body
    return interp.eval(body.jaxpr, body.consts, invals, key)


def remat_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """A remat region, re-wrapped in `jax.checkpoint` with its policy and evaluated inside."""
    region = jx.remat(eqn)
    name = eqn.primitive.name
    # a kernel returned as it came in (NNX's remat returns the module state): `Passed` by
    # outside the region instead of leaving it as an array
    where = {v: k for k, v in enumerate(region.body.jaxpr.invars)}
    passed = [
        Passed(where[o])
        if not jx.is_literal(o) and o in where and _is_kernel(invals[where[o]])
        else None
        for o in region.body.jaxpr.outvars
    ]

    def body(body_key: Key, *vals: InterpValue) -> list[InterpValue] | RoutingFallback:
        outs = interp.eval(region.body.jaxpr, region.body.consts, vals, body_key)
        if isinstance(outs, RoutingFallback):
            return outs
        return leaving(interp, outs, passed, name, "the kernel leaves the remat region")

    checkpointed = jax.checkpoint(body, prevent_cse=region.prevent_cse, policy=region.policy)
    return returned(checkpointed(key, *invals), invals)


def dot_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``dot_general``: the expert rule for an (unrouted) expert view, else the Dense rule."""
    if any(isinstance(x, KernelView) and EXPERT in x.meta.carried for x in invals):
        return expert_dense_rule(interp, eqn, invals, key)
    return dense_rule(interp, eqn, invals, key)


RULES: dict[str, Rule] = {
    **dict.fromkeys(jx.LAYOUT_OPS, layout_rule),
    **dict.fromkeys(jx.CALLS, call_rule),
    **dict.fromkeys(jx.REMATS, remat_rule),
    "scan": scan_rule,
    "dot_general": dot_rule,
    "ragged_dot_general": ragged_rule,
    "slice": slice_rule,
    "dynamic_slice": slice_rule,
    "gather": gather_rule,
    "conv_general_dilated": conv_rule,
    **dict.fromkeys(SCALINGS, scale_rule),
}
"""The rule of each primitive that factored execution sees through or factors; any other
primitive with a kernel among its inputs is `Unfactored`."""


def _is_kernel(x: object) -> bool:
    return isinstance(x, KernelView) or is_quant_base(x)


class _Frame:
    """The state of one jaxpr being evaluated: its environment and where the loop is."""

    def __init__(self, jaxpr: jx.Jaxpr, env: dict[jx.Var, InterpValue]) -> None:
        self.jaxpr = jaxpr
        self.env = env
        self.index = 0
        self.early: set[int] = set()  # indices of layout equations evaluated ahead of the loop
        self.ahead: dict[int, jax.Array] = {}  # equation index -> its branch, from a sibling's
        self._producers: dict[jx.Var, int] | None = None
        self._dots: dict[jx.Var, list[tuple[int, jx.Eqn]]] | None = None

    def producer(self, var: jx.Var) -> int | None:
        """The index of the equation that computes ``var`` (``None``: an input)."""
        if self._producers is None:
            self._producers = {o: i for i, e in enumerate(self.jaxpr.eqns) for o in e.outvars}
        return self._producers.get(var)

    def dots_using(self, var: jx.Var) -> list[tuple[int, jx.Eqn]]:
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
    """Evaluates a jaxpr whose inputs may be `KernelView`\\s (the `Evaluator` of the rules).

    Attributes:
      mode: ``"factored"`` (an unfactorable use raises), ``"auto"`` (it merges the kernel) or
        ``"merged"`` (every use merges; used for a quantized base, dequantized per use).
      with_key: whether the call has a dropout key (``lora_rng``), for the warning of a merge.
      routing: whether the call routes examples (``lora_ids``).
    """

    def __init__(self, mode: Mode, with_key: bool = False, routing: bool = False) -> None:
        self.mode = mode
        self.with_key = with_key
        self.routing = routing
        self._frames: list[_Frame] = []

    def eval(
        self, jaxpr: jx.Jaxpr, consts: Sequence[InterpValue], args: Sequence[InterpValue], key: Key
    ) -> list[InterpValue] | RoutingFallback:
        """Evaluates ``jaxpr``; ``key`` is its dropout key (``None``: no dropout). A
        `RoutingFallback` ends it and is returned instead of the outputs."""
        env: dict[jx.Var, InterpValue] = {}
        env.update(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))
        frame = _Frame(jaxpr, env)
        self._frames.append(frame)
        try:
            for i, eqn in enumerate(jaxpr.eqns):
                frame.index = i
                if i in frame.early:
                    continue
                invals = [v.val if isinstance(v, jx.Literal) else env[v] for v in eqn.invars]
                with jx.eqn_context(eqn):
                    if any(_is_kernel(x) for x in invals):
                        outs = self.apply(eqn, invals, _eqn_key(key, eqn, i))
                    else:
                        outs = jx.bind(eqn, invals)
                if isinstance(outs, RoutingFallback):
                    return outs
                env.update(zip(eqn.outvars, outs, strict=True))
        finally:
            self._frames.pop()
        return [v.val if isinstance(v, jx.Literal) else env[v] for v in jaxpr.outvars]

    def apply(
        self, eqn: jx.Eqn, invals: list[InterpValue], key: Key
    ) -> list[InterpValue] | RoutingFallback:
        """Evaluates one equation with kernels among ``invals`` by the rule of its primitive;
        a use the rule cannot factor falls back (`plain`)."""
        name = eqn.primitive.name
        rule = RULES.get(name, _no_rule)
        out = rule(self, eqn, invals, key)
        if isinstance(out, Ahead):  # branches of later siblings, for their rules
            self._frames[-1].ahead.update(out.branches)
            return out.outs
        if not isinstance(out, Unfactored):
            return out
        plain = leaving(self, invals, [None] * len(invals), name, out.reason)
        return plain if isinstance(plain, RoutingFallback) else jx.bind(eqn, plain)

    def plain(self, x: InterpValue, op: str, reason: str) -> jax.Array | RoutingFallback:
        """``x`` as an array where it leaves factored execution (a use ``op`` that cannot be
        factored, an output): a view `merged`, a quantized base dequantized; for a routed view
        the `RoutingFallback` that ends the routed call."""
        if not isinstance(x, KernelView):
            return as_array(x)
        if x.routed:
            return RoutingFallback(f"kernel {x.path!r} is used by `{op}` ({reason})")
        return self.merged(x, op, reason)

    def merged(self, v: KernelView, op: str, reason: str) -> jax.Array:
        """The kernel of view ``v`` (not routed: a routed use goes to `plain`) for a use ``op``
        that cannot be factored: merged (mode ``"auto"``) or an error (mode ``"factored"``)."""
        if v.routed:
            raise AssertionError(f"a routed view of {v.path!r} cannot be merged")  # by contract
        if self.mode == "factored":
            raise ValueError(
                f"lora.wrap(mode='factored'): kernel {v.path!r} is used by `{op}`, which cannot "
                f"be factored ({reason}). Use mode='auto' to merge this kernel and factor the "
                "others, or mode='merged'."
            )
        if self.with_key and float(v.meta.weights.dropout) > 0:
            warnings.warn(
                f"lora.wrap(mode='auto'): kernel {v.path!r} is merged for `{op}` ({reason}), so "
                "its LoRA dropout is not applied; the other kernels' is.",
                stacklevel=2,
            )
        return materialize(v)

    def later_uses(self, eqn: jx.Eqn, x_pos: int) -> list[tuple[int, jx.Eqn, KernelView]]:
        """The later ``dot_general`` equations of the current jaxpr (index, equation, view)
        whose operand ``x_pos`` is ``eqn``'s, whose other operand is a kernel view (its layout
        ops evaluated ahead) and whose branch no earlier sibling computed."""
        xvar = eqn.invars[x_pos]
        if jx.is_literal(xvar):
            return []
        frame = self._frames[-1]
        found = []
        for i, e in frame.dots_using(xvar):
            if i > frame.index and i not in frame.ahead and e.invars[x_pos] is xvar:
                v = self._resolve(e.invars[1 - x_pos], frame)
                if v is not None:
                    found.append((i, e, v))
        return found

    def branch_ahead(self) -> jax.Array | None:
        """The current equation's low-rank branch, if an earlier sibling's rule computed it."""
        frame = self._frames[-1]
        return frame.ahead.pop(frame.index, None)

    def _resolve(self, var: jx.Atom, frame: _Frame) -> KernelView | None:
        """The kernel view ``var`` will hold, evaluating its layout ops ahead if needed."""
        if jx.is_literal(var):
            return None
        if var in frame.env:
            val = frame.env[var]
            return val if isinstance(val, KernelView) else None
        index = frame.producer(var)
        if index is None:
            return None
        eqn = frame.jaxpr.eqns[index]
        if eqn.primitive.name not in jx.LAYOUT_OPS or len(eqn.invars) != 1:
            return None
        src = self._resolve(eqn.invars[0], frame)
        if src is None:
            return None
        with jx.eqn_context(eqn):
            out = layout_of(src, eqn)
        frame.env[eqn.outvars[0]] = out
        frame.early.add(index)
        return out if isinstance(out, KernelView) else None


def _eqn_key(key: Key, eqn: jx.Eqn, index: int) -> Key:
    """The dropout key of the equation at ``index`` of a jaxpr whose key is ``key`` (``None``
    for a layout op, which draws no mask)."""
    if key is None or eqn.primitive.name in jx.LAYOUT_OPS:
        return None
    return jax.random.fold_in(key, index)


def _no_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Unfactored:
    del interp, eqn, key
    return no_rule(invals)
