"""QLoRA on kernels stacked by ``nn.scan`` / ``nnx.scan``: per-layer quantization, and the
factored `lora.wrap` dequantizing each layer inside the scan body.

References: float64 numpy (the formats re-implemented in `test_quant`: ``ref_int8``,
``ref_nf4``, ``ref_double`` applied to each layer alone; the model re-implemented in numpy on
the dequantized base, LoRA added as ``x @ W0 + s * (x @ a) @ b``), and the jaxpr of the step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_quant import ref_double, ref_int8, ref_nf4, unpack

import flax_lora as lora

L = 3


class Block(nn.Module):
    d: int
    f: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        h = jnp.tanh(nn.Dense(self.f, name="fc1")(x))
        return x + nn.Dense(self.d, name="fc2")(h), None


class Stack(nn.Module):
    d: int
    f: int
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = nn.remat(Block) if self.remat else Block
        scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        x, _ = scan(self.d, self.f, name="layers")(x, None)
        return nn.Dense(4, name="head")(x)


#: (d, f): per-layer kernels of 512 values (whole NF4 blocks of 64) or of 120 (a flat stack's
#: blocks would straddle layers)
ALIGNED, STRADDLING = (16, 32), (10, 12)


def linen(dims: tuple[int, int], remat: bool = False, seed: int = 0) -> tuple[Any, Any, Any]:
    m = Stack(*dims, remat=remat)
    x = np.random.default_rng(seed).normal(size=(6, dims[0])).astype(np.float32)
    params = m.init(jax.random.key(seed), x)
    return m, params, x


def stacked_kernels(tree: Any) -> dict[str, Any]:
    layers = tree["params"]["layers"]
    return {name: layers[name]["kernel"] for name in ("fc1", "fc2")}


# ---------------------------------------------------------------------------------------------
# per-layer quantization
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [ALIGNED, STRADDLING])
def test_int8_scales_per_layer_are_the_unstacked_quantization(dims: tuple[int, int]) -> None:
    m, params, x = linen(dims)
    q = lora.quantize(params, dtype="int8", probe=lambda p: m.apply(p, x))
    for name, w in stacked_kernels(params).items():
        qk = stacked_kernels(q)[name]
        w = np.asarray(w)
        assert qk.layer_axes == 1 and qk.shape == w.shape
        assert qk.absmax.shape == (L, w.shape[-1])  # (L, out): no scale shared across layers
        for i in range(L):
            codes, absmax, deq = ref_int8(w[i])  # the layer alone, float64 numpy
            np.testing.assert_allclose(np.asarray(qk.absmax[i], np.float64), absmax, rtol=1e-7)
            got = np.asarray(qk.codes[i], np.float64)
            assert np.abs(got - codes).max() <= 1  # float32 may round a tie the other way
            assert np.mean(got == codes) > 0.999
            one = lora.quantize_kernel(jnp.asarray(w[i]), "int8")
            np.testing.assert_array_equal(np.asarray(qk.codes[i]), np.asarray(one.codes))
            np.testing.assert_array_equal(np.asarray(qk.absmax[i]), np.asarray(one.absmax))
        deq = np.asarray(lora.dequantize_kernel(qk), np.float64)
        for i in range(L):
            ref = ref_int8(w[i])[2]
            np.testing.assert_allclose(deq[i], ref, rtol=0, atol=1e-6 * np.abs(w[i]).max())
    # the head is not stacked: one quantization as before
    head = q["params"]["head"]["kernel"]
    assert head.layer_axes == 0 and head.absmax.shape == (4,)


@pytest.mark.parametrize("dims", [ALIGNED, STRADDLING])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_blocks_never_straddle_layers(dims: tuple[int, int], double_quant: bool) -> None:
    m, params, x = linen(dims)
    q = lora.quantize(
        params, dtype="nf4", block_size=64, double_quant=double_quant, probe=lambda p: m.apply(p, x)
    )
    for name, w in stacked_kernels(params).items():
        qk = stacked_kernels(q)[name]
        w = np.asarray(w)
        per_layer = w[0].size
        blocks = -(-per_layer // 64)
        assert qk.layer_axes == 1 and qk.codes.shape == (L, blocks * 32)
        assert qk.absmax.shape == (L, blocks)
        for i in range(L):
            ref = ref_nf4(w[i], 64)  # the layer alone: its own blocks and padding
            got = unpack(np.asarray(qk.codes[i]))
            assert np.mean(got == ref["codes"]) > 0.999 and np.abs(got - ref["codes"]).max() <= 1
            assert (got[per_layer:] == 7).all()  # each layer's own padding (the code of 0.0)
            if double_quant:
                dq = ref_double(ref["absmax"])
                assert np.asarray(qk.absmax_offset[i]).shape == ()
                np.testing.assert_allclose(float(qk.absmax_offset[i]), dq["deq"].mean(), rtol=0.1)
                gotc = np.asarray(qk.absmax[i], np.int64)
                assert np.abs(gotc - dq["codes"]).max() <= 1
            else:
                np.testing.assert_allclose(np.asarray(qk.absmax[i]), ref["absmax"], rtol=1e-7)
            one = lora.quantize_kernel(
                jnp.asarray(w[i]), "nf4", block_size=64, double_quant=double_quant
            )
            for got_leaf, ref_leaf in zip(
                jax.tree.leaves(jax.tree.map(lambda t, i=i: t[i], qk.layer())),
                jax.tree.leaves(one),
                strict=True,
            ):
                np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(ref_leaf))
        deq = np.asarray(lora.dequantize_kernel(qk))
        for i in range(L):
            one = lora.quantize_kernel(
                jnp.asarray(w[i]), "nf4", block_size=64, double_quant=double_quant
            )
            np.testing.assert_array_equal(deq[i], np.asarray(lora.dequantize_kernel(one)))
            if not double_quant:
                np.testing.assert_allclose(deq[i], ref_nf4(w[i], 64)["deq"], rtol=1e-6, atol=1e-7)


def test_without_probe_a_stack_is_one_array() -> None:
    _, params, _ = linen(STRADDLING)
    q = lora.quantize(params, dtype="int8")
    qk = stacked_kernels(q)["fc1"]
    assert qk.layer_axes == 0 and qk.absmax.shape == (12,)


def test_quantize_kernel_layer_axes_and_bad_input() -> None:
    w = np.random.default_rng(1).normal(size=(2, 3, 5, 7)).astype(np.float32)
    q = lora.quantize_kernel(jnp.asarray(w), "nf4", block_size=8, layer_axes=2)
    assert q.codes.shape == (2, 3, 20) and q.absmax.shape == (2, 3, 5)
    deq = np.asarray(lora.dequantize_kernel(q))
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(deq[i, j], ref_nf4(w[i, j], 8)["deq"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="layer_axes"):
        lora.quantize_kernel(jnp.asarray(w), "int8", layer_axes=4)
