"""Per-example routing of a stack that holds DoRA adapters (mixed with plain LoRA).

The reference runs each example alone (a batch of one) through its own merged model,
``apply_fn(lora.merge(params, adapters_k), x[j:j+1])`` (`lora.merge` forms the DoRA kernel
``m * V / ||V||``; tests/test_dora.py checks it against a float64 numpy formula and PEFT), or
through the base for ``-1``: a Python loop sharing no code with the routed path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.routing_models import linen_tiny, nnx_tiny, routed_reference, tiny_tokens
from support.trees import adapter_entries, is_lora

import flax_lora as lora

BATCH = 5  # examples (the tiny models' own batch is 6)
IDS = [0, 2, -1, 1, 0]


def _perturbed(adapters: Any, seed: int) -> Any:
    """Moves each magnitude away from the column norms it is initialised to."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda w: w.replace(m=w.m * (1.0 + 0.3 * jnp.asarray(rng.normal(size=w.m.shape)))),
        adapters,
        is_leaf=is_lora,
    )


def _adapter_sets(apply_fn: Callable[..., Any], params: Any) -> list[Any]:
    """DoRA (rank 2), plain LoRA (rank 4, rsLoRA), DoRA (rank 3): nonzero b, perturbed m."""
    probe = lambda p: apply_fn(p, tiny_tokens(BATCH))
    configs = [
        lora.LoraConfig(rank=2, alpha=4.0, init="random", dora=True),
        lora.LoraConfig(rank=4, alpha=2.0, init="random", rslora=True),
        lora.LoraConfig(rank=3, alpha=6.0, init="random", dora=True),
    ]
    sets = [
        lora.init(jax.random.key(10 + i), params, c, probe=probe) for i, c in enumerate(configs)
    ]
    return [_perturbed(s, 20 + i) if i != 1 else s for i, s in enumerate(sets)]


MODELS = {"linen": linen_tiny, "nnx": nnx_tiny}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("mode", ["auto", "factored", "merged"])
def test_routed_dora_equals_each_example_through_its_own_merged_model(
    family: str, mode: str
) -> None:
    apply_fn, params = MODELS[family]()
    sets = _adapter_sets(apply_fn, params)
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


def test_stack_representation_and_unstack_round_trip() -> None:
    apply_fn, params = linen_tiny()
    sets = _adapter_sets(apply_fn, params)
    stacked = lora.stack(sets)
    for path, w in adapter_entries(sets[0]).items():
        st = adapter_entries(stacked)[path]
        assert st.dora == (True, False, True)
        assert st.m.shape == (3, *w.out_shape)
        np.testing.assert_array_equal(np.asarray(st.m[1]), 0.0)
    for k, s in enumerate(sets):
        back = lora.unstack(stacked, k)
        x = tiny_tokens(BATCH)
        for path, w in adapter_entries(back).items():
            assert (w.m is not None) == (k != 1), path
        np.testing.assert_allclose(
            np.asarray(apply_fn(lora.merge(params, back), x)),
            np.asarray(apply_fn(lora.merge(params, s), x)),
            rtol=2e-5,
            atol=2e-5,
        )


def test_routed_dora_gradients_match_merged_references() -> None:
    """Gradients of the stacked a, b and m against the sum over examples of each example's
    gradient through its own merged model, mapped back into the stack."""
    apply_fn, params = linen_tiny()
    sets = _adapter_sets(apply_fn, params)
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


def test_all_base_ids_and_dora_only_stack() -> None:
    apply_fn, params = linen_tiny()
    sets = _adapter_sets(apply_fn, params)
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


@pytest.mark.parametrize("mode", ["auto", "factored", "merged"])
def test_scan_stacked_dora_routes_per_layer(mode: str) -> None:
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
    sets = [_perturbed(s, 40 + i) if i != 1 else s for i, s in enumerate(sets)]
    layered = adapter_entries(sets[2])["params/layers/fc/kernel"]
    assert layered.layer_axes == 1 and layered.layers == (0, 2)
    want = routed_reference(model.apply, params, sets, x, IDS)
    fn = jax.jit(lora.wrap(model.apply, mode=mode))
    got = fn(params, lora.stack(sets), x, lora_ids=jnp.array(IDS))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    no_m = [jax.tree.map(lambda w: w.replace(m=None), s, is_leaf=is_lora) for s in sets]
    lora_only = routed_reference(model.apply, params, [no_m[0], sets[1], no_m[2]], x, IDS)
    assert np.abs(want - lora_only)[[0, 1, 4]].min() > 1e-4  # m matters


def test_routed_dropout_follows_peft_per_example() -> None:
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
    sets[0] = _perturbed(sets[0], 51)
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
