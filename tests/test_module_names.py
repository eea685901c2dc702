"""The package's tree holds what docs/architecture.md promises about names: no module basename
is used twice, a subpackage's ``__init__.py`` is its table of contents (a docstring that names
each of its modules, and no import), and the architecture page's module table names every
module.

The modules and their imports are read from the sources with `ast`, the page as text,
independently of the code under test.
"""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "flax_lora"
PAGE = ROOT.parent / "docs" / "architecture.md"
SUBPACKAGES = sorted(p.parent for p in ROOT.glob("*/__init__.py"))


def _module_files() -> list[pathlib.Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py")


def test_the_tree_has_subpackages_to_check() -> None:
    names = {p.name for p in SUBPACKAGES}
    assert {"_adapters", "_factored", "_peft", "_quant"} <= names
    assert len(_module_files()) > 40


def test_no_module_basename_twice() -> None:
    where = collections.defaultdict(list)
    for path in _module_files():
        where[path.stem].append(str(path.relative_to(ROOT)))
    twice = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert twice == {}


def test_no_module_is_named_as_a_subpackage() -> None:
    packages = {p.name for p in SUBPACKAGES}
    clash = [str(p.relative_to(ROOT)) for p in _module_files() if p.stem in packages]
    assert clash == []


@pytest.mark.parametrize("package", SUBPACKAGES, ids=lambda p: p.name)
def test_a_subpackage_init_is_its_table_of_contents(package: pathlib.Path) -> None:
    tree = ast.parse((package / "__init__.py").read_text())
    imports = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom) and node.module != "__future__"
    ]
    assert imports == [], f"{package.name}/__init__.py imports"
    doc = ast.get_docstring(tree) or ""
    unnamed = [p.stem for p in sorted(package.glob("*.py")) if p.name != "__init__.py"]
    unnamed = [stem for stem in unnamed if f"`{stem}`" not in doc]
    assert unnamed == [], f"{package.name}/__init__.py's docstring does not name {unnamed}"


def test_the_architecture_page_names_every_module() -> None:
    text = PAGE.read_text()
    files = [*_module_files(), ROOT / "__init__.py"]
    unnamed = [str(p.relative_to(ROOT)) for p in files]
    unnamed = [rel for rel in unnamed if f"`{rel}`" not in text]
    assert unnamed == []
