"""Reading traced programs in the tests, without flax_lora's own jaxpr code: every equation of a
jaxpr and of the jaxprs nested in its equations' parameters, and the shapes they compute."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def _subjaxprs(eqn: Any) -> Iterator[Any]:
    """The jaxprs among ``eqn``'s parameters (a closed jaxpr gives its open one), including
    those inside a tuple or list parameter (``cond``'s branches)."""
    for value in eqn.params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                yield inner


def walk(jaxpr: Any, within: tuple[str, ...] = ()) -> Iterator[tuple[Any, tuple[str, ...]]]:
    """Every equation of ``jaxpr`` and of its sub-jaxprs, depth first, each with the names of
    the primitives of the equations it is nested in (outermost first)."""
    for eqn in jaxpr.eqns:
        yield eqn, within
        for sub in _subjaxprs(eqn):
            yield from walk(sub, (*within, eqn.primitive.name))


def all_eqns(jaxpr: Any) -> list[Any]:
    """Every equation of ``jaxpr`` and of its sub-jaxprs, recursively."""
    return [eqn for eqn, _ in walk(jaxpr)]


def jaxpr_shapes(jaxpr: Any) -> list[tuple[int, ...]]:
    """The shapes of all equation outputs of ``jaxpr``, nested jaxprs included."""
    return [
        tuple(v.aval.shape)
        for eqn in all_eqns(jaxpr)
        for v in eqn.outvars
        if hasattr(v.aval, "shape")
    ]
