"""`lora.wrap`: outputs, gradients and vmap against the un-wrapped model on a reference kernel.

The reference is always the plain model applied to params whose adapted kernels were replaced
by ``W0 + scale * a @ b`` computed in the test (numpy float64, or jnp for gradients).
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.models import build
from support.refs import ref_delta_jnp, ref_merged_kernel
from support.trees import adapter_entries, leaves_by_path, replace_leaves

import flax_lora as lora

RANK, ALPHA = 2, 3.0  # scale 1.5
MODES = ["merged", "auto"]


def _adapters(m, key=0):
    config = lora.LoraConfig(rank=RANK, alpha=ALPHA, init="random")
    return lora.init(jax.random.key(key), m.params, config, probe=m.probe)


def _ref_params(m, adapters):
    """Params whose adapted kernels are the float64 reference, cast once to their dtype."""
    base = leaves_by_path(m.params)
    new = {}
    for path, w in adapter_entries(adapters).items():
        in_axes, _ = m.kernels[path]
        new[path] = jnp.asarray(ref_merged_kernel(base[path], w.a, w.b, in_axes, ALPHA / RANK))
    return replace_leaves(m.params, new)


def _tol(y_ref: np.ndarray, dtype) -> dict:
    scale = float(np.abs(y_ref).max()) + 1.0
    # f32: float32 rounding of different summation orders. bf16 kernels: the library's merged
    # kernel may differ from the reference in a rare entry by 1 bf16 ulp (see test_merge), i.e.
    # 2^-8 of that entry, and a bf16 output (Embed computes in bf16) can then move by 1-2 ulps.
    return dict(rtol=0, atol=(2e-5 if dtype == jnp.float32 else 8e-3) * scale)


@pytest.mark.parametrize("mode", MODES)
def test_wrap_equals_model_on_reference_kernel(layer_name, param_dtype, mode) -> None:
    m = build(layer_name, param_dtype)
    adapters = _adapters(m)
    y = jax.jit(lora.wrap(m.apply, mode=mode))(m.params, adapters, m.x)
    y_ref = m.apply(_ref_params(m, adapters), m.x)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    y_ref = np.asarray(y_ref, np.float32)
    y_base = np.asarray(m.apply(m.params, m.x), np.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, **_tol(y_ref, param_dtype))
    # and the adapters matter: the output is not the base output
    assert np.abs(y_ref - y_base).max() > 5 * _tol(y_ref, param_dtype)["atol"]


@pytest.mark.parametrize("mode", MODES)
def test_adapters_none_is_the_base_model(mode) -> None:
    for name in ("linen_mha", "nnx_embed", "linen_conv2d"):
        m = build(name)
        y = jax.jit(lora.wrap(m.apply, mode=mode))(m.params, None, m.x)
        np.testing.assert_array_equal(y, jax.jit(m.apply)(m.params, m.x))


def _ref_loss(m, adapters, cotangent):
    """A loss of the model on kernels merged by hand in jnp, as a function of the factors."""
    entries = adapter_entries(adapters)

    def loss(factors):
        base = leaves_by_path(m.params)
        new = {}
        for path, (a, b) in factors.items():
            in_axes, _ = m.kernels[path]
            w0 = base[path].astype(jnp.float32)
            new[path] = (w0 + ref_delta_jnp(a, b, in_axes, ALPHA / RANK)).astype(base[path].dtype)
        y = m.apply(replace_leaves(m.params, new), m.x)
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    factors = {p: (w.a, w.b) for p, w in entries.items()}
    return loss, factors


@pytest.mark.parametrize("mode", MODES)
def test_grad_wrt_adapters_equals_reference(layer_name, mode) -> None:
    m = build(layer_name)
    adapters = _adapters(m)
    y0 = m.apply(m.params, m.x)
    cotangent = jnp.asarray(np.random.default_rng(0).standard_normal(y0.shape), jnp.float32)
    fn = lora.wrap(m.apply, mode=mode)
    loss = lambda ad: jnp.sum(fn(m.params, ad, m.x).astype(jnp.float32) * cotangent)
    grads = adapter_entries(jax.jit(jax.grad(loss))(adapters))
    ref_loss, factors = _ref_loss(m, adapters, cotangent)
    # not jitted: jax 0.7.1's XLA miscompiles the jitted gradient of this reference on Conv
    # kernels (a finite-difference check agrees with the eager one and with lora.wrap)
    ref = jax.grad(ref_loss)(factors)
    for path, (ga, gb) in ref.items():
        g = grads[path]
        assert g.a.shape == ga.shape and g.b.shape == gb.shape
        for got, want in ((g.a, ga), (g.b, gb)):
            want = np.asarray(want)
            assert np.abs(want).max() > 1e-3, path  # a gradient that can be wrong
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "layer_name",
    ["linen_dense", "linen_mha", "linen_embed", "linen_conv2d", "nnx_mha", "nnx_einsum"],
)
def test_vmap_over_inputs(layer_name, mode) -> None:
    m = build(layer_name)
    adapters = _adapters(m)
    fn = lora.wrap(m.apply, mode=mode)
    ys = jax.jit(jax.vmap(lambda x: fn(m.params, adapters, x)))(m.xs)
    ref_params = _ref_params(m, adapters)
    y_ref = np.stack([np.asarray(m.apply(ref_params, x)) for x in m.xs])
    np.testing.assert_allclose(ys, y_ref, **_tol(y_ref, jnp.float32))


@pytest.mark.parametrize("mode", MODES)
def test_vmap_over_a_batch_of_adapters(mode) -> None:
    m = build("linen_mha")
    sets = [_adapters(m, key=k) for k in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *sets)
    fn = lora.wrap(m.apply, mode=mode)
    ys = jax.jit(jax.vmap(lambda ad: fn(m.params, ad, m.x)))(stacked)
    for k, ad in enumerate(sets):
        y_ref = np.asarray(m.apply(_ref_params(m, ad), m.x))
        np.testing.assert_allclose(ys[k], y_ref, **_tol(y_ref, jnp.float32))


def test_wrap_passes_kwargs_and_rejects_unknown_modes() -> None:
    m = build("linen_embed_attend")
    adapters = _adapters(m)
    module_apply = lambda p, x, *, scale: scale * m.apply(p, x)
    y = lora.wrap(module_apply, mode="merged")(m.params, adapters, m.x, scale=2.0)
    y_ref = 2.0 * np.asarray(m.apply(_ref_params(m, adapters), m.x))
    np.testing.assert_allclose(y, y_ref, **_tol(y_ref, jnp.float32))
    with pytest.raises(ValueError, match="mode"):
        lora.wrap(m.apply, mode="fused")


def test_wrapped_signature_and_merged_dropout_warning() -> None:
    m = build("linen_embed_attend")
    adapters = _adapters(m)
    fn = lora.wrap(m.apply, mode="merged")
    names = list(inspect.signature(fn).parameters)
    assert names[:2] == ["params", "adapters"] and {"lora_rng", "lora_ids"} <= set(names)
    with pytest.warns(UserWarning, match="applies no LoRA dropout"):
        y = fn(m.params, adapters, m.x, lora_rng=jax.random.key(0))
    np.testing.assert_array_equal(y, fn(m.params, adapters, m.x))  # and indeed none


def test_forward_mode_autodiff_merged_works_factored_explains() -> None:
    """jax.jvp w.r.t. the adapters: mode "merged" gives the model's jvp with the kernel tangent
    ``scale * (da @ b + a @ db)``; the factored modes raise an error that says to use it."""
    model = nn.Dense(5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random")
    adapters = lora.init(jax.random.key(1), params, config)
    tangent = jax.tree.map(lambda t: 0.5 * jnp.ones_like(t), adapters)
    y, dy = jax.jvp(
        lambda ad: lora.wrap(model.apply, mode="merged")(params, ad, x), (adapters,), (tangent,)
    )
    w = adapters["params"]["kernel"]
    dw = tangent["params"]["kernel"]
    a, b, da, db = (np.asarray(v, np.float64) for v in (w.a, w.b, dw.a, dw.b))
    kernel = np.asarray(params["params"]["kernel"], np.float64) + w.scale * a @ b
    dkernel = w.scale * (da @ b + a @ db)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(y, x64 @ kernel + np.asarray(params["params"]["bias"]), rtol=1e-5)
    np.testing.assert_allclose(dy, x64 @ dkernel, rtol=1e-5, atol=1e-6)
    for mode in ("auto", "factored"):
        fn = lora.wrap(model.apply, mode=mode)
        with pytest.raises(TypeError, match=r"forward-mode autodiff.*mode='merged'"):
            jax.jvp(lambda ad: fn(params, ad, x), (adapters,), (tangent,))  # noqa: B023
