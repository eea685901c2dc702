"""What a rule of the interpreter is: its signature, what it may ask of the interpreter, and its
typed "cannot factor" result.

A rule computes one equation that has a kernel view (or a quantized base) among its inputs, as
JAX's own interpreters have one rule per primitive in a table: ``rule(interp, eqn, invals, key)``
returns the equation's outputs, or `Unfactored` saying why this use cannot be factored. The
interpreter (`flax_lora._factored._interpreter`) then merges the kernels involved (mode
``"auto"``), raises (mode ``"factored"``) or, for a kernel routed per example, records that the
call must run example by example instead.

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


@dataclasses.dataclass(frozen=True)
class Unfactored:
    """A use of a kernel that a rule cannot factor, and why (said in errors and warnings)."""

    reason: str


class Evaluator(Protocol):
    """What a rule may ask of the interpreter that calls it."""

    mode: Mode
    routing: bool  # whether the call routes examples (``lora_ids``): views hold an example axis
    stash: dict[int, jax.Array]  # low-rank branches computed ahead, by id of their equation

    def eval(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], key: Key) -> list[Any]:
        """Evaluates a (sub-)jaxpr whose inputs may be views, with that body's dropout key."""
        ...

    def apply(self, eqn: jx.Eqn, invals: list[Any], key: Key) -> list[Any]:
        """One equation with views among ``invals`` through the rule table (its fallback too)."""
        ...

    def merged(self, v: KernelView, op: str, reason: str) -> jax.Array:
        """The kernel of view ``v`` as an array, for a use ``op`` that cannot be factored."""
        ...

    def later_uses(self, eqn: jx.Eqn, x_pos: int) -> list[tuple[jx.Eqn, KernelView]]:
        """The later ``dot_general`` equations of the current jaxpr whose operand ``x_pos`` is
        ``eqn``'s and whose other operand is a kernel view."""
        ...


Result = list[Any] | Unfactored
"""What a rule returns: the equation's outputs, or why it cannot factor this use."""

Rule = Callable[[Evaluator, jx.Eqn, list[Any], Key], Result]
"""``rule(interp, eqn, invals, key)``: one equation with kernels among ``invals``."""


def no_rule(invals: list[Any]) -> Unfactored:
    """The result for a use no rule factors: the reason a view of ``invals`` already gives for
    itself (a layout op that broke its factorisation), or that there is no rule."""
    why = next((x.meta.why for x in invals if isinstance(x, KernelView) and x.meta.why), None)
    return Unfactored(why or "no factored rule for this operation")
