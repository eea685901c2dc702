"""Bad inputs that used to pass silently or fail obscurely (issue 22, H5) now get a clear error
naming the argument or the path, or a warning where the value is legal but surely a mistake; and
the legal neighbours of each still give the reference result (float64 numpy, the base model).

1. `lora.combine` with a NaN / inf weight; the density, rank and weights-length checks.
2. Non-bool flags: `lora.merge(requantize=...)`; `lora.unstack`'s index.
3. `LoraConfig(layers=...)` indices that pick no layer (scan stacks and layer numbers in paths).
4. A rank above a kernel's smaller side (warning), or far above it with big factors (error).
5. A kernel with an axis of size 0.
6. `lora_ids` whose length is not the batch, in every mode.
7. A probe that ignores its argument.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.models import fill_abstract, mlp
from support.refs import ref_delta64
from support.scan_models import in_axes_of, init_adapters, is_layered, scan_model
from support.trees import adapter_entries, kernel_deltas, leaves_by_path

import flax_lora as lora

FEW = settings(max_examples=12, deadline=None)


def _sets(n: int, rank: int = 2) -> tuple[Any, list[Any]]:
    """The MLP's variables and ``n`` random (nonzero) adapter sets of it."""
    _, variables, _ = mlp()
    cfg = lora.LoraConfig(rank=rank, alpha=3.0, init="random")
    return variables, [lora.init(jax.random.key(10 + i), variables, cfg) for i in range(n)]


def _delta64(w: lora.LoraWeights) -> np.ndarray:
    return ref_delta64(w.a, w.b, tuple(w.in_axes), float(w.scale))


# ---------------------------------------------------------------------------------------------
# 1. combine: weights, density, rank
# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39
@FEW
@given(
    n=st.integers(2, 4),
    data=st.data(),
    bad=st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e39]),
    method=st.sampled_from(["linear", "cat", "svd"]),
)
def test_combine_refuses_a_nonfinite_weight(n: int, data: Any, bad: float, method: str) -> None:
    _, sets = _sets(n)
    index = data.draw(st.integers(0, n - 1))
    weights = [0.5] * n
    weights[index] = bad  # 1e39 is inf in float32
    with pytest.raises(
        ValueError, match=rf"weights must be finite.*weights\[{index}\] = (-?inf|nan)"
    ):
        lora.combine(sets, weights, method)
    with pytest.raises(ValueError, match=rf"weights\[{index}\]"):
        lora.combine(sets, jnp.asarray(weights, jnp.float32), method)


def test_combine_with_finite_weights_is_the_float64_weighted_sum() -> None:
    variables, sets = _sets(3)
    weights = [0.7, -1.25, 3.0]
    got = kernel_deltas(variables, lora.combine(sets, weights, "cat"))
    tables = [adapter_entries(s) for s in sets]
    for path in tables[0]:
        want = sum(w * _delta64(t[path]) for w, t in zip(weights, tables, strict=True))
        np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # traced weights are not checked (no host sync) and still combine under jit
    jitted = jax.jit(lambda w: lora.combine(sets, w, "linear"))(jnp.asarray(weights))
    eager = lora.combine(sets, weights, "linear")
    for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        (dict(method="ties", density=0.0), ValueError, "density"),
        (dict(method="ties", density=-0.1), ValueError, "density"),
        (dict(method="dare_linear", density=1.5, key=jax.random.key(0)), ValueError, "density"),
        (dict(method="magnitude_prune", density=float("nan")), ValueError, "density"),
        (dict(method="ties", density=True), TypeError, "density"),
        (dict(method="ties", density="0.5"), TypeError, "density"),
        (dict(method="ties"), ValueError, "density"),
        (dict(method="svd", rank=0), ValueError, "rank"),
        (dict(method="svd", rank=-3), ValueError, "rank"),
        (dict(method="cat", rank=2), ValueError, "rank"),
    ],
)
def test_combine_checks_density_and_rank(kwargs: dict, error: type, names: str) -> None:
    _, sets = _sets(2)
    with pytest.raises(error, match=rf"lora\.combine.*{names}"):
        lora.combine(sets, [1.0, 1.0], **kwargs)


@FEW
@given(n=st.integers(1, 4), length=st.integers(0, 6))
def test_combine_refuses_weights_of_the_wrong_length(n: int, length: int) -> None:
    _, sets = _sets(n)
    if length == n:
        out = lora.combine(sets, [1.0] * length, "cat")  # the legal neighbour
        assert adapter_entries(out).keys() == adapter_entries(sets[0]).keys()
        return
    with pytest.raises(ValueError, match=rf"weights must hold one weight per adapter set \({n}\)"):
        lora.combine(sets, [1.0] * length, "cat")


# ---------------------------------------------------------------------------------------------
# 2. flags that must be bools / ints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["no", "False", 1, 0, None, 1.0, [True]])
def test_merge_requantize_must_be_a_bool(value: Any) -> None:
    variables, (adapters,) = _sets(1)
    with pytest.raises(TypeError, match=rf"requantize must be a bool.*\({type(value).__name__}\)"):
        lora.merge(variables, adapters, requantize=value)


@pytest.mark.parametrize("flag", [False, np.bool_(False)])
def test_merge_with_a_bool_flag_is_the_float64_merge(flag: Any) -> None:
    variables, (adapters,) = _sets(1)
    merged = leaves_by_path(lora.merge(variables, adapters, requantize=flag))
    base = leaves_by_path(variables)
    for path, w in adapter_entries(adapters).items():
        want = np.asarray(base[path], np.float64) + _delta64(w)
        np.testing.assert_allclose(np.asarray(merged[path]), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index", [1.0, 1.5, "1", True, np.float32(1)])
def test_unstack_index_must_be_an_integer(index: Any) -> None:
    variables, sets = _sets(2)
    stacked = lora.stack(sets)
    with pytest.raises(TypeError, match=r"lora\.unstack: index must be an int"):
        lora.unstack(stacked, index)
    for i in (1, np.int64(1), -1, jnp.asarray(1)):  # the legal neighbours: adapter set 1's delta
        got = kernel_deltas(variables, lora.unstack(stacked, i))
        for path, w in adapter_entries(sets[1]).items():
            np.testing.assert_allclose(got[path], _delta64(w), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. layers= indices that pick no layer
# ---------------------------------------------------------------------------------------------
def test_layers_out_of_range_on_a_scan_stack() -> None:
    apply, params = scan_model("linen")
    cfg = lora.LoraConfig(rank=2, init="random", targets=r".*layers/.*kernel", layers=[1, 7])
    with pytest.raises(ValueError, match=r"layers=\(1, 7\).*index\(es\) \[7\]") as e:
        init_adapters(apply, params, cfg)
    msg = str(e.value)
    assert "'params/layers/fc1/kernel'" in msg and "with 3 layer(s)" in msg


def test_layers_picks_exactly_those_of_the_stack() -> None:
    """The legal neighbour: layers=[0, 2] adapts layers 0 and 2 of every stacked kernel, and
    the merged kernels are W0 + delta there and W0 on layer 1 (float64 reference)."""
    apply, params = scan_model("linen")
    cfg = lora.LoraConfig(rank=2, alpha=3.0, init="random", layers=[0, 2])
    adapters = init_adapters(apply, params, cfg)
    entries = adapter_entries(adapters)
    kernels = [p for p in leaves_by_path(params) if is_layered(p) and p.endswith("/kernel")]
    assert sorted(entries) == sorted(kernels)
    base, merged = leaves_by_path(params), leaves_by_path(lora.merge(params, adapters))
    for path, w in entries.items():
        for layer in range(3):
            want = np.asarray(base[path][layer], np.float64)
            if layer != 1:
                ins = tuple(i - 1 for i in in_axes_of(path))
                want = want + ref_delta64(w.a[layer], w.b[layer], ins, float(w.scale))
            np.testing.assert_allclose(
                np.asarray(merged[path][layer]), want, rtol=1e-5, atol=1e-5, err_msg=path
            )


class Unstacked(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(3):
            x = jnp.tanh(nn.Dense(4, name=f"h{i}")(x))
        return nn.Dense(2, name="head")(x)


_UNSTACKED = fill_abstract(
    jax.eval_shape(Unstacked().init, jax.random.key(0), jnp.ones((1, 4))), 0, 0.5
)


@FEW
@given(
    good=st.lists(st.integers(0, 2), max_size=3),
    bad=st.lists(st.integers(3, 60), min_size=1, max_size=3),
)
def test_layers_that_match_no_path_are_named(good: list[int], bad: list[int]) -> None:
    layers = list(np.random.default_rng(len(good)).permutation(good + bad))
    cfg = lora.LoraConfig(rank=2, layers=[int(i) for i in layers])
    want = re.escape(f"index(es) {sorted(set(bad))}")
    with pytest.raises(
        ValueError, match=rf"matches no kernel at layer {want}.*numbers \[0, 1, 2\]"
    ):
        lora.init(jax.random.key(0), _UNSTACKED, cfg)


def test_layers_by_path_number_adapt_exactly_those() -> None:
    adapters = lora.init(jax.random.key(0), _UNSTACKED, lora.LoraConfig(rank=2, layers=[0, 2]))
    assert sorted(adapter_entries(adapters)) == ["params/h0/kernel", "params/h2/kernel"]
    # targets narrow the kernels first: then layer 1 names no selected kernel
    cfg = lora.LoraConfig(rank=2, targets=r"params/h0/kernel", layers=[0, 1])
    with pytest.raises(ValueError, match=r"index\(es\) \[1\].*layer numbers \[0\]"):
        lora.init(jax.random.key(0), _UNSTACKED, cfg)


def test_negative_layer_indices_are_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match=r"LoraConfig\.layers.*-1"):
        lora.LoraConfig(layers=[0, -1])


def test_layers_without_a_probe_on_a_stack_say_to_pass_one() -> None:
    _, params = scan_model("linen")
    # without a probe a path's first number is its layer: 'fc1' and 'fc2' give 1 and 2
    with pytest.raises(ValueError, match=r"index\(es\) \[5\].*numbers \[1, 2\].*pass probe="):
        lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2, layers=[5]))


def _two_stacks(p: Any, x: jax.Array) -> jax.Array:
    """An encoder of 3 layers, then a decoder of 2, each a `jax.lax.scan` over its stack."""
    layer = lambda h, w: (jnp.tanh(h @ w), None)
    h, _ = jax.lax.scan(layer, x, p["enc"])
    return jax.lax.scan(layer, h, p["dec"])[0]


def test_layers_in_range_for_one_stack_only_adapt_that_stack() -> None:
    rng = np.random.default_rng(0)
    params = {
        "enc": jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32),
        "dec": jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32),
    }
    x = jnp.ones((2, 4))
    probe = lambda p: _two_stacks(p, x)
    adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2, layers=[2]), probe)
    assert sorted(adapter_entries(adapters)) == ["enc"]
    assert tuple(adapter_entries(adapters)["enc"].layers) == (2,)
    with pytest.raises(ValueError, match=r"index\(es\) \[5\]") as e:
        lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2, layers=[1, 5]), probe)
    assert "['enc'] stacked by a scan, with 3 layer(s)" in str(e.value)
    assert "['dec'] stacked by a scan, with 2 layer(s)" in str(e.value)


# ---------------------------------------------------------------------------------------------
# 4. ranks above the kernel's smaller side
# ---------------------------------------------------------------------------------------------
def _dense(n_in: int, n_out: int) -> dict:
    rng = np.random.default_rng(n_in * 100 + n_out)
    return {"params": {"kernel": jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32)}}


@FEW
@given(n_in=st.integers(1, 6), n_out=st.integers(1, 6), rank=st.integers(1, 40))
def test_a_rank_above_the_smaller_side_warns(n_in: int, n_out: int, rank: int) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapters = lora.init(jax.random.key(0), _dense(n_in, n_out), lora.LoraConfig(rank=rank))
    ours = [w for w in caught if "smaller side" in str(w.message)]
    if rank <= min(n_in, n_out):
        assert not ours
    else:
        (w,) = ours
        assert w.category is UserWarning and w.filename == __file__  # points at the caller
        want = f"'params/kernel': rank {rank} > min(fan_in={n_in}, fan_out={n_out})"
        assert want in str(w.message)
    entry = adapter_entries(adapters)["params/kernel"]  # legal: made at the rank asked for
    assert entry.a.shape == (n_in, rank) and entry.b.shape == (rank, n_out)


def test_a_rank_above_a_layers_side_warns_per_layer() -> None:
    apply, params = scan_model("linen")
    cfg = lora.LoraConfig(rank=9, init="random", targets=r".*layers/fc1/kernel")
    with pytest.warns(UserWarning, match=r"'params/layers/fc1/kernel': rank 9 > min\(fan_in=8, "):
        init_adapters(apply, params, cfg)


@pytest.mark.parametrize("rank", [2**22 + 1, 10**9])
def test_a_huge_rank_is_refused_before_allocation(rank: int) -> None:
    with pytest.raises(ValueError, match=rf"Rank {rank} for 'params/kernel'.*fan_in 2, fan_out 2"):
        lora.init(jax.random.key(0), _dense(2, 2), lora.LoraConfig(rank=rank))


def test_factoring_inits_still_refuse_any_rank_above_the_side() -> None:
    for init in ("pissa", "olora"):
        with pytest.raises(
            ValueError, match=r"rank <= min\(fan_in, fan_out\) = 3.*'params/kernel'"
        ):
            lora.init(jax.random.key(0), _dense(3, 5), lora.LoraConfig(rank=4, init=init))


# ---------------------------------------------------------------------------------------------
# 5. a kernel with an axis of size 0
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["lora", "gaussian", "random", "pissa"])
@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0)])
def test_a_size_zero_kernel_is_named(shape: tuple[int, int], init: str) -> None:
    params = {"params": {"kernel": jnp.zeros(shape), "other": {"kernel": jnp.ones((3, 4))}}}
    with pytest.raises(ValueError, match=re.escape(f"'params/kernel' has shape {shape}")):
        lora.init(jax.random.key(0), params, lora.LoraConfig(rank=1, init=init))
    # the legal neighbour: excluded, the other kernel is adapted as usual
    cfg = lora.LoraConfig(rank=1, init="random", exclude=r"params/kernel")
    adapters = lora.init(jax.random.key(0), params, cfg)
    assert list(adapter_entries(adapters)) == ["params/other/kernel"]


def test_a_size_zero_kernel_found_by_the_probe_is_named() -> None:
    params = {"w": jnp.zeros((3, 0, 4))}
    probe = lambda p: jnp.einsum("bi,ijk->bjk", jnp.ones((2, 3)), p["w"])
    with pytest.raises(ValueError, match=re.escape("'w' has shape (3, 0, 4)")):
        lora.init(jax.random.key(0), params, lora.LoraConfig(rank=1), probe)


# ---------------------------------------------------------------------------------------------
# 6. lora_ids of the wrong length
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("mode", ["factored", "auto", "merged"])
def test_lora_ids_of_the_wrong_length_are_named(mode: str, jit: bool) -> None:
    model, variables, x = mlp()
    sets = _sets(2)[1]
    fn = lora.wrap(model.apply, mode=mode)
    fn = jax.jit(fn) if jit else fn
    batch = x.shape[0]
    for n_ids in (batch - 1, batch + 2):
        ids = jnp.asarray([k % 3 - 1 for k in range(n_ids)])
        with pytest.raises(
            ValueError, match=rf"lora_ids has {n_ids} ids but the inputs have a batch.*of {batch}"
        ):
            fn(variables, lora.stack(sets), x, lora_ids=ids)
    # the legal neighbour: one id per example, each example through its adapter (or the base)
    ids = [k % 3 - 1 for k in range(batch)]
    got = np.asarray(fn(variables, lora.stack(sets), x, lora_ids=jnp.asarray(ids)))
    for j, k in enumerate(ids):
        p = variables if k < 0 else lora.merge(variables, sets[k])
        want = np.asarray(model.apply(p, x[j : j + 1]))[0]
        np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 7. a probe that ignores its argument
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("probe_of", "how"),
    [
        (lambda model, variables, x: lambda p: model.apply(variables, x), "does not read"),
        (lambda model, variables, x: lambda p: jax.tree.map(jnp.sum, p), "reads its argument"),
    ],
)
def test_a_probe_that_ignores_its_argument_is_named(probe_of: Callable, how: str) -> None:
    model, variables, x = mlp()
    probe = probe_of(model, variables, x)
    with pytest.raises(ValueError, match=rf"probe never contracted or gathered.*{how}") as e:
        lora.init(jax.random.key(0), variables, lora.LoraConfig(rank=2), probe)
    assert "'params/fc0/kernel'" in str(e.value) and "lambda p: model.apply(p, x)" in str(e.value)
    with pytest.raises(ValueError, match="probe never contracted or gathered"):
        lora.quantize(variables, dtype="int8", probe=probe)
    # the legal neighbour: a probe of its argument finds the same kernels as no probe
    probed = lora.init(
        jax.random.key(0), variables, lora.LoraConfig(rank=2), lambda p: model.apply(p, x)
    )
    plain = lora.init(jax.random.key(0), variables, lora.LoraConfig(rank=2))
    assert adapter_entries(probed).keys() == adapter_entries(plain).keys()
    assert len(adapter_entries(plain)) == 3
