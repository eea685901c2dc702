"""What a rule of the interpreter is: its signature, what it may ask of the interpreter, and its
typed "cannot factor" result.

A rule computes one equation that has a kernel view (or a quantized base) among its inputs, as
JAX's own interpreters have one rule per primitive in a table: ``rule(interp, eqn, invals, key)``
returns the equation's outputs, or `Unfactored` saying why this use cannot be factored. The
interpreter (`flax_lora._factored._interpreter`) then merges the kernels involved (mode
``"auto"``), raises (mode ``"factored"``) or, for a kernel routed per example, ends evaluation
with a `RoutingFallback`: the call must run example by example instead.

``key`` is the equation's own dropout key: the call's ``lora_rng`` folded with the position of
the equation in its jaxpr (and, inside a scan, with the layer index), or ``None`` without
dropout. A rule draws at most one mask from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax

from flax_lora import _jaxpr as jx
from flax_lora._factored._view import KernelView
from flax_lora._typing import Key, Mode

InterpValue = Any
"""A value of the interpreted model: an array (a tracer, a constant, a literal's value), a
`KernelView` or a `QuantBase`. ``Any``, as JAX's own interpreters type the values of their
environments: a rule knows by position which operand is a view (the table dispatched on it); a
union would make each rule narrow again the operands it has checked (104 places, measured)."""


@dataclasses.dataclass(frozen=True)
class Unfactored:
    """A use of a kernel that a rule cannot factor, and why (said in errors and warnings)."""

    reason: str


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RoutingFallback:
    """Why a routed call cannot be routed kernel by kernel: a use of a routed kernel that the
    per-example rules cannot serve on the whole batch (an activation without the batch on axis
    0, a kernel used by another operation). It ends evaluation and is returned by each enclosing
    rule, `Interpreter.eval` and `call_routed` in place of outputs; `lora.wrap` then runs the
    model per example (mode ``"auto"``) or says why not (mode ``"factored"``). A static pytree
    (no leaves), so a body traced by `jax.checkpoint` or `jax.lax.scan` can return it."""

    reason: str


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Passed:
    """A traced body's output that is its kernel input ``index`` unchanged (NNX returns the
    module state from a remat or scan body): the rule returns that input as it came in. A
    static pytree, so `jax.checkpoint` and `jax.lax.scan` bodies can return it."""

    index: int


@dataclasses.dataclass(frozen=True)
class Ahead:
    """A rule's outputs and the low-rank branches it computed with them for later sibling
    equations of the same jaxpr (one product of the shared activation with the concatenated
    ``a`` factors), keyed by equation index; the interpreter hands each to its equation's rule
    (`Evaluator.branch_ahead`)."""

    outs: list[InterpValue]
    branches: dict[int, jax.Array]


class Evaluator(Protocol):
    """What a rule may ask of the interpreter that calls it."""

    mode: Mode
    routing: bool  # whether the call routes examples (``lora_ids``): views hold an example axis

    def eval(
        self, jaxpr: jx.Jaxpr, consts: Sequence[InterpValue], args: Sequence[InterpValue], key: Key
    ) -> list[InterpValue] | RoutingFallback:
        """Evaluates a (sub-)jaxpr whose inputs may be views, with that body's dropout key."""
        ...

    def apply(
        self, eqn: jx.Eqn, invals: list[InterpValue], key: Key
    ) -> list[InterpValue] | RoutingFallback:
        """One equation with views among ``invals`` through the rule table (its fallback too)."""
        ...

    def merged(self, v: KernelView, op: str, reason: str) -> jax.Array:
        """The kernel of view ``v`` (not routed) as an array, for a use ``op`` that cannot be
        factored."""
        ...

    def plain(self, x: InterpValue, op: str, reason: str) -> jax.Array | RoutingFallback:
        """``x`` as an array where it leaves factored execution (a use ``op`` without a rule,
        an output): a view merged, a quantized base dequantized; a routed view cannot be."""
        ...

    def later_uses(self, eqn: jx.Eqn, x_pos: int) -> list[tuple[int, jx.Eqn, KernelView]]:
        """The later ``dot_general`` equations of the current jaxpr (index, equation, view)
        whose operand ``x_pos`` is ``eqn``'s, whose other operand is a kernel view, and whose
        branch no earlier sibling computed."""
        ...

    def branch_ahead(self) -> jax.Array | None:
        """The low-rank branch of the current equation that an earlier sibling's rule computed
        (`Ahead`), or ``None``."""
        ...


Result = list[InterpValue] | Ahead | Unfactored | RoutingFallback
"""What a rule returns: the equation's outputs (with branches of later siblings: `Ahead`), why
it cannot factor this use, or (from a nested evaluation) why the routed call must run per
example."""

Rule = Callable[[Evaluator, jx.Eqn, list[InterpValue], Key], Result]
"""``rule(interp, eqn, invals, key)``: one equation with kernels among ``invals``."""


def no_rule(invals: list[InterpValue]) -> Unfactored:
    """The result for a use no rule factors: the reason a view of ``invals`` already gives for
    itself (a layout op that broke its factorisation), or that there is no rule."""
    why = next((x.meta.why for x in invals if isinstance(x, KernelView) and x.meta.why), None)
    return Unfactored(why or "no factored rule for this operation")


def leaving(
    interp: Evaluator, outs: list[InterpValue], passed: list[Passed | None], op: str, reason: str
) -> list[InterpValue] | RoutingFallback:
    """A traced body's outputs as arrays (`Evaluator.plain`), or the `Passed` marker of each
    output that is a kernel input unchanged; the first `RoutingFallback` instead, if any."""
    plain: list[InterpValue] = []
    for o, p in zip(outs, passed, strict=True):
        x = p if p is not None else interp.plain(o, op, reason)
        if isinstance(x, RoutingFallback):
            return x
        plain.append(x)
    return plain


def returned(outs: list[InterpValue] | RoutingFallback, ins: Sequence[InterpValue]) -> Result:
    """A traced body's results with each `Passed` output replaced by its input in ``ins``."""
    if isinstance(outs, RoutingFallback):
        return outs
    return [ins[o.index] if isinstance(o, Passed) else o for o in outs]
