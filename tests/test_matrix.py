"""The capability matrix: every feature crossed with the model kinds and wrap modes it must serve,
one case per row of the table in `support.cases` (model kind x feature x mode x check).

A check is a function of a ``support.check_<feature>`` module; each compares the library with an
independent reference named in its module's docstring (float64 numpy through
`support.refs`, the un-adapted or merged model run example by example, the real PEFT package,
the file on disk) and can fail. A new feature adds a check module and rows; a new model kind
adds rows, not modules. Rows that need PyTorch skip with the `interop` extra's reason when it
is absent.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
from support import INTEROP
from support.cases import CASES, Case

SUPPORT = Path(__file__).resolve().parent / "support"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_capability(case: Case, tmp_path: Path) -> None:
    if case.needs_torch:
        pytest.importorskip("torch", reason=INTEROP)
        pytest.importorskip("peft", reason=INTEROP)
    module, name = case.check.split(":")
    check = getattr(importlib.import_module(f"support.{module}"), name)
    args = dict(case.args)
    wanted = inspect.signature(check).parameters
    for key, value in (("model", case.model), ("mode", case.mode), ("tmp_path", tmp_path)):
        if key in wanted:
            args[key] = value
    check(**args)


def test_every_check_has_a_row() -> None:
    """Every function marked ``@check`` in a check module (read with `ast`, so the PyTorch ones
    count without torch) has a row in the table, and every row names such a function: no check
    is written and forgotten, no row points at nothing."""
    marked = set()
    for path in sorted(SUPPORT.glob("check_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Name) and d.id == "check" for d in node.decorator_list
            ):
                marked.add(f"{path.stem}:{node.name}")
    rows = {c.check for c in CASES}
    assert marked == rows, (sorted(marked - rows), sorted(rows - marked))
    assert len({c.id for c in CASES}) == len(CASES)  # ids are unique
