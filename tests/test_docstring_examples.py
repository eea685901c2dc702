"""Every docstring example of the public API runs and shows what it says.

Each name of ``flax_lora.__all__`` is one case (its id the public name): `doctest.DocTestFinder`
collects the ``>>>`` examples of its docstring and, for a class, of the methods and properties
the class defines; `doctest.DocTestRunner` runs them with ``ELLIPSIS`` and
``NORMALIZE_WHITESPACE``, and a failure shows doctest's report.

Each docstring runs on its own, in a fresh copy of a namespace that holds these imports and
nothing else (the docs' examples assume them, as optax's assume ``import optax``)::

    import tempfile
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import linen as nn
    from flax import nnx
    import flax_lora as lora

so each example builds what it needs (a tiny model, its params, adapters) in its first lines,
and writes files only under ``tempfile.mkdtemp()``.
"""

from __future__ import annotations

import doctest
import inspect
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import flax_lora as lora

NAMESPACE = {
    "tempfile": tempfile,
    "jax": jax,
    "jnp": jnp,
    "np": np,
    "optax": optax,
    "nn": nn,
    "nnx": nnx,
    "lora": lora,
}
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# The examples of the public API, at least (raise it when examples are added).
MIN_EXAMPLES = 182


def docstring_tests(name: str) -> list[doctest.DocTest]:
    """The doctests of public name ``name``: its docstring's and, for a class, its methods'."""
    obj = getattr(lora, name)
    finder = doctest.DocTestFinder(recurse=inspect.isclass(obj), exclude_empty=True)
    tests = finder.find(obj, f"lora.{name}", module=inspect.getmodule(obj), globs=NAMESPACE)
    return [t for t in tests if t.examples]


@pytest.mark.parametrize("name", sorted(lora.__all__))
def test_docstring_examples_run(name: str) -> None:
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report: list[str] = []
    for test in docstring_tests(name):
        runner.run(test, out=report.append)
    if runner.failures:
        pytest.fail(f"{runner.failures} of {runner.tries} examples failed:\n" + "".join(report))


def test_every_public_name_has_examples() -> None:
    counts = {name: sum(len(t.examples) for t in docstring_tests(name)) for name in lora.__all__}
    total = sum(counts.values())
    print(f"{total} docstring examples in {len(counts)} public names")
    assert not [name for name, n in counts.items() if n == 0], counts
    assert total >= MIN_EXAMPLES, counts
