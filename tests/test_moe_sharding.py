"""Expert parallelism: expert factors placed on a 2x4 ('data', 'model') mesh of 8 CPU devices.

A kernel sharded on its expert axis over a mesh axis gives factors sharded on their carried
expert axis the same way (`flax_lora._sharding.place_adapter`), its input / output axes keeping
the kernel's mesh axes and the rank axis never split; merging and combining on the mesh equal
the same computations on one device. The checks run in a subprocess
(tests/support/moe_mesh_checks.py), which sets ``XLA_FLAGS`` before importing jax; the specs
expected here are written by hand from the kernels' specs.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.eight_devices import run_on_eight_devices

BLOCK = {
    "params/router/kernel": ([None, None], [None, None], [None]),
    "params/experts/w_in": (["model", None, None], ["model", None, "data"], ["model", "data"]),
    "params/experts/w_out": (["model", "data", None], ["model", None, None], ["model", None]),
}


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return run_on_eight_devices("support.moe_mesh_checks", timeout=600)


def test_eight_devices(results: dict[str, Any]) -> None:
    assert results["devices"] == 8


@pytest.mark.parametrize("stacked", [False, True])
def test_factors_sharded_on_the_expert_axis(results: dict[str, Any], stacked: bool) -> None:
    got = results["stack" if stacked else "block"]["specs"]
    prefix = "params/layers/moe/" if stacked else "params/"
    for path, (a, b, m) in BLOCK.items():
        path = path.replace("params/", prefix)
        lead = [None] if stacked else []  # the layer axis is not sharded
        assert got[path]["a"] == lead + a, path
        assert got[path]["b"] == lead + b, path
        assert got[path]["m"] == lead + m, path


@pytest.mark.parametrize("stacked", [False, True])
def test_mesh_equals_one_device(results: dict[str, Any], stacked: bool) -> None:
    r = results["stack" if stacked else "block"]
    assert r["merge"] <= 1e-6 and r["combine"] <= 1e-6
    assert r["forward"] <= 1e-5
    for path, spec in r["merged_specs"].items():
        if path.endswith("experts/w_in"):  # the merged kernel stays expert-parallel
            assert spec == r["specs"][path]["kernel"], (path, spec)
