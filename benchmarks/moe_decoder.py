"""The mixture-of-experts benchmark model: the GPT-style decoder of `benchmarks.decoder` with each
block's MLP replaced by a top-2 mixture of 8 experts (Linen), importable by any benchmark.

Each block: pre-LayerNorm causal attention (``nn.MultiHeadDotProductAttention``, 8 heads), then
``MoeMlp``: a bias-free ``router`` Dense (d -> E), top-``k`` experts per token with the softmax
of their logits as combine weights (Mixtral), and the expert MLPs
``silu(x @ w_in[e]) @ w_out[e]`` with kernels ``w_in (E, d, f)`` and ``w_out (E, f, d)``.
Kernel paths: ``params/h{i}/attn/{query,key,value,out}/kernel``, ``params/h{i}/moe/router/kernel``,
``params/h{i}/moe/experts/{w_in,w_out}``; the tied table ``params/embed/embedding``.

Two dispatch styles (``dispatch=``):

- ``"einsum"`` (GShard / Switch style, capacity-bounded): each expert gets ``C = ceil(capacity
  * T * k / E)`` slots, filled first-choice-first by a cumulative sum over the assignments;
  overflowing assignments are dropped. Tokens are gathered into ``(E, C, d)`` and the experts
  run as ``jnp.einsum("ecd,edf->ecf", xe, w_in)`` (the expert axis a batch dimension of
  ``dot_general``); outputs are scattered back, weighted.
- ``"ragged"`` (dropless, MaxText / megablox style): the ``T * k`` assignments sorted by expert,
  ``jax.lax.ragged_dot(xs, w_in, group_sizes)``, un-sorted by a scatter-add. Sharp edge: XLA:CPU
  (jax 0.10 and 0.12) lowers ``ragged_dot`` to a dense dot over a masked ``(E, T*k, d)``
  broadcast, i.e. ``E`` times the FLOPs of the grouped product; GPU and TPU get XLA's
  ``ragged_dot``. Compare ratios within one dispatch, not times across them, on CPU.

Example:
  >>> from benchmarks.moe_decoder import MoeDecoder
  >>> from benchmarks.decoder import make_batch, loss_fn
  >>> model = MoeDecoder(dispatch="ragged")
  >>> batch = make_batch(jax.random.key(0))
  >>> params = model.init(jax.random.key(1), batch["tokens"])
  >>> loss = loss_fn(model.apply, params, batch)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

#: LoRA targets of issue 16: attention (q, k, v, out) and both expert kernels of every block
TARGETS = r".*/attn/(query|key|value|out)/kernel|.*/experts/w_(in|out)"
#: the expert kernels, for checking the adapters' layout
EXPERT_KERNELS = r".*/experts/w_(in|out)"


def top_k_routing(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(combine weights (T, k), experts (T, k))``: the softmax of each token's top-k logits."""
    top, experts = jax.lax.top_k(logits, k)
    return jax.nn.softmax(top.astype(jnp.float32), axis=-1), experts


def capacity_dispatch(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    capacity: float,
) -> jax.Array:
    """GShard-style: ``C`` slots per expert, first choices first, overflow dropped; the experts
    run as batched einsums over ``(E, C, d)``."""
    (t, k), e = experts.shape, w_in.shape[0]
    slots = max(1, math.ceil(capacity * t * k / e))
    flat_e = experts.T.reshape(-1)  # choice-major: every token's first choice before any second
    token = jnp.tile(jnp.arange(t), k)
    onehot = jax.nn.one_hot(flat_e, e, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    keep = position < slots
    slot = jnp.where(keep, flat_e * slots + position, e * slots)  # e * slots: the dropped bin
    xe = jnp.zeros((e * slots + 1, x.shape[-1]), x.dtype).at[slot].set(x[token])
    xe = xe[:-1].reshape(e, slots, -1)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe, w_in))
    ye = jnp.einsum("ecf,efd->ecd", h, w_out).reshape(e * slots, -1)
    ye = jnp.concatenate([ye, jnp.zeros((1, ye.shape[-1]), ye.dtype)])
    gate = jnp.where(keep, weights.T.reshape(-1), 0.0).astype(ye.dtype)
    return jnp.zeros_like(x).at[token].add(ye[slot] * gate[:, None])


def ragged_dispatch(
    x: jax.Array, weights: jax.Array, experts: jax.Array, w_in: jax.Array, w_out: jax.Array
) -> jax.Array:
    """Dropless: assignments sorted by expert, two ``ragged_dot`` with the group sizes."""
    k = experts.shape[-1]
    flat_e = experts.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    token = order // k
    sizes = jnp.bincount(flat_e, length=w_in.shape[0]).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(x[token], w_in, sizes))
    y = jax.lax.ragged_dot(h, w_out, sizes)
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[token].add(y)


class MoeMlp(nn.Module):
    """A top-``k`` mixture of ``experts`` MLPs of width ``hidden`` (see the module docstring)."""

    experts: int = 8
    hidden: int = 1024
    k: int = 2
    dispatch: str = "einsum"
    capacity: float = 1.25
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x2 = x.reshape(-1, d)
        logits = nn.Dense(self.experts, use_bias=False, dtype=self.dtype, name="router")(x2)
        weights, chosen = top_k_routing(logits, self.k)
        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        # the expert kernels live under "experts", as PyTorch's experts.w_in / experts.w_out
        w_in, w_out = _Experts(self.experts, d, self.hidden, init, name="experts")()
        w_in, w_out = w_in.astype(self.dtype), w_out.astype(self.dtype)
        if self.dispatch == "ragged":
            y = ragged_dispatch(x2, weights, chosen, w_in, w_out)
        elif self.dispatch == "einsum":
            y = capacity_dispatch(x2, weights, chosen, w_in, w_out, self.capacity)
        else:
            raise ValueError(f"dispatch {self.dispatch!r}: 'einsum' or 'ragged'")
        return y.reshape(x.shape)


class _Experts(nn.Module):
    """Holds ``w_in (E, d, f)`` and ``w_out (E, f, d)``; calling it returns them."""

    num: int
    d: int
    hidden: int
    init: Any

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        w_in = self.param("w_in", self.init, (self.num, self.d, self.hidden))
        return w_in, self.param("w_out", self.init, (self.num, self.hidden, self.d))


class MoeBlock(nn.Module):
    heads: int
    experts: int
    hidden: int
    k: int
    dispatch: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, dtype=self.dtype, deterministic=True, name="attn"
        )
        x = x + attn(h, h, mask=mask)
        h = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
        moe = MoeMlp(self.experts, self.hidden, self.k, self.dispatch, dtype=self.dtype, name="moe")
        return x + moe(h)


class MoeDecoder(nn.Module):
    """GPT-style decoder with mixture-of-experts MLPs: tied embedding, ``layers`` pre-LN blocks,
    logits via ``attend``. ``offset`` is added to the embedded tokens (the floor's input)."""

    vocab: int = 8192
    d_model: int = 512
    heads: int = 8
    experts: int = 8
    hidden: int = 1024
    k: int = 2
    layers: int = 6
    dispatch: str = "einsum"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, offset: jax.Array | None = None) -> jax.Array:
        embed = nn.Embed(self.vocab, self.d_model, dtype=self.dtype, name="embed")
        x = embed(tokens)
        if offset is not None:
            x = x + offset
        mask = nn.make_causal_mask(tokens)
        for i in range(self.layers):
            block = MoeBlock(
                self.heads,
                self.experts,
                self.hidden,
                self.k,
                self.dispatch,
                self.dtype,
                name=f"h{i}",
            )
            x = block(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
        return embed.attend(x).astype(jnp.float32)
