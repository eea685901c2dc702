"""The fixtures of the test suite (helpers, references and models live in tests/support), and
two settings of the run.

Hypothesis runs derandomized (the same examples on every run, so CI is reproducible); set
``HYPOTHESIS_PROFILE=explore`` to draw new examples, e.g. when hunting bugs locally.

JAX's persistent compilation cache is on for the suite, every program cached whatever its
compile time: most of the suite's time is XLA compiling programs that another test (another
jit object, another pytest-xdist worker, a subprocess) compiled already. Its folder is
``JAX_COMPILATION_CACHE_DIR`` when set, else ``jax-compilation-cache`` in pytest's cache
folder (``.pytest_cache/d/``, made on a clean clone; a temporary folder without the cache
plugin). Subprocesses inherit it through the environment. ``JAX_ENABLE_COMPILATION_CACHE=false``
turns it off. The run ends with a line counting the cache's hits and misses.

XLA:CPU compiles at LLVM optimization level 0 (``--xla_backend_optimization_level=0`` added to
``XLA_FLAGS`` unless ``XLA_FLAGS`` sets a level): a third less CPU time for the suite, whose
programs are small and compiled far more often than run. XLA:CPU keeps fast-math off at every
level, so the level changes speed, not the arithmetic the tests check; to run the suite at
another level, set it in ``XLA_FLAGS``.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # before any backend
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
    ).strip()

import jax
import jax.numpy as jnp
import pytest
from hypothesis import settings
from support.models import LAYER_CASES

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# -- JAX's persistent compilation cache ---------------------------------------------------------
_EVENTS = {
    "/jax/compilation_cache/compile_requests_use_cache": "requests",
    "/jax/compilation_cache/cache_hits": "hits",
    "/jax/compilation_cache/cache_misses": "misses",
}
_counts: Counter[str] = Counter()


def _count_event(event: str, **_: Any) -> None:
    if event in _EVENTS:
        _counts[_EVENTS[event]] += 1


def _cache_dir(config: pytest.Config) -> str:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    cache = getattr(config, "cache", None)  # absent under `-p no:cacheprovider`
    if cache is not None:
        return str(cache.mkdir("jax-compilation-cache"))
    return str(Path(tempfile.gettempdir()) / "flax_lora-jax-compilation-cache")


def pytest_configure(config: pytest.Config) -> None:
    """Points JAX at the cache folder before any test compiles (conftest itself compiles
    nothing) and exports it to the subprocesses the tests start."""
    path = _cache_dir(config)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.monitoring.register_event_listener(_count_event)
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keeps on one pytest-xdist worker (``--dist loadgroup``) the tests of a module that
    defines a fixture built once per module or session (a subprocess on 8 devices, a server, a
    loaded model), so that it is built once; the other tests spread one by one."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        module = item.nodeid.split("::")[0]
        defs = [d for ds in (info.name2fixturedefs.values() if info else ()) for d in ds]
        if any(d.scope != "function" and d.baseid == module for d in defs):
            item.add_marker(pytest.mark.xdist_group(module))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its counts to the controller."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["jax_cache"] = dict(_counts)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """The controller adds up its workers' counts (pytest-xdist only)."""
    _counts.update(getattr(node, "workeroutput", {}).get("jax_cache", {}))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    c = _counts
    terminalreporter.write_line(
        f"JAX persistent compilation cache ({os.environ.get('JAX_COMPILATION_CACHE_DIR')}): "
        f"{c['requests']} compilations asked for, {c['hits']} found in the cache, "
        f"{c['misses']} compiled and written"
    )


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(params=LAYER_CASES)
def layer_name(request: pytest.FixtureRequest) -> str:
    """Each layer case of `support.models.LAYER_CASES` by name (build it with `build`)."""
    return request.param


@pytest.fixture(params=["float32", "bfloat16"])
def param_dtype(request: pytest.FixtureRequest) -> Any:
    """Each parameter dtype the layer cases are built in."""
    return jnp.dtype(request.param)
