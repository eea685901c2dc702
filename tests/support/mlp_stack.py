"""A residual tanh MLP stacked by ``nn.scan`` (``layers/fc1``, ``layers/fc2`` with a leading layer
axis of `L`, then an unstacked ``head``): the quantization tests' scan model."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

L = 3

#: (d, f): per-layer kernels of 512 values (whole NF4 blocks of 64) or of 120 (a flat stack's
#: blocks would straddle layers)
ALIGNED, STRADDLING = (16, 32), (10, 12)


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
