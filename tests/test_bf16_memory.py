"""A bfloat16 LoRA training step costs no more memory than gemma's LoRA, and stays exact enough.

On a small Gemma-like decoder (`benchmarks.bf16_memory.GemmaDecoder`: RMSNorm, grouped-query
attention, gated GELU MLP, tied embedding; 2 layers, d 128, MLP 512, batch 2x64), every
parameter and both factors in bfloat16, LoRA on q, k, v, o, gate, up, down:

- the compiled factored step's temporaries (XLA's memory analysis; deterministic for one XLA
  build, not a timing) are at most those of the same step with gemma's LoRA, re-implemented as
  gemma.peft writes it (`benchmarks.bf16_memory.GemmaStyleLora`: ``x @ a @ b`` by two matmuls in
  the factors' dtype, added to the base output);
- its logits and loss are within bfloat16 tolerance of a float32 reference: the model in
  float32 on kernels merged in float64 numpy from the same bfloat16 values (as close as the
  bfloat16 base model alone is to its own float32 run: the tolerance bfloat16 can give); its
  adapter gradients are close to those of the float32 merged model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from support.refs import ref_delta64

import flax_lora as lora
from benchmarks import bf16_memory as bm

CFG = bm.GemmaLike(vocab=512, d_model=128, heads=4, kv_heads=2, head_dim=32, hidden=512, layers=2)


def _setup() -> tuple[Any, Any, Any, dict]:
    batch = bm.make_batch(jax.random.key(0), CFG, batch=2, seq=64)
    model = bm.GemmaDecoder(CFG)
    params = model.init(jax.random.key(1), batch["tokens"])
    adapters = bm.make_adapters(jax.random.key(2), model, params, batch["tokens"], jnp.bfloat16)
    return model, params, adapters, batch


def _merged64(params: Any, adapters: Any) -> Any:
    """The params with every adapted kernel merged in float64 numpy (``W0 + scale a @ b``)."""
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    is_w = lambda x: hasattr(x, "kernel_shape")
    for path, w in jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_w)[0]:
        node = out
        for k in path[:-1]:
            node = node[k.key]
        last = path[-1].key
        node[last] = node[last] + ref_delta64(w.a, w.b, w.in_axes, w.scale)
    return out


def test_factored_bf16_step_temporaries_at_most_gemma_style() -> None:
    model, params, adapters, batch = _setup()
    step = bm.flax_lora_step(model.apply)
    ours = bm.memory(bm.compile_step(step, (adapters, bm.TX.init(adapters)), params, batch))

    ref = bm.GemmaDecoder(dataclasses.replace(CFG, lora_rank=bm.RANK))
    with_lora = bm.with_factors(params, adapters, jnp.bfloat16, lambda m: f"{m}_lora")
    frozen, trained = bm.split_flat(with_lora, lambda k: "_lora/" in k)
    assert len(trained) == 2 * 7 * CFG.layers  # a and b of every projection
    theirs = bm.memory(
        bm.compile_step(bm.split_step(ref.apply), (trained, bm.TX.init(trained)), frozen, batch)
    )
    assert ours[0] <= theirs[0], (ours, theirs)  # temp bytes
    assert ours[1] <= theirs[1], (ours, theirs)  # arguments + outputs + temp - aliased


def test_factored_bf16_outputs_within_bf16_tolerance_of_float32() -> None:
    model, params, adapters, batch = _setup()
    tokens = batch["tokens"]
    fn = lora.wrap(model.apply, mode="factored")
    logits = jax.jit(fn)(params, adapters, tokens)
    assert logits.dtype == jnp.float32  # the model's own cast of its logits

    model32 = bm.GemmaDecoder(dataclasses.replace(CFG, dtype=jnp.float32))
    as32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(model32.apply(as32(_merged64(params, adapters)), tokens), np.float64)
        base_ref = np.asarray(model32.apply(as32(params), tokens), np.float64)
    base16 = np.asarray(jax.jit(model.apply)(params, tokens), np.float64)
    scale = np.max(np.abs(ref))
    base_err = np.max(np.abs(base16 - base_ref)) / scale  # what bfloat16 alone costs
    err = np.max(np.abs(np.asarray(logits, np.float64) - ref)) / scale
    assert 0 < base_err < 0.02, base_err
    assert err < 2 * base_err, (err, base_err)
    assert float(jnp.max(jnp.abs(logits - base16))) > 10 * base_err * scale  # LoRA is not a no-op

    loss = float(bm.xent(logits, batch))
    labels = np.asarray(batch["targets"])
    z = ref - ref.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    loss64 = -np.take_along_axis(logp, labels[..., None], -1).mean()
    assert abs(loss - loss64) < 0.01 * abs(loss64), (loss, loss64)


def test_factored_bf16_gradients_match_merged_float32() -> None:
    """The adapters' gradients of the bf16 factored step against those of the float32 merged
    model at the same values (float32 base and factors)."""
    model, params, adapters, batch = _setup()
    fn = lora.wrap(model.apply, mode="factored")
    g16 = jax.jit(jax.grad(lambda a: bm.xent(fn(params, a, batch["tokens"]), batch)))(adapters)
    model32 = bm.GemmaDecoder(dataclasses.replace(CFG, dtype=jnp.float32))
    p32, ad32 = bm.cast(params, jnp.float32), bm.cast(adapters, jnp.float32)
    g32 = jax.jit(
        jax.grad(lambda a: bm.xent(model32.apply(lora.merge(p32, a), batch["tokens"]), batch))
    )(ad32)
    for got, want in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        assert got.dtype == jnp.bfloat16
        err = bm.rel_err(got, want)
        assert err < 0.05, err
