"""Writes docs/api.md, the API reference, from the docstrings of the public names of flax_lora.

Run: ``python docs/make_api.py`` to regenerate; ``python docs/make_api.py --check`` exits 1 when
docs/api.md is out of date (CI runs this, so the reference cannot drift from the code).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import flax_lora as lora

OUT = Path(__file__).with_name("api.md")


def _signature(obj: object, name: str) -> str:
    try:
        sig = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        sig = ""
    kind = "class " if inspect.isclass(obj) else ""
    return f"{kind}lora.{name}{sig}"


def render() -> str:
    parts = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/make_api.py`; do not edit by hand.",
        "`import flax_lora as lora`. The public surface is `flax_lora.__all__`; the README "
        "explains the design.",
        "",
    ]
    names = sorted(lora.__all__, key=str.lower)
    parts += ["## Contents", ""] + [f"- [`lora.{n}`](#lora{n.lower()})" for n in names] + [""]
    for name in names:
        obj = getattr(lora, name)
        doc = inspect.getdoc(obj) or "(no docstring)"
        parts += [f"## lora.{name}", "", "```python", _signature(obj, name), "```", "", doc, ""]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if docs/api.md is out of date")
    text = render()
    if ap.parse_args().check:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit("docs/api.md is out of date: run `python docs/make_api.py`.")
        print("docs/api.md is up to date.")
        return
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
