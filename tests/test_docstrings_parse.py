"""The public docstrings parse cleanly as Google-style docstrings, as the docs site reads them.

The API reference is built by mkdocstrings from griffe's parse of the docstrings of the names
re-exported in flax_lora/__init__.py. Here griffe loads the package statically, as mkdocstrings
does, and parses the docstring of every public name and of every documented public member of a
public class (methods, properties, ``__call__``): griffe logs no warning (an ``Args:`` entry
that names no parameter, an entry without ``name: description``, a section heading it skips),
and each docstring has its sections: a summary line; for a function, ``Args:`` naming its
parameters exactly, in order (``*args:`` / ``**kwargs:`` for variadic ones), and ``Returns:``
unless it returns ``None``; ``Raises:`` entries that name exception classes; for a public name,
an ``Examples:`` section (its examples run in tests/test_docstring_examples.py).

Skipped with its reason where griffe (the package ``griffelib``) is not installed.
"""

from __future__ import annotations

import builtins
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flax_lora as lora

griffe = pytest.importorskip("griffe", reason="griffe (the package griffelib) is not installed")

ROOT = Path(__file__).resolve().parents[1]


class _Records(logging.Handler):
    """griffe's docstring warnings (``<file>:<line>: <message>``; not its notes on base classes
    it does not load, e.g. ``flax.nnx.Module``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if re.match(r"[^\s:]+:\d+: ", message):
            self.messages.append(message)


@pytest.fixture(scope="module")
def package() -> Any:
    return griffe.load(
        "flax_lora", search_paths=[str(ROOT)], docstring_parser="google", resolve_aliases=True
    )


def documented(package: Any) -> Iterator[tuple[str, Any]]:
    """``(name, griffe object)`` for each public name and each public member of a public class
    that has a docstring (what mkdocstrings shows by default)."""
    for name in lora.__all__:
        obj = package[name]
        yield name, obj
        if obj.is_class:
            for member in obj.members.values():
                private = member.name.startswith("_") and not member.name.startswith("__")
                if member.docstring and not private:
                    yield f"{name}.{member.name}", member


def problems(name: str, obj: Any) -> list[str]:
    """What is wrong with the parsed docstring of ``obj`` (griffe's warnings included)."""
    if obj.docstring is None:
        return [f"{name}: no docstring"]
    records = _Records()
    log = logging.getLogger("griffe")
    level = log.level
    log.addHandler(records)
    log.setLevel(logging.DEBUG)  # a skipped section heading is logged at debug level
    try:
        sections = obj.docstring.parse("google")
    finally:
        log.removeHandler(records)
        log.setLevel(level)
    found = [f"{name}: griffe: {m}" for m in records.messages]
    kinds = {s.kind.value: s for s in sections}
    if not sections or sections[0].kind.value != "text":
        found.append(f"{name}: no summary line")
    if "." not in name and "examples" not in kinds:
        found.append(f"{name}: no Examples: section")
    if obj.is_function:
        params = [
            {"variadic positional": "*", "variadic keyword": "**"}.get(p.kind.value, "") + p.name
            for p in obj.parameters
            if p.name not in ("self", "cls")
        ]
        args = [p.name for p in kinds["parameters"].value] if "parameters" in kinds else []
        if args != params:
            found.append(f"{name}: Args: {args}, parameters {params}")
        if str(obj.returns) != "None" and "returns" not in kinds:
            found.append(f"{name}: no Returns: section (returns {obj.returns})")
    for raised in kinds["raises"].value if "raises" in kinds else ():
        exc = getattr(builtins, str(raised.annotation), None)
        if not (isinstance(exc, type) and issubclass(exc, BaseException)):
            found.append(f"{name}: Raises: {raised.annotation!r} is not an exception class")
    return found


def test_public_docstrings_parse_cleanly(package: Any) -> None:
    found = [p for name, obj in documented(package) for p in problems(name, obj)]
    assert not found, "\n".join(found)


def test_the_check_sees_a_bad_docstring(package: Any) -> None:
    """The checks above fail on a docstring with each kind of fault they look for."""
    fn = package["merge"]
    good = fn.docstring
    try:
        fn.docstring = griffe.Docstring(
            "\nArgs:\n  params: the base.\n  nope: no such parameter.\n\n"
            "Raises:\n  ValueError (at apply): a bad entry.\n\n"
            "Text right above a heading.\nReturns:\n  the merged params.\n",
            lineno=1,
            parent=fn,
        )
        found = problems("merge", fn)
    finally:
        fn.docstring = good
    assert any("no summary line" in p for p in found), found
    assert any("no Examples" in p for p in found), found
    assert any("'nope' does not appear in the function signature" in p for p in found), found
    assert any("no Returns" in p for p in found), found
    assert any("Possible section skipped" in p for p in found), found
    assert any("is not an exception class" in p for p in found), found
