"""The README's example and the NNX getting-started page run as written, and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import optax

README = Path(__file__).resolve().parents[1] / "README.md"
NNX_PAGE = README.parent / "docs" / "getting-started" / "nnx.md"


def _block(section: str, page: Path = README) -> str:
    text = page.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0] if section else text
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_readme_linen_and_nnx_usage_run(tmp_path: Path) -> None:
    ns: dict = {}
    linen = _block("Example").replace("/tmp/", f"{tmp_path}/")
    exec(compile(linen, "README-linen", "exec"), ns)
    # the 100 adapter-only steps fitted the batch: the loss fell well below the base model's
    base_logits = ns["model"].apply(ns["params"], ns["x"])
    base_loss = optax.softmax_cross_entropy_with_integer_labels(base_logits, ns["y"]).mean()
    assert float(ns["loss"]) < 0.5 * float(base_loss)
    # the merged params from the checkpoint give the wrapped model's outputs
    wrapped = ns["apply"](ns["params"], ns["adapters"], ns["x"])
    np.testing.assert_allclose(
        np.asarray(ns["model"].apply(ns["merged"], ns["x"])), np.asarray(wrapped), atol=1e-5
    )

    exec(compile(_block("", NNX_PAGE), "docs-nnx", "exec"), ns)
    x = ns["x"]
    ad = jax.tree.map(lambda v: v + 0.01, ns["adapters"])  # nonzero b: a real update
    want = ns["fn"](ns["state"], ad, x)
    merged_model = ns["nnx"].merge(ns["graphdef"], ns["lora"].merge(ns["state"], ad))
    np.testing.assert_allclose(np.asarray(merged_model(x)), np.asarray(want), atol=1e-5)
    assert float(np.abs(np.asarray(want) - np.asarray(ns["apply"](ns["state"], x))).max()) > 1e-3


def test_every_named_test_file_exists() -> None:
    """Every ``tests/...py`` file the README or a docs page names as the test of a claim exists
    (a moved or absorbed test module renames its mentions; e.g. the feature-cross modules now
    rows of tests/test_matrix.py)."""
    root = README.parent
    pages = [README, *sorted((root / "docs").rglob("*.md"))]
    missing = [
        f"{page.relative_to(root)}: {name}"
        for page in pages
        for name in sorted(set(re.findall(r"\btests/[\w/]+\.py\b", page.read_text())))
        if not (root / name).is_file()
    ]
    assert not missing, missing
