"""`lora.LinenBridge`: a Linen ``(model, params)`` pair with the adapters inside the params.

A gemma-style sampler loop (greedy decoding, one token per ``apply`` with a Linen KV cache,
``mutable=["cache"]``) on a small Linen decoder of our own must give the merged model's greedy
tokens; each decoded position's logits must be the full causal forward's (so the cache passes
through the bridge and comes back). References: `lora.wrap` on the base params, the model with
`lora.merge`'d params, and that merged model's gradients.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.compare import assert_close
from support.sampler_loops import linen_greedy, linen_model

import flax_lora as lora

MODES = ["auto", "factored", "merged"]
PROMPT = np.array([[1, 2, 3], [4, 5, 6]])


def setup(scale: float = 1.0) -> tuple[nn.Module, Any, Any, Any]:
    """``(model, base_params, adapters, cache)`` with nonzero adapters on every kernel."""
    model, params, cache = linen_model()
    tokens = jnp.zeros((2, 5), jnp.int32)
    adapters = lora.init(
        jax.random.key(5),
        params,
        lora.LoraConfig(rank=4, alpha=4.0, init="random"),
        probe=lambda p: model.apply({"params": p}, tokens),
    )
    return model, params, jax.tree.map(lambda v: scale * v, adapters), cache


@pytest.mark.parametrize("mode", MODES)
def test_apply_equals_wrap_and_the_merged_model(mode: str) -> None:
    model, params, adapters, _ = setup()
    bridge = lora.LinenBridge(model, mode=mode)  # type: ignore[arg-type]
    tokens = jnp.asarray(np.concatenate([PROMPT, PROMPT[:, ::-1]], axis=1))
    got = bridge.apply({"params": {"base": params, "lora": adapters}}, tokens)
    wrapped = lora.wrap(lambda p, t: model.apply({"params": p}, t), mode=mode)(
        params, adapters, tokens
    )
    merged = model.apply({"params": lora.merge(params, adapters)}, tokens)
    base = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(wrapped), rtol=1e-6, atol=1e-6)
    assert_close(got, merged, tol=1e-5)
    assert np.abs(np.asarray(base - merged)).max() > 0.1, "the adapters must change the output"


@pytest.mark.parametrize("mode", MODES)
def test_a_stack_routes_examples_with_lora_ids(mode: str) -> None:
    model, params, first, _ = setup()
    second = jax.tree.map(lambda v: -v, first)
    bridge = lora.LinenBridge(model, mode=mode)  # type: ignore[arg-type]
    x = jnp.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    stacked = {"base": params, "lora": lora.stack([first, second])}
    got = bridge.apply({"params": stacked}, x, lora_ids=jnp.array([1, -1, 0]))
    rows = [
        model.apply({"params": p}, x[i : i + 1])[0]
        for i, p in enumerate([lora.merge(params, second), params, lora.merge(params, first)])
    ]
    assert_close(got, np.stack(rows), tol=1e-5)


def test_gradients_equal_the_merged_model() -> None:
    model, params, adapters, _ = setup()
    bridge = lora.LinenBridge(model)
    tokens = jnp.asarray(PROMPT)

    def loss(ad: Any) -> jax.Array:
        logits = bridge.apply({"params": {"base": params, "lora": ad}}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    def merged_loss(ad: Any) -> jax.Array:
        logits = model.apply({"params": lora.merge(params, ad)}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    got = jax.jit(jax.grad(loss))(adapters)
    want = jax.grad(merged_loss)(adapters)
    assert jax.tree.structure(got) == jax.tree.structure(adapters)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, tol=1e-5)


@pytest.mark.parametrize("mode", ["auto", "factored"])
def test_sampler_loop_tokens_equal_the_merged_model(mode: str) -> None:
    model, params, adapters, cache = setup()
    bridge = lora.LinenBridge(model, mode=mode)  # type: ignore[arg-type]
    steps = 6
    got, got_logits = linen_greedy(bridge, {"base": params, "lora": adapters}, cache, PROMPT, steps)
    # the merged (model, params) pair, as the bridge's docstring spells it
    want, want_logits = linen_greedy(
        bridge.model, lora.merge(params, adapters), cache, PROMPT, steps
    )
    np.testing.assert_array_equal(got, want)
    assert_close(got_logits, want_logits, tol=1e-5)
    base, _ = linen_greedy(model, params, cache, PROMPT, steps)
    assert not np.array_equal(got, base), "the adapters must change the tokens"
    assert len(np.unique(got)) > 1
    # each decoded position's logits are the full causal forward's at that position
    sequence = jnp.concatenate([jnp.asarray(PROMPT), jnp.asarray(got[:, :-1])], axis=1)
    full = model.apply({"params": lora.merge(params, adapters)}, sequence)
    assert_close(got_logits, full, tol=1e-5)


def test_collections_come_back_as_the_base_models() -> None:
    model, params, adapters, cache = setup()
    bridge = lora.LinenBridge(model)
    token = jnp.asarray(PROMPT[:, :1])
    bridged = {"params": {"base": params, "lora": adapters}, "cache": cache}
    _, state = bridge.apply(bridged, token, decode=True, mutable=["cache"])
    _, want = model.apply(
        {"params": lora.merge(params, adapters), "cache": cache},
        token,
        decode=True,
        mutable=["cache"],
    )
    assert set(state) == {"cache"}
    assert jax.tree.structure(state["cache"]) == jax.tree.structure(want["cache"])
    for u, v in zip(jax.tree.leaves(state["cache"]), jax.tree.leaves(want["cache"]), strict=True):
        assert_close(u, v, tol=1e-5)
    # mutable=True: every collection but params may change, and only the cache did
    _, everything = bridge.apply(bridged, token, decode=True, mutable=True)
    assert set(everything) == {"params", "cache"}
    assert jax.tree.structure(everything["params"]) == jax.tree.structure(bridged["params"])
    # without a mutable cache the base model's own error comes through
    with pytest.raises(Exception, match="cache"):
        bridge.apply(bridged, token, decode=True)


class Noisy(nn.Module):
    """Dense, dropout (always on), Dense."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dropout(0.5, deterministic=False)(nn.Dense(8)(x))
        return nn.Dense(3)(h)


class StreamKey(nn.Module):
    """The key a root module's ``make_rng("dropout")`` gives: what the bridge hands the base."""

    def __call__(self) -> jax.Array:
        return self.make_rng("dropout")


def test_rng_streams_reach_the_base_model() -> None:
    model = Noisy()
    x = jax.random.normal(jax.random.key(0), (4, 5))
    key = jax.random.key(1)
    params = model.init({"params": jax.random.key(2), "dropout": key}, x)["params"]
    adapters = lora.init(jax.random.key(3), params, lora.LoraConfig(rank=2, init="random"))
    bridged = {"params": {"base": params, "lora": adapters}}
    got = lora.LinenBridge(model).apply(bridged, x, rngs={"dropout": key})
    derived = StreamKey().apply({}, rngs={"dropout": key})
    want = model.apply({"params": lora.merge(params, adapters)}, x, rngs={"dropout": derived})
    assert_close(got, want, tol=1e-5)
    other = lora.LinenBridge(model).apply(bridged, x, rngs={"dropout": jax.random.key(9)})
    assert np.abs(np.asarray(other - got)).max() > 1e-3, "another key, another dropout mask"
    with pytest.raises(Exception, match="dropout"):
        lora.LinenBridge(model).apply(bridged, x)  # the base model's own error: no stream


def test_bad_params_and_fields_are_named() -> None:
    model, params, adapters, _ = setup()
    tokens = jnp.asarray(PROMPT)
    with pytest.raises(ValueError, match=r"'params' collection must be \{'base'"):
        lora.LinenBridge(model).apply({"params": params}, tokens)
    with pytest.raises(ValueError, match="got \\['base'\\]"):
        lora.LinenBridge(model).apply({"params": {"base": params}}, tokens)
    good = {"params": {"base": params, "lora": adapters}}
    with pytest.raises(ValueError, match="mode must be one of"):
        lora.LinenBridge(model, mode="fused").apply(good, tokens)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be a Linen nn\.Module"):
        lora.LinenBridge(lambda x: x).apply(good, tokens)  # type: ignore[arg-type]
    nope = {"nope": {"kernel": jnp.ones((3, 4))}}
    wrong = lora.init(jax.random.key(0), nope, lora.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="nope/kernel"):
        lora.LinenBridge(model).apply({"params": {"base": params, "lora": wrong}}, tokens)
