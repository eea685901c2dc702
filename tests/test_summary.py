"""`lora.summary`: counts checked against counts computed by hand."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from support.models import build, mlp

import flax_lora as lora


def test_mlp_counts_by_hand(capsys) -> None:
    _, variables, _ = mlp(in_features=4)  # fc0 4x6 (+6), fc1 6x6 (+6), head 6x3 (+3)
    config = lora.LoraConfig(rank=2, rank_pattern={"head": 1}, targets=r".*/kernel")
    adapters = lora.init(jax.random.key(0), variables, config)
    s = lora.summary(variables, adapters)
    base = (4 * 6 + 6) + (6 * 6 + 6) + (6 * 3 + 3)  # 99
    trainable = 2 * (4 + 6) + 2 * (6 + 6) + 1 * (6 + 3)  # 53
    assert s.base_params == base
    assert s.trainable_params == trainable
    assert s.total_params == base + trainable
    assert s.trainable_bytes == 4 * trainable and s.base_bytes == 4 * base
    assert abs(s.trainable_fraction - trainable / (base + trainable)) < 1e-12
    rows = {r.path: r for r in s.rows}
    assert set(rows) == {"params/fc0/kernel", "params/fc1/kernel", "params/head/kernel"}
    assert (rows["params/fc0/kernel"].params, rows["params/fc0/kernel"].kernel_params) == (20, 24)
    assert (rows["params/head/kernel"].rank, rows["params/head/kernel"].params) == (1, 9)
    assert rows["params/head/kernel"].scale == 8.0
    out = capsys.readouterr().out
    assert f"trainable params: {trainable:,} || all params: {base + trainable:,}" in out
    assert "params/fc1/kernel" in out and str(s) in out


def test_bf16_adapters_on_nnx_mha_counts_by_hand(capsys) -> None:
    m = build("nnx_mha")  # in 6, heads 2, head_dim 2, out 6
    config = lora.LoraConfig(rank=3, dtype=jnp.bfloat16)
    adapters = lora.init(jax.random.key(0), m.params, config, probe=m.probe)
    s = lora.summary(m.params, adapters, show=False)
    assert capsys.readouterr().out == ""
    # q, k, v: kernel (6, 2, 2), bias (2, 2); out: kernel (2, 2, 6), bias (6,)
    base = 3 * (24 + 4) + (24 + 6)
    # q, k, v: a (6, 3), b (3, 2, 2); out: a (2, 2, 3), b (3, 6)
    trainable = 3 * (18 + 12) + (12 + 18)
    assert (s.base_params, s.trainable_params) == (base, trainable)
    assert (s.base_bytes, s.trainable_bytes) == (4 * base, 2 * trainable)
    assert len(s.rows) == 4


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.drop(self.lin(x)))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))


def test_only_parameters_count_not_batch_stats_or_rng_state() -> None:
    _, state = nnx.split(NnxNet(nnx.Rngs(0)))
    adapters = lora.init(jax.random.key(0), state, lora.LoraConfig(rank=2))
    s = lora.summary(state, adapters, show=False)
    # Linear 3x4 + 4, BatchNorm scale 4 + bias 4; not its mean/var, not the RNG key/count
    assert s.base_params == 12 + 4 + 8 and s.trainable_params == 2 * (3 + 4)
    variables = LinenNet().init(jax.random.key(0), jnp.ones((1, 3)))
    assert set(variables) == {"params", "batch_stats"}
    adapters = lora.init(jax.random.key(0), variables, lora.LoraConfig(rank=1))
    s = lora.summary(variables, adapters, show=False)
    assert s.base_params == 12 + 4 + 8 and s.trainable_params == 3 + 4


# ---------------------------------------------------------------------------------------------
# a quantized base (QLoRA): the same parameter counts, the bytes actually stored
# ---------------------------------------------------------------------------------------------
class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(30, name="out")(nn.Dense(48, name="fc")(x))


# fc: kernel 64x48 + bias 48; out: kernel 48x30 + bias 30; adapters rank 4 on both kernels
TWO_DENSE_BASE = 64 * 48 + 48 + 48 * 30 + 30  # 4590
TWO_DENSE_TRAINABLE = 4 * (64 + 48) + 4 * (48 + 30)  # 760
TWO_DENSE_BIAS_BYTES = 4 * (48 + 30)
# stored bytes of the two kernels, by hand, from each format's layout (NF4 block 64: fc is
# 3072 / 64 = 48 blocks, out 1440 / 64 = 22.5 -> 23 blocks, the last one zero-padded)
TWO_DENSE_KERNEL_BYTES = {
    "float32": 4 * (64 * 48 + 48 * 30),
    # int8 codes, one float32 absmax per output channel
    "int8": (64 * 48 + 48 * 30) + 4 * (48 + 30),
    # two 4-bit codes per byte over whole blocks, one float32 absmax per block
    "nf4": (48 * 64 + 23 * 64) // 2 + 4 * (48 + 23),
    # uint8 absmax codes per block, one float32 absmax per 256 blocks (1 each), a float32 offset
    "nf4-dq": (48 * 64 + 23 * 64) // 2 + (48 + 23) + 4 * (1 + 1) + 4 * (1 + 1),
}


def _quantized_variants(variables):
    return {
        "float32": variables,
        "int8": lora.quantize(variables, dtype="int8"),
        "nf4": lora.quantize(variables, dtype="nf4", block_size=64),
        "nf4-dq": lora.quantize(variables, dtype="nf4", block_size=64, double_quant=True),
    }


def test_quantized_base_counts_its_kernels_as_parameters_and_its_storage_as_bytes() -> None:
    variables = TwoDense().init(jax.random.key(0), jnp.ones((1, 64)))
    adapters = lora.init(jax.random.key(1), variables, lora.LoraConfig(rank=4))
    fraction = TWO_DENSE_TRAINABLE / (TWO_DENSE_BASE + TWO_DENSE_TRAINABLE)
    stored = {}
    for fmt, params in _quantized_variants(variables).items():
        s = lora.summary(params, adapters, show=False)
        stored[fmt] = s.base_bytes
        assert (s.base_params, s.trainable_params) == (TWO_DENSE_BASE, TWO_DENSE_TRAINABLE), fmt
        assert s.total_params == TWO_DENSE_BASE + TWO_DENSE_TRAINABLE
        assert abs(s.trainable_fraction - fraction) < 1e-12, fmt
        assert s.base_bytes == TWO_DENSE_KERNEL_BYTES[fmt] + TWO_DENSE_BIAS_BYTES, fmt
        assert s.trainable_bytes == 4 * TWO_DENSE_TRAINABLE
        rows = {r.path: r for r in s.rows}
        assert rows["params/fc/kernel"].kernel_params == 64 * 48, fmt
        assert rows["params/out/kernel"].kernel_params == 48 * 30, fmt
        assert (rows["params/fc/kernel"].params, rows["params/out/kernel"].params) == (448, 312)
    # the stored bytes shrink: f32 > int8 > nf4 > nf4 with double quantization
    assert stored["float32"] > stored["int8"] > stored["nf4"] > stored["nf4-dq"]


def test_quantized_nnx_state_counts_like_the_float_one() -> None:
    m = build("nnx_mha")  # q, k, v: kernel (6, 2, 2) + bias (2, 2); out: kernel (2, 2, 6) + bias 6
    adapters = lora.init(jax.random.key(0), m.params, lora.LoraConfig(rank=3), probe=m.probe)
    q = lora.quantize(m.params, dtype="nf4", block_size=64)
    s = lora.summary(q, adapters, show=False)
    base = 3 * (24 + 4) + (24 + 6)
    trainable = 3 * (18 + 12) + (12 + 18)
    assert (s.base_params, s.trainable_params) == (base, trainable)
    # each 24-value kernel: one zero-padded block of 64 -> 32 bytes of codes + a float32 absmax
    assert s.base_bytes == 4 * (32 + 4) + 4 * (3 * 4 + 6)
    assert all(r.kernel_params == 24 for r in s.rows) and len(s.rows) == 4
