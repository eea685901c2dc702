"""Trace and compile time of a LoRA training step vs full fine-tuning, by depth, Linen and NNX.

An unrolled GPT-style decoder (d_model 256, 4 heads, MLP 1024, vocab 4096, batch 2x64; Linen:
`benchmarks.decoder.Decoder`, NNX: `NnxDecoder` below) with 4 / 12 / 24 / 48 blocks. For each
depth, in one process (no persistent compilation cache), each function new:

- ``full``: ``jax.jit(step).lower(...)`` then ``.compile()`` of the full fine-tuning step
  (grad w.r.t. all params, adamw);
- ``lora``: ``lora.init`` with a probe (LoRA r=8 on q, k, v, out, fc1, fc2 of every block) +
  ``jax.jit(step).lower(...)`` + ``.compile()`` of the LoRA step (``lora.wrap``, mode "auto");
- ``lora again``: the same a second time (a new ``lora.init`` and ``lora.wrap`` on the same
  model shapes), as a restarted run in the same process does.

Printed: seconds (trace+lower / compile) and the ratios LoRA/full. Targets of the compile-time
issue: LoRA <= 1.15x full at 12 and 24 blocks; the second call <= 1.05x.

Run:  python benchmarks/compile.py [--blocks 4 12 24 48] [--faces linen nnx]
      (several minutes on 2 CPUs at 48 blocks)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flax_lora as lora
from benchmarks.decoder import Decoder, loss_fn

D, HEADS, HIDDEN, VOCAB, BATCH, SEQ = 256, 4, 1024, 4096, 2, 64
TARGETS = r".*/(query|key|value|out|fc1|fc2)/kernel"


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, D, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class NnxDecoder(nnx.Module):
    """The NNX twin of the Linen decoder: tied embedding, ``layers`` pre-LN blocks."""

    def __init__(self, layers: int, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.ln_f(x))


def model_of(face: str, layers: int) -> tuple[Callable[..., Any], Any]:
    """``(apply(params, tokens), params)`` of a new model of ``layers`` blocks."""
    tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
    if face == "linen":
        m = Decoder(vocab=VOCAB, d_model=D, heads=HEADS, hidden=HIDDEN, layers=layers)
        return m.apply, jax.jit(m.init)(jax.random.key(0), tokens)
    graphdef, state = nnx.split(NnxDecoder(layers, nnx.Rngs(0)))
    return (lambda s, t: nnx.merge(graphdef, s)(t)), state


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def full_cost(apply: Callable[..., Any], params: Any, batch: dict) -> tuple[float, float]:
    tx = optax.adamw(1e-4)

    def step(state: tuple) -> tuple:
        p, opt = state
        g = jax.grad(lambda q: loss_fn(apply, q, batch))(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt

    lowered, t_lower = timed(lambda: jax.jit(step).lower((params, tx.init(params))))
    _, t_compile = timed(lowered.compile)
    return t_lower, t_compile


def lora_cost(apply: Callable[..., Any], params: Any, batch: dict) -> tuple[float, float]:
    tx = optax.adamw(1e-4)
    tokens = batch["tokens"]

    def lower() -> Any:
        config = lora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
        adapters = lora.init(jax.random.key(1), params, config, probe=lambda p: apply(p, tokens))
        fn = lora.wrap(apply)

        def step(state: tuple) -> tuple:
            ad, opt = state
            g = jax.grad(lambda a: loss_fn(lambda p, t: fn(p, a, t), params, batch))(ad)
            upd, opt = tx.update(g, opt, ad)
            return optax.apply_updates(ad, upd), opt

        return jax.jit(step).lower((adapters, tx.init(adapters)))

    lowered, t_lower = timed(lower)
    _, t_compile = timed(lowered.compile)
    return t_lower, t_compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 12, 24, 48])
    parser.add_argument("--faces", nargs="+", default=["linen", "nnx"])
    args = parser.parse_args()
    print(
        f"jax {jax.__version__} on {platform.machine()} ({os.cpu_count()} CPUs); d_model {D}, "
        f"batch {BATCH}x{SEQ}; seconds: trace+lower / compile"
    )
    tokens = jax.random.randint(jax.random.key(2), (BATCH, SEQ + 1), 0, VOCAB)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    cols = ("full", "lora", "lora again")
    print(
        f"{'face':<6} {'blocks':>6} "
        + " ".join(f"{c:>13}" for c in cols)
        + f" {'lora/full':>10} {'again/full':>11}"
    )
    for face in args.faces:  # warm-up: JAX's one-time costs (first lowering, first compile)
        apply, params = model_of(face, 1)
        full_cost(apply, params, batch)
        lora_cost(apply, params, batch)
    for face in args.faces:
        for n in args.blocks:
            apply, params = model_of(face, n)
            full = full_cost(apply, params, batch)
            first = lora_cost(apply, params, batch)
            again = lora_cost(apply, params, batch)
            fmt = lambda c: f"{c[0]:5.2f} / {c[1]:5.2f}"
            print(
                f"{face:<6} {n:>6} {fmt(full):>13} {fmt(first):>13} {fmt(again):>13} "
                f"{sum(first) / sum(full):>10.2f} {sum(again) / sum(full):>11.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
