"""Per-example routing: ``fn(params, stacked, *args, lora_ids=ids)``.

The reference runs each example alone (a batch of one) through its own merged model,
``apply_fn(lora.merge(params, adapters_k), x[j:j+1])``, or through the base for ``-1``: a Python
loop over examples that shares no code with the routed path beyond `lora.merge`, which
tests/test_merge.py checks against numpy. Models and reference: tests/support/routing_models.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.routing_models import BATCH, IDS, linen_tiny, nnx_tiny, routed_reference, tiny_tokens

import flax_lora as lora

MODELS = {"linen": linen_tiny, "nnx": nnx_tiny}


def _adapter_sets(apply_fn: Callable[..., Any], params: Any) -> list[Any]:
    """Three adapter sets of different ranks and scales (one rsLoRA), all nonzero."""
    probe = lambda p: apply_fn(p, tiny_tokens())
    configs = [
        lora.LoraConfig(rank=2, alpha=4.0, init="random"),
        lora.LoraConfig(rank=4, alpha=2.0, init="random", rslora=True),
        lora.LoraConfig(rank=3, alpha=6.0, init="random"),
    ]
    return [
        lora.init(jax.random.key(10 + i), params, c, probe=probe) for i, c in enumerate(configs)
    ]


def _kinds(adapters: Any) -> set[str]:
    return {w.kind for w in jax.tree.leaves(adapters, is_leaf=lambda x: hasattr(x, "kind"))}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("mode", ["auto", "factored", "merged"])
def test_routed_equals_each_example_through_its_own_merged_model(family: str, mode: str) -> None:
    apply_fn, params = MODELS[family]()
    sets = _adapter_sets(apply_fn, params)
    assert _kinds(sets[0]) == {"dense", "embed", "conv"}  # Embed, attention/Dense and Conv
    x = tiny_tokens()
    want = routed_reference(apply_fn, params, sets, x)
    fn = jax.jit(lora.wrap(apply_fn, mode=mode))
    got = fn(params, lora.stack(sets), x, lora_ids=jnp.array(IDS))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # the routing changes the outputs: the adapters are not no-ops
    base = np.asarray(apply_fn(params, x))
    assert np.abs(want - base)[np.array(IDS) >= 0].min() > 1e-3


def test_one_compilation_serves_any_ids() -> None:
    apply_fn, params = linen_tiny()
    traces = []

    def counted(p: Any, t: Any) -> Any:
        traces.append(1)
        return apply_fn(p, t)

    sets = _adapter_sets(apply_fn, params)
    stacked, x = lora.stack(sets), tiny_tokens()
    fn = jax.jit(lora.wrap(counted))
    ys = [fn(params, stacked, x, lora_ids=jnp.array(ids)) for ids in (IDS, [-1] * BATCH, IDS[::-1])]
    assert fn._cache_size() == 1
    n_traces = len(traces)
    fn(params, stacked, x, lora_ids=jnp.array([1] * BATCH))
    assert len(traces) == n_traces  # no retrace for new ids
    # all-base ids give the base model
    np.testing.assert_allclose(np.asarray(ys[1]), np.asarray(apply_fn(params, x)), atol=2e-6)


def test_routed_gradients_reach_only_the_adapters_used() -> None:
    apply_fn, params = linen_tiny()
    sets = _adapter_sets(apply_fn, params)
    stacked, x = lora.stack(sets), tiny_tokens()
    ids = jnp.array([0, 0, -1, 2, 2, -1])  # adapter 1 unused
    loss = lambda st: jnp.sum(lora.wrap(apply_fn)(params, st, x, lora_ids=ids) ** 2)
    grads = jax.jit(jax.grad(loss))(stacked)
    for g in jax.tree.leaves(grads):
        g = np.asarray(g)
        assert np.all(g[1] == 0)
        assert np.abs(g[0]).max() > 0 and np.abs(g[2]).max() > 0
    # adapter 0's gradient equals the gradient of its own examples through a merged model
    a0 = lora.unstack(stacked, 0)
    ref = jax.grad(lambda ad: jnp.sum(apply_fn(lora.merge(params, ad), x[:2]) ** 2))(a0)
    got = lora.unstack(grads, 0)
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_routing_errors_are_clear() -> None:
    apply_fn, params = linen_tiny()
    sets = _adapter_sets(apply_fn, params)
    stacked, x = lora.stack(sets), tiny_tokens()
    fn = lora.wrap(apply_fn)
    with pytest.raises(ValueError, match=r"lora_ids must lie in \[-1, 3\).*\[3\]"):
        fn(params, stacked, x, lora_ids=jnp.array([0, 1, 2, 3, 0, 0]))
    with pytest.raises(ValueError, match="lora_ids has 2 ids but the inputs have a batch"):
        fn(params, stacked, x, lora_ids=jnp.array([0, 1]))
    with pytest.raises(TypeError, match="lora_ids must be integers"):
        fn(params, stacked, x, lora_ids=jnp.zeros(BATCH))
    with pytest.raises(TypeError, match="Expected a stacked adapter tree"):
        fn(params, sets[0], x, lora_ids=jnp.array(IDS))


def test_keyword_inputs_and_batch_statistics_see_the_whole_batch() -> None:
    """Routing in the factored modes runs the model once on the whole batch: a per-example
    keyword input (a mask) stays aligned with its rows, and a layer that mixes examples
    (BatchNorm with batch statistics) sees the whole batch. The reference is built by hand in
    float64 numpy: row j's Dense kernel is W0 + a[ids[j]] @ b[ids[j]] * scale."""

    class Masked(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
            h = nn.Dense(4, name="dense")(x)
            h = nn.BatchNorm(use_running_average=False, use_bias=False, use_scale=False)(h)
            return h if mask is None else h * mask

    model = Masked()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    mask = jnp.asarray([[1.0], [0.0], [2.0], [0.5]])
    variables = model.init(jax.random.key(0), x)
    params = {"params": variables["params"]}
    config = lora.LoraConfig(rank=2, init="random")
    sets = [lora.init(jax.random.key(i), params, config) for i in (1, 2)]
    ids = np.asarray([0, 1, 0, -1])
    w0 = np.asarray(params["params"]["dense"]["kernel"], np.float64)
    bias = np.asarray(params["params"]["dense"]["bias"], np.float64)
    rows = []
    for j, k in enumerate(ids):
        w = w0
        if k >= 0:
            ad = sets[k]["params"]["dense"]["kernel"]
            w = w0 + ad.scale * np.asarray(ad.a, np.float64) @ np.asarray(ad.b, np.float64)
        rows.append(np.asarray(x[j], np.float64) @ w + bias)
    h = np.stack(rows)
    ref = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * np.asarray(mask, np.float64)

    def run(mode: str) -> np.ndarray:
        fn = lora.wrap(
            lambda p, x, mask: model.apply(
                {**variables, **p}, x, mask=mask, mutable=["batch_stats"]
            )[0],
            mode=mode,
        )
        return np.asarray(fn(params, lora.stack(sets), x, mask=mask, lora_ids=jnp.asarray(ids)))

    for mode in ("auto", "factored"):
        np.testing.assert_allclose(run(mode), ref, rtol=1e-4, atol=1e-4)
    # mode "merged" runs each example as a batch of one: a per-example keyword input is refused
    with pytest.raises(ValueError, match="keyword arguments are passed whole"):
        run("merged")


def test_batch_not_on_axis_0_falls_back_in_auto_and_is_refused_in_factored() -> None:
    """A model that moves the batch off axis 0 before an adapted kernel: mode "auto" runs the
    examples one by one instead (still each through its own adapter), "factored" says why."""

    class Swapped(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:  # (B, S, D) -> (S, B, D) -> Dense
            return jnp.swapaxes(nn.Dense(4, name="dense")(jnp.swapaxes(x, 0, 1)), 0, 1)

    model = Swapped()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    sets = [
        lora.init(jax.random.key(i), params, lora.LoraConfig(rank=2, init="random")) for i in (1, 2)
    ]
    ids = [0, 1, -1]
    got = lora.wrap(model.apply)(params, lora.stack(sets), x, lora_ids=jnp.asarray(ids))
    for j, k in enumerate(ids):
        p = params if k < 0 else lora.merge(params, sets[k])
        want = np.asarray(model.apply(p, x[j : j + 1]))[0]
        np.testing.assert_allclose(np.asarray(got)[j], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"'params/dense/kernel'.*not the batch \(3\) on axis 0"):
        lora.wrap(model.apply, mode="factored")(
            params, lora.stack(sets), x, lora_ids=jnp.asarray(ids)
        )
