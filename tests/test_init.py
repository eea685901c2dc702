"""`lora.init`: which kernels, which input axes, which initial values, PiSSA/OLoRA, bad input."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support.internal import Use, layered_kernels
from support.models import build, fill, mlp
from support.refs import as_matrix, ref_delta64
from support.trees import adapter_entries, leaves_by_path, replace_leaves

import flax_lora as lora


# ---------------------------------------------------------------------------------------------
# the probe finds Flax's input axes for every layer type
# ---------------------------------------------------------------------------------------------
def test_probe_finds_input_axes(layer_name: str) -> None:
    m = build(layer_name)
    adapters = lora.init(jax.random.key(0), m.params, lora.LoraConfig(rank=2), probe=m.probe)
    entries = adapter_entries(adapters)
    assert set(entries) == set(m.kernels)
    kernels = leaves_by_path(m.params)
    for path, (in_axes, kind) in m.kernels.items():
        w = entries[path]
        shape = kernels[path].shape
        out_axes = tuple(i for i in range(len(shape)) if i not in in_axes)
        assert tuple(w.in_axes) == in_axes, path
        assert w.kind == kind, path
        assert w.a.shape == (*(shape[i] for i in in_axes), 2), path
        assert w.b.shape == (2, *(shape[i] for i in out_axes)), path


def test_two_d_kernels_need_no_probe() -> None:
    _, variables, _ = mlp()
    adapters = lora.init(jax.random.key(0), variables, lora.LoraConfig(rank=3))
    entries = adapter_entries(adapters)
    assert set(entries) == {f"params/{n}/kernel" for n in ("fc0", "fc1", "head")}
    for path, w in entries.items():
        w0 = leaves_by_path(variables)[path]
        assert w.a.shape == (w0.shape[0], 3) and w.b.shape == (3, w0.shape[1])


def test_leaves_are_exactly_the_factors() -> None:
    _, variables, _ = mlp()
    config = lora.LoraConfig(rank=2, alpha=5.0, targets=r".*fc.*/kernel")
    adapters = lora.init(jax.random.key(0), variables, config)
    leaves = jax.tree.leaves(adapters)
    entries = adapter_entries(adapters)
    assert len(leaves) == 2 * len(entries) == 4
    expected = sorted(x.shape for w in entries.values() for x in (w.a, w.b))
    assert sorted(x.shape for x in leaves) == expected
    base_ids = {id(x) for x in jax.tree.leaves(variables)}
    assert not base_ids & {id(x) for x in leaves}
    assert all(x.dtype == jnp.float32 for x in leaves)


def test_targets_exclude_and_layers() -> None:
    _, variables, _ = mlp()
    pick = lambda **kw: set(
        adapter_entries(lora.init(jax.random.key(0), variables, lora.LoraConfig(**kw)))
    )
    assert pick(targets=r".*/fc\d/kernel") == {"params/fc0/kernel", "params/fc1/kernel"}
    assert pick(exclude=r".*head.*") == {"params/fc0/kernel", "params/fc1/kernel"}
    assert pick(targets=[r".*fc0.*", r".*head/kernel"]) == {
        "params/fc0/kernel",
        "params/head/kernel",
    }
    # fullmatch, not search: "fc" alone matches nothing
    with pytest.raises(ValueError, match="params/fc0/kernel"):
        pick(targets="fc")
    assert pick(layers=1) == {"params/fc1/kernel"}


class Layers(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_nnx_list_layers_paths_and_layer_selection() -> None:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Layers(nnx.Rngs(0))))
    state = fill(state)
    adapters = lora.init(jax.random.key(0), state, lora.LoraConfig(rank=1, layers=[0, 2]))
    assert set(adapter_entries(adapters)) == {"layers/0/kernel", "layers/2/kernel"}
    adapters = lora.init(jax.random.key(0), state, lora.LoraConfig(rank=1, init="random"))
    merged = leaves_by_path(lora.merge(state, adapters))
    refs = {}
    for path, w in adapter_entries(adapters).items():
        w0 = leaves_by_path(state)[path]
        ref = np.asarray(w0, np.float64) + ref_delta64(w.a, w.b, (0,), 8.0)
        np.testing.assert_allclose(merged[path], ref, rtol=2e-6, atol=2e-6)
        refs[path] = jnp.asarray(ref, jnp.float32)
    x = jnp.ones((2, 3))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    y = lora.wrap(apply, mode="merged")(state, adapters, x)
    np.testing.assert_allclose(y, apply(replace_leaves(state, refs), x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# initial values
# ---------------------------------------------------------------------------------------------
def _out(apply, params, adapters, x):
    return np.asarray(jax.jit(lora.wrap(apply, mode="merged"))(params, adapters, x))


@pytest.mark.parametrize("init", ["lora", "gaussian"])
@pytest.mark.parametrize("layer_name", ["linen_mha", "linen_conv2d", "linen_embed", "nnx_embed"])
def test_noop_inits_leave_outputs_unchanged(init: str, layer_name: str) -> None:
    m = build(layer_name)
    config = lora.LoraConfig(rank=3, alpha=6.0, init=init)
    adapters = lora.init(jax.random.key(3), m.params, config, probe=m.probe)
    base = np.asarray(jax.jit(m.apply)(m.params, m.x))
    # equal up to XLA's choice of fusions (older jax fuses the two jitted graphs differently);
    # a nonzero update would move the outputs by orders of magnitude more
    np.testing.assert_allclose(_out(m.apply, m.params, adapters, m.x), base, rtol=1e-6, atol=1e-6)
    for path, w in adapter_entries(adapters).items():
        _, kind = m.kernels[path]
        a, b = np.asarray(w.a), np.asarray(w.b)
        if kind == "embed":  # PEFT: A zeros, B standard normal
            assert not a.any() and b.any(), path
            assert 0.5 < b.std() < 1.5
        else:  # b zeros, a nonzero
            assert a.any() and not b.any(), path
            fan_in = math.prod(a.shape[:-1])
            if init == "lora":  # kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                assert np.abs(a).max() <= 1 / math.sqrt(fan_in) + 1e-7
            else:  # normal with std 1/r: with 3 * fan_in samples, loosely
                assert 0.4 / 3 < a.std() < 1.6 / 3


def test_random_init_changes_outputs() -> None:
    for name in ("linen_dense", "linen_embed", "nnx_conv"):
        m = build(name)
        config = lora.LoraConfig(rank=2, init="random")
        adapters = lora.init(jax.random.key(3), m.params, config, probe=m.probe)
        for w in adapter_entries(adapters).values():
            assert np.asarray(w.a).any() and np.asarray(w.b).any()
        base = np.asarray(m.apply(m.params, m.x))
        assert np.abs(_out(m.apply, m.params, adapters, m.x) - base).max() > 1e-3


def test_keys_give_different_adapters() -> None:
    _, variables, _ = mlp()
    config = lora.LoraConfig(rank=2)
    a1 = adapter_entries(lora.init(jax.random.key(0), variables, config))
    a2 = adapter_entries(lora.init(jax.random.key(1), variables, config))
    assert not np.array_equal(a1["params/fc0/kernel"].a, a2["params/fc0/kernel"].a)
    # and one key gives different values to different kernels of equal shape
    assert not np.array_equal(a1["params/fc1/kernel"].a[:4], a1["params/fc0/kernel"].a)


@pytest.mark.parametrize("key", ["typed", "raw"])
def test_eager_init_draws_with_the_keys_of_traced_init(key: str) -> None:
    """`lora.init` with a concrete key reads its split keys to the host (JAX compiles no
    ``unstack`` per size); under `jax.jit` the key is traced and split as JAX splits it. Both
    must give the same factors, for plain and layered (one key per layer) kernels, with typed
    and legacy raw keys."""
    from support.scan_models import X, scan_model

    apply, params = scan_model("linen")
    config = lora.LoraConfig(rank=2, init="random")
    k = jax.random.key(4) if key == "typed" else jax.random.PRNGKey(4)
    probe = lambda p: apply(p, X)
    eager = adapter_entries(lora.init(k, params, config, probe=probe))
    traced = adapter_entries(jax.jit(lambda k: lora.init(k, params, config, probe=probe))(k))
    assert set(eager) == set(traced) and any(w.a.ndim == 3 for w in eager.values())
    for path, w in eager.items():
        np.testing.assert_array_equal(w.a, traced[path].a, err_msg=path)
        np.testing.assert_array_equal(w.b, traced[path].b, err_msg=path)


def test_a_key_that_is_no_key_is_jaxs_type_error() -> None:
    _, variables, _ = mlp()
    with pytest.raises(TypeError, match="PRNG key"):
        lora.init(0, variables, lora.LoraConfig(rank=2))


def test_adapter_dtype() -> None:
    _, variables, _ = mlp()
    adapters = lora.init(jax.random.key(0), variables, lora.LoraConfig(dtype=jnp.bfloat16))
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------------------------------------
# scales: alpha / r, alpha / sqrt(r), patterns (first match wins)
# ---------------------------------------------------------------------------------------------
def test_scales() -> None:
    _, variables, _ = mlp()
    config = lora.LoraConfig(
        rank=4,
        alpha=8.0,
        rank_pattern={"fc1": 2, r"fc\d": 3},  # fc1 -> 2 (first match), fc0 -> 3
        alpha_pattern={"head": 5.0, "fc0": 6.0},
    )
    e = adapter_entries(lora.init(jax.random.key(0), variables, config))
    assert (e["params/fc0/kernel"].a.shape[-1], e["params/fc0/kernel"].scale) == (3, 6.0 / 3)
    assert (e["params/fc1/kernel"].a.shape[-1], e["params/fc1/kernel"].scale) == (2, 8.0 / 2)
    assert (e["params/head/kernel"].a.shape[-1], e["params/head/kernel"].scale) == (4, 5.0 / 4)
    rs = lora.LoraConfig(rank=4, alpha=8.0, rslora=True, rank_pattern={"head": 3})
    e = adapter_entries(lora.init(jax.random.key(0), variables, rs))
    assert e["params/fc0/kernel"].scale == pytest.approx(8.0 / 2.0)
    assert e["params/head/kernel"].scale == pytest.approx(8.0 / math.sqrt(3))


# ---------------------------------------------------------------------------------------------
# PiSSA and OLoRA
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["pissa", "olora"])
@pytest.mark.parametrize("layer_name", ["linen_dense", "linen_mha", "nnx_conv", "linen_embed"])
def test_pissa_olora_reproduce_the_model(method: str, layer_name: str) -> None:
    m = build(layer_name)
    config = lora.LoraConfig(rank=2, alpha=3.0, init=method)
    adapters, residual = lora.init(jax.random.key(0), m.params, config, probe=m.probe)
    # the base changed, the adapted model did not
    kernels = leaves_by_path(m.params)
    new = leaves_by_path(residual)
    assert set(new) == set(kernels)
    for path in kernels:
        changed = not np.array_equal(kernels[path], new[path])
        assert changed == (path in m.kernels), path
    base = np.asarray(m.apply(m.params, m.x))
    y = np.asarray(m.apply(residual, m.x))
    assert np.abs(y - base).max() > 1e-3  # the residual alone is a different model
    # residual + adapters, merged by hand in float64, reproduce the original model
    merged = {}
    for path, w in adapter_entries(adapters).items():
        in_axes, _ = m.kernels[path]
        ref = np.asarray(new[path], np.float64) + ref_delta64(w.a, w.b, in_axes, 3.0 / 2)
        np.testing.assert_allclose(ref, np.asarray(kernels[path], np.float64), atol=2e-5)
        merged[path] = ref.astype(np.float32)
    y = np.asarray(m.apply(replace_leaves(residual, merged), m.x))
    np.testing.assert_allclose(y, base, rtol=1e-4, atol=1e-4)
    # and so does lora.wrap
    np.testing.assert_allclose(_out(m.apply, residual, adapters, m.x), base, rtol=1e-4, atol=1e-4)


def _rank2_adapters(layer_name: str, init: str, alpha: float) -> list[tuple[Any, ...]]:
    """``(adapter, W0 as its (inputs, outputs) matrix in float64, in_axes)`` of each kernel of
    the layer case, adapted with rank 2 by ``init``."""
    m = build(layer_name)
    config = lora.LoraConfig(rank=2, alpha=alpha, init=init)
    adapters, _ = lora.init(jax.random.key(0), m.params, config, probe=m.probe)
    kernels = leaves_by_path(m.params)
    out = []
    for path, w in adapter_entries(adapters).items():
        in_axes, _ = m.kernels[path]
        out.append((w, as_matrix(np.asarray(kernels[path], np.float64), in_axes), in_axes))
    return out


@pytest.mark.parametrize("layer_name", ["linen_dense", "linen_conv2d", "linen_mha"])
def test_pissa_is_the_best_rank_r_approximation(layer_name: str) -> None:
    r = 2
    for w, w0, in_axes in _rank2_adapters(layer_name, "pissa", 5.0):
        u, s, vt = np.linalg.svd(w0, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vt[:r]  # Eckart-Young
        got = as_matrix(ref_delta64(w.a, w.b, in_axes, 5.0 / r), in_axes)
        np.testing.assert_allclose(got, best, atol=1e-5)
        # PEFT's split: a = U sqrt(S/scale), b = sqrt(S/scale) V^T -> equal column/row norms
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(w.a, np.float64).reshape(-1, r), axis=0),
            np.sqrt(s[:r] / (5.0 / r)),
            rtol=1e-5,
        )


@pytest.mark.parametrize("layer_name", ["linen_dense", "nnx_conv", "linen_mha"])
def test_olora_b_rows_are_orthonormal(layer_name: str) -> None:
    r = 2
    for w, w0, _ in _rank2_adapters(layer_name, "olora", 2.0):
        b = np.asarray(w.b, np.float64).reshape(r, -1)
        np.testing.assert_allclose(b @ b.T, np.eye(r), atol=1e-5)
        # a^T = R[:r] of the QR of W0^T (PyTorch layout): a @ b is W0 projected on b's rows
        np.testing.assert_allclose(
            np.asarray(w.a, np.float64).reshape(-1, r) @ b, w0 @ b.T @ b, atol=1e-5
        )


def test_pissa_with_bf16_adapters_reproduces_the_model() -> None:
    m = build("linen_dense")
    config = lora.LoraConfig(rank=2, init="pissa", dtype=jnp.bfloat16)
    adapters, residual = lora.init(jax.random.key(0), m.params, config, probe=m.probe)
    w = adapter_entries(adapters)["params/kernel"]
    assert w.a.dtype == jnp.bfloat16
    w0 = np.asarray(leaves_by_path(m.params)["params/kernel"], np.float64)
    res = np.asarray(leaves_by_path(residual)["params/kernel"], np.float64)
    # the residual is taken against the factors as stored (bf16), so nothing is lost
    np.testing.assert_allclose(res + ref_delta64(w.a, w.b, (0,), 1.0 * 8 / 2), w0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input: error type and a message that names the path and what was expected
# ---------------------------------------------------------------------------------------------
def test_targets_matching_nothing_names_the_paths_seen() -> None:
    _, variables, _ = mlp()
    with pytest.raises(ValueError) as e:
        lora.init(jax.random.key(0), variables, lora.LoraConfig(targets=r".*/query/kernel"))
    msg = str(e.value)
    assert "matches no kernel" in msg
    for name in ("fc0", "fc1", "head"):
        assert f"params/{name}/kernel" in msg


def test_three_d_kernel_without_probe() -> None:
    m = build("linen_dense_general")  # kernel (4, 5, 3, 2)
    with pytest.raises(ValueError) as e:
        lora.init(jax.random.key(0), m.params, lora.LoraConfig())
    msg = str(e.value)
    assert "'params/kernel'" in msg and "(4, 5, 3, 2)" in msg and "probe=" in msg
    m = build("nnx_mha")
    with pytest.raises(
        ValueError, match=r"'(query|key|value)/kernel' has shape \(6, 2, 2\).*probe"
    ):
        lora.init(jax.random.key(0), m.params, lora.LoraConfig(targets=r"(query|key|value)/kernel"))


def test_pissa_rank_above_the_smaller_side() -> None:
    _, variables, _ = mlp()  # head kernel (6, 3)
    config = lora.LoraConfig(rank=4, init="pissa", targets=r".*head/kernel")
    with pytest.raises(ValueError) as e:
        lora.init(jax.random.key(0), variables, config)
    msg = str(e.value)
    assert "params/head/kernel" in msg and "3" in msg and "rank 4" in msg
    # olora too; and the other kernels (4x6, 6x6) accept rank 4
    with pytest.raises(ValueError, match="params/head/kernel"):
        lora.init(jax.random.key(0), variables, lora.LoraConfig(rank=4, init="olora"))
    lora.init(
        jax.random.key(0), variables, lora.LoraConfig(rank=4, init="olora", exclude=".*head.*")
    )


def test_non_floating_targeted_leaf() -> None:
    params = {"params": {"emb": {"kernel": jnp.ones((4, 3), jnp.int32)}}}
    with pytest.raises(TypeError) as e:
        lora.init(jax.random.key(0), params, lora.LoraConfig())
    assert "params/emb/kernel" in str(e.value) and "int32" in str(e.value)
    assert "floating" in str(e.value)


def test_probe_never_uses_a_targeted_leaf() -> None:
    model = nn.Dense(3)
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x)
    variables = {"params": {**variables["params"], "extra": jnp.ones((2, 3, 4))}}
    config = lora.LoraConfig(targets=r"params/(kernel|extra)")
    with pytest.raises(ValueError) as e:
        lora.init(jax.random.key(0), variables, config, probe=lambda p: model.apply(p, x))
    assert "params/extra" in str(e.value) and "probe" in str(e.value)


def test_init_needs_a_config() -> None:
    _, variables, _ = mlp()
    with pytest.raises(TypeError, match="LoraConfig"):
        lora.init(jax.random.key(0), variables, {"rank": 2})


def test_plain_params_without_probe_say_what_to_pass() -> None:
    # plain JAX params: no leaf is named "kernel" or "embedding"
    params = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 2)), "b": jnp.ones(8)}
    with pytest.raises(ValueError) as e:
        lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2))
    msg = str(e.value)
    assert "matches no kernel" in msg
    assert "'kernel'" in msg and "'embedding'" in msg  # the rule that was applied
    assert "'w1'" in msg and "'w2'" in msg and "'b'" not in msg  # the 2-D+ leaves
    assert "targets=" in msg and "probe=" in msg  # what to pass instead
    # more than 10 such leaves: 10 shown, the rest counted
    many = {f"layer{i:02d}": jnp.ones((2, 2)) for i in range(13)}
    with pytest.raises(ValueError) as e:
        lora.init(jax.random.key(0), many, lora.LoraConfig())
    assert "'layer09'" in str(e.value) and "'layer10'" not in str(e.value)
    assert "and 3 more" in str(e.value)


def test_plain_params_follow_the_advice() -> None:
    """Both ways out named by the error adapt the plain leaves: the adapted model matches
    W0 + scale * a @ b computed in float64."""
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
        "b": jnp.zeros(8),
    }
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    apply = lambda p, x: jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"]
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random")
    by_targets = lora.init(jax.random.key(1), params, dataclasses.replace(config, targets="w1|w2"))
    by_probe = lora.init(jax.random.key(1), params, config, probe=lambda p: apply(p, x))
    for adapters in (by_targets, by_probe):
        assert set(adapters) == {"w1", "w2"}
        p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
        for k, w in adapters.items():
            assert tuple(w.in_axes) == (0,) and w.kind == "dense"
            p64[k] = p64[k] + 1.5 * np.asarray(w.a, np.float64) @ np.asarray(w.b, np.float64)
        want = np.tanh(np.asarray(x, np.float64) @ p64["w1"] + p64["b"]) @ p64["w2"]
        got = lora.wrap(apply)(params, adapters, x)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_layered_kernels_leaves_its_argument_alone() -> None:
    """The layered kernels with no picked layer are left out of the returned table, not deleted
    from the argument (which the caller may hold)."""
    leaves = {
        "s/kernel": np.zeros((2, 3, 4)),
        "t/kernel": np.zeros((5, 3, 4)),
        "d": np.zeros((3, 4)),
    }
    selected = {p: ("dense", (1,) if p != "d" else (0,)) for p in leaves}
    uses = {p: Use("dense", (1,), layer_axes=(0,)) for p in ("s/kernel", "t/kernel")}
    before = dict(selected)
    kept, layered = layered_kernels(selected, uses, leaves, lora.LoraConfig(layers=[3]))
    assert selected == before
    assert list(kept) == ["t/kernel", "d"]
    assert layered == {"t/kernel": (1, (3,), 0)}


def test_adapter_layout_is_the_static_fields_without_arrays() -> None:
    """`LoraWeights.layout` is a record of the static fields only; `with_factors` rebuilds the
    adapter, and a layer's slice drops the layer axis from the layout, as written out by hand."""
    a, b = jnp.ones((3, 4, 2)), jnp.zeros((3, 2, 5))
    w = lora.LoraWeights(
        a=a, b=b, scale=0.5, in_axes=(1,), kernel_shape=(3, 4, 5), layer_axes=1, layers=(0, 2)
    )
    layout = w.layout
    assert jax.tree.leaves(layout) == [layout]  # not a pytree node: no array inside
    same = lambda x, y: (
        jax.tree.structure(x) == jax.tree.structure(y)
        and all(
            np.array_equal(p, q)
            for p, q in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
        )
    )
    assert same(layout.with_factors(a, b), w)
    one = w.layer_slice(1, a=a[1], b=b[1])
    by_hand = lora.LoraWeights(a=a[1], b=b[1], scale=0.5, in_axes=(0,), kernel_shape=(4, 5))
    assert same(one, by_hand)
    assert same(layout.layer_slice(1).with_factors(a[1], b[1]), by_hand)
    assert (layout.carried_shape, layout.out_axes, layout.in_shape) == ((3,), (2,), (4,))
