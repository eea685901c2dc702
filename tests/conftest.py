"""The fixtures of the test suite (helpers, references and models live in tests/support)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import pytest
from support.models import LAYER_CASES


@pytest.fixture(params=LAYER_CASES)
def layer_name(request: pytest.FixtureRequest) -> str:
    """Each layer case of `support.models.LAYER_CASES` by name (build it with `build`)."""
    return request.param


@pytest.fixture(params=["float32", "bfloat16"])
def param_dtype(request: pytest.FixtureRequest) -> Any:
    """Each parameter dtype the layer cases are built in."""
    return jnp.dtype(request.param)
