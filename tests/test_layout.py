"""The package's layout holds what docs/architecture.md promises: imports form layers (no
circle, so every import goes down), no module imports a package module inside a function, and
no module grows past the size of one job; and outside the package, the tests, their support
modules, the benchmarks, the examples and the notebooks reach a private ``flax_lora._x`` name
only through tests/support/internal.py, so a move in the library changes one file there.

The import graph is read from the source with `ast`, independently of the code under test.
"""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "flax_lora"
REPO = ROOT.parent
MAX_LINES = 450
INTERNAL = REPO / "tests" / "support" / "internal.py"  # the one way to private names


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


# -- private names outside the package ------------------------------------------------------------
def _is_private(module: str) -> bool:
    """Whether a dotted ``flax_lora...`` module path goes through a private (``_x``) part."""
    return any(part.startswith("_") for part in module.split(".")[1:])


def private_names(source: str) -> list[str]:
    """The private flax_lora names a source imports or reads: ``import flax_lora._x``, ``from
    flax_lora._x import y``, ``from flax_lora import _x``, and ``lora._x`` on a name bound to the
    package (dunders such as ``lora.__version__`` are public)."""
    found, package_names = [], set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] != "flax_lora":
                    continue
                if _is_private(a.name):
                    found.append(a.name)
                package_names.add(a.asname if a.asname and a.name == "flax_lora" else "flax_lora")
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] != "flax_lora":
                continue
            if _is_private(node.module):
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in package_names
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"flax_lora.{node.attr}")
    return found


def _sources() -> dict[str, str]:
    """Every Python source of the tests, benchmarks and examples, and the code cells of the
    notebooks (IPython's ``%`` / ``!`` lines left out), by path."""
    out = {}
    for folder in ("tests", "benchmarks", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path != INTERNAL:
                out[str(path.relative_to(REPO))] = path.read_text()
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        lines = [ln for cell in code for ln in cell.splitlines() if ln.lstrip()[:1] not in "%!"]
        out[str(path.relative_to(REPO))] = "\n".join(lines)
    return out


def test_the_private_name_check_sees_each_form() -> None:
    for source in (
        "import flax_lora._stack",
        "import flax_lora._stack as s",
        "from flax_lora._peft import _safetensors",
        "from flax_lora._stack import gather",
        "from flax_lora import _atomic",
        "import flax_lora as lora\nlora._wrap.run",
        "import flax_lora\nflax_lora._quant",
    ):
        assert private_names(source), source
    public = "import flax_lora as lora\nfrom flax_lora import LoraConfig\nlora.wrap, lora.__file__"
    assert private_names(public) == []


def test_private_names_only_through_support_internal() -> None:
    sources = _sources()
    assert "tests/test_layout.py" in sources and any(p.startswith("benchmarks/") for p in sources)
    bypass = {p: names for p, src in sources.items() if (names := private_names(src))}
    assert bypass == {}, f"import these through tests/support/internal.py: {bypass}"
    assert private_names(INTERNAL.read_text())  # where they do come from
