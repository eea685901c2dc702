"""`lora.NnxBridge`, `lora.to_adapters`, `lora.merged` on NNX models of our own (no tunix).

References: a float64 numpy forward of the merged MLP, `lora.wrap` called on the split state,
the model with `lora.merge`'d params (merged kernels are formed by other code than the
factored engine the bridge runs in mode "auto"), gradients of that merged model, and a
full-sequence forward against the decoding loop's logits (the KV cache must be written back).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from support.jaxprs import jaxpr_shapes
from support.sampler_loops import nnx_greedy, nnx_model

import flax_lora as lora

MODES = ["auto", "factored", "merged"]


class MLP(nnx.Module):
    """Linear, relu, Linear; counts its calls in a non-param variable (state a call changes)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.label = "mlp"

    def __call__(self, x: jax.Array) -> jax.Array:
        self.calls[...] += 1
        return self.l2(jax.nn.relu(self.l1(x)))


def mlp_bridge(mode: str = "auto", seed: int = 0) -> tuple[MLP, Any, lora.NnxBridge]:
    model = MLP(nnx.Rngs(seed))
    config = lora.LoraConfig(rank=2, alpha=4.0, init="random")
    adapters = lora.init(jax.random.key(seed + 1), nnx.state(model, nnx.Param), config)
    return model, adapters, lora.NnxBridge(model, adapters, mode=mode)  # type: ignore[arg-type]


def x_in() -> jax.Array:
    return jax.random.normal(jax.random.key(7), (5, 4))


def ref64(model: MLP, adapters: Any, x: Any) -> np.ndarray:
    """The merged MLP in float64 numpy: ``W = W0 + scale * a @ b`` per layer."""
    h = np.asarray(x, np.float64)
    for i, layer in enumerate((model.l1, model.l2)):
        w = adapters[f"l{i + 1}"]["kernel"]
        kernel = np.asarray(layer.kernel[...], np.float64) + w.scale * (
            np.asarray(w.a, np.float64) @ np.asarray(w.b, np.float64)
        )
        h = h @ kernel + np.asarray(layer.bias[...], np.float64)
        h = np.maximum(h, 0) if i == 0 else h
    return h


def flat_paths(state: Any) -> set[str]:
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


def test_lora_params_are_exactly_the_adapters() -> None:
    model, adapters, bridge = mlp_bridge()
    lora_state = nnx.state(bridge, nnx.LoRAParam)
    assert flat_paths(lora_state) == {f"adapters/l{i}/kernel/{f}" for i in (1, 2) for f in "ab"}
    for u, v in zip(jax.tree.leaves(lora_state), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # the base params are Params of the bridge, never LoRAParams
    params = nnx.state(bridge, nnx.Param)
    base = {p for p in flat_paths(params) if not p.startswith("adapters/")}
    assert base == {f"model/{p}" for p in flat_paths(nnx.state(model, nnx.Param))}
    assert not flat_paths(nnx.state(bridge.model, nnx.LoRAParam))


@pytest.mark.parametrize("mode", MODES)
def test_outputs_equal_wrap_merged_and_float64(mode: str) -> None:
    model, adapters, bridge = mlp_bridge(mode)
    x = x_in()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    expected64 = ref64(model, adapters, x)
    wrapped = lora.wrap(lambda p, r, x: nnx.merge(graphdef, p, r)(x), mode=mode)(
        params, adapters, rest, x
    )
    got = bridge(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(wrapped), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), expected64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lora.merged(bridge)(x)), expected64, rtol=1e-5, atol=1e-5)
    jitted = nnx.jit(lambda m, x: m(x))(bridge, x)
    np.testing.assert_allclose(np.asarray(jitted), expected64, rtol=1e-5, atol=1e-5)
    base = np.asarray(model.l2(jax.nn.relu(model.l1(x))))
    assert np.abs(base - expected64).max() > 0.1, "the adapters must change the output"


@pytest.mark.parametrize("mode", ["auto", "merged"])
def test_optimizer_wrt_lora_param_trains_only_the_adapters(mode: str) -> None:
    model, adapters, bridge = mlp_bridge(mode)
    x = x_in()
    target = jnp.ones((5, 3))
    base_before = [np.array(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    lr = 0.05
    optimizer = nnx.Optimizer(bridge, optax.sgd(lr), wrt=nnx.LoRAParam)

    def loss_fn(m: lora.NnxBridge) -> jax.Array:
        return jnp.mean((m(x) - target) ** 2)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))

    @nnx.jit
    def step(m: lora.NnxBridge, opt: nnx.Optimizer) -> tuple[jax.Array, Any]:
        loss, grads = grad_fn(m)
        opt.update(m, grads)
        return loss, grads

    # reference gradient: the merged model's, w.r.t. the adapters (merge, not the engine)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def merged_loss(ad: Any, rest: Any) -> jax.Array:
        rest = jax.tree.map(lambda v: v, rest)  # variables of this trace: the call mutates them
        y = nnx.merge(graphdef, lora.merge(params, ad), rest)(x)
        return jnp.mean((y - target) ** 2)

    ref_loss, ref_grads = jax.value_and_grad(merged_loss)(adapters, rest)
    loss0, grads = step(bridge, optimizer)
    assert flat_paths(grads) == flat_paths(nnx.state(bridge, nnx.LoRAParam))
    np.testing.assert_allclose(float(loss0), float(ref_loss), rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
    # one SGD step moved exactly the adapters, by -lr * grad
    for new, old, r in zip(
        jax.tree.leaves(lora.to_adapters(bridge)),
        jax.tree.leaves(adapters),
        jax.tree.leaves(ref_grads),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(new), np.asarray(old - lr * r), rtol=1e-5, atol=1e-6)
    losses = [float(step(bridge, optimizer)[0]) for _ in range(20)]
    assert losses[-1] < 0.5 * float(loss0), (float(loss0), losses[-1])
    base_after = [np.array(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert all(np.array_equal(u, v) for u, v in zip(base_before, base_after, strict=True))
    assert int(model.calls[...]) == 21, "the call counter is written back at every step"


class Wide(nnx.Module):
    """Two Linear layers of kernel shapes no activation of the test has: (6, 10), (10, 7)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(6, 10, rngs=rngs)
        self.l2 = nnx.Linear(10, 7, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("mode", ["factored", "merged"])
def test_a_training_step_forms_no_kernel_sized_array_when_factored(mode: str) -> None:
    model = Wide(nnx.Rngs(0))
    adapters = lora.init(jax.random.key(1), nnx.state(model, nnx.Param), lora.LoraConfig(rank=2))
    bridge = lora.NnxBridge(model, adapters, mode=mode)  # type: ignore[arg-type]
    x = jnp.ones((5, 6))

    def step(m: lora.NnxBridge) -> Any:
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(m)

    graphdef, state = nnx.split(bridge)
    jaxpr = jax.make_jaxpr(lambda s: step(nnx.merge(graphdef, s)))(state).jaxpr
    kernel_sized = {(6, 10), (10, 7)} & set(jaxpr_shapes(jaxpr))
    # no base gradient, no adapted kernel, no kernel-sized adapter gradient: only in "merged"
    assert kernel_sized == (set() if mode == "factored" else {(6, 10), (10, 7)})


def test_dora_magnitudes_are_lora_params_and_train() -> None:
    model = MLP(nnx.Rngs(0))
    config = lora.LoraConfig(rank=2, alpha=4.0, init="random", dora=True)
    adapters = lora.init(jax.random.key(1), nnx.state(model, nnx.Param), config)
    bridge = lora.NnxBridge(model, adapters, mode="factored")
    paths = flat_paths(nnx.state(bridge, nnx.LoRAParam))
    assert paths == {f"adapters/l{i}/kernel/{f}" for i in (1, 2) for f in "abm"}
    x = x_in()
    np.testing.assert_allclose(
        np.asarray(bridge(x)), np.asarray(lora.merged(bridge)(x)), rtol=1e-5, atol=1e-5
    )
    optimizer = nnx.Optimizer(bridge, optax.sgd(0.1), wrt=nnx.LoRAParam)
    loss = lambda m: jnp.sum(m(x) ** 2)
    optimizer.update(bridge, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(bridge))
    after = lora.to_adapters(bridge)
    for name in ("l1", "l2"):
        old, new = adapters[name]["kernel"], after[name]["kernel"]
        assert not np.array_equal(np.asarray(old.m), np.asarray(new.m)), name


def test_to_adapters_and_merged_round_trip() -> None:
    model, adapters, bridge = mlp_bridge()
    x = x_in()
    back = lora.to_adapters(bridge)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(back))
    again = lora.NnxBridge(MLP(nnx.Rngs(0)), back)
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(bridge(x)))

    plain = lora.merged(bridge)
    assert type(plain) is MLP
    assert not flat_paths(nnx.state(plain, nnx.LoRAParam))
    params = nnx.state(model, nnx.Param)
    want = lora.merge(params, adapters)
    for u, v in zip(
        jax.tree.leaves(nnx.state(plain, nnx.Param)), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    unmerged = lora.unmerge(nnx.state(plain, nnx.Param), back)
    for u, v in zip(jax.tree.leaves(unmerged), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
    # the merged model shares no variable with the bridge
    calls = int(model.calls[...])
    plain(x)
    plain.l1.kernel[...] = jnp.zeros_like(plain.l1.kernel[...])
    assert int(model.calls[...]) == calls and int(plain.calls[...]) == calls + 1
    assert np.abs(np.asarray(model.l1.kernel[...])).max() > 0


@pytest.mark.parametrize("mode", ["auto", "factored"])
def test_a_stack_routes_examples_with_lora_ids(mode: str) -> None:
    model = MLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    config = lora.LoraConfig(rank=2, alpha=4.0, init="random")
    sets = [lora.init(jax.random.key(k), params, config) for k in (1, 2)]
    bridge = lora.NnxBridge(model, lora.stack(sets), mode=mode)  # type: ignore[arg-type]
    x = jax.random.normal(jax.random.key(7), (3, 4))
    got = np.asarray(bridge(x, lora_ids=jnp.array([1, -1, 0])))
    base = np.asarray(model.l2(jax.nn.relu(model.l1(x))), np.float64)
    want = np.stack([ref64(model, sets[1], x)[0], base[1], ref64(model, sets[0], x)[2]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"lora\.unstack"):
        lora.merged(bridge)


def test_kv_cache_decoding_writes_the_cache_back() -> None:
    model = nnx_model()
    config = lora.LoraConfig(rank=4, alpha=4.0, init="random")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.zeros((2, 4), jnp.int32)
    adapters = lora.init(
        jax.random.key(3),
        params,
        config,
        probe=lambda p: nnx.merge(graphdef, p, rest)(tokens),
    )
    bridge = lora.NnxBridge(model, adapters)
    plain = lora.merged(bridge)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    steps = 6

    got, got_logits = nnx_greedy(bridge, prompt, steps)
    want, want_logits = nnx_greedy(plain, prompt, steps)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    base, _ = nnx_greedy(nnx_model(), prompt, steps)
    assert not np.array_equal(got, base), "the adapters must change the tokens"
    assert len(np.unique(got)) > 1
    # the cache advanced inside the bridge's base model, one position per call
    for attn in model.attn:
        assert int(attn.cache_index[...]) == prompt.shape[1] + steps - 1
    # each decoded position's logits are the full causal forward's (no cache) at that position
    sequence = jnp.concatenate([jnp.asarray(prompt), jnp.asarray(got[:, :-1])], axis=1)
    full = np.asarray(bridge(sequence))
    np.testing.assert_allclose(got_logits, full, rtol=1e-4, atol=1e-4)


def test_public_attributes_come_from_the_base_model() -> None:
    model = nnx_model()
    tokens = jnp.zeros((1, 3), jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adapters = lora.init(
        jax.random.key(0),
        params,
        lora.LoraConfig(rank=2),
        probe=lambda p: nnx.merge(graphdef, p, rest)(tokens),
    )
    bridge = lora.NnxBridge(model, adapters)
    assert bridge.width == model.width
    assert bridge.init_cache.__self__ is model
    assert bridge.embed is model.embed
    assert not hasattr(bridge, "no_such_thing")
    assert not hasattr(bridge, "_private_thing")
    model._private_thing = 1
    assert not hasattr(bridge, "_private_thing")


def test_bad_input_is_named() -> None:
    model, adapters, _ = mlp_bridge()
    with pytest.raises(TypeError, match=r"must be an nnx\.Module"):
        lora.NnxBridge({"l1": 1}, adapters)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be one of"):
        lora.NnxBridge(model, adapters, mode="fused")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hold no arrays"):
        lora.NnxBridge(model, {})
    other = lora.init(
        jax.random.key(0),
        {"l9": {"kernel": jnp.ones((4, 8))}},
        lora.LoraConfig(rank=2),
    )
    with pytest.raises(ValueError, match="l9/kernel"):
        lora.NnxBridge(model, other)
    bad = jax.tree.map(lambda v: v, adapters)
    bad["l1"]["kernel"] = bad["l1"]["kernel"].replace(a="not an array")
    with pytest.raises(TypeError, match=r"l1.*kernel.*must be an array"):
        lora.NnxBridge(model, bad)

    class WithNnxLora(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.inner = nnx.LoRA(4, 2, 3, rngs=rngs)

    with pytest.raises(ValueError, match=r"already holds nnx.LoRAParam.*inner/lora_a"):
        lora.NnxBridge(WithNnxLora(nnx.Rngs(0)), adapters)
    with pytest.raises(TypeError, match="expected an NnxBridge"):
        lora.to_adapters(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected an NnxBridge"):
        lora.merged(model)  # type: ignore[arg-type]
