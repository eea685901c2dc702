"""Per-example routing (`lora.stack` + ``lora_ids``) across the model kinds: attention + MLP blocks
stacked by ``nn.scan`` / ``nnx.scan`` (``scan-*``), a scan of scans (``nested``), the tiny
Embed / attention / Conv / Dense models with DoRA adapters mixed with plain LoRA
(``tiny-*``), a scan stack holding DoRA adapters on some layers (``routed-scan``), and one Dense
layer under LoRA dropout (``dense``).

References are independent of the routed code: each example run alone (a batch of one) through
the un-routed model with its own adapter merged in, ``apply(lora.merge(params, adapters_k),
x[j:j+1])`` (or the base params for ``-1``; `lora.merge` forms the DoRA kernel ``m * V /
||V||``, checked against float64 numpy and PEFT in tests/test_dora.py), a float64 numpy forward
of the scan of scans (`support.refs_models.nested64`), gradients of each example through its
own merged model, and PEFT's DoRA dropout form in float64 numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import flax_lora as lora

from .cases import check
from .compare import assert_close
from .jaxprs import jaxpr_shapes
from .models import NestedStack, fill_abstract
from .refs_models import nested64
from .routing_models import (
    KERNELS,
    dora_sets,
    linen_tiny,
    nnx_tiny,
    perturbed,
    routed_reference,
    scan_model_and_sets,
    scan_sets,
    tiny_tokens,
)
from .scan_models import D, L, X
from .trees import adapter_entries, is_lora

IDS = [0, 2, -1, 1, 0]
BATCH = 5  # examples (the tiny models' own batch is 6)
MODELS = {"linen": linen_tiny, "nnx": nnx_tiny}


def _reference(apply: Callable, params: Any, sets: list[Any], x: Any, ids: list[int]) -> Any:
    single = jax.jit(lambda p, xi: apply(p, xi))
    rows = [
        single(params if k < 0 else lora.merge(params, sets[k]), x[j : j + 1])[0]
        for j, k in enumerate(ids)
    ]
    return np.stack([np.asarray(r) for r in rows])


def _changed(want: np.ndarray, base: Any) -> float:
    """The smallest, over the examples routed to an adapter, of how far it moves the output."""
    diff = np.abs(np.asarray(want) - np.asarray(base)).reshape(len(IDS), -1).max(axis=1)
    return float(diff[np.array(IDS) >= 0].min())


@check
def routed_scan_equals_each_example_through_its_own_merged_model(model: str, mode: str) -> None:
    """Mode "factored" raises rather than fall back, so there the routing runs inside the scan:
    each layer's uses get per-example factors, no example runs alone."""
    apply, params, sets = scan_model_and_sets(model.split("-", 1)[1])  # scan-<name>
    want = _reference(apply, params, sets, X, IDS)
    fn = jax.jit(lora.wrap(apply, mode=mode))
    stacked = lora.stack(sets)
    got = fn(params, stacked, X, lora_ids=jnp.array(IDS))
    assert_close(got, want, 1e-5)
    base = np.asarray(jax.jit(apply)(params, X))
    assert _changed(want, base) > 1e-3  # the adapters matter
    # other ids, same compilation; all -1 is the base model
    assert_close(fn(params, stacked, X, lora_ids=jnp.array([-1] * len(IDS))), base, 1e-5)
    assert fn._cache_size() == 1


@check
def routed_factored_scan_forms_no_per_example_kernel() -> None:
    """Inside the scan only the rank-R branch is per example: no array of a layer kernel's shape
    with an example axis (forward or backward), which mode "merged" does form."""
    apply, params, sets = scan_model_and_sets("linen")
    stacked = lora.stack(sets)
    per_example = set()
    for w in adapter_entries(stacked).values():
        per_example |= {(len(IDS), *w.kernel_shape), (len(IDS), *w.kernel_shape[w.layer_axes :])}
    ids = jnp.array(IDS)

    def count(mode: str, grad: bool) -> int:
        fn = lambda st: jnp.sum(lora.wrap(apply, mode=mode)(params, st, X, lora_ids=ids))
        shapes = jaxpr_shapes(jax.make_jaxpr(jax.grad(fn) if grad else fn)(stacked).jaxpr)
        return sum(s in per_example for s in shapes)

    assert count("factored", False) == 0 and count("factored", True) == 0
    assert count("merged", False) > 0  # the check sees per-example kernels where they exist


@check
def routed_nested_scans_equal_a_float64_numpy_forward(mode: str) -> None:
    """A scan of scans (kernels ``(L, 2, D, D)``, two layer axes), set 1 on outer layers 0, 2."""
    model = NestedStack(width=D, layers=L)
    params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 4, 0.4)
    sets = scan_sets(model.apply, params, X, KERNELS)
    w = adapter_entries(sets[1])["params/outer/inner/fc/kernel"]
    assert (w.layer_axes, w.layers) == (2, (0, 2))
    want = nested64(params, sets, X, IDS)
    fn = jax.jit(lora.wrap(model.apply, mode=mode))
    got = fn(params, lora.stack(sets), X, lora_ids=jnp.array(IDS))
    assert_close(got, want, 1e-5)
    base = nested64(params, sets, X, [-1] * len(IDS))
    assert _changed(want, base) > 1e-3


# -- gradients -------------------------------------------------------------------------------
@check
def routed_scan_gradients_reach_only_the_adapters_used(mode: str) -> None:
    apply, params, sets = scan_model_and_sets("linen")
    stacked = lora.stack(sets)
    ids = [1, 0, -1, 1, 0]  # adapter 2 unused
    loss = lambda st: jnp.sum(lora.wrap(apply, mode=mode)(params, st, X, lora_ids=jnp.array(ids)))
    grads = jax.jit(jax.grad(loss))(stacked)
    for path, g in adapter_entries(grads).items():
        ga, gb = np.asarray(g.a), np.asarray(g.b)
        assert not np.any(ga[2]) and not np.any(gb[2]), path
        assert np.abs(ga[0]).max() > 0 and np.abs(gb[1]).max() > 0, path
        if g.layer_axes:  # layer 1 is not adapted by set 1: no gradient there
            assert not np.any(ga[1, 1]) and not np.any(gb[1, 1]), path
    merged_loss = lambda ad, xs: jnp.sum(apply(lora.merge(params, ad), xs))
    for k in (0, 1):
        mine = np.array([i for i, j in enumerate(ids) if j == k])
        ref = jax.grad(merged_loss)(lora.unstack(stacked, k), X[mine])
        got = lora.unstack(grads, k)
        for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
            assert_close(g, r, 5e-5)


@check
def routed_dora_equals_each_example_through_its_own_merged_model(model: str, mode: str) -> None:
    apply_fn, params = MODELS[model.split("-", 1)[1]]()  # tiny-<family>
    sets = dora_sets(apply_fn, params, BATCH)
    kinds = {w.kind for w in jax.tree.leaves(sets[0], is_leaf=is_lora)}
    assert kinds == {"dense", "embed", "conv"}
    x = tiny_tokens(BATCH)
    want = routed_reference(apply_fn, params, sets, x, IDS)
    stacked = lora.stack(sets)
    fn = jax.jit(lora.wrap(apply_fn, mode=mode))
    got = fn(params, stacked, x, lora_ids=jnp.array(IDS))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # DoRA changes the outputs beyond its LoRA part: m matters
    no_m = [
        jax.tree.map(lambda w: w.replace(m=None), s, is_leaf=is_lora) if i != 1 else s
        for i, s in enumerate(sets)
    ]
    lora_only = routed_reference(apply_fn, params, no_m, x, IDS)
    assert np.abs(want - lora_only)[[0, 1, 4]].min() > 1e-3


@check
def routed_dora_gradients_match_merged_references() -> None:
    """Gradients of the stacked a, b and m against the sum over examples of each example's
    gradient through its own merged model, mapped back into the stack."""
    apply_fn, params = linen_tiny()
    sets = dora_sets(apply_fn, params, BATCH)
    stacked, x = lora.stack(sets), tiny_tokens(BATCH)
    ids = jnp.array(IDS)
    loss = lambda st: jnp.sum(jnp.sin(lora.wrap(apply_fn)(params, st, x, lora_ids=ids)))
    grads = jax.jit(jax.grad(loss))(stacked)
    got = adapter_entries(grads)
    for k, s in enumerate(sets):
        rows = np.array([j for j, i in enumerate(IDS) if i == k])
        ref = jax.grad(
            lambda ad, rows=rows: jnp.sum(jnp.sin(apply_fn(lora.merge(params, ad), x[rows])))
        )(s)
        for path, r in adapter_entries(ref).items():
            g, w = got[path], adapter_entries(s)[path]
            rank = w.rank
            # stacked b holds scale * b: d/d(b_stacked) = d/d(b) / scale
            np.testing.assert_allclose(
                np.asarray(g.a[k, ..., :rank]), np.asarray(r.a), rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(
                np.asarray(g.b[k, :rank]) * w.scale, np.asarray(r.b), rtol=1e-4, atol=1e-5
            )
            np.testing.assert_array_equal(np.asarray(g.a[k, ..., rank:]), 0.0)
            if w.m is not None:
                np.testing.assert_allclose(
                    np.asarray(g.m[k]), np.asarray(r.m), rtol=1e-4, atol=1e-5
                )
            else:  # a plain adapter's m slot is not read
                np.testing.assert_array_equal(np.asarray(g.m[k]), 0.0)


@check
def all_base_ids_and_dora_only_stack() -> None:
    apply_fn, params = linen_tiny()
    sets = dora_sets(apply_fn, params, BATCH)
    x = tiny_tokens(BATCH)
    fn = jax.jit(lora.wrap(apply_fn, mode="factored"))
    stacked = lora.stack([sets[2], sets[0]])
    got = fn(params, stacked, x, lora_ids=jnp.array([-1] * BATCH))
    np.testing.assert_allclose(np.asarray(got), np.asarray(apply_fn(params, x)), atol=2e-6)
    got = fn(params, stacked, x, lora_ids=jnp.array([1, 0, 0, 1, -1]))
    want = [
        apply_fn(lora.merge(params, sets[k]) if k >= 0 else params, x[j : j + 1])[0]
        for j, k in enumerate([0, 2, 2, 0, -1])
    ]
    np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=2e-5, atol=2e-5)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return h + nn.tanh(nn.Dense(8, name="fc")(h)), None


class _Stacked(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = scan(name="layers")(nn.Dense(8, name="inp")(x), None)
        return nn.Dense(2, name="head")(h)


@check
def scan_stacked_dora_routes_per_layer(mode: str) -> None:
    model = _Stacked()
    x = jax.random.normal(jax.random.key(3), (BATCH, 4, 8))
    params = model.init(jax.random.key(0), x)
    probe = lambda p: model.apply(p, x)
    configs = [
        lora.LoraConfig(rank=2, alpha=4.0, init="random", dora=True),
        lora.LoraConfig(rank=3, alpha=3.0, init="random"),
        lora.LoraConfig(rank=3, alpha=6.0, init="random", dora=True, layers=[0, 2]),
    ]
    configs = [dataclasses.replace(c, targets=[r".*/fc/kernel"]) for c in configs]
    sets = [
        lora.init(jax.random.key(30 + i), params, c, probe=probe) for i, c in enumerate(configs)
    ]
    sets = [perturbed(s, 40 + i) if i != 1 else s for i, s in enumerate(sets)]
    layered = adapter_entries(sets[2])["params/layers/fc/kernel"]
    assert layered.layer_axes == 1 and layered.layers == (0, 2)
    want = routed_reference(model.apply, params, sets, x, IDS)
    fn = jax.jit(lora.wrap(model.apply, mode=mode))
    got = fn(params, lora.stack(sets), x, lora_ids=jnp.array(IDS))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    no_m = [jax.tree.map(lambda w: w.replace(m=None), s, is_leaf=is_lora) for s in sets]
    lora_only = routed_reference(model.apply, params, [no_m[0], sets[1], no_m[2]], x, IDS)
    assert np.abs(want - lora_only)[[0, 1, 4]].min() > 1e-4  # m matters


@check
def routed_dropout_follows_peft_per_example() -> None:
    """With LoRA dropout each routed example gets PEFT's DoRA form
    ``x @ W0 + (g - 1) * (drop(x) @ W0) + g * low(drop(x))`` (``g = 1`` for a plain adapter):
    mean the undropped output, variance per output unit ``p / (1 - p) * sum_i x_i**2 C_ij**2``
    with ``C = (g - 1) W0 + g * scale * a @ b`` (float64 numpy reference from the factors)."""
    rate, n, d_in, d_out = 0.3, 6000, 12, 3
    model = nn.Dense(d_out, use_bias=False)
    row = np.random.default_rng(50).normal(size=(1, d_in)).astype(np.float32)
    params = model.init(jax.random.key(0), row)
    sets = [
        lora.init(jax.random.key(1 + i), params, c)
        for i, c in enumerate(
            [
                lora.LoraConfig(rank=4, alpha=8.0, init="random", dropout=rate, dora=True),
                lora.LoraConfig(rank=2, alpha=3.0, init="random", dropout=rate),
            ]
        )
    ]
    sets[0] = perturbed(sets[0], 51)
    ids = np.repeat([0, 1, -1], n)
    x = jnp.tile(row, (3 * n, 1))
    fn = jax.jit(lora.wrap(model.apply, mode="factored"))
    y = np.asarray(
        fn(params, lora.stack(sets), x, lora_ids=jnp.array(ids), lora_rng=jax.random.key(5)),
        np.float64,
    )
    w0 = np.asarray(params["params"]["kernel"], np.float64)
    xr = row[0].astype(np.float64)
    for k, s in enumerate(sets):
        w = adapter_entries(s)["params/kernel"]
        low = w.scale * np.asarray(w.a, np.float64) @ np.asarray(w.b, np.float64)
        v = w0 + low
        g = (
            np.ones(d_out)
            if w.m is None
            else np.asarray(w.m, np.float64) / np.linalg.norm(v, axis=0)
        )
        c = (g - 1.0)[None, :] * w0 + g[None, :] * low
        mean = xr @ (g[None, :] * v)
        var = rate / (1.0 - rate) * (xr**2) @ (c**2)
        yk = y[ids == k]
        assert np.all(np.abs(yk.mean(0) - mean) < 5 * np.sqrt(var / n))
        np.testing.assert_allclose(yk.var(0), var, rtol=0.1)
    np.testing.assert_allclose(y[ids == -1], np.tile(xr @ w0, (n, 1)), rtol=1e-5, atol=1e-5)
