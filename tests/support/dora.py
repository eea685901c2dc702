"""Helpers shared by tests/test_dora.py and tests/test_dora_peft.py."""

from __future__ import annotations

from typing import Any

import numpy as np

import flax_lora as lora

GRAD_TOL = 1e-4
MODES = ("merged", "factored", "auto")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rel(x: Any, ref: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def _is_weights(x: Any) -> bool:
    return isinstance(x, lora.LoraWeights)
