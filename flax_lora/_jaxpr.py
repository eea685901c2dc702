"""Everything flax_lora reads from JAX's jaxpr equations, for every supported JAX version.

The probe (`flax_lora._probe`) and the factored interpreter walk jaxprs. The parameters of
JAX's primitives are JAX internals and change between releases: jax 0.12's ``scan`` replaced
``num_consts`` / ``num_carry`` / ``linear`` by the flat-tree descriptors ``ft_in`` / ``ft_out``,
and its sub-jaxprs became `Jaxpr`\\s with their constants attached (``ClosedJaxpr`` is an alias
of ``Jaxpr`` there). This module is the one place that reads equation parameters and re-binds
equations. The rest of the package asks it typed questions ("the body, consts, carry and xs of
this scan"), and a release that changes a primitive fails here, with an `UnsupportedJaxError`
that names the primitive, what was expected and the parameters found, instead of deep inside
the probe.

The constructs, and the JAX versions whose parameters are known (jax 0.7.1 to 0.12.x):

=================================  ==================================================
primitive                          read as
=================================  ==================================================
``jit``, ``pjit``, ``closed_call``  `Call`: the body
``remat2`` (``jax.checkpoint``)     `Remat`: the body, ``prevent_cse``, ``policy``
``custom_jvp_call``,                `CustomCall`: the primal body, ``num_consts``
``custom_vjp_call``
``scan``                            `Scan`: body, numbers of consts / carry / xs, length, ...
``cond``                            `Cond`: the branches
``while``                           `While`: cond and body, their numbers of consts
``dot_general``                     `Dot`: contracting and batch dimensions, precision, ...
``ragged_dot_general``              `RaggedDot`: `Dot`'s fields, ragged and group dimensions
=================================  ==================================================

First-order primitives (``transpose``, ``gather``, ``conv_general_dilated``, ...) are read with
`param`, which raises the same error when a parameter is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import jax
from jax.extend import core as jex_core
from jax.typing import DTypeLike

if TYPE_CHECKING:  # typing.TypeIs from Python 3.13; the checker's own stubs before
    from typing_extensions import TypeIs

Eqn = jex_core.JaxprEqn
Var = jex_core.Var
Literal = jex_core.Literal
Atom = Var | Literal
"""An equation operand: a variable or a literal."""
Jaxpr = jex_core.Jaxpr
ClosedJaxpr = jex_core.ClosedJaxpr
Primitive = jex_core.Primitive


class UnsupportedJaxError(NotImplementedError):
    """A JAX equation whose parameters this version of flax_lora does not know."""


def unsupported(eqn: Eqn, expected: str) -> UnsupportedJaxError:
    """The error for an equation whose parameters are not the ones flax_lora knows."""
    return _unknown(eqn.primitive.name, eqn.params, expected)


def _unknown(name: str, params: Mapping[str, object], expected: str) -> UnsupportedJaxError:
    found = ", ".join(sorted(params)) or "none"
    return UnsupportedJaxError(
        f"flax_lora does not know the `{name}` equation of jax {jax.__version__}: "
        f"expected {expected}; found the parameters ({found}). flax_lora supports jax 0.7.1 to "
        "0.12.x; please report this with your JAX version."
    )


def param(eqn: Eqn, key: str) -> Any:
    """The parameter ``key`` of ``eqn``.

    Raises:
      UnsupportedJaxError: the equation has no such parameter.
    """
    return bound_param(eqn.primitive, eqn.params, key)


def bound_param(prim: Primitive, params: dict[str, Any], key: str) -> Any:
    """The parameter ``key`` of bind parameters ``params`` (from `bind_params`) of ``prim``.

    Raises:
      UnsupportedJaxError: there is no such parameter.
    """
    try:
        return params[key]
    except KeyError:
        raise _unknown(prim.name, params, f"a parameter `{key}`") from None


class Body(NamedTuple):
    """A sub-jaxpr and the constants it closes over (evaluate as ``eval(jaxpr, consts, args)``)."""

    jaxpr: Jaxpr
    consts: list[Any]  # JAX's own type for a jaxpr's constants (arrays, scalars, tokens)


def _body(eqn: Eqn, value: object) -> Body:
    """A `Body` from a ``ClosedJaxpr`` (jax < 0.12) or a `Jaxpr` (consts attached, 0.12)."""
    if isinstance(value, jex_core.ClosedJaxpr):  # on jax 0.12 every Jaxpr is one
        return Body(value.jaxpr, list(value.consts))
    if isinstance(value, jex_core.Jaxpr):
        if value.constvars:
            raise unsupported(eqn, "a sub-jaxpr whose constants are given")
        return Body(value, [])
    raise unsupported(eqn, f"a jaxpr, not a {type(value).__name__}")


class Call(NamedTuple):
    """``jit`` / ``pjit`` / ``closed_call``: a call of ``body`` on the equation's operands."""

    body: Body


class Remat(NamedTuple):
    """``jax.checkpoint`` (``remat2``): ``body`` with its rematerialization policy."""

    body: Body
    prevent_cse: bool
    policy: Callable[..., bool] | None


class CustomCall(NamedTuple):
    """``custom_jvp_call`` / ``custom_vjp_call``: the primal ``body`` (its first ``num_consts``
    operands are constants)."""

    body: Body
    num_consts: int


class Scan(NamedTuple):
    """``scan``: operands are ``num_consts`` consts, ``num_carry`` carries, ``num_xs`` xs;
    outputs are the carries then the ys. ``body`` maps ``(consts, carry, x)`` slices to
    ``(carry, y)`` slices."""

    body: Body
    num_consts: int
    num_carry: int
    num_xs: int
    length: int
    reverse: bool
    unroll: int | bool


class Cond(NamedTuple):
    """``cond``: operand 0 is the branch index, the rest are every branch's operands."""

    branches: tuple[Body, ...]


class While(NamedTuple):
    """``while``: operands are ``cond_nconsts`` consts of ``cond``, ``body_nconsts`` consts of
    ``body``, then the carries."""

    cond: Body
    body: Body
    cond_nconsts: int
    body_nconsts: int


class Dot(NamedTuple):
    """``dot_general``'s dimension numbers and its precision settings."""

    lhs_contract: tuple[int, ...]
    rhs_contract: tuple[int, ...]
    lhs_batch: tuple[int, ...]
    rhs_batch: tuple[int, ...]
    precision: jax.lax.PrecisionLike
    preferred_element_type: DTypeLike | None


class RaggedDot(NamedTuple):
    """``ragged_dot_general`` (``jax.lax.ragged_dot``; operands ``lhs, rhs, group_sizes``):
    the `Dot` of its dimension numbers, the lhs ragged dimensions and the rhs group (expert)
    dimensions (``()`` in the backward mode that contracts the ragged axis)."""

    dot: Dot
    lhs_ragged: tuple[int, ...]
    rhs_group: tuple[int, ...]


CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
REMATS = frozenset({"remat2", "checkpoint", "remat"})
CUSTOMS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})

# -- the primitives a kernel goes through on its way to a use ---------------------------------
ELEMENTWISE = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
"""Ops on values only, with no shape among their parameters: they commute with slicing a
leading axis off (a scan's layer axis)."""

VALUE_OPS = ELEMENTWISE | {"sharding_constraint", "device_put", "mesh_cast", "reshard"}
"""Ops that change neither the layout nor the meaning of a kernel (dtype casts, copies,
sharding placements)."""

LAYOUT_OPS = VALUE_OPS | {"transpose", "reshape", "squeeze", "broadcast_in_dim"}
"""The ops a model applies to a kernel before using it that factored execution follows."""

KEEPS_AXES = VALUE_OPS | {"optimization_barrier", "stop_gradient"}
"""Ops whose output has the axes of their (first) operand. The probe follows a kernel's axes
through all of them; factored execution stops at the last two (an adapter's gradient must not
pass a ``stop_gradient``)."""


def call(eqn: Eqn) -> Call:
    """The body of a ``jit`` / ``pjit`` / ``closed_call`` equation."""
    key = "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"
    body = _body(eqn, param(eqn, key))
    _check_arity(eqn, body, len(eqn.invars), "a body taking every operand")
    return Call(body)


def remat(eqn: Eqn) -> Remat:
    """The body and policy of a ``jax.checkpoint`` equation."""
    body = _body(eqn, param(eqn, "jaxpr"))
    _check_arity(eqn, body, len(eqn.invars), "a body taking every operand")
    return Remat(body, bool(eqn.params.get("prevent_cse", True)), eqn.params.get("policy"))


def custom_call(eqn: Eqn) -> CustomCall:
    """The primal body of a ``custom_jvp_call`` / ``custom_vjp_call`` equation."""
    key = "call_jaxpr" if "call_jaxpr" in eqn.params else "fun_jaxpr"
    body = _body(eqn, param(eqn, key))
    _check_arity(eqn, body, len(eqn.invars), "a primal body taking every operand")
    return CustomCall(body, int(eqn.params.get("num_consts", 0)))


def scan(eqn: Eqn) -> Scan:
    """The body and operand layout of a ``scan`` equation.

    jax < 0.12 gives ``num_consts`` and ``num_carry``; jax 0.12 gives ``ft_in``, a flat-tree
    tuple (consts, carry, xs) of the operands.
    """
    p = eqn.params
    n = len(eqn.invars)
    if "num_consts" in p and "num_carry" in p:
        n_consts, n_carry = int(p["num_consts"]), int(p["num_carry"])
    elif "ft_in" in p:
        try:
            parts = p["ft_in"].update(list(range(n))).unpack()
            n_consts, n_carry, n_xs = (len(list(part)) for part in parts)
        except Exception as e:  # any change of JAX's flat trees lands here
            raise unsupported(eqn, f"`ft_in` splitting the operands in three ({e})") from None
        if n_consts + n_carry + n_xs != n:
            raise unsupported(eqn, f"`ft_in` covering the {n} operands")
    else:
        raise unsupported(eqn, "`num_consts` and `num_carry` (jax < 0.12) or `ft_in` (0.12)")
    body = _body(eqn, param(eqn, "jaxpr"))
    _check_arity(eqn, body, n, "a body taking consts, carry and xs")
    return Scan(
        body=body,
        num_consts=n_consts,
        num_carry=n_carry,
        num_xs=n - n_consts - n_carry,
        length=int(param(eqn, "length")),
        reverse=bool(param(eqn, "reverse")),
        unroll=param(eqn, "unroll"),
    )


def cond(eqn: Eqn) -> Cond:
    """The branches of a ``cond`` equation."""
    branches = tuple(_body(eqn, b) for b in param(eqn, "branches"))
    for b in branches:
        _check_arity(eqn, b, len(eqn.invars) - 1, "branches taking every operand but the index")
    return Cond(branches)


def while_loop(eqn: Eqn) -> While:
    """The cond and body of a ``while`` equation."""
    out = While(
        cond=_body(eqn, param(eqn, "cond_jaxpr")),
        body=_body(eqn, param(eqn, "body_jaxpr")),
        cond_nconsts=int(param(eqn, "cond_nconsts")),
        body_nconsts=int(param(eqn, "body_nconsts")),
    )
    n_carry = len(eqn.invars) - out.cond_nconsts - out.body_nconsts
    _check_arity(eqn, out.body, out.body_nconsts + n_carry, "a body taking its consts and carry")
    return out


def dot(eqn: Eqn) -> Dot:
    """The dimension numbers and precision settings of a ``dot_general`` equation."""
    return _dot_of(eqn, param(eqn, "dimension_numbers"))


def _dot_of(eqn: Eqn, numbers: Any) -> Dot:
    """A `Dot` from ``((lc, rc), (lb, rb))`` and ``eqn``'s precision settings."""
    try:
        (lc, rc), (lb, rb) = numbers
    except (TypeError, ValueError):
        raise unsupported(eqn, "dimension_numbers ((lc, rc), (lb, rb))") from None
    return Dot(
        tuple(lc),
        tuple(rc),
        tuple(lb),
        tuple(rb),
        eqn.params.get("precision"),
        eqn.params.get("preferred_element_type"),
    )


def ragged_dot(eqn: Eqn) -> RaggedDot:
    """The dimension numbers of a ``ragged_dot_general`` equation (jax 0.7.1 to 0.12 alike)."""
    rd = param(eqn, "ragged_dot_dimension_numbers")
    try:
        numbers = rd.dot_dimension_numbers
        ragged, group = tuple(rd.lhs_ragged_dimensions), tuple(rd.rhs_group_dimensions)
    except (AttributeError, TypeError):
        raise unsupported(eqn, "RaggedDotDimensionNumbers(dot_dimension_numbers, ...)") from None
    dims = _dot_of(eqn, numbers)
    return RaggedDot(dims, ragged, group)


def ragged_numbers(
    dims: Dot, lhs_ragged: Sequence[int], rhs_group: Sequence[int]
) -> jax.lax.RaggedDotDimensionNumbers:
    """``jax.lax.RaggedDotDimensionNumbers`` from a `Dot`'s dimensions and the ragged and group
    dimensions (to bind ``ragged_dot_general`` with new operands)."""
    return jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(
            (tuple(dims.lhs_contract), tuple(dims.rhs_contract)),
            (tuple(dims.lhs_batch), tuple(dims.rhs_batch)),
        ),
        lhs_ragged_dimensions=tuple(lhs_ragged),
        rhs_group_dimensions=tuple(rhs_group),
    )


Construct = Call | Remat | CustomCall | Scan | Cond | While | Dot | RaggedDot
"""An equation read as one of the typed constructs above."""

_READERS: dict[str, Callable[[Eqn], Construct]] = {
    **dict.fromkeys(CALLS, call),
    **dict.fromkeys(REMATS, remat),
    **dict.fromkeys(CUSTOMS, custom_call),
    "scan": scan,
    "cond": cond,
    "while": while_loop,
    "dot_general": dot,
    "ragged_dot_general": ragged_dot,
}


def construct(eqn: Eqn) -> Construct | None:
    """``eqn`` read as its typed construct when it is one of those above, else ``None``.

    Raises:
      UnsupportedJaxError: ``eqn`` is one of them but its parameters are not known.
    """
    read = _READERS.get(eqn.primitive.name)
    return None if read is None else read(eqn)


_BODIES: dict[str, Callable[[Eqn], Call | Remat | CustomCall]] = {
    **dict.fromkeys(CALLS, call),
    **dict.fromkeys(REMATS, remat),
    **dict.fromkeys(CUSTOMS, custom_call),
}
"""The reader of each call-like primitive whose body takes the equation's operands."""


def sub_body(eqn: Eqn) -> Body | None:
    """The one sub-jaxpr taking exactly the operands of a call-like equation (jit, remat,
    custom derivatives; and any other primitive with a ``jaxpr`` / ``call_jaxpr`` parameter
    taking its operands, such as ``shard_map``), or ``None``."""
    read = _BODIES.get(eqn.primitive.name)
    if read is not None:
        return read(eqn).body
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        value = eqn.params.get(key)
        if isinstance(value, jex_core.ClosedJaxpr | jex_core.Jaxpr):
            body = _body(eqn, value)
            if len(body.jaxpr.invars) == len(eqn.invars):
                return body
    return None


def _check_arity(eqn: Eqn, body: Body, n: int, expected: str) -> None:
    if len(body.jaxpr.invars) != n:
        raise unsupported(eqn, f"{expected} ({n} inputs, not {len(body.jaxpr.invars)})")


# -- binding ----------------------------------------------------------------------------------
def bind_params(eqn: Eqn) -> dict[str, Any]:
    """The parameters to bind ``eqn``'s primitive with (no sub-functions)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        if subfuns:
            raise unsupported(eqn, "a primitive without sub-functions")
    return params


def bind(eqn: Eqn, invals: Sequence[object]) -> list[Any]:
    """Binds ``eqn``'s primitive unchanged to new inputs (JAX's `eval_jaxpr` step)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: Sequence[Any] = ()
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def rebind(eqn: Eqn, invals: Sequence[object], **changes: object) -> Any:
    """``eqn``'s primitive bound to ``invals`` with some parameters changed (one output).

    Used for first-order primitives only (a gather of the factor ``a`` with its own slice
    sizes, a convolution with the factor's dimension numbers).
    """
    params = bind_params(eqn)
    unknown = set(changes) - set(params)
    if unknown:
        raise unsupported(eqn, f"the parameters {sorted(unknown)}")
    return eqn.primitive.bind(*invals, **{**params, **changes})


def eqn_context(eqn: Eqn) -> contextlib.ExitStack:
    """The equation's own context (compute type, metadata) and its name scope, if available."""
    stack = contextlib.ExitStack()
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    if manager is not None:
        stack.enter_context(manager)
    name = str(getattr(getattr(eqn, "source_info", None), "name_stack", "") or "")
    if name:
        stack.enter_context(jax.named_scope(name))
    return stack


def is_literal(v: object) -> TypeIs[Literal]:
    """Whether a jaxpr atom is a literal (not a variable)."""
    return isinstance(v, jex_core.Literal)


def shape(v: Atom) -> tuple[int, ...]:
    """The shape of a jaxpr atom (its abstract value is an array's)."""
    return tuple(cast(jax.core.ShapedArray, v.aval).shape)
