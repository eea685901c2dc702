"""Decode throughput with a KV cache: one adapter for the batch vs per-sequence adapters.

On the benchmark decoder (`benchmarks.decoder`, 6 blocks, d_model 512, vocab 8192) with a KV
cache, a batch of 16 sequences decodes ``--tokens`` tokens greedily, one jitted decode step per
token (``lora.wrap``, mode "auto"; LoRA r=8 on q, k, v, out, fc1, fc2 of every block):

- ``base``: the model without adapters;
- ``single``: one adapter set for the whole batch;
- ``routed4`` / ``routed16``: ``lora.stack`` of 4 / 16 different sets and ``lora_ids``, each
  sequence with its own set (4 sequences per set / one each), in the same one step per token;
- ``loop16``: the usual alternative to routing: the batch split into 16 sub-batches of one
  sequence, each decoded with its own set by the single-set step (16 calls per token).

Tokens per second of the whole batch are medians over interleaved rounds in one process, by
wall clock and by process CPU time (all threads: the steadier figure on a shared machine). The
last line is ``routed16/single <ratio>`` (CPU-time ratio of the per-token cost; target <= 1.25).

Run:  python benchmarks/generate.py [--tokens 32] [--rounds 5]   (about a minute on 2 CPUs)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

import flax_lora as lora
from benchmarks.decoder import TARGETS, Decoder
from benchmarks.train_step import timed

BATCH = 16


def decode_loop(apply: Callable[..., Any], params: Any, tokens: int) -> Callable[..., Any]:
    """A jitted greedy decode of ``tokens`` tokens: ``(cache, first (B, 1), *extra) -> tokens``,
    one ``apply`` per token inside a ``lax.fori_loop`` (the step compiled once)."""

    @jax.jit
    def run(cache: Any, first: jax.Array, *extra: Any, **kw: Any) -> jax.Array:
        out = jnp.zeros((first.shape[0], tokens), first.dtype)

        def body(t: jax.Array, carry: tuple) -> tuple:
            cache, tok, out = carry
            logits, state = apply({**params, "cache": cache}, *extra, tok, mutable=["cache"], **kw)
            nxt = jnp.argmax(logits[:, -1], axis=-1).astype(tok.dtype)[:, None]
            return state["cache"], nxt, out.at[:, t].set(nxt[:, 0])

        return jax.lax.fori_loop(0, tokens, body, (cache, first, out))[2]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"jax {jax.__version__} on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"{jax.devices()[0].platform}; batch {BATCH}, {args.tokens} tokens, KV cache "
        f"{args.tokens + 1}"
    )
    model = Decoder()
    decoding = Decoder(decode=True)
    prompt = jax.random.randint(jax.random.key(0), (BATCH, 1), 0, model.vocab)
    params = model.init(jax.random.key(1), prompt)
    length = jnp.zeros((BATCH, args.tokens + 1), jnp.int32)
    cache = decoding.init(jax.random.key(0), length)["cache"]
    cache1 = decoding.init(jax.random.key(0), length[:1])["cache"]
    probe = lambda p: model.apply(p, prompt)
    sets = [
        lora.init(
            jax.random.key(10 + i),
            params,
            lora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS, init="random"),
            probe=probe,
        )
        for i in range(16)
    ]
    fn = lora.wrap(decoding.apply)
    base = decode_loop(decoding.apply, params, args.tokens)
    one = decode_loop(fn, params, args.tokens)
    ids4 = jnp.arange(BATCH) % 4
    ids16 = jnp.arange(BATCH)
    stack4, stack16 = lora.stack(sets[:4]), lora.stack(sets)
    runs: dict[str, Callable[[], Any]] = {
        "base": lambda: base(cache, prompt),
        "single": lambda: one(cache, prompt, sets[0]),
        "routed4": lambda: one(cache, prompt, stack4, lora_ids=ids4),
        "routed16": lambda: one(cache, prompt, stack16, lora_ids=ids16),
        "loop16": lambda: [one(cache1, prompt[i : i + 1], sets[i]) for i in range(BATCH)],
    }
    for run in runs.values():  # compile, and check the routed runs agree with the loop
        jax.block_until_ready(run())
    routed, looped = runs["routed16"](), jnp.concatenate(runs["loop16"](), axis=0)
    agree = float(jnp.mean(routed == looped))
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(timed(run)[1:])  # (wall, CPU) seconds
    n = BATCH * args.tokens
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in times.items()
    }
    print(
        f"{'variant':<10} {'tokens/s (wall)':>16} {'tokens/s (cpu)':>15} {'cost/single (cpu)':>18}"
    )
    for name, (w, c) in med.items():
        print(f"{name:<10} {n / w:>16.0f} {n / c:>15.0f} {c / med['single'][1]:>18.3f}")
    print(f"routed16 tokens equal to the per-sequence loop's: {agree:.3f}")
    print(f"routed16/single {med['routed16'][1] / med['single'][1]:.3f}")


if __name__ == "__main__":
    main()
