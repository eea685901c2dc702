"""`lora.summary`: counts checked against counts computed by hand."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from conftest import build, mlp
from flax import nnx

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
