"""`lora.merge` / `lora.unmerge` against a float64 numpy reference written in the tests."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.models import build, fill, mlp
from support.refs import BF16, bf16_ulps, ref_delta64, ref_merged_kernel
from support.trees import adapter_entries, leaves_by_path

import flax_lora as lora

RANK, ALPHA = 3, 4.5  # scale 1.5


def _random_adapters(m, rank=RANK, alpha=ALPHA, dtype=jnp.float32, key=0):
    config = lora.LoraConfig(rank=rank, alpha=alpha, init="random", dtype=dtype)
    return lora.init(jax.random.key(key), m.params, config, probe=m.probe)


# ---------------------------------------------------------------------------------------------
# every layer type, f32 and bf16 kernels
# ---------------------------------------------------------------------------------------------
def test_merge_equals_reference(layer_name: str, param_dtype) -> None:
    m = build(layer_name, param_dtype)
    adapters = _random_adapters(m)
    merged = leaves_by_path(jax.jit(lora.merge)(m.params, adapters))
    base = leaves_by_path(m.params)
    entries = adapter_entries(adapters)
    assert set(entries) == set(m.kernels)
    for path, leaf in base.items():
        got = merged[path]
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, path
        if path not in m.kernels:  # every other leaf untouched
            np.testing.assert_array_equal(got, leaf)
            continue
        in_axes, _ = m.kernels[path]
        w = entries[path]
        # the kernel moved by a rank-3 update, not by nothing
        assert np.abs(np.asarray(got, np.float32) - np.asarray(leaf, np.float32)).max() > 1e-2
        expected = ref_merged_kernel(leaf, w.a, w.b, in_axes, ALPHA / RANK)
        if param_dtype == jnp.float32:
            ref64 = np.asarray(leaf, np.float64) + ref_delta64(w.a, w.b, in_axes, ALPHA / RANK)
            np.testing.assert_allclose(np.asarray(got, np.float64), ref64, rtol=2e-6, atol=2e-6)
        else:
            # The merged bf16 kernel is W0 + scale * a @ b computed in float32 and rounded ONCE
            # to bf16. Our reference is the exact float64 sum rounded to float32 and then to
            # bf16. The library's float32 sum differs from the float64 one by a float32 rounding
            # error (~1e-7 relative), which can only flip the final bf16 rounding of a value
            # lying within that distance of a bf16 rounding midpoint: so the two agree to
            # within 1 bf16 ulp and are almost always bit-identical. Rounding twice (the
            # delta to bf16, then the bf16 sum) would be off by more than 1 ulp in places,
            # as the contrast below shows.
            ulps = bf16_ulps(got, expected)
            assert ulps.max() <= 1, path
            assert (ulps == 0).mean() >= 0.9, path
    # the contrast: a double-rounding merge is measurably worse than ours against the reference
    if param_dtype == jnp.bfloat16:
        worst_twice = 0
        for path, w in entries.items():
            in_axes, _ = m.kernels[path]
            d = ref_delta64(w.a, w.b, in_axes, ALPHA / RANK).astype(BF16)
            twice = (np.asarray(base[path], np.float32) + d.astype(np.float32)).astype(BF16)
            expected = ref_merged_kernel(base[path], w.a, w.b, in_axes, ALPHA / RANK)
            worst_twice = max(worst_twice, int(bf16_ulps(twice, expected).max()))
        assert worst_twice > 1


def test_unmerge_inverts_merge(layer_name: str) -> None:
    m = build(layer_name)
    adapters = _random_adapters(m)
    back = leaves_by_path(lora.unmerge(lora.merge(m.params, adapters), adapters))
    for path, leaf in leaves_by_path(m.params).items():
        np.testing.assert_allclose(back[path], leaf, rtol=1e-5, atol=1e-5, err_msg=path)
    unmerged = leaves_by_path(lora.unmerge(m.params, adapters))
    for path, w in adapter_entries(adapters).items():
        in_axes, _ = m.kernels[path]
        ref = np.asarray(leaves_by_path(m.params)[path], np.float64) - ref_delta64(
            w.a, w.b, in_axes, ALPHA / RANK
        )
        np.testing.assert_allclose(unmerged[path], ref, rtol=2e-6, atol=2e-6)


def test_merge_keeps_the_tree_type_and_none_is_identity() -> None:
    m = build("nnx_mha")
    adapters = _random_adapters(m)
    merged = lora.merge(m.params, adapters)
    assert type(merged) is type(m.params)
    assert jax.tree.structure(merged) == jax.tree.structure(m.params)
    assert lora.merge(m.params, None) is m.params


def test_bf16_adapters_merge_in_float32() -> None:
    m = build("linen_dense", jnp.bfloat16)
    adapters = _random_adapters(m, dtype=jnp.bfloat16)
    w = adapter_entries(adapters)["params/kernel"]
    assert w.a.dtype == jnp.bfloat16
    got = leaves_by_path(lora.merge(m.params, adapters))["params/kernel"]
    expected = ref_merged_kernel(leaves_by_path(m.params)["params/kernel"], w.a, w.b, (0,), 1.5)
    assert bf16_ulps(got, expected).max() <= 1


# ---------------------------------------------------------------------------------------------
# property tests: shapes, ranks, patterns, dtypes
# ---------------------------------------------------------------------------------------------
class Stack(nn.Module):
    """A DenseGeneral per name; input (..., d0, d1)."""

    names: tuple[str, ...]
    features: tuple[int, ...]
    n_axes: int
    param_dtype: object

    @nn.compact
    def __call__(self, x):
        axis = tuple(range(-self.n_axes, 0))
        return [
            nn.DenseGeneral(self.features, axis=axis, param_dtype=self.param_dtype, name=n)(x)
            for n in self.names
        ]


NAMES = ("q_proj", "v_proj", "o_proj")
pattern_dict = st.dictionaries(
    st.sampled_from(["q_", "proj", "^params/v", "o_proj/kernel$"]),
    st.integers(1, 8),
    max_size=3,
)


def _first(patterns: dict, path: str, default):
    for p, v in patterns.items():  # dicts keep insertion order: the first match wins
        if re.search(p, path):
            return v
    return default


@settings(max_examples=20, deadline=None)
@given(
    in_dims=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    features=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    rank=st.integers(1, 8),
    alpha=st.floats(0.5, 32.0),
    rank_pattern=pattern_dict,
    alpha_pattern=st.dictionaries(st.sampled_from(["q_", "v_", "kernel"]), st.floats(0.1, 9.0)),
    rslora=st.booleans(),
    pdtype=st.sampled_from(["float32", "bfloat16"]),
    adtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_property_merge(
    in_dims, features, rank, alpha, rank_pattern, alpha_pattern, rslora, pdtype, adtype, seed
):
    n = len(in_dims)
    module = Stack(NAMES, tuple(features), n, jnp.dtype(pdtype))
    x = jnp.ones((1, *in_dims))
    params = fill(jax.eval_shape(lambda: module.init(jax.random.key(0), x)), seed)
    config = lora.LoraConfig(
        rank=rank,
        alpha=alpha,
        rank_pattern={k: int(v) for k, v in rank_pattern.items()},
        alpha_pattern=alpha_pattern,
        rslora=rslora,
        init="random",
        dtype=jnp.dtype(adtype),
    )
    probe = (lambda p: module.apply(p, x)) if n + len(features) > 2 else None
    adapters = lora.init(jax.random.key(seed), params, config, probe=probe)
    entries = adapter_entries(adapters)
    assert set(entries) == {f"params/{name}/kernel" for name in NAMES}
    merged = leaves_by_path(jax.jit(lora.merge)(params, adapters))
    base = leaves_by_path(params)
    in_axes = tuple(range(n))  # DenseGeneral kernel (*in_dims, *features)
    for path, w in entries.items():
        r = _first(config.rank_pattern, path, rank)
        al = _first(config.alpha_pattern, path, alpha)
        scale = al / (np.sqrt(r) if rslora else r)
        assert w.a.shape == (*in_dims, r) and w.b.shape == (r, *features)
        assert w.a.dtype == jnp.dtype(adtype)
        assert w.scale == pytest.approx(scale, rel=1e-12)
        expected = ref_merged_kernel(base[path], w.a, w.b, in_axes, scale)
        if pdtype == "float32":
            ref64 = np.asarray(base[path], np.float64) + ref_delta64(w.a, w.b, in_axes, scale)
            tol = 2e-6 * (1 + np.abs(ref64).max())
            np.testing.assert_allclose(np.asarray(merged[path], np.float64), ref64, atol=tol)
        else:  # rounded once from float32: within 1 bf16 ulp of the f64 -> f32 -> bf16 reference
            assert bf16_ulps(merged[path], expected).max() <= 1
    if pdtype == "float32":
        roundtrip = jax.jit(lambda p, ad: lora.unmerge(lora.merge(p, ad), ad))
        back = leaves_by_path(roundtrip(params, adapters))
        for path in entries:
            tol = 4e-6 * (1 + np.abs(np.asarray(merged[path])).max())
            np.testing.assert_allclose(back[path], base[path], atol=tol)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_adapters_of_another_model_shape_mismatch() -> None:
    _, variables, _ = mlp(in_features=4)
    _, other, _ = mlp(in_features=7)
    adapters = lora.init(jax.random.key(0), other, lora.LoraConfig(rank=2))
    with pytest.raises(ValueError) as e:
        lora.merge(variables, adapters)
    msg = str(e.value)
    assert "params/fc0/kernel" in msg and "(7, 6)" in msg and "(4, 6)" in msg
    with pytest.raises(ValueError, match="params/fc0/kernel"):
        lora.unmerge(variables, adapters)


def test_adapters_of_another_model_path_mismatch() -> None:
    _, variables, _ = mlp()
    nnx_like = {"fc0": {"kernel": variables["params"]["fc0"]["kernel"]}}  # no "params" level
    adapters = lora.init(jax.random.key(0), nnx_like, lora.LoraConfig(rank=2))
    with pytest.raises(ValueError) as e:
        lora.merge(variables, adapters)
    msg = str(e.value)
    assert "'fc0/kernel'" in msg  # the adapter path that has no kernel
    assert "params/fc0/kernel" in msg  # and the kernels that are there


def test_factor_of_the_wrong_shape() -> None:
    _, variables, _ = mlp()
    adapters = lora.init(jax.random.key(0), variables, lora.LoraConfig(rank=2))
    w = adapters["params"]["fc1"]["kernel"]
    adapters["params"]["fc1"]["kernel"] = w.replace(b=jnp.zeros((3, 6)))
    with pytest.raises(ValueError) as e:
        lora.merge(variables, adapters)
    assert "params/fc1/kernel" in str(e.value) and "(3, 6)" in str(e.value)


def test_not_an_adapter_tree() -> None:
    _, variables, _ = mlp()
    with pytest.raises(TypeError, match="params/fc0/kernel"):
        lora.merge(variables, {"params": {"fc0": {"kernel": jnp.ones((4, 6))}}})
