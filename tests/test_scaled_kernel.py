"""A kernel scaled before its use (``w * w_scale``, as Gemma 3n / 4's per-layer-input projection)
and cast (``convert_element_type``): the probe learns the kernel's axes through the ``mul``, and
``mode="factored"`` factors it as ``x @ (c * W0) + c * scale * (x @ a) @ b``.

Each model is linear in its effective kernel ``W = c * (W0 + scale * a @ b)``: ``y = P @ W`` as
matrices, ``P`` the layer input laid out by numpy (the activation, one-hot rows for a lookup,
im2col patches for a convolution). The float64 reference computes ``y`` and the gradients of
``sum(C * y)`` w.r.t. ``a`` and ``b`` by hand: ``dW = c * P.T @ C``,
``da = scale * dW @ b.T``, ``db = scale * a.T @ dW``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support.compare import rel_err
from support.jaxprs import all_eqns
from support.models import fill_abstract
from support.refs import as_matrix

import flax_lora as lora

CONFIG = lora.LoraConfig(rank=2, alpha=3.0, init="random")
C = 0.37  # the constant scale (a Python float; NumPy's sqrt below)
rng = np.random.default_rng(0)
X = rng.normal(size=(2, 5, 6)).astype(np.float32)
IDS = rng.integers(0, 11, (2, 5)).astype(np.int32)


class ScaledDense(nn.Module):
    """``x @ (kernel * c)``: ``c`` a constant, the scalar parameter ``w_scale`` (``scale_shape``
    ``()``), or one of shape ``(1, 1)`` that JAX broadcasts; or ``c`` a NumPy array of shape
    ``(1,)``, broadcast (``broadcast_in_dim``) before the product."""

    scale_shape: tuple[int, ...] | None = None
    numpy_vector: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.param("kernel", nn.initializers.normal(), (x.shape[-1], 4))
        c: Any = C
        if self.scale_shape is not None:
            c = self.param("w_scale", nn.initializers.ones, self.scale_shape)
        elif self.numpy_vector:
            c = np.array([C], np.float32)
        return x @ (k * c)


class ScaledEinsum(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.param("kernel", nn.initializers.normal(), (x.shape[-1], 2, 3))
        return jnp.einsum("btd,dhk->bthk", x, k * np.sqrt(np.float32(C)) / np.float32(2.0))


class ScaledEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        e = self.param("embedding", nn.initializers.normal(), (11, 6))
        return (e * C)[ids]


class ScaledConv(nn.Module):
    """A 1-D convolution, SAME padding, of ``kernel * c``, the kernel cast to bfloat16 and back."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.param("kernel", nn.initializers.normal(), (3, x.shape[-1], 4))
        w = k.astype(jnp.bfloat16).astype(jnp.float32) * C
        dims = ("NWC", "WIO", "NWC")
        return jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=dims)


class NnxScaledDense(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (6, 4)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ (self.kernel[...] * C)


def _conv_patches(x: np.ndarray, width: int) -> np.ndarray:
    """im2col of a SAME-padded 1-D convolution: ``(B*T, width*I)``, kernel rows ``(k, i)``."""
    pad = (width - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, width - 1 - pad), (0, 0)))
    t = x.shape[1]
    return np.stack([xp[:, k : k + t] for k in range(width)], axis=2).reshape(x.shape[0] * t, -1)


# name -> (model, its input, the float64 patches P, the scale c, the kernel's input axes)
CASES: dict[str, tuple[nn.Module, np.ndarray, np.ndarray, float, tuple[int, ...]]] = {
    "dense": (ScaledDense(), X, X.reshape(-1, 6).astype(np.float64), C, (0,)),
    "dense_scalar_param": (ScaledDense(()), X, X.reshape(-1, 6).astype(np.float64), None, (0,)),
    "dense_11_param": (ScaledDense((1, 1)), X, X.reshape(-1, 6).astype(np.float64), None, (0,)),
    "dense_numpy_vector": (
        ScaledDense(numpy_vector=True),
        X,
        X.reshape(-1, 6).astype(np.float64),
        C,
        (0,),
    ),
    "einsum": (
        ScaledEinsum(),
        X,
        X.reshape(-1, 6).astype(np.float64),
        float(np.float64(np.sqrt(np.float32(C))) / 2.0),
        (0,),
    ),
    "embed": (ScaledEmbed(), IDS, np.eye(11)[IDS.reshape(-1)], C, (0,)),
    "conv": (ScaledConv(), X, _conv_patches(X.astype(np.float64), 3), C, (0, 1)),
}


def _setup(model: nn.Module, x: np.ndarray) -> tuple[Callable, Any, Any]:
    params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), x), 1, 0.5)
    if "w_scale" in params["params"]:
        params["params"]["w_scale"] = np.full(params["params"]["w_scale"].shape, C, np.float32)
    probe = lambda p: model.apply(p, x)
    shapes = jax.eval_shape(lambda p: lora.init(jax.random.key(2), p, CONFIG, probe), params)
    return model.apply, params, fill_abstract(shapes, 2, 0.3)


def _reference(params: Any, w: lora.LoraWeights, pmat: np.ndarray, c: float, cot: np.ndarray):
    """``y = P @ (c * (W0 + s a @ b))`` and the gradients of ``sum(cot * y)`` in float64 (the
    conv model casts ``W0`` to bfloat16 first: so does the reference)."""
    leaves = params["params"]
    k0 = np.asarray(leaves["kernel"] if "kernel" in leaves else leaves["embedding"])
    if w.kind == "conv":
        k0 = np.asarray(jnp.asarray(k0).astype(jnp.bfloat16).astype(jnp.float32))
    km = as_matrix(k0.astype(np.float64), tuple(w.in_axes))
    r = w.a.shape[-1]
    a = np.asarray(w.a, np.float64).reshape(-1, r)
    b = np.asarray(w.b, np.float64).reshape(r, -1)
    y = pmat @ (c * (km + w.scale * a @ b))
    dw = c * pmat.T @ cot
    return y, w.scale * dw @ b.T, w.scale * a.T @ dw


@pytest.mark.parametrize("name", sorted(CASES))
def test_scaled_kernel(name: str) -> None:
    """Probe axes; factored and merged forwards and gradients == the float64 reference."""
    model, x, pmat, c, in_axes = CASES[name]
    c = C if c is None else c
    apply, params, adapters = _setup(model, x)
    leaf = "kernel" if "kernel" in adapters["params"] else "embedding"
    w = adapters["params"][leaf]
    assert tuple(w.in_axes) == in_axes  # learned through the `mul` (and the casts)
    assert w.kind == {"embed": "embed", "conv": "conv"}.get(name, "dense")
    cot = np.random.default_rng(5).normal(size=(pmat.shape[0], w.b[0].size))
    y_ref, da_ref, db_ref = _reference(params, w, pmat, c, cot)
    for mode in ("factored", "merged"):
        # merged conv: the adapted kernel goes through the model's bfloat16 cast
        tol = 2e-2 if (name, mode) == ("conv", "merged") else 2e-5
        fn = lora.wrap(apply, mode=mode)
        assert rel_err(fn(params, adapters, x).reshape(y_ref.shape), y_ref) < tol, mode
        loss = lambda ad, fn=fn: jnp.sum(fn(params, ad, x).reshape(cot.shape) * cot)
        g = jax.grad(loss)(adapters)["params"][leaf]
        assert rel_err(g.a.reshape(da_ref.shape), da_ref) < tol, mode
        assert rel_err(g.b.reshape(db_ref.shape), db_ref) < tol, mode


def test_nnx_scaled_linear() -> None:
    """An NNX module scaling its kernel: factored == merged == the float64 reference."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxScaledDense(nnx.Rngs(0))))
    state = fill_abstract(state, 1, 0.5)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    adapters = lora.init(jax.random.key(1), state, CONFIG, probe=lambda s: apply(s, X))
    w = adapters["kernel"]
    k0 = np.asarray(state["kernel"][...], np.float64)
    a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
    y_ref = X.astype(np.float64) @ (C * (k0 + w.scale * a @ b))
    for mode in ("factored", "merged"):
        assert rel_err(lora.wrap(apply, mode=mode)(state, adapters, X), y_ref) < 2e-5, mode


class MaskedDense(nn.Module):
    """``x @ (kernel * mask)``: a multiplier of the kernel's shape, not a scalar."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.param("kernel", nn.initializers.normal(), (x.shape[-1], 4))
        mask = np.tril(np.ones((x.shape[-1], 4), np.float32))
        return x @ (k * mask)


def test_non_scalar_multiplier_is_merged_or_refused() -> None:
    """A kernel times an array is not factored: mode="factored" says so naming the kernel and
    ``mul``; mode="auto" merges that kernel (== mode="merged"). The probe still learns its
    axes."""
    apply, params, adapters = _setup(MaskedDense(), X)
    assert adapters["params"]["kernel"].in_axes == (0,)
    with pytest.raises(ValueError, match=r"'params/kernel' is used by `mul`.*not by a scalar"):
        lora.wrap(apply, mode="factored")(params, adapters, X)
    auto = lora.wrap(apply, mode="auto")(params, adapters, X)
    merged = lora.wrap(apply, mode="merged")(params, adapters, X)
    assert rel_err(auto, merged) < 1e-6


def test_factored_gradient_forms_no_kernel() -> None:
    """The factored gradient w.r.t. the adapters of a scaled Dense computes one kernel-sized
    array, the model's own ``c * W0``: no adapted kernel, no kernel-sized gradient."""
    apply, params, adapters = _setup(ScaledDense(), X)
    fn = lora.wrap(apply, mode="factored")
    grad = jax.grad(lambda ad: jnp.sum(fn(params, ad, X)))
    eqns = all_eqns(jax.make_jaxpr(grad)(adapters).jaxpr)
    sized = [e.primitive.name for e in eqns for v in e.outvars if tuple(v.aval.shape) == (6, 4)]
    assert sized == ["mul"], sized


class ScaledLayer(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array, _: None) -> tuple[jax.Array, None]:
        k = self.param("kernel", nn.initializers.normal(), (h.shape[-1], h.shape[-1]))
        return jnp.tanh(h @ (k * C)), None


class ScaledStack(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        scan = nn.scan(
            ScaledLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return scan(name="layers")(h, None)[0]


def test_layered_scaled_kernel() -> None:
    """A scaled kernel inside ``nn.scan``: the probe finds the layer axis through the ``mul``;
    factored == the float64 reference, layer by layer; its gradients == merged's."""
    model = ScaledStack()
    params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 1, 0.5)
    probe = lambda p: model.apply(p, X)
    shapes = jax.eval_shape(lambda p: lora.init(jax.random.key(2), p, CONFIG, probe), params)
    adapters = fill_abstract(shapes, 2, 0.3)
    w = adapters["params"]["layers"]["kernel"]
    assert (w.layer_axes, w.in_axes) == (1, (1,))
    k0 = np.asarray(params["params"]["layers"]["kernel"], np.float64)
    h = X.astype(np.float64)
    for layer in range(3):
        a, b = np.asarray(w.a[layer], np.float64), np.asarray(w.b[layer], np.float64)
        h = np.tanh(h @ (C * (k0[layer] + w.scale * a @ b)))
    fns = {m: lora.wrap(model.apply, mode=m) for m in ("factored", "merged")}
    assert rel_err(fns["factored"](params, adapters, X), h) < 2e-5
    grads = {
        m: jax.grad(lambda ad, f=f: jnp.sum(f(params, ad, X) ** 2))(adapters)
        for m, f in fns.items()
    }
    g, ref = (
        grads["factored"]["params"]["layers"]["kernel"],
        grads["merged"]["params"]["layers"]["kernel"],
    )
    assert rel_err(g.a, ref.a) < 2e-5 and rel_err(g.b, ref.b) < 2e-5


def test_routed_scaled_kernel() -> None:
    """``lora_ids`` routing through a scaled kernel: example ``j`` runs with adapter
    ``ids[j]`` (``-1``: the base), as the merged model of that adapter does."""
    apply, params, first = _setup(ScaledDense(), X)
    second = jax.tree.map(lambda x: -x, first)
    ids = np.array([1, -1], np.int32)
    got = lora.wrap(apply, mode="factored")(params, lora.stack([first, second]), X, lora_ids=ids)
    want = [apply(lora.merge(params, second), X[:1]), apply(params, X[1:])]
    assert rel_err(got, np.concatenate(want)) < 2e-5


def test_dora_scaled_kernel_is_merged() -> None:
    """DoRA's normalised kernel does not scale with ``W0``: mode="factored" refuses the scaled
    DoRA kernel naming ``mul``; mode="auto" merges it, equal to mode="merged"."""
    model = ScaledDense()
    params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 1, 0.5)
    config = lora.LoraConfig(rank=2, init="random", dora=True)
    adapters = lora.init(jax.random.key(2), params, config, lambda p: model.apply(p, X))
    with pytest.raises(ValueError, match=r"'params/kernel' is used by `mul`.*DoRA"):
        lora.wrap(model.apply, mode="factored")(params, adapters, X)
    auto = lora.wrap(model.apply, mode="auto")(params, adapters, X)
    assert rel_err(auto, lora.wrap(model.apply, mode="merged")(params, adapters, X)) < 1e-6


def test_quantized_scaled_kernel() -> None:
    """QLoRA: a quantized kernel scaled before its use is dequantized at the ``mul`` and
    factored after it, equal to the merged model on the dequantized base; so are the
    gradients."""
    apply, params, adapters = _setup(ScaledDense(), X)
    qparams = lora.quantize(params, dtype="int8")
    base = lora.dequantize(qparams)
    for mode in ("factored", "auto"):
        fn = lora.wrap(apply, mode=mode)
        got = fn(qparams, adapters, X)
        assert rel_err(got, apply(lora.merge(base, adapters), X)) < 1e-5
        g = jax.grad(lambda ad, fn=fn: jnp.sum(fn(qparams, ad, X) ** 2))(adapters)
        ref = jax.grad(lambda ad: jnp.sum(apply(lora.merge(base, ad), X) ** 2))(adapters)
        w, r = g["params"]["kernel"], ref["params"]["kernel"]
        assert rel_err(w.a, r.a) < 1e-5 and rel_err(w.b, r.b) < 1e-5
