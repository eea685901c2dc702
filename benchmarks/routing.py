"""Per-example routing: a batch of 16 through 8 different adapters in one jitted call.

Times, in one process with interleaved rounds (medians), forward passes of the benchmark
decoder (benchmarks/decoder.py: 6 blocks, d_model 512, LoRA rank 8 on q/k/v/out/fc1/fc2 of every
block, 36 kernels) on a batch of 16 sequences of 128 tokens:

- ``base``: the frozen model, no adapters;
- ``one adapter``: ``lora.wrap(apply)(params, adapters, tokens)``, every example through the same
  adapter (the target: routing costs at most 1.15x this);
- ``routed``: ``lora.wrap(apply)(params, stacked, tokens, lora_ids=ids)`` with 8 stacked adapters,
  example ``j`` through adapter ``j % 8``;
- ``loop over adapters``: what PEFT's ``adapter_names=`` does, a Python loop over the adapters,
  each running its own sub-batch (2 examples here) through the wrapped model, then the outputs
  put back in batch order.

Run: ``python -m benchmarks.routing`` (about 2 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import flax_lora as lora
from benchmarks.decoder import TARGETS, Decoder, make_batch


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = Decoder()
    tokens = make_batch(jax.random.key(0), batch=args.batch, seq=args.seq)["tokens"]
    params = model.init(jax.random.key(1), tokens[:1])
    probe = lambda p: model.apply(p, tokens[:1])
    sets = [
        lora.init(
            jax.random.key(10 + k),
            params,
            lora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS, init="random"),
            probe=probe,
        )
        for k in range(args.adapters)
    ]
    stacked = lora.stack(sets)
    ids = jnp.arange(args.batch) % args.adapters
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus; batch "
        f"{args.batch} x {args.seq} tokens, {args.adapters} adapters of rank 8 on "
        f"{len(jax.tree.leaves(sets[0])) // 2} kernels"
    )

    wrapped = jax.jit(lora.wrap(model.apply))
    base = jax.jit(model.apply)
    groups = [np.flatnonzero(np.asarray(ids) == k) for k in range(args.adapters)]
    order = np.argsort(np.concatenate(groups))

    def loop() -> jax.Array:
        outs = [wrapped(params, sets[k], tokens[g]) for k, g in enumerate(groups)]
        return jnp.concatenate(outs)[order]

    variants: dict[str, Callable[[], Any]] = {
        "base": lambda: base(params, tokens),
        "one adapter": lambda: wrapped(params, sets[0], tokens),
        "routed": lambda: wrapped(params, stacked, tokens, lora_ids=ids),
        "loop over adapters": loop,
    }
    for fn in variants.values():  # compile and warm up
        jax.block_until_ready(fn())

    # the routed output is right: each example against its own adapter's wrapped forward
    routed, looped = np.asarray(variants["routed"]()), np.asarray(loop())
    single = np.asarray(variants["one adapter"]())
    print(
        f"max |routed - loop over adapters| = {np.abs(routed - looped).max():.2e} (agreement); "
        f"max |routed - one adapter| = {np.abs(routed - single).max():.2e} (the adapters differ)"
    )

    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"\n{'forward':22s} {'median ms':>10s} {'x one adapter':>14s}")
    for name in variants:
        print(f"{name:22s} {med[name]:10.1f} {med[name] / med['one adapter']:14.3f}")
    print(
        f"\nrouted / one adapter: {med['routed'] / med['one adapter']:.3f} (target <= 1.15); "
        f"loop over adapters / routed: {med['loop over adapters'] / med['routed']:.2f}x "
        f"speed-up of routing; {args.rounds} interleaved rounds, total wall "
        f"{time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
