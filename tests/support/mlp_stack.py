"""A residual tanh MLP stacked by ``nn.scan`` (``layers/fc1``, ``layers/fc2`` with a leading layer
axis of `L`, then an unstacked ``head``), and its NNX twin (``nnx.scan``): the quantization tests'
layered model, also the model of the sharded scan checks (without the head)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from .models import nnx_layers, nnx_scan

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
    """`L` blocks ``x + fc2(tanh(fc1(x)))`` of width ``d`` (hidden ``f``), then a Dense ``head``
    of ``head`` outputs (none with ``head=None``)."""

    d: int
    f: int
    remat: bool = False
    head: int | None = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = nn.remat(Block) if self.remat else Block
        scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        x, _ = scan(self.d, self.f, name="layers")(x, None)
        return x if self.head is None else nn.Dense(self.head, name="head")(x)


class NnxBlock(nnx.Module):
    def __init__(self, d: int, f: int, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(d, f, rngs=rngs)
        self.fc2 = nnx.Linear(f, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.fc2(jnp.tanh(self.fc1(x)))


class NnxStack(nnx.Module):
    """`Stack` in NNX (with a head of 4 outputs), each step under ``nnx.remat`` with ``remat``."""

    def __init__(self, d: int, f: int, remat: bool, rngs: nnx.Rngs) -> None:
        self.layers = nnx_layers(lambda rngs: NnxBlock(d, f, rngs), L, rngs)
        self.head = nnx.Linear(d, 4, rngs=rngs)
        self.remat = remat

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx_scan(x, self.layers, remat=self.remat))
