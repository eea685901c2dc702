"""The tiny Linen and NNX models of tests/test_routing.py (Embed, attention, Conv, Dense) and the
per-example reference of routing, shared with tests/test_routing_dora.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

import flax_lora as lora

VOCAB, SEQ, DIM, BATCH = 24, 6, 16, 6
IDS = [0, 2, -1, 1, 2, 0]


class LinenTiny(nn.Module):
    """Embed lookup, self-attention (DenseGeneral q/k/v/out), a 1-D Conv and a Dense head."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nn.Embed(VOCAB, DIM)(tokens)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=DIM)(h)
        h = nn.gelu(nn.Conv(DIM, kernel_size=(3,))(h))
        return nn.Dense(5)(h.mean(axis=1))


class NnxTiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=DIM, qkv_features=DIM, decode=False, rngs=rngs
        )
        self.conv = nnx.Conv(DIM, DIM, kernel_size=(3,), rngs=rngs)
        self.head = nnx.Linear(DIM, 5, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        h = h + self.attn(h)
        h = nnx.gelu(self.conv(h))
        return self.head(h.mean(axis=1))


def tiny_tokens(batch: int = BATCH) -> jax.Array:
    """A batch of token ids for the tiny models."""
    return jax.random.randint(jax.random.key(7), (batch, SEQ), 0, VOCAB)


def linen_tiny() -> tuple[Callable[..., Any], Any]:
    """``(apply, params)`` of `LinenTiny`."""
    model = LinenTiny()
    return model.apply, model.init(jax.random.key(0), tiny_tokens())


def nnx_tiny() -> tuple[Callable[..., Any], Any]:
    """``(apply, state)`` of `NnxTiny`."""
    graphdef, state = nnx.split(NnxTiny(nnx.Rngs(0)))
    return (lambda s, t: nnx.merge(graphdef, s)(t)), state


def routed_reference(
    apply_fn: Callable[..., Any], params: Any, sets: list[Any], x: Any, ids: Any = IDS
) -> np.ndarray:
    """Example ``j`` run alone through ``merge(params, sets[ids[j]])`` (the base for -1)."""
    rows = []
    for j, k in enumerate(ids):
        p = params if k < 0 else lora.merge(params, sets[k])
        rows.append(np.asarray(apply_fn(p, x[j : j + 1]))[0])
    return np.stack(rows)
