"""LoRA training step on a scan-stacked decoder (``nn.scan`` over the blocks, MaxText-style).

The benchmark decoder of `benchmarks.decoder` with its 6 blocks stacked by ``nn.scan`` (kernels
``(6, ...)``, one ``scan`` in the jaxpr). Times, medians of interleaved rounds in one process:

- full fine-tuning step (grad w.r.t. all params, adamw on all params);
- LoRA ``mode="merged"`` step (every layer's ``W0 + s * a @ b`` formed inside the scan);
- LoRA ``mode="factored"`` step (the scan rule: per-layer factored branches, no kernel formed);
- backprop to activations only (weights frozen): the floor of any LoRA step.

Run:  python benchmarks/scan_step.py [--rounds 5]   (about 2-4 minutes on 2 CPUs)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax

import flax_lora as lora
from benchmarks.decoder import ScanDecoder, loss_fn, make_batch

TARGETS = r".*/(query|key|value|out|fc1|fc2)/kernel"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = ScanDecoder()
    batch = make_batch(jax.random.key(0))
    tokens = batch["tokens"]
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    config = lora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
    adapters = lora.init(jax.random.key(2), params, config, probe=lambda p: model.apply(p, tokens))
    tx = optax.adamw(1e-4)

    def full(state: Any) -> Any:
        p, opt = state
        g = jax.grad(lambda q: loss_fn(model.apply, q, batch))(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt

    def lora_step(mode: str) -> Any:
        fn = lora.wrap(model.apply, mode=mode)

        def step(state: Any) -> Any:
            ad, opt = state
            g = jax.grad(lambda a: loss_fn(fn, params, batch, a))(ad)
            upd, opt = tx.update(g, opt, ad)
            return optax.apply_updates(ad, upd), opt

        return step

    offset = jnp.zeros((*tokens.shape, model.d_model), jnp.float32)

    def floor(state: Any) -> Any:
        (o,) = state
        g = jax.grad(lambda o: loss_fn(lambda p, t: model.apply(p, t, o), params, batch))(o)
        return (o + 0 * g,)

    variants = {
        "full fine-tuning": (jax.jit(full), (params, tx.init(params))),
        "LoRA merged": (jax.jit(lora_step("merged")), (adapters, tx.init(adapters))),
        "LoRA factored": (jax.jit(lora_step("factored")), (adapters, tx.init(adapters))),
        "floor (activations only)": (jax.jit(floor), (offset,)),
    }
    states = {}
    for name, (fn, state) in variants.items():
        t0 = time.perf_counter()
        states[name] = jax.block_until_ready(fn(state))
        print(f"compiled + first call {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (fn, _) in variants.items():
            t0 = time.perf_counter()
            states[name] = jax.block_until_ready(fn(states[name]))
            times[name].append(time.perf_counter() - t0)
    full_t = statistics.median(times["full fine-tuning"])
    print(f"\nscan-stacked decoder (6 blocks in one nn.scan), {args.rounds} interleaved rounds")
    print("| step | median time | / full fine-tuning |")
    print("|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t * 1e3:.0f} ms | {t / full_t:.2f} |")


if __name__ == "__main__":
    main()
