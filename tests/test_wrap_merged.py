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


class _TwoOnOneInput(nn.Module):
    """Two Dense layers on one input (as q and k of attention): the factored branches of both
    run as one low-rank product."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(nn.Dense(5, name="q")(x)) * nn.Dense(5, name="k")(x)


def _forward_mode_case():
    model = _TwoOnOneInput()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random")
    adapters = lora.init(jax.random.key(1), params, config)
    tangent = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), t.dtype), adapters)
    dx = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    return model, params, adapters, x, tangent, dx


def _forward64(params, adapters, x, tangent, dx, eps):
    """The model in float64 numpy at adapters + eps * tangent and x + eps * dx."""
    p, t = params["params"], tangent["params"]
    xs = np.asarray(x, np.float64) + eps * np.asarray(dx, np.float64)
    outs = []
    for name in ("q", "k"):
        w, dw = adapters["params"][name]["kernel"], t[name]["kernel"]
        a = np.asarray(w.a, np.float64) + eps * np.asarray(dw.a, np.float64)
        b = np.asarray(w.b, np.float64) + eps * np.asarray(dw.b, np.float64)
        kernel = np.asarray(p[name]["kernel"], np.float64) + w.scale * a @ b
        outs.append(xs @ kernel + np.asarray(p[name]["bias"], np.float64))
    return np.tanh(outs[0]) * outs[1]


@pytest.mark.parametrize("mode", ["merged", "auto", "factored"])
def test_forward_mode_autodiff_in_every_mode(mode) -> None:
    """jax.jvp w.r.t. the adapters and the input, and jax.jacfwd w.r.t. the input, in every
    mode (the factored branches have a custom JVP whose transpose is their backward pass):
    equal to the float64 model's central difference (exact up to eps**2 for this smooth
    model) and, for jacfwd, to jax.jacrev."""
    model, params, adapters, x, tangent, dx = _forward_mode_case()
    fn = lora.wrap(model.apply, mode=mode)
    y, dy = jax.jit(lambda ad, x: jax.jvp(lambda a, u: fn(params, a, u), (ad, x), (tangent, dx)))(
        adapters, x
    )
    eps = 1e-5
    fd = (
        _forward64(params, adapters, x, tangent, dx, eps)
        - _forward64(params, adapters, x, tangent, dx, -eps)
    ) / (2 * eps)
    np.testing.assert_allclose(y, _forward64(params, adapters, x, tangent, dx, 0.0), rtol=1e-5)
    np.testing.assert_allclose(dy, fd, rtol=1e-4, atol=1e-5)
    jf = jax.jacfwd(lambda u: fn(params, adapters, u))(x)
    jr = jax.jacrev(lambda u: fn(params, adapters, u))(x)
    np.testing.assert_allclose(jf, jr, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(jf))) > 0.1  # a Jacobian, not zeros


def test_hessian_of_factored_equals_the_closed_form() -> None:
    """jax.hessian of ``sum((x @ (W0 + s a b))**2)`` w.r.t. ``b`` through the factored mode:
    ``2 s^2 (x a)^T (x a)`` on the rank axes times the identity on the output axis, in float64."""
    model = nn.Dense(5, use_bias=False)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 4)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    adapters = lora.init(
        jax.random.key(1), params, lora.LoraConfig(rank=2, alpha=3.0, init="random")
    )
    fn = lora.wrap(model.apply, mode="factored")
    w = adapters["params"]["kernel"]

    def loss(b: jax.Array) -> jax.Array:
        ad = {"params": {"kernel": w.replace(b=b)}}
        return jnp.sum(fn(params, ad, x) ** 2)

    h = jax.hessian(loss)(w.b)
    xa = np.asarray(x, np.float64) @ np.asarray(w.a, np.float64)
    want = 2 * w.scale**2 * np.einsum("rs,mn->rmsn", xa.T @ xa, np.eye(5))
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5)
