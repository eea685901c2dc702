"""PEFT ``target_parameters`` files of expert kernels without PyTorch (runs in every venv):
the tensors `lora.save_peft` writes, entry by entry against the layout peft 0.21.2 uses
(docs/guides/moe.md, "PEFT files"; pinned against the real peft by tests/test_moe_peft.py and
tests/test_moe_peft_files.py), the ``.base_layer`` nesting in the given registration order,
and ``save_peft`` -> ``load_peft`` round trips (Linen and NNX, einsum and ragged, one block and
a scan stack).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from support.moe_models import E, L, build, random_factors
from support.trees import leaves_by_path

import flax_lora as lora

R = 2
PREFIX = "base_model.model."


def _adapters(kernels: dict[str, tuple], layer_axes: int = 0) -> dict[str, Any]:
    """``{path: (shape, a, b, in_axes, expert_axes)}`` -> nested hand-built adapters."""
    out: dict[str, Any] = {}
    for path, (shape, a, b, in_axes, expert_axes) in kernels.items():
        *parents, leaf = path.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = lora.LoraWeights(
            a=jnp.asarray(a),
            b=jnp.asarray(b),
            scale=0.5,
            in_axes=in_axes,
            kernel_shape=shape,
            layer_axes=layer_axes,
            expert_axes=expert_axes,
        )
    return out


def _case_adapters(case: Any, seed: int) -> tuple[dict[str, Any], dict[str, tuple]]:
    factors = random_factors(case, rank=R, scale=0.5, seed=seed)
    shapes = {p: tuple(np.shape(v)) for p, v in leaves_by_path(case.params).items()}
    n = int(case.stacked)
    kernels = {
        p: (shapes[p], a, b, case.kernels[p].inputs, case.kernels[p].carried[n:])
        for p, (a, b, _) in factors.items()
    }
    return _adapters(kernels, n), factors


def _entries(adapters: Any) -> dict[str, Any]:
    return leaves_by_path(adapters, is_leaf=lambda x: isinstance(x, lora.LoraWeights))


@pytest.mark.parametrize("reverse", [False, True], ids=["same_side", "reversed"])
def test_tensor_entries_follow_peft(tmp_path: Path, reverse: bool) -> None:
    """Row ``e * r + k`` of ``lora_A`` is expert ``e``'s rank ``k`` (expert-major), column
    ``k * E + e`` of ``lora_B`` too (rank-major); PEFT's ``in`` side is ``a``'s, or ``b``'s
    for a reversed parameter."""
    rng = np.random.default_rng(0)
    d, f = 3, 5
    a = rng.normal(size=(E, d, R)).astype(np.float32)
    b = rng.normal(size=(E, R, f)).astype(np.float32)
    adapters = _adapters({"params/moe/experts/w": ((E, d, f), a, b, (1,), (0,))})
    reversed_params = {"moe.experts.w"} if reverse else ()
    lora.save_peft(tmp_path, adapters, reversed_params=reversed_params)
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    lora_a = t[f"{PREFIX}moe.experts.lora_A.weight"]
    lora_b = t[f"{PREFIX}moe.experts.lora_B.weight"]
    assert lora_a.shape == (R * E, f if reverse else d)
    assert lora_b.shape == (d if reverse else f, R * E)
    for e in range(E):
        for k in range(R):
            row, col = lora_a[e * R + k], lora_b[:, k * E + e]
            want_row, want_col = (b[e, k, :], a[e, :, k]) if reverse else (a[e, :, k], b[e, k, :])
            np.testing.assert_array_equal(row, want_row)
            np.testing.assert_array_equal(col, want_col)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["target_parameters"], cfg["target_modules"]) == (["moe.experts.w"], [])
    back = lora.load_peft(
        tmp_path,
        {"params": {"moe": {"experts": {"w": np.zeros((E, d, f), np.float32)}}}},
        reversed_params=reversed_params,
    )
    got = back["params"]["moe"]["experts"]["w"]
    assert (got.in_axes, got.expert_axes, got.scale) == ((1,), (0,), 0.5)
    np.testing.assert_array_equal(np.asarray(got.a), a)
    np.testing.assert_array_equal(np.asarray(got.b), b)


def test_nesting_follows_the_given_registration_order(tmp_path: Path) -> None:
    """Three parameters of one module: the first registered is innermost, whatever the
    alphabetical order of the Flax names; one module's order given by a dict."""
    rng = np.random.default_rng(1)
    kernels = {
        f"params/experts/{n}": (
            (E, 4, 6),
            rng.normal(size=(E, 4, R)),
            rng.normal(size=(E, R, 6)),
            (1,),
            (0,),
        )
        for n in ("w1", "w2", "w3")
    }
    adapters = _adapters(kernels)
    order = {"experts": ("bias_not_adapted", "w3", "w1", "w2")}
    lora.save_peft(tmp_path, adapters, param_order=order)
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    depth = {"w3": ".base_layer.base_layer", "w1": ".base_layer", "w2": ""}
    for name, d in depth.items():
        want = np.asarray(kernels[f"params/experts/{name}"][1], np.float32)[0, :, 0]
        np.testing.assert_array_equal(t[f"{PREFIX}experts{d}.lora_A.weight"][0], want)
    params = {"params": {"experts": {n: np.zeros((E, 4, 6), np.float32) for n in depth}}}
    back = _entries(lora.load_peft(tmp_path, params, param_order=order))
    for path, (_, a, b, _, _) in kernels.items():
        np.testing.assert_allclose(np.asarray(back[path].a), a, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(back[path].b), b, rtol=1e-6)
    with pytest.raises(ValueError, match=r"module 'experts'.*\['w1', 'w2', 'w3'\]"):
        lora.load_peft(tmp_path, params)
    # a module with one adapted parameter needs no order, even beside an order for others
    one = _adapters({"params/other/w": kernels["params/experts/w1"]})
    lora.save_peft(tmp_path / "one", one, param_order=("w3", "w1"))
    t = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert set(t) == {f"{PREFIX}other.lora_A.weight", f"{PREFIX}other.lora_B.weight"}


@pytest.mark.parametrize(
    "framework,dispatch,stacked",
    [
        ("linen", "einsum", False),
        ("nnx", "ragged", False),
        ("linen", "ragged", True),
        ("nnx", "einsum", True),
    ],
)
def test_round_trip(tmp_path: Path, framework: str, dispatch: str, stacked: bool) -> None:
    case = build(framework, dispatch, stacked=stacked, transposed_out=dispatch == "ragged")
    adapters, _ = _case_adapters(case, seed=3)
    prefix = "params/" if framework == "linen" else ""
    if stacked:
        stack = f"{prefix}layers/" + ("moe/" if framework == "linen" else "")
        key_map = {
            f"{stack}router/kernel": "layers.{layer}.router",
            f"{stack}experts/w_in": "layers.{layer}.experts.w_in",
            f"{stack}experts/w_out": "layers.{layer}.experts.w_out",
        }
    else:
        key_map = None  # the default: router, experts.w_in, experts.w_out
    opts = dict(param_order=("w_in", "w_out"), reversed_params={"layers.{layer}.experts.w_out"})
    lora.save_peft(tmp_path, adapters, None, key_map, **opts)
    names = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    if stacked:
        assert {f"{PREFIX}layers.{i}.experts.base_layer.lora_A.weight" for i in range(L)} <= names
    else:
        assert f"{PREFIX}experts.base_layer.lora_B.weight" in names
    back = _entries(lora.load_peft(tmp_path, case.params, key_map, **opts))
    for path, w in _entries(adapters).items():
        v = back[path]
        assert (v.in_axes, v.expert_axes, v.layer_axes, v.kernel_shape) == (
            w.in_axes,
            w.expert_axes,
            w.layer_axes,
            w.kernel_shape,
        )
        np.testing.assert_array_equal(np.asarray(v.a), np.asarray(w.a))
        np.testing.assert_array_equal(np.asarray(v.b), np.asarray(w.b))
