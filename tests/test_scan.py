"""Kernels stacked by ``nn.scan`` / ``nnx.scan`` (a leading layer axis) and layer selection.

References are independent of the code under test: the merged kernels are built here in
float64 numpy, layer by layer, as ``W0[l] + scale * a[l] @ b[l]`` with each kernel's input axes
written by hand, and the model is run on them; gradients of the factored form are compared with
those of ``apply(lora.merge(...))`` (plain JAX autodiff, no factored code). The models are in
tests/support/scan_models.py (shared with the other scan tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex_core
from support.compare import assert_close
from support.jaxprs import jaxpr_shapes
from support.models import NestedStack, fill_abstract
from support.refs import ref_delta64
from support.scan_models import MODELS, D, L, X, in_axes_of, init_adapters, is_layered, scan_model
from support.trees import adapter_entries, leaves_by_path, replace_leaves

import flax_lora as lora


def ref_params(params: Any, adapters: Any, layers: tuple[int, ...] | None = None) -> Any:
    """Merged params in float64 numpy, layer by layer, cast once to float32."""
    base = leaves_by_path(params)
    new = {}
    for path, w in adapter_entries(adapters).items():
        w0 = np.asarray(base[path], np.float64)
        a, b = np.asarray(w.a), np.asarray(w.b)
        if is_layered(path):
            out = w0.copy()
            for i in range(w0.shape[0]):
                if layers is None or i in layers:
                    per_layer = tuple(d - 1 for d in in_axes_of(path))
                    out[i] += ref_delta64(a[i], b[i], per_layer, w.scale)
        else:
            out = w0 + ref_delta64(a, b, (0,), w.scale)
        new[path] = out.astype(np.float32)
    return replace_leaves(params, new)


# -- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_stacked_adapters_have_the_layer_axis(name: str) -> None:
    apply, params = scan_model(name)
    adapters = init_adapters(apply, params)
    entries = adapter_entries(adapters)
    kernels = leaves_by_path(params)
    stacked = [p for p in entries if is_layered(p)]
    assert len(stacked) == 6 and len(entries) == 7  # q, k, v, out, fc1, fc2 + head
    for path, w in entries.items():
        shape = tuple(kernels[path].shape)
        ins = in_axes_of(path)
        lead = (L,) if is_layered(path) else ()
        outs = [d for d in range(len(lead), len(shape)) if d not in ins]
        assert tuple(w.kernel_shape) == shape
        assert tuple(w.in_axes) == ins, path
        assert w.layer_axes == len(lead)
        assert w.a.shape == (*lead, *[shape[d] for d in ins], 2), path
        assert w.b.shape == (*lead, 2, *[shape[d] for d in outs]), path


@pytest.mark.parametrize("name", MODELS)
def test_merge_is_the_per_layer_reference(name: str) -> None:
    apply, params = scan_model(name)
    adapters = init_adapters(apply, params)
    merged = leaves_by_path(lora.merge(params, adapters))
    ref = leaves_by_path(ref_params(params, adapters))
    for path in adapter_entries(adapters):
        assert_close(merged[path], ref[path], 1e-6)
    back = leaves_by_path(lora.unmerge(lora.merge(params, adapters), adapters))
    for path, x in leaves_by_path(params).items():
        assert_close(back[path], x, 1e-6)


@pytest.mark.parametrize("mode", ["factored", "auto", "merged"])
@pytest.mark.parametrize("name", MODELS)
def test_wrapped_equals_merged_and_reference(name: str, mode: str) -> None:
    apply, params = scan_model(name)
    adapters = init_adapters(apply, params)
    y = jax.jit(lora.wrap(apply, mode=mode))(params, adapters, X)
    y_merged = jax.jit(apply)(lora.merge(params, adapters), X)
    y_ref = jax.jit(apply)(ref_params(params, adapters), X)
    y_base = jax.jit(apply)(params, X)
    assert np.max(np.abs(np.asarray(y_ref) - np.asarray(y_base))) > 1e-2  # not a no-op
    assert_close(y, y_merged)
    assert_close(y, y_ref)


def _loss(fn: Callable, params: Any, adapters: Any) -> jax.Array:
    return jnp.sum(jnp.sin(fn(params, adapters, X)))


@pytest.mark.parametrize("mode", ["factored", "auto"])
@pytest.mark.parametrize("name", MODELS)
def test_factored_gradients_equal_merged(name: str, mode: str) -> None:
    apply, params = scan_model(name)
    adapters = init_adapters(apply, params)
    merged_fn = lambda p, ad, x: apply(lora.merge(p, ad), x)
    g = jax.jit(jax.grad(lambda ad: _loss(lora.wrap(apply, mode=mode), params, ad)))(adapters)
    g_ref = jax.jit(jax.grad(lambda ad: _loss(merged_fn, params, ad)))(adapters)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert_close(x, y, 5e-5)


@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_factored_scan_forms_no_layer_kernel(name: str) -> None:
    """Factored mode computes no array of a (per-layer or stacked) adapted kernel's shape that
    the base model itself does not compute, forward and backward; merged mode does."""
    apply, params = scan_model(name)
    adapters = init_adapters(apply, params)
    kernel_shapes = set()
    for path, w in adapter_entries(adapters).items():
        kernel_shapes.add(tuple(w.kernel_shape))
        if is_layered(path):
            kernel_shapes.add(tuple(w.kernel_shape[1:]))

    def count(fn: Callable, *args: Any) -> int:
        shapes = jaxpr_shapes(jax.make_jaxpr(fn)(*args).jaxpr)
        return sum(s in kernel_shapes for s in shapes)

    base_fwd = count(apply, params, X)
    # the base model as a jaxpr (NNX modules refuse to be built at another trace level than
    # their state's, as they would be under jax.grad w.r.t. x with the state passed along)
    as_fun = jex_core.jaxpr_as_fun(jax.make_jaxpr(apply)(params, X))
    base = lambda p, x: as_fun(*jax.tree.leaves(p), x)[0]
    base_bwd = count(jax.grad(lambda x, p: jnp.sum(jnp.sin(base(p, x)))), X, params)
    fn = lora.wrap(apply, mode="factored")
    assert count(lambda p, ad: fn(p, ad, X), params, adapters) <= base_fwd
    assert count(jax.grad(lambda ad, p: _loss(fn, p, ad)), adapters, params) <= base_bwd
    merged = lora.wrap(apply, mode="merged")
    assert count(lambda p, ad: merged(p, ad, X), params, adapters) > base_fwd


@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_layer_selection_on_stacked_kernels(name: str) -> None:
    apply, params = scan_model(name)
    picked = (0, 2)
    adapters = init_adapters(apply, params, _cfg(picked))
    entries = adapter_entries(adapters)
    # the head's path has no layer number: not adapted, as PEFT's layers_to_transform
    assert sorted(entries) == sorted(p for p in leaves_by_path(params) if _is_kernel(p))
    for w in entries.values():
        assert tuple(w.layers) == picked
        assert not np.any(np.asarray(w.a)[1]) and not np.any(np.asarray(w.b)[1])
        assert np.all(np.any(np.asarray(w.a)[[0, 2]] != 0, axis=tuple(range(1, w.a.ndim))))
    base = leaves_by_path(params)
    merged = leaves_by_path(lora.merge(params, adapters))
    ref = leaves_by_path(ref_params(params, adapters, picked))
    for path in entries:
        np.testing.assert_array_equal(np.asarray(merged[path])[1], np.asarray(base[path])[1])
        assert np.any(np.asarray(merged[path])[0] != np.asarray(base[path])[0])
        assert_close(merged[path], ref[path], 1e-6)

    # factors of layer 1 that are (wrongly) nonzero still change nothing: the update is masked
    poisoned = jax.tree.map(lambda x: x.at[1].set(1.0), adapters)
    for mode in ("factored", "auto", "merged"):
        y = jax.jit(lora.wrap(apply, mode=mode))(params, poisoned, X)
        assert_close(y, jax.jit(apply)(ref_params(params, adapters, picked), X))
        wrapped = lora.wrap(apply, mode=mode)
        g = jax.jit(jax.grad(lambda ad, fn=wrapped: _loss(fn, params, ad)))(poisoned)
        for leaf in jax.tree.leaves(g):
            assert not np.any(np.asarray(leaf)[1]), mode  # layer 1 gets no gradient
            assert np.any(np.asarray(leaf)[0]), mode

    # training keeps the layers not picked at zero
    fn = jax.jit(lora.wrap(apply))
    tx = optax.adam(1e-2)
    opt = tx.init(adapters)
    trained = adapters
    for _ in range(2):
        g = jax.grad(lambda ad: _loss(fn, params, ad))(trained)
        upd, opt = tx.update(g, opt, trained)
        trained = optax.apply_updates(trained, upd)
    for x0, x1 in zip(jax.tree.leaves(adapters), jax.tree.leaves(trained), strict=True):
        assert not np.any(np.asarray(x1)[1])
        assert np.any(np.asarray(x1)[0] != np.asarray(x0)[0])


def _cfg(layers: tuple[int, ...]) -> lora.LoraConfig:
    return lora.LoraConfig(rank=2, alpha=3.0, init="random", layers=layers)


def _is_kernel(path: str) -> bool:
    return is_layered(path) and path.split("/")[-1] == "kernel"


class Unstacked(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(3):
            x = jnp.tanh(nn.Dense(D, name=f"h{i}")(x))
        return nn.Dense(3, name="head")(x)


def test_layer_selection_on_unstacked_layers() -> None:
    model = Unstacked()
    params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 3, 0.4)
    adapters = lora.init(jax.random.key(1), params, _cfg((0, 2)))
    assert sorted(adapter_entries(adapters)) == ["params/h0/kernel", "params/h2/kernel"]
    adapters = lora.init(jax.random.key(1), params, _cfg((1,)))
    assert sorted(adapter_entries(adapters)) == ["params/h1/kernel"]
    y = lora.wrap(model.apply, mode="factored")(params, adapters, X)
    assert_close(y, model.apply(ref_params(params, adapters), X))
    with pytest.raises(ValueError, match="matches no kernel"):
        lora.init(jax.random.key(1), params, _cfg((7,)))


def test_layer_selection_out_of_range_on_stack() -> None:
    apply, params = scan_model("linen")
    with pytest.raises(ValueError, match="layer"):
        init_adapters(apply, params, lora.LoraConfig(rank=2, layers=(9,), targets=r".*layers/.*"))


def test_checkpoint_and_summary_of_stacked_adapters(tmp_path: Any) -> None:
    apply, params = scan_model("linen")
    adapters = init_adapters(apply, params, _cfg((1,)))
    lora.save(tmp_path / "ad", adapters)
    back = lora.load(tmp_path / "ad")
    for (p0, w0), (p1, w1) in zip(
        sorted(adapter_entries(adapters).items()),
        sorted(adapter_entries(back).items()),
        strict=True,
    ):
        assert p0 == p1
        assert (w1.layer_axes, w1.layers, w1.in_axes) == (w0.layer_axes, w0.layers, w0.in_axes)
        np.testing.assert_array_equal(np.asarray(w0.a), np.asarray(w1.a))
        np.testing.assert_array_equal(np.asarray(w0.b), np.asarray(w1.b))
    fn = jax.jit(lora.wrap(apply))
    np.testing.assert_array_equal(
        np.asarray(fn(params, adapters, X)), np.asarray(fn(params, back, X))
    )
    s = lora.summary(params, adapters, show=False)
    want = 0
    for path in adapter_entries(adapters):
        shape = leaves_by_path(params)[path].shape
        n_in = int(np.prod([shape[d] for d in in_axes_of(path)]))
        n_out = int(np.prod(shape[1:])) // n_in
        want += L * 2 * (n_in + n_out)
    assert s.trainable_params == want


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_on_stacked_kernels(init: str) -> None:
    """The residual base plus the adapter is the original base, layer by layer (float64
    reference); layers not picked keep their kernel and get zero factors."""
    apply, params = scan_model("linen")
    config = lora.LoraConfig(rank=2, alpha=3.0, init=init, layers=(0, 2))
    adapters, residual = init_adapters(apply, params, config)
    base = leaves_by_path(params)
    res = leaves_by_path(residual)
    rebuilt = leaves_by_path(ref_params(residual, adapters, (0, 2)))
    for path, w in adapter_entries(adapters).items():
        np.testing.assert_array_equal(np.asarray(res[path])[1], np.asarray(base[path])[1])
        assert not np.any(np.asarray(w.a)[1]) and not np.any(np.asarray(w.b)[1])
        assert np.max(np.abs(np.asarray(res[path])[0] - np.asarray(base[path])[0])) > 1e-3
        assert_close(rebuilt[path], base[path], 1e-5)
    y = jax.jit(lora.wrap(apply, mode="factored"))(residual, adapters, X)
    assert_close(y, jax.jit(apply)(params, X), 5e-5)


def test_nested_scans_stack_two_layer_axes() -> None:
    """A scan of scans: kernels (L, 2, in, out), adapters with both leading axes; ``layers``
    picks entries of the outer axis."""
    model = NestedStack(width=D, layers=L)
    params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 4, 0.4)
    adapters = init_adapters(model.apply, params, _cfg((1,)))
    w = adapter_entries(adapters)["params/outer/inner/fc/kernel"]
    assert (w.a.shape, w.b.shape, w.layer_axes, w.in_axes) == ((L, 2, D, 2), (L, 2, 2, D), 2, (2,))
    w0 = np.asarray(leaves_by_path(params)["params/outer/inner/fc/kernel"], np.float64)
    a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
    ref = w0.copy()
    ref[1] += w.scale * np.einsum("jir,jro->jio", a[1], b[1])
    ref_params_ = replace_leaves(params, {"params/outer/inner/fc/kernel": ref.astype(np.float32)})
    y_ref = jax.jit(model.apply)(ref_params_, X)
    for mode in ("factored", "auto", "merged"):
        assert_close(jax.jit(lora.wrap(model.apply, mode=mode))(params, adapters, X), y_ref)
    g = jax.grad(lambda ad: _loss(lora.wrap(model.apply, mode="factored"), params, ad))(adapters)
    merged_fn = lambda p, ad, x: model.apply(lora.merge(p, ad), x)
    g_ref = jax.grad(lambda ad: _loss(merged_fn, params, ad))(adapters)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert_close(x, y, 5e-5)
        assert not np.any(np.asarray(x)[[0, 2]])
