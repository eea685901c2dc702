"""Layered kernels whose layer axis is not their first (MaxText's ``param_scan_axis: 1``):
``(d, L, f)`` kernels moved to ``(L, d, f)`` in the traced model just before the scan.

References are independent of the code under test: the merged kernels are built in float64
numpy layer by layer, ``W0[:, l] + scale * a[l] @ b[l]`` with each kernel's layer axis and input
axes written by hand (tests/support/axis_models.py), and the model is run on them; gradients of
every mode are compared with those of the model on kernels merged by a differentiable jnp
reference (no flax_lora code in the reference's path). The models: a Linen ``nn.scan`` with
``variable_axes={"params": 1}`` and a hand-written `jax.lax.scan` over ``jnp.moveaxis``
(one kernel with its layer axis last).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core
from support.axis_models import (
    MODELS,
    SPECS,
    L,
    X,
    axis_model,
    init_adapters,
    probe_of,
    ref_delta_layered64,
    ref_merge64,
)
from support.compare import assert_close
from support.eight_devices import run_on_eight_devices
from support.jaxprs import jaxpr_shapes
from support.refs import ref_delta64, ref_delta_jnp
from support.trees import adapter_entries, leaves_by_path, replace_leaves

import flax_lora as lora

CONFIG = lora.LoraConfig(rank=2, alpha=3.0, init="random")
MODES = ["merged", "factored", "auto"]


def ref_params(name: str, params: Any, adapters: Any) -> Any:
    """The params with every adapted kernel merged in float64 numpy, cast once to float32."""
    merged = ref_merge64(name, params, adapters)
    return replace_leaves(params, {p: v.astype(np.float32) for p, v in merged.items()})


def jnp_merged(name: str, params: Any, adapters: Any) -> Any:
    """The params with each kernel merged by a differentiable jnp reference (per layer, stacked
    on the kernel's layer axis written by hand): the gradients' reference."""
    kernels = leaves_by_path(params)
    new = {}
    for path, w in adapter_entries(adapters).items():
        axis, ins = SPECS[name][path]
        if axis is None:
            d = ref_delta_jnp(w.a, w.b, ins, w.scale)
        else:
            inner = tuple(i - (i > axis) for i in ins)
            per = [ref_delta_jnp(w.a[i], w.b[i], inner, w.scale) for i in range(L)]
            d = jnp.stack(per, axis=axis)
        new[path] = jnp.asarray(kernels[path]) + d
    return replace_leaves(params, new)


# -- the adapters --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_adapters_keep_the_layer_axis_first_and_record_where_the_kernel_has_it(name: str) -> None:
    _, params = axis_model(name)
    adapters = init_adapters(name, CONFIG)
    kernels = leaves_by_path(params)
    entries = adapter_entries(adapters)
    assert set(entries) == set(SPECS[name])
    for path, w in entries.items():
        axis, ins = SPECS[name][path]
        shape = kernels[path].shape
        assert w.stored_shape == shape, path
        if axis is None:
            assert (w.layer_axes, w.layer_at) == (0, 0)
            continue
        rest = [d for d in range(len(shape)) if d != axis]
        outs = [d for d in rest if d not in ins]
        assert (w.layer_axes, w.layer_at) == (1, axis), path
        assert w.a.shape == (L, *[shape[d] for d in ins], 2), path
        assert w.b.shape == (L, 2, *[shape[d] for d in outs]), path
        assert w.kernel_shape == (L, *[shape[d] for d in rest]), path  # the scan layout
        assert_close(lora.delta(w), ref_delta_layered64(w, axis, ins), 1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_merge_and_unmerge_equal_the_float64_merge(name: str) -> None:
    _, params = axis_model(name)
    adapters = init_adapters(name, CONFIG)
    merged = jax.jit(lora.merge)(params, adapters)
    ref = ref_merge64(name, params, adapters)
    got = leaves_by_path(merged)
    for path, want in ref.items():
        assert_close(got[path], want, 1e-5)
    back = leaves_by_path(lora.unmerge(merged, adapters))
    for path, w0 in leaves_by_path(params).items():
        assert_close(back[path], w0, 1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_every_mode_equals_the_model_on_merged_kernels(name: str, mode: str) -> None:
    apply, params = axis_model(name)
    adapters = init_adapters(name, CONFIG)
    want = apply(ref_params(name, params, adapters), X)
    got = jax.jit(lora.wrap(apply, mode=mode))(params, adapters, X)
    assert_close(got, want, 1e-4)
    assert_close(apply(lora.merge(params, adapters), X), want, 1e-4)
    assert float(jnp.max(jnp.abs(apply(params, X) - want))) > 1e-2  # the adapters do something


@pytest.mark.parametrize("name", MODELS)
def test_gradients_agree_across_modes(name: str) -> None:
    apply, params = axis_model(name)
    adapters = init_adapters(name, CONFIG)
    target = np.random.default_rng(3).normal(size=np.shape(apply(params, X)))
    loss = lambda y: jnp.mean((y - target) ** 2)
    ref = jax.grad(lambda ad: loss(apply(jnp_merged(name, params, ad), X)))(adapters)
    for mode in MODES:
        run = lora.wrap(apply, mode=mode)
        got = jax.jit(jax.grad(lambda ad, run=run: loss(run(params, ad, X))))(adapters)
        for path, g in adapter_entries(got).items():
            r = adapter_entries(ref)[path]
            assert_close(g.a, r.a, 1e-4), (mode, path)
            assert_close(g.b, r.b, 1e-4), (mode, path)


@pytest.mark.parametrize("name", MODELS)
def test_factored_scan_forms_no_layer_kernel(name: str) -> None:
    """Factored mode computes no array of an adapted kernel's shape (as stored, moved to the
    scan layout, or one layer's) that the base model itself does not compute, forward and
    backward; merged mode does."""
    apply, params = axis_model(name)
    adapters = init_adapters(name, CONFIG)
    kernel_shapes = set()
    for w in adapter_entries(adapters).values():
        kernel_shapes |= {w.stored_shape, w.kernel_shape, w.kernel_shape[w.layer_axes :]}

    def count(fn: Callable[..., Any], *args: Any) -> int:
        shapes = jaxpr_shapes(jax.make_jaxpr(fn)(*args).jaxpr)
        return sum(s in kernel_shapes for s in shapes)

    loss = lambda y: jnp.sum(jnp.sin(y))
    base_fwd = count(apply, params, X)
    # the base model as a jaxpr (an NNX module refuses to be built under jax.grad w.r.t. x
    # with its state passed along)
    as_fun = jex_core.jaxpr_as_fun(jax.make_jaxpr(apply)(params, X))
    base = lambda p, x: as_fun(*jax.tree.leaves(p), x)[0]
    base_bwd = count(jax.grad(lambda x, p: loss(base(p, x))), X, params)
    fn = lora.wrap(apply, mode="factored")
    assert count(lambda p, ad: fn(p, ad, X), params, adapters) <= base_fwd
    assert count(jax.grad(lambda ad, p: loss(fn(p, ad, X))), adapters, params) <= base_bwd
    merged = lora.wrap(apply, mode="merged")
    assert count(lambda p, ad: merged(p, ad, X), params, adapters) > base_fwd


# -- picking layers, DoRA ------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_layers_pick_layers_on_the_kernels_layer_axis(name: str) -> None:
    apply, params = axis_model(name)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random", layers=[0, 2])
    adapters = init_adapters(name, config)
    for path, w in adapter_entries(adapters).items():
        axis = SPECS[name][path][0]
        if axis is None:
            continue
        assert w.layers == (0, 2)
        d = np.asarray(lora.delta(w))
        assert np.all(np.take(d, 1, axis=axis) == 0), path
        assert np.any(np.take(d, 0, axis=axis) != 0), path
    want = apply(ref_params(name, params, adapters), X)
    for mode in MODES:
        run = lora.wrap(apply, mode=mode)
        assert_close(jax.jit(run)(params, adapters, X), want, 1e-4)
        g = jax.grad(lambda ad, run=run: jnp.sum(run(params, ad, X) ** 2))(adapters)
        for path, gw in adapter_entries(g).items():
            if SPECS[name][path][0] is not None:
                assert not np.any(np.asarray(gw.a[1])) and not np.any(np.asarray(gw.b[1]))


@pytest.mark.parametrize("name", MODELS)
def test_dora_norms_per_layer_on_the_kernels_layer_axis(name: str) -> None:
    apply, params = axis_model(name)
    adapters = init_adapters(name, lora.LoraConfig(rank=2, alpha=3.0, init="random", dora=True))
    rng = np.random.default_rng(4)
    adapters = jax.tree.map(
        lambda w: w.replace(m=w.m * jnp.asarray(1 + 0.3 * rng.normal(size=w.m.shape), w.m.dtype)),
        adapters,
        is_leaf=lambda x: isinstance(x, lora.LoraWeights),
    )
    for path, w in adapter_entries(adapters).items():
        axis = SPECS[name][path][0]
        if axis is not None:
            assert w.m.shape[0] == L
    want = apply(ref_params(name, params, adapters), X)
    for mode in MODES:
        assert_close(jax.jit(lora.wrap(apply, mode=mode))(params, adapters, X), want, 1e-4)
    got = leaves_by_path(lora.merge(params, adapters))
    for path, ref in ref_merge64(name, params, adapters).items():
        assert_close(got[path], ref, 1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_put_the_residual_back_in_the_kernels_layout(init: str) -> None:
    """The residual base plus the float64 merge of the factors is the original kernel, and
    every mode runs the original model."""
    apply, params = axis_model("linen")
    config = lora.LoraConfig(rank=2, alpha=3.0, init=init)
    adapters, residual = lora.init(jax.random.key(2), params, config, probe=probe_of(apply))
    merged = ref_merge64("linen", residual, adapters)
    kernels = leaves_by_path(params)
    for path, v in merged.items():
        assert leaves_by_path(residual)[path].shape == kernels[path].shape
        assert_close(v, kernels[path], 1e-5)
    want = apply(params, X)
    for mode in MODES:
        assert_close(jax.jit(lora.wrap(apply, mode=mode))(residual, adapters, X), want, 1e-4)


# -- several adapters ----------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_routing_by_lora_ids_equals_each_examples_merged_model(name: str, dora: bool) -> None:
    """A stack of a plain and a (DoRA, with ``dora``) adapter, routed per example."""
    apply, params = axis_model(name)
    one = init_adapters(name, CONFIG)
    config = lora.LoraConfig(rank=3, alpha=2.0, init="random", dora=dora)
    two = lora.init(jax.random.key(7), params, config, probe=probe_of(apply))
    if dora:  # magnitudes off ||V||, so that DoRA's rescaling shows
        two = jax.tree.map(
            lambda w: w.replace(m=w.m * 1.3), two, is_leaf=lambda x: isinstance(x, lora.LoraWeights)
        )
    stacked = lora.stack([one, two])
    ids = jnp.asarray([1, -1, 0, 1])
    got = jax.jit(lora.wrap(apply, mode="factored"))(params, stacked, X, lora_ids=ids)
    for j, i in enumerate(np.asarray(ids)):
        p = params if i < 0 else ref_params(name, params, [one, two][i])
        assert_close(got[j], apply(p, X[j : j + 1])[0], 1e-4)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_combine_works_layer_by_layer_in_the_kernels_layout(method: str) -> None:
    """``cat`` is exactly ``sum w_i * delta_i``; ``svd`` at the summed rank (here full for each
    layer's rank-4 sum) too, each per layer on the kernel's own layer axis."""
    apply, params = axis_model("jax")
    one = init_adapters("jax", CONFIG)
    two = lora.init(jax.random.key(7), params, CONFIG, probe=probe_of(apply))
    rank = 4 if method == "svd" else None
    both = lora.combine([one, two], [0.7, -0.4], method=method, rank=rank)
    for path, w in adapter_entries(both).items():
        axis, ins = SPECS["jax"][path]
        assert w.layer_at == (0 if axis is None else axis)
        want = 0.7 * ref_delta_layered64(adapter_entries(one)[path], axis, ins)
        want -= 0.4 * ref_delta_layered64(adapter_entries(two)[path], axis, ins)
        assert_close(lora.delta(w), want, 1e-4)


def test_summary_shows_the_kernels_as_stored_and_counts_the_factors() -> None:
    _, params = axis_model("linen")
    adapters = init_adapters("linen", CONFIG)
    report = lora.summary(params, adapters, show=False)
    kernels = leaves_by_path(params)
    assert {r.path: r.kernel_shape for r in report.rows} == {
        p: kernels[p].shape for p in SPECS["linen"]
    }
    assert report.trainable_params == sum(int(np.size(x)) for x in jax.tree.leaves(adapters))


# -- files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_round_trip_exactly(name: str, tmp_path: Path) -> None:
    adapters = init_adapters(name, lora.LoraConfig(rank=2, init="random", layers=[1]))
    lora.save(tmp_path / "ckpt", adapters)
    back = lora.load(tmp_path / "ckpt")
    assert jax.tree.structure(back) == jax.tree.structure(adapters)  # layer_at included
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def key_map(path: str) -> str:
    """``params/layers/wi/kernel`` -> ``layers.{layer}.wi``; ``w_in`` -> ``layers.{layer}.w_in``;
    the head -> ``head``."""
    parts = [p for p in path.split("/") if p not in ("params", "kernel")]
    if parts[0] == "layers":
        return "layers.{layer}." + ".".join(parts[1:])
    return parts[0] if parts[0] == "head" else "layers.{layer}." + parts[0]


@pytest.mark.parametrize("name", MODELS)
def test_save_peft_and_load_peft_round_trip_exactly(name: str, tmp_path: Path) -> None:
    apply, params = axis_model(name)
    configs = [
        CONFIG,
        lora.LoraConfig(rank=2, init="random", layers=[0, 2]),
        lora.LoraConfig(rank=2, init="random", dora=True),
    ]
    for k, config in enumerate(configs):
        adapters = init_adapters(name, config)
        lora.save_peft(tmp_path / str(k), adapters, config, key_map=key_map)
        back = lora.load_peft(tmp_path / str(k), params, key_map, probe=probe_of(apply))
        assert jax.tree.structure(back) == jax.tree.structure(adapters)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_with_a_layer_position_out_of_range_is_refused(tmp_path: Path) -> None:
    adapters = init_adapters("jax", CONFIG)
    lora.save(tmp_path / "ckpt", adapters)
    meta_file = tmp_path / "ckpt" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    entry = next(e for e in meta["adapters"].values() if e.get("layer_at") == 2)  # w_out
    entry["layer_at"] = 3  # (f, d, L): a layer axis from axis 3 on is out of range
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="field 'layer_at': 3"):
        lora.load(tmp_path / "ckpt")


# -- nested scans ------------------------------------------------------------------------------
def nested_outside(p: Any, x: jax.Array) -> jax.Array:
    """Two scans over a kernel stored (d, 2, 3, d): both layer axes moved first at once."""

    def outer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:  # w (3, d, d)
        def inner(h: jax.Array, w1: jax.Array) -> tuple[jax.Array, None]:
            return h + jnp.tanh(h @ w1), None

        return jax.lax.scan(inner, h, w)[0], None

    return jax.lax.scan(outer, x, jnp.moveaxis(p["w"], (1, 2), (0, 1)))[0]


def nested_inside(p: Any, x: jax.Array) -> jax.Array:
    """The same kernel, each layer axis moved first by the scan that slices it."""

    def outer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:  # w (d, 3, d)
        def inner(h: jax.Array, w1: jax.Array) -> tuple[jax.Array, None]:
            return h + jnp.tanh(h @ w1), None

        return jax.lax.scan(inner, h, jnp.moveaxis(w, 1, 0))[0], None

    return jax.lax.scan(outer, x, jnp.moveaxis(p["w"], 1, 0))[0]


@pytest.mark.parametrize("apply", [nested_outside, nested_inside])
def test_nested_scans_over_a_kernels_middle_axes(apply: Callable[..., Any]) -> None:
    w0 = (0.3 * np.random.default_rng(5).normal(size=(8, 2, 3, 8))).astype(np.float32)
    params = {"w": w0}
    adapters = lora.init(jax.random.key(0), params, CONFIG, probe=lambda p: apply(p, X))
    w = adapters["w"]
    assert (w.layer_axes, w.layer_at, w.a.shape, w.b.shape) == (2, 1, (2, 3, 8, 2), (2, 3, 2, 8))
    ref = np.asarray(w0, np.float64).copy()
    for i in range(2):
        for j in range(3):
            ref[:, i, j, :] += ref_delta64(w.a[i, j], w.b[i, j], (0,), w.scale)
    assert_close(lora.merge(params, adapters)["w"], ref, 1e-5)
    want = apply({"w": ref.astype(np.float32)}, X)
    for mode in MODES:
        assert_close(jax.jit(lora.wrap(apply, mode=mode))(params, adapters, X), want, 1e-4)


# -- expert kernels --------------------------------------------------------------------------------
def moe_apply(p: Any, x: jax.Array) -> jax.Array:
    """Expert kernels stored (E, L, d, f) (MaxText's MoE with param_scan_axis 1), each layer's
    (E, d, f) used by an einsum batched over the experts."""

    def body(h: jax.Array, w: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        u = jnp.tanh(jnp.einsum("etd,edf->etf", h, w[0]))
        return h + jnp.einsum("etf,efd->etd", u, w[1]), None

    xs = (jnp.moveaxis(p["wi"], 1, 0), jnp.moveaxis(p["wo"], 1, 0))
    return jax.lax.scan(body, x, xs)[0]


def test_expert_kernels_with_the_layer_axis_second() -> None:
    rng = np.random.default_rng(6)
    e, d, f = 4, 8, 16
    params = {
        "wi": (0.3 * rng.normal(size=(e, L, d, f))).astype(np.float32),
        "wo": (0.3 * rng.normal(size=(e, L, f, d))).astype(np.float32),
    }
    x = rng.normal(size=(e, 5, d)).astype(np.float32)
    adapters = lora.init(jax.random.key(1), params, CONFIG, probe=lambda p: moe_apply(p, x))
    ref = {}
    for k, w in adapters.items():
        assert (w.layer_at, w.expert_axes) == (1, (1,))  # experts second in the scan layout
        assert w.a.shape[:2] == w.b.shape[:2] == (L, e)
        ref[k] = np.asarray(params[k], np.float64).copy()
        for i in range(L):
            for j in range(e):
                ref[k][j, i] += ref_delta64(w.a[i, j], w.b[i, j], (0,), w.scale)
        assert_close(lora.merge(params, adapters)[k], ref[k], 1e-5)
    want = moe_apply({k: v.astype(np.float32) for k, v in ref.items()}, x)
    for mode in MODES:
        assert_close(jax.jit(lora.wrap(moe_apply, mode=mode))(params, adapters, x), want, 1e-4)


# -- quantized bases -------------------------------------------------------------------------------
def test_qlora_without_a_probe_quantizes_the_kernel_whole_and_runs_it() -> None:
    """Without a probe `lora.quantize` does not know the layer axis and quantizes the kernel as
    one; the adapters (from a probe) then run on it in every mode as on its dequantized kernel."""
    apply, params = axis_model("jax")
    qparams = lora.quantize(params, targets=["w_in", "w_out"], dtype="int8")
    adapters = lora.init(jax.random.key(2), qparams, CONFIG, probe=probe_of(apply))
    dequantized = lora.dequantize(qparams)
    want = apply(ref_params("jax", dequantized, adapters), X)
    for mode in MODES:
        assert_close(jax.jit(lora.wrap(apply, mode=mode))(qparams, adapters, X), want, 1e-4)


def test_loftq_refuses_a_kernel_whose_layer_axis_does_not_lead() -> None:
    apply, params = axis_model("jax")
    config = lora.LoraConfig(rank=2, init="loftq", targets="w_in")
    with pytest.raises(ValueError, match=r"init='loftq'.*'w_in'.*layer axes from axis 1"):
        lora.init(jax.random.key(0), params, config, probe=probe_of(apply))


# -- what is refused -------------------------------------------------------------------------------
def test_quantize_refuses_a_kernel_whose_layer_axis_does_not_lead() -> None:
    apply, params = axis_model("jax")
    with pytest.raises(ValueError, match=r"'w_in' is sliced by a scan on axes \(1,\)"):
        lora.quantize(params, targets=["w_in", "w_out"], probe=probe_of(apply))


def test_scans_on_axes_apart_are_refused() -> None:
    """A kernel sliced by two scans on axes that are not next to each other."""

    def apply(p: Any, x: jax.Array) -> jax.Array:
        def outer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:  # w (d, 2, f)
            def inner(h: jax.Array, w1: jax.Array) -> tuple[jax.Array, None]:
                return h + jnp.tanh(h @ w1), None

            return jax.lax.scan(inner, h, jnp.moveaxis(w, 1, 0))[0], None

        return jax.lax.scan(outer, x, jnp.moveaxis(p["w"], 3, 0))[0]  # layer axes 1 and 3

    params = {"w": np.zeros((8, 2, 8, 3), np.float32)}
    with pytest.raises(ValueError, match="next to each other"):
        lora.init(jax.random.key(0), params, CONFIG, probe=lambda p: apply(p, X))


# -- on a mesh ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh_results() -> dict[str, Any]:
    """The 8-device checks (support/axis_mesh_checks.py), run once in a subprocess."""
    return run_on_eight_devices("support.axis_mesh_checks")


def test_init_on_a_mesh_gives_factors_the_shardings_of_the_kernels_own_axes(
    mesh_results: dict[str, Any],
) -> None:
    assert mesh_results["devices"] == 8
    rows = mesh_results["init"]
    assert len(rows) == 4
    for path, r in rows.items():
        assert [r["a"], r["b"]] == r["want"], path
        assert r["same"], path  # the values do not depend on the placement
    assert all(mesh_results["merge_keeps"].values()), mesh_results["merge_keeps"]


@pytest.mark.parametrize("mode", MODES)
def test_a_step_on_a_mesh_equals_one_device(mesh_results: dict[str, Any], mode: str) -> None:
    s = mesh_results["steps"][mode]
    assert abs(s["loss_mesh"] - s["loss_one"]) <= 1e-5 * abs(s["loss_one"]), s
    assert s["min_grad"] > 1e-3  # every factor has a gradient
    assert s["max_grad_diff"] <= 1e-5 * max(1.0, s["min_grad"]), s
