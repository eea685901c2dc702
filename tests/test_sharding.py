"""Sharded adapters on a 2x4 ('data', 'model') mesh of 8 CPU devices.

The checks run in one subprocess (tests/support/mesh_checks.py), which sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax: this pytest process
has already imported jax with one device. The subprocess prints computed values as JSON; the
tests below judge them against references built independently (the kernels' specs and their
input axes written by hand, the same step run on one device, the base model's compiled step).
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
from support.eight_devices import run_on_eight_devices


@pytest.fixture(scope="module")
def mesh_results() -> dict[str, Any]:
    return run_on_eight_devices("support.mesh_checks")


def test_eight_devices(mesh_results: dict[str, Any]) -> None:
    assert mesh_results["devices"] == 8


def test_init_gives_factors_the_kernel_axes_shardings(mesh_results: dict[str, Any]) -> None:
    rows = mesh_results["init"]
    assert len(rows) == 12  # q, k, v, out, fc1, fc2 of 2 blocks
    for path, r in rows.items():
        assert r["a_named"] and r["b_named"], path
        assert r["a"] == r["want_a"], (path, r)
        assert r["b"] == r["want_b"], (path, r)
    # the model-parallel kernels really are split: some a and some b carry 'model'
    assert any("model" in r["a"] for r in rows.values())
    assert any("model" in r["b"] for r in rows.values())


@pytest.mark.parametrize("which", ["merge_eager", "unmerge_eager", "merge_jit", "unmerge_jit"])
def test_merge_keeps_kernel_shardings(mesh_results: dict[str, Any], which: str) -> None:
    kept = mesh_results[which]
    assert len(kept) == 12
    assert all(kept.values()), {p: k for p, k in kept.items() if not k}


@pytest.mark.parametrize("mode", ["auto", "factored", "merged"])
def test_training_step_on_mesh_equals_one_device(mesh_results: dict[str, Any], mode: str) -> None:
    s = mesh_results["steps"][mode]
    for one, mesh in zip(s["loss_one"], s["loss_mesh"], strict=True):
        assert abs(one - mesh) <= 1e-5 * abs(one), s
    assert s["loss_mesh"][-1] < s["loss_mesh"][0]  # it trains
    # adapters moved by ~3e-2 in 3 adam steps; mesh vs one device agree to f32 rounding
    assert s["min_update"] > 1e-3
    assert s["max_update_diff"] < 2e-5, s
    assert s["adapter_shardings_kept"]


@pytest.mark.parametrize("mode", ["factored", "auto"])
def test_no_all_gather_of_adapted_kernels(mesh_results: dict[str, Any], mode: str) -> None:
    """The factored step all-gathers no base kernel the base model's own step does not.

    Compared with the base model's forward and backward pass to its activations (the floor of
    any LoRA step): every all-gather the LoRA step has beyond those must move fewer elements
    than one shard of the smallest adapted kernel (a LoRA factor may be gathered; a kernel, or
    a kernel-sized weight gradient, may not), and none may have a whole kernel's size.
    """
    g = mesh_results["all_gathers"]
    sizes = set(mesh_results["kernel_sizes"])
    smallest_shard = min(mesh_results["kernel_shard_sizes"])
    lora_step = collections.Counter(tuple(s) for s in g[mode])
    base = collections.Counter(tuple(s) for s in g["base_activation_step"])
    extra = lora_step - base
    assert all(_prod(s) < smallest_shard for s in extra), (extra, smallest_shard)
    kernel_like = lambda c: sum(n for s, n in c.items() if _prod(s) in sizes)
    assert kernel_like(lora_step) <= kernel_like(base)
    assert kernel_like(collections.Counter(tuple(s) for s in g["base_full_step"])) == 0


def test_hlo_check_sees_kernel_gathers(mesh_results: dict[str, Any]) -> None:
    """The HLO scan is not vacuous: the merged form does gather whole kernels here."""
    sizes = set(mesh_results["kernel_sizes"])
    merged = [s for s in mesh_results["all_gathers"]["merged"] if _prod(s) in sizes]
    assert merged, mesh_results["all_gathers"]["merged"]


def test_scan_stacked_kernels_on_mesh(mesh_results: dict[str, Any]) -> None:
    """A scan-stacked MLP (kernels (3, in, out)) with fc1 split on its output features and fc2
    on its input features: factors keep the layer axis unsharded as the kernel does."""
    r = mesh_results["scan"]
    assert r["specs"] == {
        "params/layers/fc1/kernel": [[None, None, None], [None, None, "model"]],
        "params/layers/fc2/kernel": [[None, "model", None], [None, None, None]],
    }
    assert r["merge_kept"]
    one, mesh = r["loss"]
    assert abs(one - mesh) <= 1e-5 * max(1.0, abs(one))
    assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_max"])
    sizes = set(r["kernel_sizes"]) | set(r["layer_kernel_sizes"])
    extra = collections.Counter(map(tuple, r["gathers_factored"])) - collections.Counter(
        map(tuple, r["gathers_base"])
    )
    assert not any(_prod(s) in sizes for s in extra), extra


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
