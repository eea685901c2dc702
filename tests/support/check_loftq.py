"""LoftQ (``init="loftq"``) on kernels stacked by ``nn.scan`` (``mlp-linen``, ``nested``): one
LoftQ per layer, the stacked base quantized in `lora.quantize`'s format.

References: the unstacked LoftQ of each layer's kernel (``lora.init`` on a tree holding that
layer alone), `lora.quantize` of the float params (plain QLoRA), and float64 numpy: the tests'
own decoding of the codes (`support.refs.ref_decode`: NF4 levels, ``codes * absmax / 127``),
per-layer SVDs (Eckart-Young) and errors.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_lora as lora

from .cases import check
from .mlp_stack import ALIGNED, L, Stack
from .models import NestedStack
from .refs import ref_decode, ref_delta64

RANK, ALPHA = 4, 8.0  # scale 2: the factors carry 1 / scale
SCALE = ALPHA / RANK
STACKED = ("fc1", "fc2")


_MODELS: dict[tuple[int, int], tuple[Stack, Any, np.ndarray]] = {}


def model(dims: tuple[int, int] = ALIGNED) -> tuple[Stack, Any, np.ndarray]:
    if dims not in _MODELS:
        m = Stack(*dims)
        x = np.random.default_rng(0).normal(size=(6, dims[0])).astype(np.float32)
        _MODELS[dims] = (m, m.init(jax.random.key(0), x), x)
    return _MODELS[dims]


def config(fmt: str, iters: int, **kw: Any) -> lora.LoraConfig:
    return lora.LoraConfig(
        rank=RANK, alpha=ALPHA, init="loftq", loftq_iter=iters, loftq_dtype=fmt, **kw
    )


def loftq(m: nn.Module, params: Any, x: np.ndarray, cfg: lora.LoraConfig) -> tuple[Any, Any]:
    return lora.init(jax.random.key(1), params, cfg, probe=lambda p: m.apply(p, x))


def stacked(tree: Any, name: str) -> Any:
    return tree["params"]["layers"][name]["kernel"]


def assert_same_codes(q: lora.QuantizedKernel, ref: lora.QuantizedKernel) -> None:
    assert (q.shape, q.dtype, q.format, q.block_size) == (
        ref.shape,
        ref.dtype,
        ref.format,
        ref.block_size,
    )
    assert q.absmax_scale is None and q.absmax_offset is None
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(q.absmax), np.asarray(ref.absmax))


# ---------------------------------------------------------------------------------------------
# (1) per layer
# ---------------------------------------------------------------------------------------------
@check
def nf4_whole_blocks_per_layer_is_the_unstacked_loftq_of_each_layer(iters: int) -> None:
    m, params, x = model(ALIGNED)
    cfg = config("nf4", iters)
    adapters, qparams = loftq(m, params, x, cfg)
    for name in STACKED:
        ad, q = stacked(adapters, name), stacked(qparams, name)
        w0 = np.asarray(stacked(params, name))
        assert ad.layer_axes == 1 and ad.layers is None
        assert ad.a.shape == (L, w0.shape[1], RANK) and ad.b.shape == (L, RANK, w0.shape[2])
        per_layer_codes = q.codes.shape[0] // L
        per_layer_blocks = q.absmax.shape[0] // L
        for layer in range(L):
            ad1, q1 = lora.init(jax.random.key(1), {"p": {"kernel": jnp.asarray(w0[layer])}}, cfg)
            ad1, q1 = ad1["p"]["kernel"], q1["p"]["kernel"]
            np.testing.assert_array_equal(np.asarray(ad.a[layer]), np.asarray(ad1.a))
            np.testing.assert_array_equal(np.asarray(ad.b[layer]), np.asarray(ad1.b))
            codes = slice(layer * per_layer_codes, (layer + 1) * per_layer_codes)
            blocks = slice(layer * per_layer_blocks, (layer + 1) * per_layer_blocks)
            np.testing.assert_array_equal(np.asarray(q.codes[codes]), np.asarray(q1.codes))
            np.testing.assert_array_equal(np.asarray(q.absmax[blocks]), np.asarray(q1.absmax))


@check
def stacked_base_is_lora_quantize_format_and_each_layer_beats_plain_qlora(
    fmt: str, iters: int, dims: tuple[int, int]
) -> None:
    m, params, x = model(dims)
    adapters, qparams = loftq(m, params, x, config(fmt, iters))
    plain = lora.quantize(params, dtype=fmt)
    for name in STACKED:
        ad, q, qp = stacked(adapters, name), stacked(qparams, name), stacked(plain, name)
        w0 = np.asarray(stacked(params, name), np.float64)
        assert isinstance(q, lora.QuantizedKernel)
        # the same stored layout as lora.quantize of the stacked kernel
        assert (q.shape, q.dtype, q.format, q.block_size) == (
            qp.shape,
            qp.dtype,
            qp.format,
            64 * (fmt == "nf4"),
        )
        assert q.codes.shape == qp.codes.shape and q.absmax.shape == qp.absmax.shape
        if iters == 1:  # Q = quantize(W0): plain QLoRA's base
            assert_same_codes(q, qp)
        deq, deq_plain = ref_decode(q), ref_decode(qp)
        for layer in range(L):
            delta = ref_delta64(ad.a[layer], ad.b[layer], (0,), SCALE)
            e_loftq = np.linalg.norm(w0[layer] - (deq[layer] + delta))
            e_plain = np.linalg.norm(w0[layer] - deq_plain[layer])
            # the factors are the best rank-r fit of this layer's W0 - deQ(Q) (Eckart-Young)
            s = np.linalg.svd(w0[layer] - deq[layer], compute_uv=False)
            np.testing.assert_allclose(e_loftq, np.sqrt(np.sum(s[RANK:] ** 2)), rtol=1e-4)
            print(
                f"{fmt} iter={iters} {dims} {name}[{layer}]: ||W0 - (deQ(Q) + s a@b)|| = "
                f"{e_loftq:.4f} vs plain QLoRA {e_plain:.4f}"
            )
            assert e_loftq < 0.97 * e_plain


@check
def base_is_the_stacked_quantization_of_the_previous_residual(fmt: str) -> None:
    """Iteration k quantizes ``W0 - scale * a @ b`` of iteration k - 1, all layers together
    (int8: one absmax per channel over all layers, as `lora.quantize` stores a stacked kernel)."""
    m, params, x = model(ALIGNED)
    ad2, _ = loftq(m, params, x, config(fmt, 2))
    _, q3 = loftq(m, params, x, config(fmt, 3))
    for name in STACKED:
        ad, q = stacked(ad2, name), stacked(q3, name)
        w0 = np.asarray(stacked(params, name), np.float64)
        res = w0 - np.stack([ref_delta64(ad.a[i], ad.b[i], (0,), SCALE) for i in range(L)])
        ref = lora.quantize_kernel(jnp.asarray(res, jnp.float32), fmt)
        # the residual is rounded to float32 differently here: a code may sit on a tie
        got, want = np.asarray(q.codes).astype(int), np.asarray(ref.codes).astype(int)
        assert np.mean(got != want) < 0.01
        np.testing.assert_allclose(np.asarray(q.absmax), np.asarray(ref.absmax), rtol=1e-5)
        if fmt == "int8":
            assert q.absmax.shape == (w0.shape[-1],)


# ---------------------------------------------------------------------------------------------
# (2) the model
# ---------------------------------------------------------------------------------------------
@check
def wrap_matches_merge_and_beats_plain_qlora(fmt: str) -> None:
    m, params, x = model(ALIGNED)
    adapters, qparams = loftq(m, params, x, config(fmt, 2))
    y_float = np.asarray(m.apply(params, x), np.float64)
    y = np.asarray(jax.jit(lora.wrap(m.apply))(qparams, adapters, x), np.float64)
    y_merged = np.asarray(m.apply(lora.merge(qparams, adapters), x), np.float64)
    np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=1e-5)
    qplain = lora.quantize(params, dtype=fmt)
    plain_cfg = lora.LoraConfig(rank=RANK, alpha=ALPHA)
    plain_ad = lora.init(jax.random.key(1), qplain, plain_cfg, probe=lambda p: m.apply(p, x))
    y_plain = np.asarray(lora.wrap(m.apply)(qplain, plain_ad, x), np.float64)
    e_loftq, e_plain = np.linalg.norm(y - y_float), np.linalg.norm(y_plain - y_float)
    print(f"{fmt}: output error vs float model LoftQ {e_loftq:.5f}, plain QLoRA {e_plain:.5f}")
    assert e_loftq < e_plain


# ---------------------------------------------------------------------------------------------
# (3) layers=
# ---------------------------------------------------------------------------------------------
@check
def layers_subset_keeps_the_others_plain(fmt: str) -> None:
    m, params, x = model(ALIGNED)
    ad_all, _ = loftq(m, params, x, config(fmt, 2))
    adapters, qparams = loftq(m, params, x, config(fmt, 2, layers=[0, 2]))
    assert "head" not in adapters["params"]  # no layer number in its path
    assert qparams["params"]["head"]["kernel"] is params["params"]["head"]["kernel"]
    plain = lora.quantize(params, dtype=fmt)
    for name in STACKED:
        ad, q, qp = stacked(adapters, name), stacked(qparams, name), stacked(plain, name)
        w0 = np.asarray(stacked(params, name), np.float64)
        assert ad.layers == (0, 2)
        assert not np.any(np.asarray(ad.a[1])) and not np.any(np.asarray(ad.b[1]))
        deq = ref_decode(q)
        if fmt == "nf4":  # layers are whole blocks: the picked ones as LoftQ of all layers,
            for i in (0, 2):  # layer 1 as plain QLoRA
                np.testing.assert_array_equal(
                    np.asarray(ad.a[i]), np.asarray(stacked(ad_all, name).a[i])
                )
                np.testing.assert_array_equal(
                    np.asarray(ad.b[i]), np.asarray(stacked(ad_all, name).b[i])
                )
            np.testing.assert_array_equal(deq[1], ref_decode(qp)[1])
        else:  # layer 1 rounded plainly on the channel scales of the stacked residual
            absmax = np.asarray(q.absmax, np.float64)
            assert np.all(np.abs(w0[1] - deq[1]) <= absmax / 127 / 2 * (1 + 1e-5) + 1e-7)
            codes = np.clip(np.round(w0[1] * 127 / absmax), -127, 127)
            assert np.mean(codes != np.asarray(q.codes[1])) < 0.01
        for i in (0, 2):
            delta = ref_delta64(ad.a[i], ad.b[i], (0,), SCALE)
            e = np.linalg.norm(w0[i] - (deq[i] + delta))
            s = np.linalg.svd(w0[i] - deq[i], compute_uv=False)
            np.testing.assert_allclose(e, np.sqrt(np.sum(s[RANK:] ** 2)), rtol=1e-4)
    y = lora.wrap(m.apply)(qparams, adapters, x)
    y_merged = m.apply(lora.merge(qparams, adapters), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_merged), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (4) nested scans
# ---------------------------------------------------------------------------------------------
@check
def nested_scan_is_the_unstacked_loftq_of_each_layer() -> None:
    m = NestedStack(width=16, layers=2)  # kernel (2, 2, 16, 16): 4 NF4 blocks per layer
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    params = m.init(jax.random.key(0), x)
    cfg = config("nf4", 2, targets=r".*/fc/kernel")
    adapters, qparams = loftq(m, params, x, cfg)
    ad = adapters["params"]["outer"]["inner"]["fc"]["kernel"]
    q = qparams["params"]["outer"]["inner"]["fc"]["kernel"]
    w0 = np.asarray(params["params"]["outer"]["inner"]["fc"]["kernel"])
    assert ad.layer_axes == 2 and ad.a.shape == (2, 2, 16, RANK) and ad.b.shape == (2, 2, RANK, 16)
    assert q.shape == w0.shape
    codes, blocks = np.asarray(q.codes).reshape(4, -1), np.asarray(q.absmax).reshape(4, -1)
    for i in range(2):
        for j in range(2):
            twin = {"p": {"fc": {"kernel": jnp.asarray(w0[i, j])}}}
            ad1, q1 = lora.init(jax.random.key(1), twin, cfg)
            ad1, q1 = ad1["p"]["fc"]["kernel"], q1["p"]["fc"]["kernel"]
            np.testing.assert_array_equal(np.asarray(ad.a[i, j]), np.asarray(ad1.a))
            np.testing.assert_array_equal(np.asarray(ad.b[i, j]), np.asarray(ad1.b))
            np.testing.assert_array_equal(codes[2 * i + j], np.asarray(q1.codes))
            np.testing.assert_array_equal(blocks[2 * i + j], np.asarray(q1.absmax))
    y = lora.wrap(m.apply)(qparams, adapters, x)
    y_merged = m.apply(lora.merge(qparams, adapters), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_merged), rtol=1e-5, atol=1e-5)
    # layers= picks entries of the outer axis: outer layer 0 keeps zero factors and plain codes
    ad_sub, q_sub = loftq(m, params, x, config("nf4", 2, targets=r".*/fc/kernel", layers=[1]))
    ad_sub = ad_sub["params"]["outer"]["inner"]["fc"]["kernel"]
    q_sub = q_sub["params"]["outer"]["inner"]["fc"]["kernel"]
    assert not np.any(np.asarray(ad_sub.a[0])) and not np.any(np.asarray(ad_sub.b[0]))
    np.testing.assert_array_equal(np.asarray(ad_sub.a[1]), np.asarray(ad.a[1]))
    plain = lora.quantize_kernel(jnp.asarray(w0), "nf4")
    np.testing.assert_array_equal(ref_decode(q_sub)[0], ref_decode(plain)[0])


@check
def rank_above_a_layers_side_is_refused() -> None:
    m, params, x = model(ALIGNED)
    cfg = lora.LoraConfig(rank=17, init="loftq", targets=r".*/fc1/kernel")
    with pytest.raises(
        ValueError, match=r"rank <= min\(fan_in, fan_out\) = 16 .*fc1/kernel.*stacked"
    ):
        loftq(m, params, x, cfg)
