"""DoRA adapters on kernels stacked by ``nn.scan`` / ``nnx.scan`` (a leading layer axis).

The reference is written here in float64 numpy, independent of the code under test: each layer
``l`` runs with the kernel ``W'[l] = m[l] * V / ||V||``, ``V = W0[l] + scale * a[l] @ b[l]``,
the norm taken over the kernel's input axes, one value per output unit (PEFT: per output
feature; a Flax Dense kernel's rows are its inputs), or with ``W0[l]`` on a layer that
``LoraConfig(layers=...)`` did not pick. Gradients are backpropagated by hand through the small
residual block ``x + tanh(x @ W1 + b1) @ W2 + b2`` for a linear loss; with ``G = dL/dW'[l]`` and
the norm detached, ``dL/dm = sum_in(G * V) / ||V||``, ``dL/dV = G * m / ||V||``,
``dL/da = scale * dL/dV @ b.T`` and ``dL/db = scale * a.T @ dL/dV``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core
from support.compare import rel_err
from support.jaxprs import jaxpr_shapes
from support.models import NestedStack, fill_abstract, nnx_layers, nnx_scan
from support.trees import adapter_entries, is_lora, leaves_by_path, replace_leaves

import flax_lora as lora

L, D, B = 3, 6, 5  # layers, model width, batch
HID = (2, 4)  # the Linen block's hidden axes (a DenseGeneral with two output axes)
TOL = 2e-5  # relative, float32 against float64
X = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
C = np.random.default_rng(1).normal(size=(B, D))  # the loss is sum(C * y)


# -- models: x + tanh(x @ W1 + b1) @ W2 + b2 per layer ----------------------------------------
class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        t = jnp.tanh(nn.DenseGeneral(HID, name="w1")(x))  # kernel (D, 2, 4)
        return x + nn.DenseGeneral(D, axis=(-2, -1), name="w2")(t), None  # kernel (2, 4, D)


class LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        return stack(name="layers")(x, None)[0]


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.w1 = nnx.Linear(D, 8, rngs=rngs)
        self.w2 = nnx.Linear(8, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.w2(jnp.tanh(self.w1(x)))


class NnxStack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx_layers(NnxBlock, L, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx_scan(x, self.layers)


# per-layer input axes of each kernel, by hand (Flax's layouts)
IN_AXES = {"linen": {"w1": (0,), "w2": (0, 1)}, "nnx": {"w1": (0,), "w2": (0,)}}


def build(name: str) -> tuple[Callable, Any, dict[str, str]]:
    """``apply``, params and the kernel path of ``w1`` / ``w2``."""
    if name == "linen":
        model = LinenStack()
        params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 3, 0.4)
        return model.apply, params, {k: f"params/layers/{k}/kernel" for k in ("w1", "w2")}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxStack(nnx.Rngs(0))))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    return apply, fill_abstract(state, 3, 0.4), {k: f"layers/{k}/kernel" for k in ("w1", "w2")}


def make_adapters(apply: Callable, params: Any, layers: Any, seed: int) -> Any:
    """DoRA adapters from `lora.init`, then a, b and m replaced by random values on every layer
    (also on the layers not picked: they must still act as the base kernel), m far from the
    column norms."""
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random", dora=True, layers=layers)
    adapters = lora.init(jax.random.key(seed), params, config, probe=lambda p: apply(p, X))
    rng = np.random.default_rng(seed)
    rand = lambda x, lo, hi: jnp.asarray(rng.uniform(lo, hi, size=x.shape), x.dtype)
    return jax.tree.map(
        lambda w: w.replace(a=rand(w.a, -0.5, 0.5), b=rand(w.b, -0.5, 0.5), m=rand(w.m, 0.5, 2.0)),
        adapters,
        is_leaf=is_lora,
    )


# -- the float64 reference ---------------------------------------------------------------------
def _matrix(w: np.ndarray, in_axes: tuple[int, ...]) -> np.ndarray:
    """A per-layer kernel as its ``(prod in, prod out)`` matrix (here the input axes lead)."""
    assert in_axes == tuple(range(len(in_axes)))
    return w.reshape(math.prod(w.shape[: len(in_axes)]), -1)


def layer_ref(w0: np.ndarray, w: Any, layer: int, in_axes: tuple[int, ...]) -> dict[str, Any]:
    """Layer ``layer`` of a stacked DoRA adapter ``w``, as matrices in float64."""
    r = w.a.shape[-1]
    k0 = _matrix(np.asarray(w0[layer], np.float64), in_axes)
    a = np.asarray(w.a[layer], np.float64).reshape(-1, r)
    b = np.asarray(w.b[layer], np.float64).reshape(r, -1)
    m = np.asarray(w.m[layer], np.float64).reshape(-1)
    v = k0 + w.scale * a @ b
    norm = np.sqrt((v**2).sum(axis=0))  # per output unit (column), over the input axes
    picked = w.layers is None or layer in w.layers
    return dict(k=v * (m / norm) if picked else k0, v=v, norm=norm, a=a, b=b, m=m, picked=picked)


def reference(params: Any, adapters: Any, paths: dict[str, str], name: str) -> dict[str, Any]:
    """The output and the gradients of ``sum(C * y)`` w.r.t. a, b, m of both kernels."""
    base = leaves_by_path(params)
    bias = {k: np.asarray(base[p.replace("kernel", "bias")], np.float64) for k, p in paths.items()}
    ad = adapter_entries(adapters)
    refs = {
        k: [layer_ref(np.asarray(base[p]), ad[p], i, IN_AXES[name][k]) for i in range(L)]
        for k, p in paths.items()
    }
    h = np.asarray(X, np.float64)
    acts = []
    for i in range(L):  # forward
        k1, k2 = refs["w1"][i]["k"], refs["w2"][i]["k"]
        t = np.tanh(h @ k1 + bias["w1"][i].reshape(-1))
        acts.append((h, t))
        h = h + t @ k2 + bias["w2"][i].reshape(-1)
    y = h
    dh = C.copy()
    g_kernel: dict[str, list[np.ndarray]] = {"w1": [None] * L, "w2": [None] * L}
    for i in reversed(range(L)):  # backward
        x_in, t = acts[i]
        k1, k2 = refs["w1"][i]["k"], refs["w2"][i]["k"]
        g_kernel["w2"][i] = t.T @ dh
        du = (dh @ k2.T) * (1.0 - t**2)
        g_kernel["w1"][i] = x_in.T @ du
        dh = dh + du @ k1.T
    grads = {}
    for k, p in paths.items():
        w = ad[p]
        ga, gb, gm = [], [], []
        for i in range(L):
            ref, g = refs[k][i], g_kernel[k][i]
            if not ref["picked"]:
                ga.append(np.zeros(w.a.shape[1:]))
                gb.append(np.zeros(w.b.shape[1:]))
                gm.append(np.zeros(w.m.shape[1:]))
                continue
            dv = g * (ref["m"] / ref["norm"])
            ga.append((w.scale * dv @ ref["b"].T).reshape(w.a.shape[1:]))
            gb.append((w.scale * ref["a"].T @ dv).reshape(w.b.shape[1:]))
            gm.append(((g * ref["v"]).sum(axis=0) / ref["norm"]).reshape(w.m.shape[1:]))
        grads[p] = dict(a=np.stack(ga), b=np.stack(gb), m=np.stack(gm))
    kernels = {
        p: np.stack([refs[k][i]["k"].reshape(base[p].shape[1:]) for i in range(L)])
        for k, p in paths.items()
    }
    return dict(y=y, grads=grads, kernels=kernels)


def _loss(fn: Callable, params: Any, adapters: Any) -> jax.Array:
    return jnp.sum(jnp.asarray(C, jnp.float32) * fn(params, adapters, X))


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [None, (0, 2)])
@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_init_gives_per_layer_magnitudes(name: str, layers: Any) -> None:
    """``lora.init(dora=True)`` on a stacked kernel: ``m`` ``(L, *O)``, each layer's column
    norms of ``W0 + scale * a @ b`` (``W0``'s on layers not picked), so the adapted model is
    the plain LoRA one at init."""
    apply, params, paths = build(name)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random", dora=True, layers=layers)
    adapters = lora.init(jax.random.key(5), params, config, probe=lambda p: apply(p, X))
    base = leaves_by_path(params)
    for k, p in paths.items():
        w = adapter_entries(adapters)[p]
        assert w.layer_axes == 1 and w.m.shape == (L, *w.out_shape), (p, w.m.shape)
        for i in range(L):
            ref = layer_ref(np.asarray(base[p]), w, i, IN_AXES[name][k])
            if not ref["picked"]:  # zero factors there: the norms of W0
                assert not np.any(np.asarray(w.a[i])) and not np.any(np.asarray(w.b[i]))
            assert rel_err(np.asarray(w.m[i]).reshape(-1), ref["norm"]) < TOL, (p, i)
    plain = jax.tree.map(lambda w: w.replace(m=None), adapters, is_leaf=is_lora)
    y_dora = lora.wrap(apply, mode="factored")(params, adapters, X)
    y_lora = lora.wrap(apply, mode="factored")(params, plain, X)
    assert rel_err(y_dora, np.asarray(y_lora, np.float64)) < TOL


@pytest.mark.parametrize("layers", [None, (0, 2)])
@pytest.mark.parametrize("mode", ["factored", "auto"])
@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_outputs_and_gradients_match_numpy(name: str, mode: str, layers: Any) -> None:
    apply, params, paths = build(name)
    adapters = make_adapters(apply, params, layers, 7)
    ref = reference(params, adapters, paths, name)
    y_base = np.asarray(jax.jit(apply)(params, X), np.float64)
    assert np.abs(ref["y"] - y_base).max() > 0.05 * np.abs(y_base).max()  # DoRA changes it
    fn = lora.wrap(apply, mode=mode)
    assert rel_err(jax.jit(fn)(params, adapters, X), ref["y"]) < TOL
    grads = adapter_entries(jax.jit(jax.grad(lambda ad: _loss(fn, params, ad)))(adapters))
    for p, want in ref["grads"].items():
        for leaf in ("a", "b", "m"):
            got = np.asarray(getattr(grads[p], leaf), np.float64)
            assert got.shape == want[leaf].shape
            assert rel_err(got, want[leaf]) < 1e-4, (p, leaf, rel_err(got, want[leaf]))
            if layers is not None:  # layers not picked get exactly zero gradients
                assert not np.any(got[[i for i in range(L) if i not in layers]]), (p, leaf)


@pytest.mark.parametrize("layers", [None, (1,)])
def test_merge_is_the_per_layer_reference(layers: Any) -> None:
    apply, params, paths = build("linen")
    adapters = make_adapters(apply, params, layers, 11)
    ref = reference(params, adapters, paths, "linen")
    merged = leaves_by_path(lora.merge(params, adapters))
    for p, want in ref["kernels"].items():
        assert rel_err(merged[p], want) < TOL, p
    assert rel_err(jax.jit(apply)(lora.merge(params, adapters), X), ref["y"]) < TOL
    # W0 cannot be recovered from a DoRA kernel (see the README): unmerge refuses, naming it
    with pytest.raises(ValueError, match=r"params/layers/w\d/kernel.*DoRA"):
        lora.unmerge(lora.merge(params, adapters), adapters)


@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_factored_dora_scan_forms_no_kernel(name: str) -> None:
    """The factored gradient step computes no array of a stacked kernel's shape, nor more of a
    per-layer kernel's shape than the base model's own backward pass; merged mode does."""
    apply, params, paths = build(name)
    adapters = make_adapters(apply, params, (0, 2), 13)
    stacked = {tuple(leaves_by_path(params)[p].shape) for p in paths.values()}
    kernel_shapes = stacked | {s[1:] for s in stacked}

    def count(fn: Callable, *args: Any, shapes: set = kernel_shapes) -> int:
        return sum(s in shapes for s in jaxpr_shapes(jax.make_jaxpr(fn)(*args).jaxpr))

    as_fun = jex_core.jaxpr_as_fun(jax.make_jaxpr(apply)(params, X))
    base = lambda p, x: as_fun(*jax.tree.leaves(p), x)[0]
    base_bwd = count(jax.grad(lambda x, p: jnp.sum(jnp.sin(base(p, x)))), X, params)
    fn = lora.wrap(apply, mode="factored")
    grad = jax.grad(lambda ad, p: _loss(fn, p, ad))
    assert count(grad, adapters, params, shapes=stacked) == 0
    assert count(grad, adapters, params) <= base_bwd
    merged = jax.grad(lambda ad, p: _loss(lora.wrap(apply, mode="merged"), p, ad))
    assert count(merged, adapters, params, shapes=stacked) > 0


def test_nested_scans_two_layer_axes() -> None:
    """A scan of scans: ``m`` ``(L, 2, D)``; every mode runs the model on the numpy DoRA
    kernels (layer 1 of the outer axis picked)."""
    model = NestedStack(width=D, layers=L)
    params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 4, 0.4)
    adapters = make_adapters(model.apply, params, (1,), 17)
    path = "params/outer/inner/fc/kernel"
    w = adapter_entries(adapters)[path]
    assert (w.m.shape, w.layer_axes) == ((L, 2, D), 2)
    w0 = np.asarray(leaves_by_path(params)[path], np.float64)
    ref = w0.copy()
    for j in range(2):
        v = w0[1, j] + w.scale * np.asarray(w.a[1, j], np.float64) @ np.asarray(w.b[1, j])
        ref[1, j] = v * np.asarray(w.m[1, j], np.float64) / np.sqrt((v**2).sum(axis=0))
    y_ref = jax.jit(model.apply)(replace_leaves(params, {path: ref.astype(np.float32)}), X)
    for mode in ("factored", "auto", "merged"):
        fn = jax.jit(lora.wrap(model.apply, mode=mode))
        assert rel_err(fn(params, adapters, X), np.asarray(y_ref, np.float64)) < TOL, mode
    g = jax.grad(lambda ad: _loss(lora.wrap(model.apply, mode="factored"), params, ad))(adapters)
    g_m = adapter_entries(g)[path].m
    assert np.any(np.asarray(g_m[1])) and not np.any(np.asarray(g_m)[[0, 2]])


def test_auto_merges_one_layer_for_an_unfactorable_use() -> None:
    """A use in the scan body with no factored rule (a sum of the kernel) merges that layer's
    DoRA kernel in mode "auto" (``W0`` on the layer not picked) and raises in "factored"."""
    rng = np.random.default_rng(19)
    params = {"w": jnp.asarray(rng.normal(size=(L, D, D)), jnp.float32)}

    def apply(p: Any, x: jax.Array) -> jax.Array:
        body = lambda h, k: (jnp.tanh(h @ k) + jnp.sum(k), None)
        return jax.lax.scan(body, x, p["w"])[0]

    config = lora.LoraConfig(rank=2, init="random", dora=True, targets="w", layers=(0, 2))
    w = lora.init(jax.random.key(0), params, config, probe=lambda p: apply(p, X))["w"]
    w = w.replace(a=w.a + 0.3, b=w.b + 0.2, m=w.m * jnp.linspace(0.5, 2.0, D))
    ref = np.asarray(params["w"], np.float64).copy()
    for i in (0, 2):
        v = ref[i] + w.scale * np.asarray(w.a[i], np.float64) @ np.asarray(w.b[i], np.float64)
        ref[i] = v * np.asarray(w.m[i], np.float64) / np.sqrt((v**2).sum(axis=0))
    h = np.asarray(X, np.float64)
    for i in range(L):
        h = np.tanh(h @ ref[i]) + ref[i].sum()
    assert rel_err(lora.wrap(apply, mode="auto")(params, {"w": w}, X), h) < TOL
    with pytest.raises(ValueError, match="kernel 'w' is used by `reduce_sum`"):
        lora.wrap(apply, mode="factored")(params, {"w": w}, X)
