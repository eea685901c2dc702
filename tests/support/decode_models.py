"""Tiny decoders with a KV cache and greedy decoding, for tests/test_generate.py.

- Linen: `benchmarks.decoder.Decoder` at a tiny size (``nn.MultiHeadDotProductAttention``: its
  q/k/v/out kernels are 3-D ``DenseGeneral`` einsums; the cache is Flax's ``cache`` collection);
- NNX: `NnxDecoder` (``nnx.MultiHeadAttention``, ``nnx.Linear`` MLP, tied ``nnx.Embed``; the
  cache is ``nnx.Cache`` state, carried through ``nnx.split`` / ``nnx.merge``).

`greedy` runs a decode step once per token: the prompt's tokens are fed one at a time, then
each step's argmax. The reference of a routed batch is `alone`: each sequence decoded by itself
through the plain model with its adapter merged (``lora.merge``), the base for id -1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flax_lora as lora
from benchmarks.decoder import Decoder

from .sampler_loops import feed

VOCAB, DIM, HEADS, HIDDEN, LAYERS = 48, 32, 2, 64, 2
PROMPT, STEPS = 3, 10  # prompt tokens, then generated ones (the cache holds PROMPT + STEPS)
LENGTH = PROMPT + STEPS
TARGETS = r".*(query|key|value|out|fc1|fc2|q_proj|k_proj|v_proj|o_proj|up|down).*/kernel"

Step = Callable[[Any, jax.Array], tuple[Any, jax.Array]]
"""``(cache, tokens (B, 1)) -> (cache, logits of the last position (B, vocab))``."""


def prompts(batch: int) -> jax.Array:
    return jax.random.randint(jax.random.key(3), (batch, PROMPT), 0, VOCAB)


def greedy(step: Step, cache: Any, prompt: jax.Array) -> np.ndarray:
    """The tokens after the prompt, ``(B, STEPS + 1)``: greedy decoding, one call of ``step``
    per token (``LENGTH`` calls, the cache's length)."""
    state = [cache]

    def one(token: jax.Array) -> jax.Array:
        state[0], logits = step(state[0], token)
        return logits

    return feed(one, prompt, STEPS + 1)[0]


# -- Linen --------------------------------------------------------------------------------------
def linen_decoder() -> tuple[Decoder, Decoder, Any]:
    """``(model, decoding model, params)``: the same weights, without and with a KV cache."""
    kw = dict(vocab=VOCAB, d_model=DIM, heads=HEADS, hidden=HIDDEN, layers=LAYERS)
    model = Decoder(**kw)
    params = model.init(jax.random.key(1), prompts(2))
    return model, Decoder(**kw, decode=True), params


def linen_cache(decoding: Decoder, batch: int) -> Any:
    return decoding.init(jax.random.key(0), jnp.zeros((batch, LENGTH), jnp.int32))["cache"]


def linen_step(apply: Callable[..., Any], params: Any, *extra: Any, **kw: Any) -> Step:
    """A jitted decode step of ``apply(variables, *extra, tokens, mutable=["cache"], **kw)``."""

    @jax.jit
    def step(cache: Any, tok: jax.Array) -> tuple[Any, jax.Array]:
        logits, state = apply({**params, "cache": cache}, *extra, tok, mutable=["cache"], **kw)
        return state["cache"], logits[:, -1]

    return step


# -- NNX ----------------------------------------------------------------------------------------
class NnxDecoder(nnx.Module):
    """Tied embedding, ``LAYERS`` pre-norm blocks of causal self-attention and an MLP."""

    def __init__(self, rngs: nnx.Rngs, decode: bool = False) -> None:
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.blocks = nnx.List([_NnxBlock(rngs, decode) for _ in range(LAYERS)])
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.decode = decode

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        mask = None if self.decode else nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.norm(x))


class _NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, decode: bool) -> None:
        self.ln1 = nnx.LayerNorm(DIM, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=DIM, decode=decode, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(DIM, rngs=rngs)
        self.up = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, DIM, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


def nnx_decoder(batch: int) -> tuple[Callable[..., Any], Any, Any, Callable[..., Any]]:
    """``(apply, params, cache, forward)``: ``apply(state, tokens) -> (logits, cache)`` of the
    decoding model, its ``nnx.Param`` state, its empty cache for ``batch`` sequences, and the
    full-sequence model's ``forward(params, tokens)`` (the probe's model)."""
    model = NnxDecoder(nnx.Rngs(0), decode=True)
    for block in model.blocks:
        block.attn.init_cache((batch, LENGTH, DIM))
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    plain = NnxDecoder(nnx.Rngs(0))
    plain_def, _ = nnx.split(plain, nnx.Param)

    def apply(state: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
        m = nnx.merge(graphdef, state["params"], state["cache"])
        logits = m(tokens)
        return logits, nnx.state(m, nnx.Cache)

    def forward(p: Any, tokens: jax.Array) -> jax.Array:
        return nnx.merge(plain_def, p)(tokens)

    return apply, params, cache, forward


def nnx_cache(batch: int) -> Any:
    return nnx_decoder(batch)[2]


def nnx_step(apply: Callable[..., Any], params: Any, *extra: Any, **kw: Any) -> Step:
    """A jitted decode step of ``apply({"params": params, "cache": cache}, *extra, tokens)``."""

    @jax.jit
    def step(cache: Any, tok: jax.Array) -> tuple[Any, jax.Array]:
        logits, cache = apply({"params": params, "cache": cache}, *extra, tok, **kw)
        return cache, logits[:, -1]

    return step


def alone(kind: str, sets: list[Any], ids: list[int], prompt: jax.Array) -> np.ndarray:
    """Each sequence decoded by itself (batch 1) through the plain decoding model with its
    adapter set merged (``lora.merge``; the base for -1): the reference of routed decoding."""
    rows = []
    for j, k in enumerate(ids):
        if kind == "linen":
            _, decoding, params = linen_decoder()
            p = params if k < 0 else lora.merge(params, sets[k])
            step = linen_step(decoding.apply, p)
            cache = linen_cache(decoding, 1)
        else:
            apply, params, cache, _ = nnx_decoder(1)
            p = params if k < 0 else lora.merge({"params": params}, sets[k])["params"]
            step = nnx_step(apply, p)
        rows.append(greedy(step, cache, prompt[j : j + 1])[0])
    return np.stack(rows)
