"""Small language models with every kind of kernel, Linen and NNX, for the tests of PEFT's target
conventions (``targets="all-linear"``, plain module names) and of `lora.select`.

Each has an Embed (``embed``), a block with attention (``attn``: DenseGeneral query / key /
value / out), an Einsum (``proj``), an MLP (``fc1``, ``fc2``), a 1-D convolution (``conv``), each
added to the residual stream, and an output head (``head``) over the embedding's 11 rows.
`ALL_LINEAR` is what PEFT's rule picks, written by hand: the linear maps but the head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models import fill_abstract

VOCAB, D = 11, 8
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 5)).astype(np.int32)


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        h = nn.Embed(VOCAB, D, name="embed")(ids)
        h = h + nn.MultiHeadDotProductAttention(2, qkv_features=D, name="attn")(h)
        h = h + nn.Einsum((D, 2, 4), "btd,dhk->bthk", name="proj")(h).reshape(h.shape)
        h = h + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(16, name="fc1")(h)))
        h = h + nn.Conv(D, (3,), name="conv")(h)
        return nn.Dense(VOCAB, name="head")(h)


class NnxLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, D, qkv_features=D, decode=False, rngs=rngs)
        self.proj = nnx.Einsum("btd,dhk->bthk", (D, 2, 4), (2, 4), rngs=rngs)
        self.fc1 = nnx.Linear(D, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, (3,), rngs=rngs)
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.embed(ids)
        h = h + self.attn(h)
        h = h + self.proj(h).reshape(h.shape)
        h = h + self.fc2(nnx.gelu(self.fc1(h)))
        h = h + self.conv(h)
        return self.head(h)


ATTN = [f"attn/{n}/kernel" for n in ("query", "key", "value", "out")]
ALL_LINEAR = [*ATTN, "proj/kernel", "fc1/kernel", "fc2/kernel"]
"""The kernels ``"all-linear"`` picks (module paths without the Linen ``params/`` prefix)."""


def linen_lm() -> tuple[Callable[..., Any], Any, str]:
    """(apply, params, prefix of the paths) of `LinenLM`, values filled without compiling."""
    model = LinenLM()
    params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), IDS), 1, 0.3)
    return model.apply, params, "params/"


def nnx_lm() -> tuple[Callable[..., Any], Any, str]:
    """(apply, state, prefix of the paths) of `NnxLM`."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxLM(nnx.Rngs(0))))
    state = fill_abstract(state, 1, 0.3)
    return (lambda s, ids: nnx.merge(graphdef, s)(ids)), state, ""


LMS = {"linen": linen_lm, "nnx": nnx_lm}


class ExpertMLP(nn.Module):
    """An MoE block whose expert kernel ``experts_up`` (E, d, f) is used by an einsum with the
    expert axis as a batch dimension, then an output head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("experts_up", nn.initializers.normal(), (3, D, 16))
        h = jnp.einsum("etd,edf->etf", jnp.broadcast_to(x, (3, *x.shape)), w).sum(0)
        return nn.Dense(4, name="head")(x + nn.Dense(D, name="down")(nn.relu(h)))
