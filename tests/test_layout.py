"""The package's layout holds what docs/architecture.md promises: imports form layers (no
circle, so every import goes down), no module imports a package module inside a function, and
no module grows past the size of one job.

The import graph is read from the source with `ast`, independently of the code under test.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "flax_lora"
MAX_LINES = 450


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict[str, pathlib.Path]) -> list[tuple[str, int]]:
    """The package modules ``name`` imports, with the column of each import statement."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            mod = (base + "." + node.module if node.module else base) if node.level else node.module
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
            targets = subs or [mod]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out += [(t, node.col_offset) for t in targets if t in mods and t != name]
    return out


def test_the_package_has_modules_to_check() -> None:
    mods = _modules()
    assert {"flax_lora", "flax_lora._wrap", "flax_lora._factored._interpreter"} <= set(mods)


def test_no_import_inside_a_function() -> None:
    mods = _modules()
    local = [f"{n} -> {t}" for n, p in mods.items() for t, col in _imports(n, p, mods) if col]
    assert local == []


def test_imports_form_layers_without_circles() -> None:
    mods = _modules()
    graph = {n: {t for t, _ in _imports(n, p, mods)} for n, p in mods.items()}
    floor: dict[str, int] = {}

    def depth(name: str, chain: tuple[str, ...]) -> int:
        if name in chain:
            pytest.fail("import circle: " + " -> ".join((*chain[chain.index(name) :], name)))
        if name not in floor:
            floor[name] = 1 + max((depth(t, (*chain, name)) for t in graph[name]), default=-1)
        return floor[name]

    for name in graph:
        depth(name, ())
    assert floor["flax_lora"] == max(floor.values())  # the public surface sits on top


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_over_one_job(name: str) -> None:
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"
