"""The expert axis carried through the adapter tools (issue 16): merge / unmerge, `lora.combine`
(every method, per carried index), `lora.stack` / `unstack` / `select` / `gather`, `lora.summary`,
orbax checkpoints, quantized expert bases. Sharding of expert factors: tests/test_moe_sharding.py.

The adapters are built by hand (`support.moe_adapters`: ``a (*C, *I, r)``, ``b (*C, r, *O)``,
one LoRA per expert and per scan layer) on the MoE blocks of `support.moe_models` (Linen / NNX,
einsum / ragged_dot dispatch, one block / a scan stack, ``w_out`` laid out ``(E, F, D)`` or
``(E, D, F)``). References are float64 numpy per carried index (`carried_delta64`, `merged64`,
`ref_output`, SVDs and factor sums written here); the pruning methods are checked index by index
against `lora.combine` of the plain adapters of that index's kernel (whose rules
tests/test_combine.py checks against hand-built references and PEFT).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.compare import assert_close
from support.moe_adapters import expert_adapters, kernel_shapes, nest
from support.moe_models import E, L, build, carried_delta64, merged64, random_factors, ref_output
from support.trees import adapter_entries

import flax_lora as lora
from flax_lora._multi._stack import gather, select

CASES = [
    pytest.param(fw, d, s, t, id=f"{fw}-{d}{'-stack' if s else ''}{'-transposed' if t else ''}")
    for fw, d, s, t in itertools.product(
        ("linen", "nnx"), ("einsum", "ragged"), (False, True), (False, True)
    )
]
LINEN = [
    pytest.param(s, t, id=f"{'stack' if s else 'block'}{'-transposed' if t else ''}")
    for s, t in itertools.product((False, True), (False, True))
]
EXPERTS = ("experts/w_in", "experts/w_out")
_merge = jax.jit(lora.merge)


def _case(stacked: bool, transposed: bool = False, **kw: Any) -> Any:
    return build("linen", "einsum", stacked=stacked, transposed_out=transposed, **kw)


def _flat(a: Any, b: Any, nc: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``a (*C, *I, r)``, ``b (*C, r, *O)`` as float64 ``(prod C, prod I, r)`` and
    ``(prod C, r, prod O)``."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c = math.prod(a64.shape[:nc])
    r = a64.shape[-1]
    return a64.reshape(c, -1, r), b64.reshape(c, r, -1)


def _merged_kernels(case: Any, params: Any) -> dict[str, np.ndarray]:
    return merged64(case, params)


# -- merge / unmerge ------------------------------------------------------------------------------
@pytest.mark.parametrize(("framework", "dispatch", "stacked", "transposed"), CASES)
def test_merge_per_expert(framework: str, dispatch: str, stacked: bool, transposed: bool) -> None:
    case = build(framework, dispatch, stacked=stacked, transposed_out=transposed)
    factors = random_factors(case)
    adapters = expert_adapters(case, factors)
    merged = _merge(case.params, adapters)
    ref = merged64(case, case.params, factors)
    for path, kernel in _merged_kernels(case, merged).items():
        assert_close(kernel, ref[path], 2e-6)
    assert_close(jax.jit(case.apply)(merged, case.x), ref_output(case, case.params, factors), 2e-5)
    back = jax.jit(lora.unmerge)(merged, adapters)
    base = merged64(case, case.params)
    for path, kernel in _merged_kernels(case, back).items():
        assert_close(kernel, base[path], 2e-6)


def test_merge_some_layers_of_a_stacked_expert_kernel() -> None:
    case = _case(True)
    factors = random_factors(case)
    merged = _merge(case.params, expert_adapters(case, factors, layers=(1,)))
    zeroed = {p: (np.concatenate([0 * a[:1], a[1:]]), b, s) for p, (a, b, s) in factors.items()}
    ref = merged64(case, case.params, zeroed)
    for path, kernel in _merged_kernels(case, merged).items():
        assert_close(kernel, ref[path], 2e-6)
        assert np.array_equal(kernel[0], merged64(case, case.params)[path][0])


def test_merge_bfloat16_expert_kernels() -> None:
    case = _case(False, param_dtype=jnp.bfloat16)
    factors = random_factors(case)
    merged = _merge(case.params, expert_adapters(case, factors, dtype=jnp.bfloat16))
    for path, kernel in _merged_kernels(case, merged).items():
        assert jax.tree.leaves(merged)[0].dtype == jnp.bfloat16
        a, b, s = factors[path]
        # reference from the bf16-rounded factors, one bf16 rounding of the sum allowed
        a16 = np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
        b16 = np.asarray(jnp.asarray(b, jnp.bfloat16), np.float64)
        ref = merged64(case, case.params, {path: (a16, b16, s)})[path]
        assert np.max(np.abs(kernel - ref) / np.maximum(np.abs(ref), 1e-3)) <= 2**-8


# -- combine --------------------------------------------------------------------------------------
WEIGHTS = (0.7, -0.4)


def _two_sets(stacked: bool, transposed: bool, ranks: tuple[int, int] = (2, 2)) -> tuple:
    case = _case(stacked, transposed)
    f = [
        random_factors(case, rank=ranks[0], scale=0.75, seed=3),
        random_factors(case, rank=ranks[1], scale=0.5, seed=4),
    ]
    return case, f, [expert_adapters(case, x) for x in f]


def _ncarried(case: Any, path: str) -> int:
    return len(case.kernels[path].carried)


@pytest.mark.parametrize(("stacked", "transposed"), LINEN)
def test_combine_cat_is_the_weighted_sum_per_expert(stacked: bool, transposed: bool) -> None:
    case, f, sets = _two_sets(stacked, transposed, ranks=(2, 3))
    out = adapter_entries(lora.combine(sets, WEIGHTS, "cat"))
    for path, w in out.items():
        ax = case.kernels[path]
        ref = sum(
            wi * carried_delta64(*fi[path], ax.carried, ax.inputs)
            for wi, fi in zip(WEIGHTS, f, strict=True)
        )
        assert w.rank == 5 and w.scale == 1.0
        assert_close(carried_delta64(w.a, w.b, 1.0, ax.carried, ax.inputs), ref, 2e-6)


@pytest.mark.parametrize(("stacked", "transposed"), LINEN)
def test_combine_svd_per_expert(stacked: bool, transposed: bool) -> None:
    case, f, sets = _two_sets(stacked, transposed, ranks=(2, 3))
    out = adapter_entries(lora.combine(sets, WEIGHTS, "svd", rank=1))
    for path, w in out.items():
        nc = _ncarried(case, path)
        flats = [_flat(fi[path][0], fi[path][1], nc) for fi in f]
        got_a, got_b = _flat(w.a, w.b, nc)
        assert w.a.shape[:nc] == tuple(np.shape(f[0][path][0])[:nc])
        for c in range(got_a.shape[0]):
            m = sum(
                wi * fi[path][2] * fa[c] @ fb[c]
                for wi, fi, (fa, fb) in zip(WEIGHTS, f, flats, strict=True)
            )
            u, s, vt = np.linalg.svd(m)
            assert_close(got_a[c] @ got_b[c], s[0] * np.outer(u[:, 0], vt[0]), 2e-5)


@pytest.mark.parametrize(("stacked", "transposed"), LINEN)
def test_combine_linear_per_expert(stacked: bool, transposed: bool) -> None:
    case, f, sets = _two_sets(stacked, transposed)
    out = adapter_entries(lora.combine(sets, WEIGHTS, "linear"))
    for path, w in out.items():
        nc = _ncarried(case, path)
        ws = [wi * fi[path][2] for wi, fi in zip(WEIGHTS, f, strict=True)]
        flats = [_flat(fi[path][0], fi[path][1], nc) for fi in f]
        a = sum(np.sign(v) * np.sqrt(abs(v)) * fa for v, (fa, _) in zip(ws, flats, strict=True))
        b = sum(np.sqrt(abs(v)) * fb for v, (_, fb) in zip(ws, flats, strict=True))
        got_a, got_b = _flat(w.a, w.b, nc)
        assert_close(got_a, a, 2e-6)
        assert_close(got_b, b, 2e-6)


def _index_adapter(w: Any, case: Any, path: str, c: int) -> Any:
    """The plain adapter of carried index ``c`` (flattened) of ``w``, built by hand."""
    ax = case.kernels[path]
    shape = kernel_shapes(case)[path]
    kept = [i for i in range(len(shape)) if i not in ax.carried]
    nc = len(ax.carried)
    a = np.asarray(w.a).reshape(-1, *w.a.shape[nc:])[c]
    b = np.asarray(w.b).reshape(-1, *w.b.shape[nc:])[c]
    return lora.LoraWeights(
        jnp.asarray(a),
        jnp.asarray(b),
        scale=w.scale,
        in_axes=tuple(kept.index(i) for i in ax.inputs),
        kernel_shape=tuple(shape[i] for i in kept),
    )


@pytest.mark.parametrize("method", ["magnitude_prune", "ties", "magnitude_prune_svd", "ties_svd"])
@pytest.mark.parametrize("stacked", [False, True])
def test_combine_pruning_per_expert(method: str, stacked: bool) -> None:
    case, _, sets = _two_sets(stacked, True)
    out = adapter_entries(lora.combine(sets, WEIGHTS, method, density=0.5))
    tables = [adapter_entries(s) for s in sets]
    for path, w in out.items():
        nc = _ncarried(case, path)
        got_a, got_b = _flat(w.a, w.b, nc)
        for c in range(got_a.shape[0]):
            one = [{"k": _index_adapter(t[path], case, path, c)} for t in tables]
            ref = lora.combine(one, WEIGHTS, method, density=0.5)["k"]
            ref_a, ref_b = np.asarray(ref.a, np.float64), np.asarray(ref.b, np.float64)
            rr = ref_a.shape[-1]
            assert_close(got_a[c] @ got_b[c], ref_a.reshape(-1, rr) @ ref_b.reshape(rr, -1), 2e-5)


@pytest.mark.parametrize("stacked", [False, True])
def test_combine_dare_draws_per_expert(stacked: bool) -> None:
    case, f, sets = _two_sets(stacked, False)
    d = 0.5
    out = adapter_entries(
        lora.combine(sets, WEIGHTS, "dare_linear", density=d, key=jax.random.key(1))
    )
    path = "params/layers/moe/experts/w_in" if stacked else "params/experts/w_in"
    nc = _ncarried(case, path)
    v = [
        np.sign(wi * fi[path][2]) * np.sqrt(abs(wi * fi[path][2]))
        for wi, fi in zip(WEIGHTS, f, strict=True)
    ]
    a1, a2 = (_flat(fi[path][0], fi[path][1], nc)[0] / d for fi in f)
    got = _flat(out[path].a, out[path].b, nc)[0]
    # every entry: the kept subset of the two weighted factors
    options = np.stack([np.zeros_like(a1), v[0] * a1, v[1] * a2, v[0] * a1 + v[1] * a2])
    assert np.min(np.abs(options - got[None]), axis=0).max() <= 1e-5
    zero = np.isclose(got, 0.0, atol=1e-7)
    assert 0.05 < zero.mean() < 0.5  # about (1 - d)^2 dropped by both
    assert len({z.tobytes() for z in zero}) == zero.shape[0]  # a mask per carried index


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_combine_keeps_the_expert_layout(method: str) -> None:
    case = _case(True)
    f = random_factors(case)
    sets = [expert_adapters(case, f, layers=(0,)), expert_adapters(case, f, layers=(1,))]
    out = lora.combine(sets, [1.0, 1.0], method)
    if method == "cat":  # layer 0 from set 0, layer 1 from set 1: together, f on every layer
        ref = merged64(case, case.params, f)
        for path, kernel in _merged_kernels(case, _merge(case.params, out)).items():
            assert_close(kernel, ref[path], 2e-6)
    for path, w in adapter_entries(out).items():
        w0 = adapter_entries(sets[0])[path]
        assert (w.kernel_shape, w.in_axes, w.layer_axes, w.expert_axes) == (
            w0.kernel_shape,
            w0.in_axes,
            w0.layer_axes,
            w0.expert_axes,
        )
        assert w.layers == (0, 1)


# -- stack / unstack / select / gather ------------------------------------------------------------
@pytest.mark.parametrize(("stacked", "transposed"), LINEN)
def test_stack_keeps_expert_axes(stacked: bool, transposed: bool) -> None:
    case, f, sets = _two_sets(stacked, transposed, ranks=(2, 3))
    st = lora.stack(sets)
    for path, w in adapter_entries(st).items():
        w0 = adapter_entries(sets[0])[path]
        assert (w.layer_axes, w.expert_axes, w.carried_axes) == (
            w0.layer_axes,
            w0.expert_axes,
            w0.carried_axes,
        )
        assert w.a.shape == (2, *w0.a.shape[:-1], 3)
        nc = len(w0.carried_axes)
        assert w.b.shape == (2, *w0.b.shape[:nc], 3, *w0.b.shape[nc + 1 :])
    for k in (0, 1):
        merged = _merge(case.params, lora.unstack(st, k))
        ref = merged64(case, case.params, f[k])
        for path, kernel in _merged_kernels(case, merged).items():
            assert_close(kernel, ref[path], 2e-6)
        picked = jax.jit(lambda s, i, p: lora.merge(p, select(s, i)))(st, jnp.int32(k), case.params)
        for path, kernel in _merged_kernels(case, picked).items():
            assert_close(kernel, ref[path], 2e-6)
    base = jax.jit(lambda s, p: lora.merge(p, select(s, jnp.int32(-1))))(st, case.params)
    for path, kernel in _merged_kernels(case, base).items():
        assert_close(kernel, merged64(case, case.params)[path], 0)


def test_gather_per_example_expert_factors() -> None:
    _, f, sets = _two_sets(True, False, ranks=(2, 3))
    path = "params/layers/moe/experts/w_in"
    w = adapter_entries(lora.stack(sets))[path]
    a, b = gather(w, jnp.array([1, -1, 0], jnp.int32))
    assert a.shape == (3, L, E, *w.a.shape[3:]) and b.shape == (3, L, E, *w.b.shape[3:])
    assert not np.any(np.asarray(a[1])) and not np.any(np.asarray(b[1]))
    assert np.array_equal(np.asarray(a[0]), np.asarray(f[1][path][0]))
    assert_close(b[2, ..., :2, :], f[0][path][1] * f[0][path][2], 1e-7)
    assert not np.any(np.asarray(b[2, ..., 2:, :]))


def test_stack_some_layers_zeroes_the_others() -> None:
    case = _case(True)
    f = random_factors(case)
    st = lora.stack([expert_adapters(case, f, layers=(1,)), expert_adapters(case, f)])
    w = adapter_entries(st)["params/layers/moe/experts/w_out"]
    assert not np.any(np.asarray(w.a[0, 0])) and np.all(np.asarray(w.a[0, 1]) != 0)
    assert np.all(np.asarray(w.a[1, 0]) != 0)


# -- summary --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("stacked", "transposed"), LINEN)
def test_summary_counts_every_expert(stacked: bool, transposed: bool) -> None:
    case = _case(stacked, transposed)
    f = random_factors(case, rank=3)
    s = lora.summary(case.params, expert_adapters(case, f), show=False)
    shapes = kernel_shapes(case)
    expected = {}
    for path, ax in case.kernels.items():
        shape = shapes[path]
        c = math.prod(shape[i] for i in ax.carried)
        n_in = math.prod(shape[i] for i in ax.inputs)
        n_out = math.prod(shape) // (c * n_in)
        expected[path] = c * 3 * (n_in + n_out)
    assert {r.path: r.params for r in s.rows} == expected
    assert s.trainable_params == sum(expected.values())
    assert s.trainable_bytes == 4 * sum(expected.values())
    assert s.base_params == sum(x.size for x in jax.tree.leaves(case.params))
    assert {r.path: r.rank for r in s.rows} == dict.fromkeys(expected, 3)


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("stacked", "dtype"), [(False, jnp.float32), (True, jnp.bfloat16)])
def test_checkpoint_round_trip(tmp_path: Any, stacked: bool, dtype: Any) -> None:
    case = _case(stacked, True)
    f = random_factors(case)
    adapters = expert_adapters(case, f, dtype=dtype, layers=(1,) if stacked else None)
    lora.save(tmp_path / "ckpt", adapters)
    back = lora.load(tmp_path / "ckpt")
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    old, new = adapter_entries(adapters), adapter_entries(back)
    for path, w in old.items():
        assert new[path].meta() == w.meta()
        want = (1 if stacked else 0,) if path.endswith(EXPERTS) else ()
        assert new[path].expert_axes == w.expert_axes == want
        for x, y in ((w.a, new[path].a), (w.b, new[path].b)):
            assert y.dtype == x.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    for path, kernel in _merged_kernels(case, _merge(case.params, back)).items():
        assert np.array_equal(kernel, _merged_kernels(case, _merge(case.params, adapters))[path])


# -- quantized expert bases -----------------------------------------------------------------------
TARGETS = r".*experts/w_(in|out)"


@pytest.mark.parametrize("dtype", ["nf4", "int8"])
@pytest.mark.parametrize(("stacked", "transposed"), LINEN)
def test_merge_on_a_quantized_expert_base(dtype: str, stacked: bool, transposed: bool) -> None:
    case = _case(stacked, transposed)
    f = random_factors(case)
    q = lora.quantize(case.params, TARGETS, dtype=dtype, block_size=32)
    quantized = {p for p, x in quantized_kernels(q).items()}
    assert quantized == {p for p in case.kernels if p.endswith(EXPERTS)}
    base = merged64(case, lora.dequantize(q))
    merged = _merge(q, expert_adapters(case, f))
    for path, kernel in _merged_kernels(case, merged).items():
        ax = case.kernels[path]
        assert_close(kernel, base[path] + carried_delta64(*f[path], ax.carried, ax.inputs), 2e-6)


def quantized_kernels(params: Any) -> dict[str, Any]:
    """Path -> each `lora.QuantizedKernel` of ``params``."""
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, lora.QuantizedKernel)
    )[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in kp): x
        for kp, x in flat
        if isinstance(x, lora.QuantizedKernel)
    }


@pytest.mark.parametrize("stacked", [False, True])
def test_requantize_expert_kernels(stacked: bool) -> None:
    case = _case(stacked)
    f = random_factors(case, std=0.1)
    n = int(stacked)  # a stacked kernel is quantized layer by layer (found by the probe)
    q = lora.quantize(case.params, TARGETS, dtype="int8", probe=case.probe)
    assert {x.layer_axes for x in quantized_kernels(q).values()} == {n}
    with pytest.warns(UserWarning):
        merged = _merge_requantize(q, expert_adapters(case, f))
    qs = quantized_kernels(merged)
    assert set(qs) == set(quantized_kernels(q)) and {x.layer_axes for x in qs.values()} == {n}
    base = merged64(case, lora.dequantize(q))
    got = merged64(case, lora.dequantize(merged))
    for path in qs:
        ax = case.kernels[path]
        ref = base[path] + carried_delta64(*f[path], ax.carried, ax.inputs)
        # int8 per (layer and) channel: at most half a step of the channel's absmax / 127
        step = np.max(np.abs(ref), axis=tuple(range(n, ref.ndim - 1)), keepdims=True) / 127
        assert np.all(np.abs(got[path] - ref) <= 0.5 * step + 1e-6)


def _merge_requantize(q: Any, adapters: Any) -> Any:
    return lora.merge(q, adapters, requantize=True)


def _dora64(kernel: np.ndarray, d: np.ndarray, m: np.ndarray, ax: Any) -> np.ndarray:
    """``m * V / ||V||`` in float64, ``V = W0 + delta``, the norm over the input axes per carried
    index and output unit (``m (*C, *O)`` put back in the kernel's layout)."""
    v = kernel + d
    norm = np.sqrt(np.sum(v**2, axis=ax.inputs, keepdims=True))
    outputs = [i for i in range(v.ndim) if i not in ax.carried and i not in ax.inputs]
    order = [*ax.carried, *outputs]  # m's axes, in kernel axis numbers
    m_k = np.expand_dims(np.transpose(m, np.argsort(np.argsort(order))), ax.inputs)
    return m_k * v / norm


@pytest.mark.parametrize(("stacked", "transposed"), LINEN)
def test_dora_expert_adapters_in_a_stack(stacked: bool, transposed: bool) -> None:
    case = _case(stacked, transposed)
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
                ref = _dora64(base[path], d, mags[path].astype(np.float64), ax)
            elif k == 1:
                ref = base[path] + carried_delta64(*f2[path], ax.carried, ax.inputs)
            else:
                ref = base[path]
            assert_close(got[path], ref, 2e-6)
