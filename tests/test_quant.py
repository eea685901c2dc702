"""QLoRA: quantize / dequantize (int8 per channel, NF4 block-wise, double quantization), requantize
and LoftQ, against numpy references written here (float64), bitsandbytes' tables rebuilt here
as bitsandbytes builds them, and the float models.
"""

from __future__ import annotations

import math
import re
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from scipy.stats import norm
from support.internal import DYNAMIC_MAP, NF4_LEVELS
from support.models import build, mlp
from support.refs import (
    DYN,
    NF4_BNB,
    linspace32,
    pack,
    ref_decode_nf4,
    ref_delta64,
    ref_double,
    ref_int8,
    ref_nf4,
    unpack,
)
from support.trees import leaves_by_path, replace_leaves

import flax_lora as lora

NF4_HALF_GAP = float(np.diff(NF4_BNB.astype(np.float64)).max() / 2)  # 0.1519...


def nf4_from_normal_quantiles() -> np.ndarray:
    """QLoRA's NormalFloat as bitsandbytes' ``create_normal_map(offset=0.9677083)`` computes it:
    8 positive and 7 negative quantiles of N(0, 1), and 0, normalised by the largest (in float32,
    as bitsandbytes does in torch)."""
    offset = 0.9677083
    v1 = norm.ppf(linspace32(offset, 0.5, 9)[:-1]).tolist()
    v3 = (-norm.ppf(linspace32(offset, 0.5, 8)[:-1])).tolist()
    values = np.sort(np.array([*v1, 0.0, *v3], np.float32))
    return values / values.max()


# ---------------------------------------------------------------------------------------------
# numpy float64 references
# ---------------------------------------------------------------------------------------------
def near_tie(t: np.ndarray, levels: np.ndarray, tol: float = 1e-5) -> np.ndarray:
    mids = (levels[:-1].astype(np.float64) + levels[1:]) / 2
    return np.abs(np.clip(t, -1, 1)[..., None] - mids).min(axis=-1) < tol


def normal(shape: tuple[int, ...], seed: int = 0, outliers: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    if outliers:  # a few large values, as real weights have
        w.reshape(-1)[rng.integers(0, w.size, max(1, w.size // 97))] *= 6.0
    return w.astype(np.float32)


SHAPES = [(64, 48), (5, 7, 9), (3, 3, 4, 8)]


# ---------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------
def test_nf4_levels_are_bitsandbytes_and_the_papers() -> None:
    np.testing.assert_array_equal(NF4_LEVELS, NF4_BNB)
    np.testing.assert_array_equal(nf4_from_normal_quantiles(), NF4_BNB)
    np.testing.assert_allclose(DYNAMIC_MAP, DYN, rtol=2e-7, atol=0)
    assert DYN.shape == (256,) and DYN[-1] == 1.0 and (np.diff(DYN) > 0).all()


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_against_reference(shape: tuple[int, ...]) -> None:
    w = normal(shape, seed=len(shape))
    q = lora.quantize_kernel(jnp.asarray(w), "int8")
    codes, absmax, _ = ref_int8(w)
    assert q.codes.dtype == jnp.int8 and q.codes.shape == shape and q.absmax.shape == shape[-1:]
    np.testing.assert_allclose(np.asarray(q.absmax), absmax, rtol=0)
    t = np.asarray(w, np.float64) * 127.0 / absmax
    tie = np.abs(t - np.floor(t) - 0.5) < 1e-4  # float32 vs float64 may round a tie differently
    got = np.asarray(q.codes, np.float64)
    np.testing.assert_array_equal(got[~tie], codes[~tie])
    assert np.abs(got - codes).max() <= 1
    out = lora.dequantize_kernel(q)
    assert out.shape == shape and out.dtype == jnp.float32
    err = np.abs(np.asarray(out, np.float64) - w)
    bound = absmax / 127.0 / 2.0
    assert (err <= bound * (1 + 1e-5) + 1e-7).all(), (err / bound).max()
    print(f"int8 {shape}: max |err| / (absmax/254) = {(err / bound).max():.4f}")


def test_int8_exact_round_trip() -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(-127, 128, (10, 6))
    codes[rng.integers(0, 10, 6), np.arange(6)] = 127 * rng.choice([-1, 1], 6)  # absmax per column
    step = 2.0 ** rng.integers(-8, 1, 6)  # absmax / 127 exact in binary
    w = (codes * step).astype(np.float32)
    q = lora.quantize_kernel(jnp.asarray(w), "int8")
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(lora.dequantize_kernel(q)), w)


# ---------------------------------------------------------------------------------------------
# nf4
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "block"), [((64, 48), 64), ((5, 7, 9), 64), ((3, 3, 4, 8), 32)])
def test_nf4_against_reference(shape: tuple[int, ...], block: int) -> None:
    w = normal(shape, seed=7)
    q = lora.quantize_kernel(jnp.asarray(w), "nf4", block_size=block)
    ref = ref_nf4(w, block)
    n_blocks = -(-w.size // block)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (n_blocks * block // 2,)
    assert q.absmax.dtype == jnp.float32 and q.absmax.shape == (n_blocks,)
    assert (q.shape, q.dtype, q.format, q.block_size) == (shape, jnp.float32, "nf4", block)
    np.testing.assert_allclose(np.asarray(q.absmax), ref["absmax"], rtol=0)
    got = unpack(np.asarray(q.codes))  # the test's own unpacking: high nibble first
    tie = near_tie(ref["t"], NF4_BNB)
    np.testing.assert_array_equal(got[~tie], ref["codes"][~tie])
    assert np.abs(got - ref["codes"]).max() <= 1
    # the padding of a partial last block is stored as the code of 0.0
    assert (got[w.size :] == 7).all()
    out = lora.dequantize_kernel(q)
    assert out.shape == shape and out.dtype == jnp.float32
    err = np.abs(np.asarray(out, np.float64) - w).reshape(-1)
    block_absmax = np.repeat(ref["absmax"], block)[: w.size]
    bound = NF4_HALF_GAP * block_absmax
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()
    np.testing.assert_allclose(
        np.asarray(out).reshape(-1)[~tie[: w.size]],
        ref["deq"].reshape(-1)[~tie[: w.size]],
        rtol=1e-6,
        atol=1e-7,
    )
    print(
        f"nf4 {shape} block {block}: max |err| / block absmax = {(err / block_absmax).max():.4f}"
        f" (bound {NF4_HALF_GAP:.4f})"
    )


def test_nf4_exact_packing_round_trip() -> None:
    rng = np.random.default_rng(4)
    block, n_blocks = 16, 6
    codes = rng.integers(0, 16, (n_blocks, block))
    codes[:, 0] = 15  # level 1.0: each block's absmax is its scale exactly
    scale = rng.uniform(0.1, 3.0, n_blocks).astype(np.float32)
    w = (NF4_BNB[codes] * scale[:, None]).astype(np.float32).reshape(8, 12)
    q = lora.quantize_kernel(jnp.asarray(w), "nf4", block_size=block)
    np.testing.assert_array_equal(np.asarray(q.codes), pack(codes.reshape(-1)))
    np.testing.assert_array_equal(unpack(pack(codes.reshape(-1))), codes.reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax), scale)
    np.testing.assert_array_equal(np.asarray(lora.dequantize_kernel(q)), w)  # bit for bit


def test_double_quant_against_reference() -> None:
    shape, block = (300, 130), 64  # 610 blocks: 3 groups of 256 scales, the last one partial
    w = normal(shape, seed=9)
    q = lora.quantize_kernel(jnp.asarray(w), "nf4", block_size=block, double_quant=True)
    single = lora.quantize_kernel(jnp.asarray(w), "nf4", block_size=block)
    ref = ref_nf4(w, block)
    dq = ref_double(ref["absmax"])
    n_blocks = ref["absmax"].size
    assert q.absmax.dtype == jnp.uint8 and q.absmax.shape == (n_blocks,)
    assert q.absmax_scale.shape == (-(-n_blocks // 256),) and q.absmax_offset.shape == ()
    np.testing.assert_allclose(float(q.absmax_offset), ref["absmax"].mean(), rtol=1e-6)
    tie = near_tie(dq["t"], DYN, tol=1e-6)
    got = np.asarray(q.absmax).astype(np.int64)
    np.testing.assert_array_equal(got[~tie], dq["codes"][~tie])
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(single.codes))  # same 4-bit codes
    # the dequantized scales are within half the widest gap of the dynamic map x the group absmax
    deq_absmax = DYN[got].astype(np.float64) * np.repeat(np.asarray(q.absmax_scale), 256)[
        :n_blocks
    ] + float(q.absmax_offset)
    centred = np.abs(ref["absmax"] - ref["absmax"].mean())
    group_absmax = np.array([centred[i : i + 256].max() for i in range(0, n_blocks, 256)])
    dyn_half_gap = max(np.diff(DYN.astype(np.float64)).max() / 2, 1 + DYN[0])
    scale_err = np.abs(deq_absmax - ref["absmax"])
    scale_bound = dyn_half_gap * np.repeat(group_absmax, 256)[:n_blocks]
    assert (scale_err <= scale_bound * (1 + 1e-5) + 1e-7).all()
    np.testing.assert_allclose(deq_absmax[~tie], dq["deq"][~tie], rtol=1e-6)
    # the kernel: within half an NF4 gap times the block absmax, plus the scale's own error
    out = np.asarray(lora.dequantize_kernel(q), np.float64).reshape(-1)
    err = np.abs(out - w.reshape(-1))
    bound = NF4_HALF_GAP * np.repeat(ref["absmax"], block) + np.repeat(scale_err, block)
    assert (err <= bound[: w.size] * (1 + 1e-5) + 1e-6).all()
    np.testing.assert_allclose(
        out,
        (NF4_BNB[unpack(np.asarray(q.codes))] * np.repeat(deq_absmax, block))[: w.size],
        rtol=1e-6,
        atol=1e-7,
    )
    assert q.nbytes < single.nbytes
    print(
        f"double quant: max scale err / group absmax = {(scale_err / scale_bound).max():.3f} "
        f"of the bound; bytes {q.nbytes} vs {single.nbytes} without"
    )


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_bfloat16_kernel(fmt: str) -> None:
    w = normal((32, 24), seed=11).astype(ml_dtypes.bfloat16)
    q = lora.quantize_kernel(jnp.asarray(w), fmt)
    out = lora.dequantize_kernel(q)
    assert out.dtype == jnp.bfloat16 and out.shape == (32, 24) and q.dtype == jnp.bfloat16
    w64 = w.astype(np.float64)
    if fmt == "int8":
        _, absmax, ref = ref_int8(w64)
        t = w64 * 127.0 / absmax
        tie = np.abs(t - np.floor(t) - 0.5) < 1e-4  # bfloat16 inputs make exact ties common
    else:
        r = ref_nf4(w64, 64)
        ref, tie = r["deq"], near_tie(r["t"], NF4_BNB)[: w.size].reshape(w.shape)
    # the reference, rounded once to bfloat16 (ties, which may round either way, aside)
    got = np.asarray(out, np.float64)
    np.testing.assert_allclose(got[~tie], ref[~tie], rtol=2**-8, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# trees
# ---------------------------------------------------------------------------------------------
def kernel_paths(tree: object) -> set[str]:
    return {
        p
        for p, x in leaves_by_path(tree).items()
        if x.ndim >= 2 and p.rsplit("/", 1)[-1] in ("kernel", "embedding")
    }


def quantized_paths(qtree: object) -> dict[str, lora.QuantizedKernel]:
    flat = leaves_by_path(qtree, is_leaf=lambda x: isinstance(x, lora.QuantizedKernel))
    return {p: x for p, x in flat.items() if isinstance(x, lora.QuantizedKernel)}


@pytest.mark.parametrize(
    ("case", "fmt"),
    [("linen_mha", "int8"), ("nnx_mha", "nf4"), ("linen_embed", "nf4"), ("linen_conv2d", "int8")],
)
def test_tree_against_reference_model(case: str, fmt: str) -> None:
    b = build(case)
    q = lora.quantize(b.params, dtype=fmt, block_size=16)
    found = quantized_paths(q)
    assert set(found) == kernel_paths(b.params)
    before, after = leaves_by_path(b.params), leaves_by_path(lora.dequantize(q))
    for p, x in before.items():  # everything else is untouched
        if p not in found:
            assert after[p] is x
    ref = {}
    for p in found:
        w = np.asarray(before[p])
        ref[p] = ref_int8(w)[2] if fmt == "int8" else ref_nf4(w, 16)["deq"]
        assert after[p].shape == w.shape and after[p].dtype == w.dtype
    ref_params = replace_leaves(b.params, {p: jnp.asarray(v, jnp.float32) for p, v in ref.items()})
    y = jax.jit(lambda qp, x: b.apply(lora.dequantize(qp), x))(q, b.x)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(b.apply(ref_params, b.x)), rtol=2e-5, atol=2e-5
    )


def test_targets_select_by_fullmatch() -> None:
    _, variables, _ = mlp()
    q = lora.quantize(variables, targets=r"params/fc[01]/kernel", dtype="int8")
    assert set(quantized_paths(q)) == {"params/fc0/kernel", "params/fc1/kernel"}
    q = lora.quantize(variables, targets=["fc0/kernel", r".*/head/kernel"], dtype="int8")
    assert set(quantized_paths(q)) == {"params/head/kernel"}  # fullmatch: "fc0/kernel" matches none
    # quantizing again leaves the quantized kernels alone and adds the others
    q2 = lora.quantize(q, dtype="nf4")
    kinds = {p: k.format for p, k in quantized_paths(q2).items()}
    assert kinds == {
        "params/head/kernel": "int8",
        "params/fc0/kernel": "nf4",
        "params/fc1/kernel": "nf4",
    }


def test_bytes_shrink() -> None:
    w = jnp.asarray(normal((256, 512), seed=1))
    params = {"params": {"fc": {"kernel": w, "bias": jnp.zeros(512)}}}
    nbytes = lambda t: sum(int(x.nbytes) for x in jax.tree.leaves(t))
    n, bias = 256 * 512, 512 * 4
    assert nbytes(params) == 4 * n + bias
    assert nbytes(lora.quantize(params, dtype="int8")) == n + 4 * 512 + bias
    assert nbytes(lora.quantize(params, dtype="nf4")) == n // 2 + 4 * (n // 64) + bias
    dq = lora.quantize(params, dtype="nf4", double_quant=True)
    assert nbytes(dq) == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + bias
    print(
        f"bytes f32 {nbytes(params)}, int8 {nbytes(lora.quantize(params, dtype='int8'))}, "
        f"nf4 {nbytes(lora.quantize(params))}, nf4+dq {nbytes(dq)}"
    )


def test_jit() -> None:
    _, variables, _ = mlp()
    qfn = jax.jit(lora.quantize, static_argnames=("targets", "dtype", "block_size", "double_quant"))
    for kw in (dict(dtype="nf4", block_size=8, double_quant=True),):
        eager, jitted = lora.quantize(variables, **kw), qfn(variables, **kw)
        assert jax.tree.structure(eager) == jax.tree.structure(jitted)
        for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            assert e.dtype == j.dtype
            if jnp.issubdtype(e.dtype, jnp.integer):  # codes: equal
                np.testing.assert_array_equal(np.asarray(e), np.asarray(j))
            else:  # scales: XLA may sum the mean of the absmaxes in another order
                np.testing.assert_allclose(np.asarray(e), np.asarray(j), rtol=1e-6)
        np.testing.assert_allclose(  # a fused multiply-add may round differently
            np.asarray(jax.tree.leaves(jax.jit(lora.dequantize)(eager))[1]),
            np.asarray(jax.tree.leaves(lora.dequantize(eager))[1]),
            rtol=1e-6,
        )


# ---------------------------------------------------------------------------------------------
# with adapters
# ---------------------------------------------------------------------------------------------
def numpy_mlp(p: dict, x: np.ndarray) -> np.ndarray:
    h = np.asarray(x, np.float64)
    for name in ("fc0", "fc1", "head"):
        h = h @ p[name]["kernel"] + np.asarray(p[name]["bias"], np.float64)
        if name != "head":
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_merge_and_wrap_on_quantized_base(fmt: str) -> None:
    model, variables, x = mlp()
    q = lora.quantize(variables, dtype=fmt, block_size=8)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random")
    adapters = lora.init(jax.random.key(0), variables, config)
    ref, base = {}, {}
    for name in ("fc0", "fc1", "head"):
        w = np.asarray(variables["params"][name]["kernel"])
        base[name] = ref_int8(w)[2] if fmt == "int8" else ref_nf4(w, 8)["deq"]
        ad = adapters["params"][name]["kernel"]
        ref[name] = dict(
            kernel=base[name] + ref_delta64(ad.a, ad.b, (0,), 1.5),
            bias=variables["params"][name]["bias"],
        )
    want = numpy_mlp(ref, np.asarray(x))
    y = model.apply(lora.merge(lora.dequantize(q), adapters), x)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    # merge onto the quantized base directly: float kernels, by default
    merged = lora.merge(q, adapters)
    assert not quantized_paths(merged)
    np.testing.assert_allclose(np.asarray(model.apply(merged, x)), want, rtol=1e-5, atol=1e-5)
    # adapters made on the quantized tree (shapes only) fit the float model the same way
    on_q = lora.init(jax.random.key(0), q, config)
    for u, v in zip(jax.tree.leaves(on_q), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # lora.wrap takes the quantized tree and dequantizes inside the jitted call
    for mode in ("auto", "merged"):
        fn = jax.jit(lora.wrap(model.apply, mode=mode))
        np.testing.assert_allclose(np.asarray(fn(q, adapters, x)), want, rtol=1e-5, atol=1e-5)
    # gradients w.r.t. the adapters, against the same model on the reference's float base
    ref_base = replace_leaves(
        variables, {f"params/{n}/kernel": jnp.asarray(v, jnp.float32) for n, v in base.items()}
    )
    loss = lambda base, ad: jnp.sum(jnp.tanh(lora.wrap(model.apply)(base, ad, x)))
    g = jax.jit(jax.grad(lambda ad, qp: loss(qp, ad)))(adapters, q)
    g_ref = jax.grad(lambda ad: loss(ref_base, ad))(adapters)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(dtype="int8"), dict(dtype="nf4", double_quant=True)])
def test_requantize_warns_with_the_error(kw: dict) -> None:
    _, variables, _ = mlp()
    q = lora.quantize(variables, targets=r".*/fc[01]/kernel", block_size=8, **kw)
    adapters = lora.init(jax.random.key(0), variables, lora.LoraConfig(rank=2, init="random"))
    merged = lora.merge(lora.dequantize(q), adapters)
    with pytest.warns(UserWarning, match=r"relative error .* of up to (\d|\.)+") as rec:
        rq = lora.requantize(merged, like=q)
    with pytest.warns(UserWarning, match=r"relative error"):
        via_merge = lora.merge(q, adapters, requantize=True)
    assert set(quantized_paths(via_merge)) == set(quantized_paths(q))
    worst = float(re.search(r"up to ([0-9.e-]+)", str(rec[0].message)).group(1))
    found = quantized_paths(rq)
    assert set(found) == set(quantized_paths(q))
    errs = []
    for p, k in found.items():
        old = quantized_paths(q)[p]
        assert (k.format, k.block_size, k.double_quant, k.shape) == (
            old.format,
            old.block_size,
            old.double_quant,
            old.shape,
        )
        w = np.asarray(leaves_by_path(merged)[p], np.float64)
        back = np.asarray(lora.dequantize_kernel(k), np.float64)
        errs.append(np.linalg.norm(w - back) / np.linalg.norm(w))
    np.testing.assert_allclose(worst, max(errs), rtol=2e-3)
    assert leaves_by_path(rq)["params/head/kernel"] is leaves_by_path(merged)["params/head/kernel"]


# ---------------------------------------------------------------------------------------------
# LoftQ
# ---------------------------------------------------------------------------------------------
def dense_params(shape: tuple[int, int] = (64, 48), seed: int = 0) -> dict:
    return {
        "params": {
            "fc": {
                "kernel": jnp.asarray(normal(shape, seed, outliers=False)),
                "bias": jnp.zeros(shape[1]),
            }
        }
    }


@pytest.mark.parametrize(("fmt", "iters"), [("nf4", 1), ("nf4", 4), ("int8", 1)])
def test_loftq_reduces_the_quantization_error(fmt: str, iters: int) -> None:
    params = dense_params()
    w0 = np.asarray(params["params"]["fc"]["kernel"], np.float64)
    rank, alpha = 6, 12.0  # scale 2: the factors must carry 1 / scale
    config = lora.LoraConfig(
        rank=rank, alpha=alpha, init="loftq", loftq_iter=iters, loftq_dtype=fmt
    )
    adapters, qparams = lora.init(jax.random.key(0), params, config)
    qk = qparams["params"]["fc"]["kernel"]
    assert isinstance(qk, lora.QuantizedKernel) and qk.format == fmt
    assert qparams["params"]["fc"]["bias"] is params["params"]["fc"]["bias"]
    ad = adapters["params"]["fc"]["kernel"]
    delta = ref_delta64(ad.a, ad.b, (0,), alpha / rank)
    if fmt == "nf4":
        deq = ref_decode_nf4(qk)
        plain = ref_nf4(w0, 64)["deq"]
    else:
        deq = np.asarray(qk.codes, np.float64) * np.asarray(qk.absmax, np.float64) / 127.0
        plain = ref_int8(w0)[2]
    e_plain = np.linalg.norm(w0 - plain)
    e_loftq = np.linalg.norm(w0 - (deq + delta))
    # the factors are the best rank-r fit of the residual W0 - deQ(Q) (Eckart-Young)
    s = np.linalg.svd(w0 - deq, compute_uv=False)
    np.testing.assert_allclose(e_loftq, np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-4)
    if iters == 1:  # Q = quantize(W0)
        np.testing.assert_allclose(deq, plain, rtol=1e-6, atol=1e-6)
    print(
        f"LoftQ {fmt} iter={iters} r={rank}: ||W0 - (deQ(Q) + s a@b)|| = {e_loftq:.4f} vs plain "
        f"||W0 - deQ(Q(W0))|| = {e_plain:.4f} ({100 * (1 - e_loftq / e_plain):.1f}% lower)"
    )
    assert e_loftq < 0.97 * e_plain
    # the lead's path: merged model on the dequantized base
    merged = lora.merge(lora.dequantize(qparams), adapters)["params"]["fc"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged), deq + delta, rtol=1e-5, atol=1e-5)


def test_loftq_more_iterations_do_not_hurt() -> None:
    params = dense_params(seed=5)
    w0 = np.asarray(params["params"]["fc"]["kernel"], np.float64)
    errs = {}
    for iters in (1, 5):
        config = lora.LoraConfig(rank=8, alpha=8.0, init="loftq", loftq_iter=iters)
        ad, qp = lora.init(jax.random.key(0), params, config)
        merged = lora.merge(lora.dequantize(qp), ad)["params"]["fc"]["kernel"]
        errs[iters] = np.linalg.norm(w0 - np.asarray(merged, np.float64))
    print(f"LoftQ nf4 r=8: error after 1 iteration {errs[1]:.4f}, after 5 {errs[5]:.4f}")
    assert errs[5] <= errs[1] * 1.001


def test_loftq_on_a_kernel_with_several_input_axes() -> None:
    b = build("linen_dense_general")  # kernel (4, 5, 3, 2), input axes (0, 1)
    config = lora.LoraConfig(rank=2, alpha=4.0, init="loftq", loftq_dtype="int8")
    adapters, qparams = lora.init(jax.random.key(0), b.params, config, probe=b.probe)
    w0 = np.asarray(b.params["params"]["kernel"], np.float64)
    qk = qparams["params"]["kernel"]
    assert qk.shape == w0.shape
    ad = adapters["params"]["kernel"]
    deq = np.asarray(qk.codes, np.float64) * np.asarray(qk.absmax, np.float64) / 127.0
    e_loftq = np.linalg.norm(w0 - (deq + ref_delta64(ad.a, ad.b, (0, 1), 2.0)))
    e_plain = np.linalg.norm(w0 - ref_int8(w0)[2])
    print(f"LoftQ int8 on DenseGeneral (4, 5, 3, 2): {e_loftq:.5f} vs plain {e_plain:.5f}")
    assert e_loftq < e_plain
    y = lora.wrap(b.apply)(lora.dequantize(qparams), adapters, b.x)
    assert np.isfinite(np.asarray(y)).all()


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input() -> None:
    _, variables, _ = mlp()
    with pytest.raises(ValueError, match=r"dtype must be one of \('int8', 'nf4'\); got 'int4'"):
        lora.quantize(variables, dtype="int4")
    for bad in (63, 0, -2):
        with pytest.raises(ValueError, match=r"block_size must be a positive even number"):
            lora.quantize(variables, block_size=bad)
    with pytest.raises(TypeError, match="block_size must be an int"):
        lora.quantize(variables, block_size=64.0)
    with pytest.raises(ValueError, match="double_quant applies to dtype='nf4' only"):
        lora.quantize(variables, dtype="int8", double_quant=True)
    with pytest.raises(ValueError, match=r"match no unquantized kernel.*params/fc0/kernel"):
        lora.quantize(variables, targets=r".*/query/kernel")
    with pytest.raises(ValueError, match="not a valid regex"):
        lora.quantize(variables, targets="(")
    ints = {"params": {"emb": {"kernel": jnp.ones((4, 3), jnp.int32)}}}
    with pytest.raises(TypeError, match=r"'params/emb/kernel' has dtype int32"):
        lora.quantize(ints)
    q = lora.quantize(variables)
    with pytest.raises(ValueError, match=r"already quantized: \['params/fc0/kernel'"):
        lora.quantize(q)
    with pytest.raises(ValueError, match=r"'params/fc0/kernel'.* are already quantized"):
        lora.quantize(q, targets=r".*fc0/kernel")
    with pytest.raises(TypeError, match="expects a QuantizedKernel"):
        lora.dequantize_kernel(jnp.ones((2, 2)))
    other = {"params": {"fc0": {"kernel": jnp.ones((4, 6))}}}
    with pytest.raises(ValueError, match=r"'params/fc1/kernel'.* not in params"):
        lora.requantize(other, like=q)
    wrong = replace_leaves(variables, {"params/fc0/kernel": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"'params/fc0/kernel' has shape \(2, 2\)"):
        lora.requantize(wrong, like=q)
    with pytest.raises(ValueError, match="holds no QuantizedKernel"):
        lora.requantize(variables, like=variables)
    with pytest.raises(ValueError, match=r"LoraConfig.loftq_iter must be at least 1"):
        lora.LoraConfig(init="loftq", loftq_iter=0)
    with pytest.raises(ValueError, match=r"LoraConfig.loftq_dtype must be 'nf4' or 'int8'"):
        lora.LoraConfig(init="loftq", loftq_dtype="fp4")
    with pytest.raises(ValueError, match=r"init='loftq' needs rank <= .*'params/head/kernel'"):
        lora.init(jax.random.key(0), variables, lora.LoraConfig(rank=4, init="loftq"))


def test_init_on_a_quantized_base_needs_no_values_but_pissa_does() -> None:
    _, variables, _ = mlp()
    q = lora.quantize(variables, dtype="nf4", block_size=8)
    with pytest.raises(TypeError, match=r"init='pissa'.*QuantizedKernel"):
        lora.init(jax.random.key(0), q, lora.LoraConfig(rank=2, init="pissa"))


# ---------------------------------------------------------------------------------------------
# merge / unmerge on a quantized base: only the adapted kernels are dequantized
# ---------------------------------------------------------------------------------------------
def ref_dequant64(w: np.ndarray, fmt: str, block: int, double_quant: bool) -> np.ndarray:
    """deQ(Q(w)) in float64 from the test's own references (no near-ties allowed)."""
    if fmt == "int8":
        _, absmax, deq = ref_int8(w)
        t = np.asarray(w, np.float64) * 127.0 / absmax
        assert (np.abs(t - np.floor(t) - 0.5) > 1e-4).all()  # no rounding ties in the data
        return deq
    r = ref_nf4(w, block)
    assert not near_tie(r["t"][: w.size], NF4_BNB).any()
    if not double_quant:
        return r["deq"]
    d = ref_double(r["absmax"])
    assert not near_tie(d["t"], DYN, tol=1e-6).any()
    vals = NF4_BNB[r["codes"]].astype(np.float64).reshape(-1, block) * d["deq"][:, None]
    return vals.reshape(-1)[: w.size].reshape(w.shape)


QUANT_KW = [
    dict(dtype="int8"),
    dict(dtype="nf4", block_size=8),
    dict(dtype="nf4", block_size=8, double_quant=True),
]


@pytest.mark.parametrize("kw", QUANT_KW, ids=["int8", "nf4", "nf4-dq"])
def test_merge_dequantizes_only_the_adapted_kernels(kw: dict) -> None:
    _, variables, _ = mlp()
    q = lora.quantize(variables, targets=r".*/(fc1|head)/kernel", **kw)  # fc0 stays float
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random", targets=r".*/fc1/kernel")
    adapters = lora.init(jax.random.key(0), variables, config)
    ad = adapters["params"]["fc1"]["kernel"]
    w = np.asarray(variables["params"]["fc1"]["kernel"])
    deq = ref_dequant64(w, kw["dtype"], kw.get("block_size", 0), kw.get("double_quant", False))
    delta = ref_delta64(ad.a, ad.b, (0,), 1.5)
    head = q["params"]["head"]["kernel"]
    for fn, want in ((lora.merge, deq + delta), (lora.unmerge, deq - delta)):
        out = fn(q, adapters)
        # the unadapted quantized kernel: the very same QuantizedKernel, codes and scales
        kept = out["params"]["head"]["kernel"]
        assert isinstance(kept, lora.QuantizedKernel) and kept is head
        for name in ("codes", "absmax", "absmax_scale", "absmax_offset"):
            assert getattr(kept, name) is getattr(head, name)
        # every other leaf untouched too
        for name in ("fc0", "fc1", "head"):
            assert out["params"][name]["bias"] is q["params"][name]["bias"]
        assert out["params"]["fc0"]["kernel"] is q["params"]["fc0"]["kernel"]
        # the adapted kernel: a plain float32 array, deQ(W) +/- scale * a @ b
        got = out["params"]["fc1"]["kernel"]
        assert not isinstance(got, lora.QuantizedKernel)
        assert got.dtype == jnp.float32 and got.shape == w.shape
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)
        assert set(quantized_paths(out)) == {"params/head/kernel"}
    # jitted: the unadapted kernel comes back quantized with the same codes and scales
    out = jax.jit(lora.merge)(q, adapters)
    kept = out["params"]["head"]["kernel"]
    assert isinstance(kept, lora.QuantizedKernel)
    for u, v in zip(jax.tree.leaves(kept), jax.tree.leaves(head), strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    np.testing.assert_allclose(
        np.asarray(out["params"]["fc1"]["kernel"], np.float64), deq + delta, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("kw", QUANT_KW, ids=["int8", "nf4", "nf4-dq"])
def test_merge_without_adapters_leaves_a_quantized_tree_untouched(kw: dict) -> None:
    _, variables, _ = mlp()
    q = lora.quantize(variables, **kw)
    for out in (lora.merge(q, None), lora.unmerge(q, None), lora.merge(q, None, requantize=True)):
        flat_q = jax.tree_util.tree_flatten(
            q, is_leaf=lambda x: isinstance(x, lora.QuantizedKernel)
        )
        flat_o = jax.tree_util.tree_flatten(
            out, is_leaf=lambda x: isinstance(x, lora.QuantizedKernel)
        )
        assert flat_o[1] == flat_q[1]
        assert len(quantized_paths(out)) == 3
        for u, v in zip(flat_o[0], flat_q[0], strict=True):
            assert u is v


def test_merge_requantize_keeps_unadapted_kernels_as_they_were() -> None:
    _, variables, _ = mlp()
    q = lora.quantize(variables, dtype="nf4", block_size=8)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random", targets=r".*/fc1/kernel")
    adapters = lora.init(jax.random.key(0), variables, config)
    with pytest.warns(
        UserWarning, match=r"relative error .*\(at 'params/fc1/kernel'; mean .* over 1 kernels"
    ):
        out = lora.merge(q, adapters, requantize=True)
    # the adapted kernel quantized again from the float merge, in the base's format
    float_merge = lora.merge(q, adapters)["params"]["fc1"]["kernel"]
    again = out["params"]["fc1"]["kernel"]
    assert isinstance(again, lora.QuantizedKernel)
    assert (again.format, again.block_size, again.shape) == ("nf4", 8, (6, 6))
    fresh = lora.quantize_kernel(float_merge, "nf4", block_size=8)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(fresh.codes))
    # the others: the very same objects, not a re-quantization of their dequantized values
    for name in ("fc0", "head"):
        assert out["params"][name]["kernel"] is q["params"][name]["kernel"]
    # adapters only on a float kernel of a partly quantized base: nothing is rounded, no warning
    q_head = lora.quantize(variables, targets=r".*/head/kernel", dtype="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = lora.merge(q_head, adapters, requantize=True)
    assert out["params"]["head"]["kernel"] is q_head["params"]["head"]["kernel"]
    np.testing.assert_allclose(
        np.asarray(out["params"]["fc1"]["kernel"], np.float64),
        np.asarray(variables["params"]["fc1"]["kernel"], np.float64)
        + ref_delta64(
            adapters["params"]["fc1"]["kernel"].a, adapters["params"]["fc1"]["kernel"].b, (0,), 1.5
        ),
        rtol=1e-6,
        atol=1e-6,
    )
    # requantize=True on a base with nothing quantized still says so
    with pytest.raises(ValueError, match="holds no QuantizedKernel"):
        lora.merge(variables, adapters, requantize=True)
