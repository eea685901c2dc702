"""How the tests compare computed arrays with their references: errors relative to the largest
reference value, in float64."""

from __future__ import annotations

from typing import Any

import numpy as np


def rel_err(x: Any, ref: Any) -> float:
    """``max |x - ref| / max |ref|``, in float64."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def assert_close(x: Any, y: Any, tol: float = 2e-5) -> None:
    """``max |x - y| <= tol * max(1, max |y|)``."""
    x, y = np.asarray(x), np.asarray(y)
    scale = max(1.0, float(np.max(np.abs(y))))
    assert np.max(np.abs(x - y)) <= tol * scale, np.max(np.abs(x - y))
