"""DoRA across the model kinds: kernels stacked by ``nn.scan`` / ``nnx.scan`` (``dg-linen``,
``dg-nnx``: `support.dg_stack`), a scan of scans (``nested``), a bare ``lax.scan``
(``lax-scan``), and expert kernels in a routing stack (``moe-*``).

References: float64 numpy, `support.refs_models.dg_stack64` (each layer's DoRA kernel
``m * V / ||V||``, ``V = W0[l] + scale * a[l] @ b[l]``, gradients by hand), the DoRA kernels
written out per layer here, and for experts `support.refs.dora_carried64` per carried index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

import flax_lora as lora

from .cases import check
from .compare import assert_close, rel_err
from .dg_stack import IN_AXES as DG_IN_AXES
from .dg_stack import TOL, D, L, X, build, loss, make_adapters
from .internal import select
from .jaxprs import jaxpr_shapes
from .models import NestedStack, fill_abstract
from .moe_adapters import expert_adapters, nest
from .moe_models import build as moe_build
from .moe_models import carried_delta64, merged64, random_factors
from .refs import dora_carried64
from .refs_models import dg_layer64, dg_stack64
from .trees import adapter_entries, is_lora, leaves_by_path, replace_leaves


# -- scan stacks -------------------------------------------------------------------------------
@check
def init_gives_per_layer_magnitudes(model: str, layers: Any) -> None:
    """``lora.init(dora=True)`` on a stacked kernel: ``m`` ``(L, *O)``, each layer's column
    norms of ``W0 + scale * a @ b`` (``W0``'s on layers not picked), so the adapted model is
    the plain LoRA one at init."""
    name = model.split("-")[1]
    apply, params, paths = build(name)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random", dora=True, layers=layers)
    adapters = lora.init(jax.random.key(5), params, config, probe=lambda p: apply(p, X))
    base = leaves_by_path(params)
    for k, p in paths.items():
        w = adapter_entries(adapters)[p]
        assert w.layer_axes == 1 and w.m.shape == (L, *w.out_shape), (p, w.m.shape)
        for i in range(L):
            ref = dg_layer64(np.asarray(base[p]), w, i, DG_IN_AXES[name][k])
            if not ref["picked"]:  # zero factors there: the norms of W0
                assert not np.any(np.asarray(w.a[i])) and not np.any(np.asarray(w.b[i]))
            assert rel_err(np.asarray(w.m[i]).reshape(-1), ref["norm"]) < TOL, (p, i)
    plain = jax.tree.map(lambda w: w.replace(m=None), adapters, is_leaf=is_lora)
    y_dora = lora.wrap(apply, mode="factored")(params, adapters, X)
    y_lora = lora.wrap(apply, mode="factored")(params, plain, X)
    assert rel_err(y_dora, np.asarray(y_lora, np.float64)) < TOL


@check
def outputs_and_gradients_match_numpy(model: str, mode: str, layers: Any) -> None:
    name = model.split("-")[1]
    apply, params, paths = build(name)
    adapters = make_adapters(apply, params, layers, 7)
    ref = dg_stack64(params, adapters, paths, name)
    y_base = np.asarray(jax.jit(apply)(params, X), np.float64)
    assert np.abs(ref["y"] - y_base).max() > 0.05 * np.abs(y_base).max()  # DoRA changes it
    fn = lora.wrap(apply, mode=mode)
    assert rel_err(jax.jit(fn)(params, adapters, X), ref["y"]) < TOL
    grads = adapter_entries(jax.jit(jax.grad(lambda ad: loss(fn, params, ad)))(adapters))
    for p, want in ref["grads"].items():
        for leaf in ("a", "b", "m"):
            got = np.asarray(getattr(grads[p], leaf), np.float64)
            assert got.shape == want[leaf].shape
            assert rel_err(got, want[leaf]) < 1e-4, (p, leaf, rel_err(got, want[leaf]))
            if layers is not None:  # layers not picked get exactly zero gradients
                assert not np.any(got[[i for i in range(L) if i not in layers]]), (p, leaf)


@check
def merge_is_the_per_layer_reference(layers: Any) -> None:
    apply, params, paths = build("linen")
    adapters = make_adapters(apply, params, layers, 11)
    ref = dg_stack64(params, adapters, paths, "linen")
    merged = leaves_by_path(lora.merge(params, adapters))
    for p, want in ref["kernels"].items():
        assert rel_err(merged[p], want) < TOL, p
    assert rel_err(jax.jit(apply)(lora.merge(params, adapters), X), ref["y"]) < TOL
    # W0 cannot be recovered from a DoRA kernel (see the README): unmerge refuses, naming it
    with pytest.raises(ValueError, match=r"params/layers/w\d/kernel.*DoRA"):
        lora.unmerge(lora.merge(params, adapters), adapters)


@check
def factored_dora_scan_forms_no_kernel(model: str) -> None:
    """The factored gradient step computes no array of a stacked kernel's shape, nor more of a
    per-layer kernel's shape than the base model's own backward pass; merged mode does."""
    apply, params, paths = build(model.split("-")[1])
    adapters = make_adapters(apply, params, (0, 2), 13)
    stacked = {tuple(leaves_by_path(params)[p].shape) for p in paths.values()}
    kernel_shapes = stacked | {s[1:] for s in stacked}

    def count(fn: Callable, *args: Any, shapes: set = kernel_shapes) -> int:
        return sum(s in shapes for s in jaxpr_shapes(jax.make_jaxpr(fn)(*args).jaxpr))

    as_fun = jex_core.jaxpr_as_fun(jax.make_jaxpr(apply)(params, X))
    base = lambda p, x: as_fun(*jax.tree.leaves(p), x)[0]
    base_bwd = count(jax.grad(lambda x, p: jnp.sum(jnp.sin(base(p, x)))), X, params)
    fn = lora.wrap(apply, mode="factored")
    grad = jax.grad(lambda ad, p: loss(fn, p, ad))
    assert count(grad, adapters, params, shapes=stacked) == 0
    assert count(grad, adapters, params) <= base_bwd
    merged = jax.grad(lambda ad, p: loss(lora.wrap(apply, mode="merged"), p, ad))
    assert count(merged, adapters, params, shapes=stacked) > 0


@check
def nested_scans_two_layer_axes() -> None:
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
    g = jax.grad(lambda ad: loss(lora.wrap(model.apply, mode="factored"), params, ad))(adapters)
    g_m = adapter_entries(g)[path].m
    assert np.any(np.asarray(g_m[1])) and not np.any(np.asarray(g_m)[[0, 2]])


@check
def auto_merges_one_layer_for_an_unfactorable_use() -> None:
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


# -- expert kernels ----------------------------------------------------------------------------
_merge = jax.jit(lora.merge)


@check
def dora_expert_adapters_in_a_stack(stacked: bool, transposed: bool) -> None:
    case = moe_build("linen", "einsum", stacked=stacked, transposed_out=transposed)
    f, f2 = random_factors(case), random_factors(case, seed=5)
    rng = np.random.default_rng(0)
    mags = {}
    for path, (_, b, _) in f.items():
        nc = len(case.kernels[path].carried)
        mags[path] = rng.uniform(0.5, 1.5, (*b.shape[:nc], *b.shape[nc + 1 :])).astype(np.float32)
    dora = {
        p: w.replace(m=jnp.asarray(mags[p]))
        for p, w in adapter_entries(expert_adapters(case, f)).items()
    }
    st = lora.stack([nest(dora), expert_adapters(case, f2)])
    base = merged64(case, case.params)
    for k in (0, 1, -1):
        got = merged64(case, _merge(case.params, select(st, jnp.int32(k), case.params)))
        for path, ax in case.kernels.items():
            if k == 0:
                d = carried_delta64(*f[path], ax.carried, ax.inputs)
                m64 = mags[path].astype(np.float64)
                ref = dora_carried64(base[path], d, m64, ax.carried, ax.inputs)
            elif k == 1:
                ref = base[path] + carried_delta64(*f2[path], ax.carried, ax.inputs)
            else:
                ref = base[path]
            assert_close(got[path], ref, 2e-6)
