"""Every ```python block of the README and the docs pages runs, in order, page by page.

A page's blocks share one namespace, prepared by ``tests/support/doc_pages.py`` (the common
imports, and the objects the page's text takes as given). Files the blocks write under
``/tmp/`` go to a temporary folder instead; the working directory is a temporary folder too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import doc_pages

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


WITH_CODE = [
    p for p in PAGES if any((_name(p), i) not in doc_pages.NOT_RUN for i in range(len(_blocks(p))))
]


@pytest.mark.parametrize("page", WITH_CODE, ids=_name)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = _name(page)
    if name in doc_pages.NEEDS:
        pytest.importorskip(doc_pages.NEEDS[name], reason=f"{name}'s examples need it")
    ns: dict = {"__name__": "doc_example"}
    exec(compile(doc_pages.COMMON + doc_pages.SETUPS.get(name, ""), f"{name}:setup", "exec"), ns)
    ran = 0
    for i, block in enumerate(_blocks(page)):
        if (name, i) in doc_pages.NOT_RUN:
            continue
        code = block.replace("/tmp/", f"{tmp_path}/")
        exec(compile(code, f"{name}[block {i}]", "exec"), ns)
        ran += 1
    assert ran > 0


def test_count_of_doc_examples() -> None:
    """The number of blocks run and not run (the closing notes report it); a block is skipped
    only by an entry of ``NOT_RUN`` naming the test that runs the same code."""
    total = sum(len(_blocks(p)) for p in PAGES)
    not_run = dict(doc_pages.NOT_RUN)
    for (page, i), reason in not_run.items():
        assert i < len(_blocks(ROOT / page)), (page, i)
        assert re.search(r"tests/test_\w+\.py", reason), reason
        assert (ROOT / re.search(r"tests/test_\w+\.py", reason).group(0)).is_file(), reason
    print(
        f"doc examples: {total - len(not_run)} run, {len(not_run)} not run, "
        f"in {len(WITH_CODE)} pages"
    )
    assert total - len(not_run) >= 30
