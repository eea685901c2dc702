"""The benchmark model: a small GPT-style decoder in Linen, importable by any benchmark.

Six pre-LayerNorm blocks (``nn.MultiHeadDotProductAttention`` with 8 heads of 64, causal; an MLP
``fc1`` 512 -> 2048, gelu, ``fc2`` 2048 -> 512), a tied ``nn.Embed`` of vocab 8192 used for the
logits through ``attend``. Kernel paths read ``params/h{i}/attn/{query,key,value,out}/kernel``
and ``params/h{i}/mlp/{fc1,fc2}/kernel``; the table is ``params/embed/embedding``.

Example:
  >>> from benchmarks.decoder import Decoder, make_batch, loss_fn
  >>> model = Decoder()
  >>> batch = make_batch(jax.random.key(0))
  >>> params = model.init(jax.random.key(1), batch["tokens"])
  >>> loss = loss_fn(model.apply, params, batch)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

#: LoRA targets of the issue: q, k, v, out and both MLP kernels of every block (36 kernels).
TARGETS = r".*/(query|key|value|out|fc1|fc2)/kernel"


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        h = nn.gelu(h)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class Block(nn.Module):
    heads: int
    hidden: int
    dtype: Any = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            dtype=self.dtype,
            deterministic=True,
            decode=self.decode,
            name="attn",
        )(h, h, mask=mask)
        x = x + h
        h = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
        return x + Mlp(self.hidden, dtype=self.dtype, name="mlp")(h)


class Decoder(nn.Module):
    """GPT-style decoder: tied embedding, ``layers`` pre-LN blocks, logits via ``attend``.

    With ``decode=True`` the attention keeps a KV cache (Flax's ``cache`` collection, sized by
    the tokens given to ``init``) and each call takes the next token(s) of every sequence."""

    vocab: int = 8192
    d_model: int = 512
    heads: int = 8
    hidden: int = 2048
    layers: int = 6
    dtype: Any = jnp.float32
    remat: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, offset: jax.Array | None = None) -> jax.Array:
        """Logits ``(batch, seq, vocab)``; ``offset`` is added to the embedded tokens (the
        benchmark differentiates with respect to it to time backprop to activations only)."""
        embed = nn.Embed(self.vocab, self.d_model, dtype=self.dtype, name="embed")
        x = embed(tokens)
        if offset is not None:
            x = x + offset
        mask = None if self.decode else nn.make_causal_mask(tokens)
        block = nn.remat(Block) if self.remat else Block
        for i in range(self.layers):
            x = block(self.heads, self.hidden, self.dtype, self.decode, name=f"h{i}")(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
        return embed.attend(x).astype(jnp.float32)


def make_batch(key: jax.Array, batch: int = 8, seq: int = 128, vocab: int = 8192) -> dict:
    """Random next-token data: ``tokens`` (batch, seq) and ``targets`` shifted by one."""
    t = jax.random.randint(key, (batch, seq + 1), 0, vocab)
    return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def loss_fn(apply: Callable[..., jax.Array], params: Any, batch: dict, *extra: Any) -> jax.Array:
    """Mean next-token cross entropy of ``apply(params, *extra, tokens)``."""
    logits = apply(params, *extra, batch["tokens"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


class ScanBlock(nn.Module):
    """One `Block` as an ``nn.scan`` body: ``(x, mask) -> (x, None)``."""

    heads: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, None]:
        return Block(self.heads, self.hidden, name="block")(x, mask), None


class ScanDecoder(nn.Module):
    """The benchmark decoder with its blocks stacked by ``nn.scan`` (kernel paths
    ``params/h/block/...`` with a leading layer axis); ``remat=True`` wraps each block in
    ``nn.remat``. ``offset`` is added to the embedded tokens (the floor's activation input)."""

    vocab: int = 8192
    d_model: int = 512
    heads: int = 8
    hidden: int = 2048
    layers: int = 6
    remat: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, offset: jax.Array | None = None) -> jax.Array:
        embed = nn.Embed(self.vocab, self.d_model, name="embed")
        x = embed(tokens)
        if offset is not None:
            x = x + offset
        mask = nn.make_causal_mask(tokens)
        stack = nn.scan(
            nn.remat(ScanBlock) if self.remat else ScanBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=self.layers,
        )
        x, _ = stack(self.heads, self.hidden, name="h")(x, mask)
        x = nn.LayerNorm(name="ln_f")(x)
        return embed.attend(x)
