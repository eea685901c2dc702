"""The public API is typed: every parameter and return of every name in ``flax_lora.__all__``
(functions, and the public methods, properties and constructors of the public classes) has an
annotation, and none is ``Any`` or holds ``Any`` (``dict[str, Any]``, ``Callable[..., Any]``)
unless `ALLOWED` names it with its reason.

``PyTree`` (`flax_lora._typing.PyTree`, an alias of ``Any``) and JAX's own aliases
(``jax.typing.DTypeLike``, ``ArrayLike``) are types: JAX has no type for a pytree, and its
aliases are what JAX offers. They are told apart from a written ``Any`` by resolving each
signature's annotations with those names bound to markers.

The type checker's run over the package (``mypy``, configured in pyproject.toml) is CI's job,
not this module's: this module is quick and needs no checker.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any

from jax.typing import DTypeLike

import flax_lora as lora


class _PyTree:
    """Stands for ``PyTree`` when annotations are resolved."""


class _JaxAlias:
    """Stands for a ``jax.typing`` alias when annotations are resolved."""


_MARKERS = {"PyTree": _PyTree, "DTypeLike": _JaxAlias, "ArrayLike": _JaxAlias}

# (qualified name, parameter or "return") -> why Any stays: where no type exists (the user's
# model's inputs and outputs pass through). The test fails on an entry that no longer matches.
ALLOWED: dict[tuple[str, str], str] = {}

CALLED_DUNDERS = ("__init__", "__call__")
"""The dunder methods of a public class that users call by name or by calling an instance."""


def public_callables(names: list[str]) -> Iterator[tuple[str, Callable[..., object]]]:
    """``(qualified name, function)`` for each public function of ``flax_lora`` among ``names``,
    and each public method, property getter, constructor and ``__call__`` of its public classes
    (those the class defines or inherits from a flax_lora class)."""
    for name in names:
        obj = getattr(lora, name)
        if not inspect.isclass(obj):
            assert callable(obj), f"flax_lora.{name} is neither a class nor callable"
            yield name, obj
            continue
        seen: set[str] = set()
        for klass in obj.__mro__:
            if not klass.__module__.startswith("flax_lora"):
                continue
            for attr, value in vars(klass).items():
                if attr in seen or (attr.startswith("_") and attr not in CALLED_DUNDERS):
                    continue
                seen.add(attr)
                if isinstance(value, staticmethod | classmethod):
                    value = value.__func__
                if isinstance(value, property) and value.fget is not None:
                    yield f"{name}.{attr}", value.fget
                elif inspect.isfunction(value):
                    yield f"{name}.{attr}", value


def _holds_any(t: object) -> bool:
    """Whether the resolved annotation ``t`` is ``Any`` or has ``Any`` among its arguments."""
    if t is typing.Any:
        return True
    args = typing.get_args(t)
    return any(_holds_any(a) for arg in args for a in (arg if isinstance(arg, list) else [arg]))


def untyped(qualname: str, fn: Callable[..., object]) -> list[tuple[str, str, str]]:
    """``(qualname, parameter or "return", what is wrong)`` for each unannotated parameter or
    return of ``fn`` and each annotated ``Any`` or holding ``Any`` (besides ``PyTree`` and
    JAX's aliases)."""
    namespace = {**getattr(fn, "__globals__", {}), **_MARKERS}
    hints = typing.get_type_hints(fn, globalns=namespace)
    sig = inspect.signature(fn)
    names = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")]
    found = []
    for n in [*names, "return"]:
        shown = sig.return_annotation if n == "return" else sig.parameters[n].annotation
        if n not in hints:
            found.append((qualname, n, "unannotated"))
        elif _holds_any(hints[n]):
            found.append((qualname, n, f"annotated {shown}"))
    return found


def test_the_check_finds_any_and_missing_annotations() -> None:
    def f(x: Any, y, z: dict[str, Any], t: DTypeLike) -> Callable[..., Any]:
        raise AssertionError

    got = {(n, what.split()[0]) for _, n, what in untyped("f", f)}
    assert got == {
        ("x", "annotated"),
        ("y", "unannotated"),
        ("z", "annotated"),
        ("return", "annotated"),
    }
    # PyTree (an alias of Any) is a type: merge(params: PyTree, adapters: PyTree) -> PyTree
    assert untyped("merge", lora.merge) == []


def test_public_signatures_are_typed() -> None:
    found = [f for q, fn in public_callables(lora.__all__) for f in untyped(q, fn)]
    unexpected = [f for f in found if f[:2] not in ALLOWED]
    assert not unexpected, "public signatures with Any or no annotation:\n" + "\n".join(
        f"  {q}: {n} {what}" for q, n, what in unexpected
    )
    stale = sorted(set(ALLOWED) - {f[:2] for f in found})
    assert not stale, f"ALLOWED entries whose signature is typed now (remove them): {stale}"


def test_every_public_name_is_walked() -> None:
    walked = {q.split(".")[0] for q, _ in public_callables(lora.__all__)}
    assert walked == set(lora.__all__)


def test_allowed_entries_give_a_reason() -> None:
    short = [key for key, why in ALLOWED.items() if len(why) <= 10]
    assert not short, f"ALLOWED entries need a reason: {short}"
