"""The fixtures of the test suite (helpers, references and models live in tests/support).

Hypothesis runs derandomized (the same examples on every run, so CI is reproducible); set
``HYPOTHESIS_PROFILE=explore`` to draw new examples, e.g. when hunting bugs locally.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import pytest
from hypothesis import settings
from support.models import LAYER_CASES

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=LAYER_CASES)
def layer_name(request: pytest.FixtureRequest) -> str:
    """Each layer case of `support.models.LAYER_CASES` by name (build it with `build`)."""
    return request.param


@pytest.fixture(params=["float32", "bfloat16"])
def param_dtype(request: pytest.FixtureRequest) -> Any:
    """Each parameter dtype the layer cases are built in."""
    return jnp.dtype(request.param)
