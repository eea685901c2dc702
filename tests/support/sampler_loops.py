"""Decoding loops as samplers run them, over a module or a ``(model, params)`` pair, and small
decoders with a KV cache for them (tests/test_bridge_*.py: the bridges are driven the way tunix's
and gemma's samplers drive a model; `support.decode_models` steps a pure function instead).
The kernels are drawn N(0, 0.3^2), so that greedy tokens vary along a sequence and adapters
change them (at Flax's default init the greedy tokens of these tiny models repeat one token).

- `LinenDecoder`: Embed, two blocks of causal ``nn.MultiHeadDotProductAttention``
  (``decode=True`` keeps its keys and values in Linen's ``"cache"`` collection) and a Dense
  MLP, a Dense head; and
  `linen_greedy`, the loop of a gemma-style sampler that takes a ``(model, params)`` pair:
  ``model.apply({"params": params, "cache": cache}, token, decode=True, mutable=["cache"])``
  one token at a time, the prompt first, then the argmax.
- `NnxDecoder`: the same in NNX (``nnx.MultiHeadAttention`` in decode mode: its cache is
  ``nnx.Cache`` variables inside the model, changed by each call; ``init_cache`` makes it),
  and `nnx_greedy`, the same loop over a module under ``nnx.jit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB, WIDTH, HEADS, BLOCKS = 13, 16, 2, 2


def normal_kernels(params: Any, key: jax.Array, std: float = 0.3) -> Any:
    """``params`` with every leaf of 2 or more dimensions drawn N(0, std^2) (one key split from
    ``key`` per leaf, in tree order); biases and norm scales kept."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [
        std * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def feed(
    step: Callable[[jax.Array], jax.Array], prompt: np.ndarray | jax.Array, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding, one call of ``step`` (tokens ``(B, 1)`` -> last logits ``(B, V)``, the
    cache kept by the caller) per token: the prompt's tokens first, then each argmax.

    Returns the ``steps`` generated tokens ``(B, steps)`` and the logits of every fed position
    ``(B, P + steps - 1, V)``."""
    fed, out, seen = jnp.asarray(prompt[:, :1]), [], []
    for t in range(prompt.shape[1] + steps - 1):
        logits = step(fed)
        seen.append(np.asarray(logits))
        nxt = jnp.argmax(logits, axis=-1)
        if t + 1 < prompt.shape[1]:
            fed = jnp.asarray(prompt[:, t + 1 : t + 2])
        else:
            out.append(np.asarray(nxt))
            fed = nxt[:, None]
    return np.stack(out, axis=1), np.stack(seen, axis=1)


class LinenDecoder(nn.Module):
    """A two-block causal decoder; ``decode=True`` runs one position with the KV cache."""

    @nn.compact
    def __call__(self, tokens: jax.Array, decode: bool = False) -> jax.Array:
        x = nn.Embed(VOCAB, WIDTH, name="embed")(tokens)
        mask = None if decode else nn.make_causal_mask(tokens)
        for i in range(BLOCKS):
            attn = nn.MultiHeadDotProductAttention(
                HEADS, qkv_features=WIDTH, decode=decode, name=f"attn{i}"
            )
            x = x + attn(x, mask=mask)
            h = nn.gelu(nn.Dense(2 * WIDTH, name=f"up{i}")(x))
            x = x + nn.Dense(WIDTH, name=f"down{i}")(h)
        return nn.Dense(VOCAB, name="head")(x)


def linen_model(seed: int = 0, batch: int = 2, length: int = 12) -> tuple[Any, Any, Any]:
    """``(model, params, cache)``: the decoder, params with N(0, 0.3^2) kernels (the default
    init's outputs are too flat for distinct greedy tokens), and an empty cache for ``batch``
    sequences of up to ``length`` tokens."""
    model = LinenDecoder()
    tokens = jnp.zeros((batch, length), jnp.int32)
    params = model.init(jax.random.key(seed), tokens)["params"]
    cache = model.init(jax.random.key(seed), tokens, decode=True)["cache"]
    return model, normal_kernels(params, jax.random.key(seed + 1)), cache


def linen_greedy(
    model: nn.Module, params: Any, cache: Any, prompt: np.ndarray, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding of a ``(model, params)`` pair with a Linen KV cache.

    Returns the ``steps`` generated tokens ``(B, steps)`` and the logits of every fed position
    ``(B, P + steps - 1, V)``."""

    @jax.jit
    def step(params: Any, cache: Any, token: jax.Array) -> tuple[jax.Array, Any]:
        logits, state = model.apply(
            {"params": params, "cache": cache}, token, decode=True, mutable=["cache"]
        )
        return logits[:, -1], state["cache"]

    state = [cache]

    def one(token: jax.Array) -> jax.Array:
        logits, state[0] = step(params, state[0], token)
        return logits

    return feed(one, prompt, steps)


class NnxDecoder(nnx.Module):
    """The NNX twin of `LinenDecoder`; its attention cache lives in ``nnx.Cache`` variables."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.attn = nnx.List(
            [nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs) for _ in range(BLOCKS)]
        )
        self.up = nnx.List([nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs) for _ in range(BLOCKS)])
        self.down = nnx.List([nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs) for _ in range(BLOCKS)])
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)
        self.width = WIDTH

    def init_cache(self, batch: int, length: int) -> None:
        for attn in self.attn:
            attn.init_cache((batch, length, WIDTH))

    def __call__(self, tokens: jax.Array, decode: bool = False) -> jax.Array:
        x = self.embed(tokens)
        mask = None if decode else nnx.make_causal_mask(tokens)
        for attn, up, down in zip(self.attn, self.up, self.down, strict=True):
            x = x + attn(x, mask=mask, decode=decode, deterministic=True)
            x = x + down(nnx.gelu(up(x)))
        return self.head(x)


def nnx_model(seed: int = 0) -> NnxDecoder:
    """The NNX decoder with N(0, 0.3^2) kernels (see `linen_model`)."""
    model = NnxDecoder(nnx.Rngs(seed))
    nnx.update(model, normal_kernels(nnx.state(model, nnx.Param), jax.random.key(seed + 1)))
    return model


def nnx_greedy(module: nnx.Module, prompt: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding of an NNX module whose cache lives in the module (``init_cache`` first).

    Returns the generated tokens ``(B, steps)`` and the logits of every fed position."""
    module.init_cache(prompt.shape[0], prompt.shape[1] + steps)

    @nnx.jit
    def step(module: nnx.Module, token: jax.Array) -> jax.Array:
        return module(token, decode=True)[:, -1]

    return feed(lambda token: step(module, token), prompt, steps)
